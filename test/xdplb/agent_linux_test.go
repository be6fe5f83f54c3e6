package xdplb

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/test/harness"
)

// shuntd is one agent process in the node namespace (a "node" of its own:
// its own bpffs folder, API socket and state), with its socket LB attached
// to the node's cgroup, which holds no pod: clients in pods reach the VIPs
// through the network only.
type shuntd struct {
	t        *testing.T
	c        *lbCluster
	name     string
	cfg      string
	socket   string
	state    string
	root     string
	bin, ctl string
	proc     *harness.Proc
}

func (c *lbCluster) startAgent(name, xdpYAML string) *shuntd {
	c.t.Helper()
	bin, ctl := harness.AgentBinaries(c.t)
	dir := c.t.TempDir()
	a := &shuntd{t: c.t, c: c, name: name, socket: filepath.Join(dir, "sock"), state: filepath.Join(dir, "state.json"),
		root: filepath.Join(c.env.BPFFSPath(), "agent-"+name), bin: bin, ctl: ctl, cfg: filepath.Join(dir, "shunt.yaml")}
	yaml := fmt.Sprintf("datapath:\n  bpffsRoot: %s\n  cgroup: %s\nxdp:\n%s", a.root, c.env.Node().CgroupPath(), xdpYAML)
	if err := os.WriteFile(a.cfg, []byte(yaml), 0o600); err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() {
		if a.proc != nil {
			a.proc.Kill()
			<-a.proc.Done()
		}
		exec.Command(ctl, "cleanup", "--bpffs-root", a.root).Run()
	})
	a.start()
	return a
}

func (a *shuntd) start() {
	a.t.Helper()
	a.proc = a.c.env.Node().StartCmd(harness.ProcOpts{}, a.bin, "-config", a.cfg, "-api-socket", a.socket,
		"-state-file", a.state, "-metrics-addr=", "-log-level", "debug")
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := a.ctlErr("status"); err == nil {
			return
		}
		select {
		case <-a.proc.Done():
			a.t.Fatalf("shuntd %s exited: %s", a.name, a.proc.Stderr())
		default:
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("shuntd %s API did not come up: %s", a.name, a.proc.Stderr())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (a *shuntd) ctlErr(args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.Command(a.ctl, append([]string{"--socket", a.socket}, args...)...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func (a *shuntd) run(args ...string) string {
	a.t.Helper()
	out, err := a.ctlErr(args...)
	if err != nil {
		a.t.Fatalf("shuntctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// metrics scrapes /metrics over the API socket.
func (a *shuntd) metrics() string {
	a.t.Helper()
	hc := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", a.socket)
	}}}
	resp, err := hc.Get("http://shuntd/metrics")
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestAgentXDP runs the load balancer and the backend sides as shuntd
// processes configured by YAML and driven by shuntctl: a maglev service
// reaches the backends, `shuntctl lb which` agrees with the Go Maglev pick,
// every node's table fingerprint equals `shuntctl maglev table`'s, the
// counters are exported, and 50 requests across a kill -9 and restart of
// the load balancer's agent all succeed.
func TestAgentXDP(t *testing.T) {
	c := newTopology(t)
	pass, err := xdp.Open(xdp.Config{}, "", nil) // only for its XDP_PASS program
	if err != nil {
		t.Fatal(err)
	}
	defer pass.Close()
	c.attachPeerPass(pass.PassProgram())
	lbYAML := fmt.Sprintf("  devices: [eth0]\n  netns: %s\n  seed: %s\n  tableSize: 251\n  nodeAddr: %s\n  maxFlows: 16384\n  maxBackends: 256\n  maxServices: 64\n",
		c.lbPod.NetNSPath(), e2eSeed, c.lbPod.IPv4())
	lb := c.startAgent("lb", lbYAML)
	agents := []*shuntd{lb}
	for _, p := range c.backends {
		agents = append(agents, c.startAgent(p.Name(), fmt.Sprintf("  dsrDevices: [eth0]\n  netns: %s\n  seed: %s\n  tableSize: 251\n  maxFlows: 16384\n  maxBackends: 256\n  maxServices: 64\n", p.NetNSPath(), e2eSeed)))
	}
	var bl []string
	for _, b := range c.backendsOf(8080, false, false) {
		bl = append(bl, b.Addr.String())
	}
	const vip = "10.96.0.50:80"
	for _, a := range agents {
		a.run("service", "update", "--name", "web", "--frontend", vip, "--backends", strings.Join(bl, ","),
			"--algorithm", "maglev", "--mode", "dsr", "--dispatch", "geneve")
	}
	r := c.connect("--target", vip, "--proto", "tcp", "--count", "30", "--echo", "5000")
	if r.OK != 30 || len(r.Backends) < 2 {
		t.Fatalf("through shuntd: %d ok, %d failed (%v), backends %v", r.OK, r.Fail, r.Errors, r.Backends)
	}

	// lb which runs the loaded program; it must agree with mesh/maglev.
	svc := xdp.Service{Backends: c.backendsOf(8080, false, false)}
	for i := 0; i < 20; i++ {
		src := netip.AddrPortFrom(c.client.IPv4(), uint16(50000+i))
		out := lb.run("lb", "which", "--bpffs-root", lb.root, "tcp", src.String(), vip)
		want := tableOwner(t, svc, src, ap(vip))
		if !strings.Contains(out, "backend "+want+" via geneve") {
			t.Errorf("lb which %s: %q, want backend %s", src, out, want)
		}
	}

	// Every node built the same table, and so does shuntctl maglev table.
	fp := regexp.MustCompile(`fingerprint ([0-9a-f]{16})`).FindStringSubmatch(lb.run("maglev", "table", "--seed", e2eSeed, "--size", "251", "--backends", strings.Join(bl, ",")))
	if fp == nil {
		t.Fatal("maglev table printed no fingerprint")
	}
	for _, a := range agents {
		if st := a.run("lb", "status"); !strings.Contains(st, fp[1]) {
			t.Errorf("%s: lb status does not show table fingerprint %s:\n%s", a.name, fp[1], st)
		}
	}
	m := lb.metrics()
	for _, series := range []string{`shunt_xdp_packets_total{verdict="tx_geneve"}`, `shunt_xdp_service_flows_total{frontend="10.96.0.50:80/tcp",service="web"}`,
		`shunt_xdp_table_info{fingerprint="` + fp[1] + `"`} {
		if !strings.Contains(m, series) {
			t.Errorf("metrics lack %s", series)
		}
	}
	if !strings.Contains(agents[1].metrics(), `shunt_dsr_events_total{event="in_geneve"}`) {
		t.Error("backend metrics lack shunt_dsr_events_total")
	}

	// kill -9 and restart the load balancer's agent during 50 requests.
	done := make(chan harness.ConnectResult, 1)
	go func() {
		r, _ := c.client.Connect(harness.ProcOpts{Timeout: time.Minute}, "--target", vip, "--proto", "tcp", "--count", "50", "--interval", "40ms", "--echo", "1000")
		done <- r
	}()
	time.Sleep(500 * time.Millisecond)
	if err := lb.proc.Kill(); err != nil {
		t.Fatal(err)
	}
	<-lb.proc.Done()
	time.Sleep(300 * time.Millisecond)
	lb.start()
	if r := <-done; r.OK != 50 || r.Fail != 0 {
		t.Errorf("across an agent kill -9 and restart: %d ok, %d failed: %v", r.OK, r.Fail, r.Errors)
	}
	if st := lb.run("lb", "status"); !strings.Contains(st, fp[1]) {
		t.Errorf("after restart, lb status lacks fingerprint %s:\n%s", fp[1], st)
	}
}
