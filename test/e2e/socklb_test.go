package e2e

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/shuntmesh/shunt/test/harness"
)

// cluster is a node with three backend pods serving TCP and UDP on v4 and
// v6, and one client pod.
type cluster struct {
	env      *harness.Env
	backends []*harness.Pod
	client   *harness.Pod
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	env := harness.New(t)
	c := &cluster{env: env}
	for i := 0; i < 3; i++ {
		p := env.NewPod(fmt.Sprintf("be%d", i))
		for _, proto := range []string{"tcp", "udp"} {
			pr := p.Start(harness.ProcOpts{}, "serve", "--id", fmt.Sprintf("be%d", i), "--proto", proto,
				"--listen", "0.0.0.0:8080", "--listen", "[::]:8080")
			if err := pr.WaitReady(); err != nil {
				t.Fatal(err)
			}
		}
		c.backends = append(c.backends, p)
	}
	c.client = env.NewPod("client")
	return c
}

func (c *cluster) backendList(v6 bool) string {
	var out []string
	for _, p := range c.backends {
		a := p.IPv4()
		if v6 {
			a = p.IPv6()
		}
		out = append(out, netip.AddrPortFrom(a, 8080).String())
	}
	return strings.Join(out, ",")
}

func connect(t *testing.T, p *harness.Pod, args ...string) harness.ConnectResult {
	t.Helper()
	r, err := p.Connect(harness.ProcOpts{Timeout: 2 * time.Minute}, args...)
	if err != nil {
		t.Fatalf("connect %v: %v", args, err)
	}
	return r
}

// within checks that got is within k standard deviations of a binomial
// expectation n*p.
func within(t *testing.T, what string, got, n int, p float64) {
	t.Helper()
	mean := float64(n) * p
	sd := math.Sqrt(float64(n) * p * (1 - p))
	if math.Abs(float64(got)-mean) > 5*sd {
		t.Errorf("%s: %d of %d, expected %.0f ± %.0f (5σ)", what, got, n, mean, 5*sd)
	}
}

func TestSocketLBTranslatesTCPAndUDP(t *testing.T) {
	c := newCluster(t)
	a := newAgent(t, c.env, "")
	for _, tc := range []struct {
		name, frontend, proto, udpMode string
		v6                             bool
	}{
		{"tcp4", "10.96.0.10:80", "tcp", "", false},
		{"tcp6", "[fd00:96::10]:80", "tcp", "", true},
		{"udp4-connected", "10.96.0.11:53", "udp", "connected", false},
		{"udp4-unconnected", "10.96.0.11:53", "udp", "unconnected", false},
		{"udp6-connected", "[fd00:96::11]:53", "udp", "connected", true},
		{"udp6-unconnected", "[fd00:96::11]:53", "udp", "unconnected", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a.ctl("service", "update", "--frontend", tc.frontend, "--protocol", tc.proto, "--backends", c.backendList(tc.v6))
			args := []string{"--target", tc.frontend, "--proto", tc.proto, "--count", "60"}
			if tc.udpMode != "" {
				args = append(args, "--udp", tc.udpMode)
			}
			r := connect(t, c.client, args...)
			if r.Fail != 0 || r.OK != 60 {
				t.Fatalf("%d ok, %d failed: %v", r.OK, r.Fail, r.Errors)
			}
			for id := range r.Backends {
				if !strings.HasPrefix(id, "be") {
					t.Errorf("answered by %q, not a backend", id)
				}
			}
			// The application never sees a backend address: getpeername
			// (connected) and recvfrom's source (unconnected) show the VIP.
			seen := r.Peers
			if tc.udpMode == "unconnected" {
				seen = r.Sources
			}
			for addr, n := range seen {
				if addr != tc.frontend {
					t.Errorf("app saw peer %s (%d times), want the VIP %s", addr, n, tc.frontend)
				}
			}
			if tc.udpMode != "unconnected" && len(r.Backends) < 2 {
				t.Errorf("60 connections all went to %v: not balanced", r.Backends)
			}
		})
	}
	if v := a.metric(`shunt_service_translations_total{frontend="10.96.0.10:80/tcp",service="10.96.0.10:80/tcp"}`); v != "60" {
		t.Errorf("translations metric for the tcp4 service = %q, want 60", v)
	}
}

func TestSocketLBSpreadWeightsDrain(t *testing.T) {
	c := newCluster(t)
	a := newAgent(t, c.env, "")
	vip := "10.96.0.20:80"
	const n = 600
	a.ctl("service", "update", "--frontend", vip, "--backends", c.backendList(false))
	r := connect(t, c.client, "--target", vip, "--count", fmt.Sprint(n))
	if r.OK != n {
		t.Fatalf("spread: %d of %d ok: %v", r.OK, n, r.Errors)
	}
	for i := 0; i < 3; i++ {
		within(t, fmt.Sprintf("equal weights, be%d", i), r.Backends[fmt.Sprintf("be%d", i)], n, 1.0/3)
	}

	a.ctl("service", "update", "--frontend", vip, "--backends", c.backendList(false), "--weights", "1,2,3")
	r = connect(t, c.client, "--target", vip, "--count", fmt.Sprint(n))
	for i, w := range []float64{1, 2, 3} {
		within(t, fmt.Sprintf("weights 1:2:3, be%d", i), r.Backends[fmt.Sprintf("be%d", i)], n, w/6)
	}

	// Drain be0 while a connection to it is open: no new connection reaches
	// it, the open one keeps working.
	a.ctl("service", "update", "--frontend", vip, "--backends", c.backendList(false), "--weights", "1,0,0")
	long := c.client.Start(harness.ProcOpts{}, "stream", "--target", vip, "--bytes", "8388608", "--chunk", "1024", "--rate-pause", "2ms")
	time.Sleep(300 * time.Millisecond)
	a.ctl("service", "update", "--frontend", vip, "--backends", c.backendList(false), "--weights", "0,1,1")
	r = connect(t, c.client, "--target", vip, "--count", "200")
	if r.OK != 200 || r.Backends["be0"] != 0 {
		t.Errorf("after draining be0: %v ok=%d errors=%v", r.Backends, r.OK, r.Errors)
	}
	out, err := long.Stop()
	var sr harness.StreamResult
	if jerr := json.Unmarshal(lastLine(out), &sr); jerr != nil || err != nil || !sr.OK || sr.Backend != "be0" {
		t.Errorf("connection open during the drain: err=%v result=%+v (%s)", err, sr, out)
	}

	// Terminating backends serve only when no active one is left.
	a.ctl("service", "update", "--frontend", vip, "--backends", c.backendList(false), "--states", "terminating,active,terminating")
	r = connect(t, c.client, "--target", vip, "--count", "100")
	if r.Backends["be1"] != 100 {
		t.Errorf("with one active backend every connection goes to it: %v", r.Backends)
	}
	a.ctl("service", "update", "--frontend", vip, "--backends", c.backendList(false), "--states", "terminating,terminating,terminating")
	r = connect(t, c.client, "--target", vip, "--count", "100")
	if r.OK != 100 || len(r.Backends) < 2 {
		t.Errorf("only terminating backends left: they must serve: %v %v", r.Backends, r.Errors)
	}
}

func lastLine(b []byte) []byte {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return []byte(lines[len(lines)-1])
}

func TestSocketLBNoBackendRefusesAtOnce(t *testing.T) {
	c := newCluster(t)
	a := newAgent(t, c.env, `
services:
  - name: empty
    frontend: 10.96.0.30:80
    backends: []
  - name: empty-udp
    frontend: 10.96.0.30:53
    protocol: udp
    backends: []
  - name: empty6
    frontend: "[fd00:96::30]:80"
    backends: []
`)
	for _, args := range [][]string{
		{"--target", "10.96.0.30:80"},
		{"--target", "[fd00:96::30]:80"},
		{"--target", "10.96.0.30:53", "--proto", "udp", "--udp", "connected"},
		{"--target", "10.96.0.30:53", "--proto", "udp", "--udp", "unconnected"},
	} {
		// A hanging connect would end in the harness's TIMEOUT label, so
		// five ECONNREFUSED prove the refusal came from the hook, not a hang.
		r := connect(t, c.client, append(args, "--count", "5", "--timeout", "10s")...)
		if r.Errors["ECONNREFUSED"] != 5 {
			t.Errorf("%v: want 5× ECONNREFUSED, got ok=%d errors=%v", args, r.OK, r.Errors)
		}
	}
	if v := a.metric(`shunt_service_no_backend_total{frontend="10.96.0.30:80/tcp",service="empty"}`); v != "5" {
		t.Errorf("no-backend metric = %q, want 5", v)
	}
}

func TestHostNamespaceOnly(t *testing.T) {
	c := newCluster(t)
	// The kernel path for the VIP: the node owns 10.96.0.40 and serves it
	// itself, standing in for what balances a bypassed pod's traffic (its
	// sidecar via xDS, or kube-proxy rules). A pod reaching "vip-kernel"
	// proves its socket was left untouched.
	node := c.env.Node()
	if out, err := node.Exec("ip", "addr", "add", "10.96.0.40/32", "dev", "lo"); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	srv := node.Start(harness.ProcOpts{}, "serve", "--id", "vip-kernel", "--proto", "tcp", "--listen", "10.96.0.40:80")
	if err := srv.WaitReady(); err != nil {
		t.Fatal(err)
	}
	bypassed := c.env.NewPod("bypass")
	translated := c.env.NewPod("xlate")
	a := newAgent(t, c.env, fmt.Sprintf(`
socketLB:
  hostNamespaceOnly: true
services:
  - name: web
    frontend: 10.96.0.40:80
    backends: [{addr: "%s:8080"}, {addr: "%s:8080"}]
pods:
  - name: default/bypass
    netns: %s
  - name: default/xlate
    netns: %s
    socketLB: translate
`, c.backends[0].IPv4(), c.backends[1].IPv4(), bypassed.NetNSPath(), translated.NetNSPath()))

	check := func(p *harness.Pod, wantKernel bool) {
		t.Helper()
		r := connect(t, p, "--target", "10.96.0.40:80", "--count", "20")
		if r.OK != 20 {
			t.Fatalf("%s: %d ok: %v", p.Name(), r.OK, r.Errors)
		}
		if wantKernel && r.Backends["vip-kernel"] != 20 {
			t.Errorf("%s: socket must see the VIP untouched (kernel path), got %v", p.Name(), r.Backends)
		}
		if !wantKernel && r.Backends["vip-kernel"] != 0 {
			t.Errorf("%s: socket must be translated to a backend, got %v", p.Name(), r.Backends)
		}
	}
	check(bypassed, true)    // enrolled, inherits hostNamespaceOnly=true
	check(c.client, true)    // not enrolled: global setting
	check(translated, false) // per-pod override
	check(node, false)       // the node's own sockets are always translated
	if v := a.metric(`shunt_datapath_events_total{event="bypass_netns"}`); v == "" || v == "0" {
		t.Errorf("bypass counter = %q", v)
	}

	// Per pod, the other way round: global off, one pod bypassed.
	a.ctl("pod", "update", "--name", "default/bypass", "--netns", bypassed.NetNSPath(), "--socket-lb", "bypass")
	a.ctl("pod", "update", "--name", "default/xlate", "--netns", translated.NetNSPath(), "--socket-lb", "inherit")
	cfg, _ := os.ReadFile(a.cfgPath)
	os.WriteFile(a.cfgPath, []byte(strings.Replace(string(cfg), "hostNamespaceOnly: true", "hostNamespaceOnly: false", 1)), 0o600)
	a.proc.Stop()
	a.start()
	check(bypassed, true)
	check(translated, false)
	check(c.client, false)
}

func TestAgentKill9AndRestartLoseNothing(t *testing.T) {
	c := newCluster(t)
	a := newAgent(t, c.env, "")
	vip := "10.96.0.50:80"
	a.ctl("service", "update", "--frontend", vip, "--backends", c.backendList(false))
	// An established connection carrying data across the whole episode.
	long := c.client.Start(harness.ProcOpts{}, "stream", "--target", vip, "--bytes", "16777216", "--chunk", "4096", "--rate-pause", "1ms")
	loop := c.client.Start(harness.ProcOpts{}, "connect", "--target", vip, "--duration", "6s", "--interval", "2ms")
	time.Sleep(time.Second)
	a.kill9()
	time.Sleep(time.Second) // agent down: the pinned links keep translating
	a.start()
	time.Sleep(500 * time.Millisecond)
	a.kill9()
	a.start()
	err := loop.Wait()
	out := loop.Stdout()
	var r harness.ConnectResult
	if jerr := json.Unmarshal(lastLine(out), &r); jerr != nil || err != nil {
		t.Fatalf("connect loop: %v %v %s", err, jerr, out)
	}
	if r.Fail != 0 || r.OK < 100 {
		t.Errorf("connect loop across two kill -9 + restarts: ok=%d fail=%d %v", r.OK, r.Fail, r.Errors)
	}
	sout, err := long.Stop()
	var sr harness.StreamResult
	if jerr := json.Unmarshal(lastLine(sout), &sr); jerr != nil || err != nil || !sr.OK {
		t.Errorf("established stream across restarts: %v %+v %s", err, sr, sout)
	}
	st := a.ctl("status")
	if !strings.Contains(st, "adopted pinned state: true") {
		t.Errorf("restarted agent did not adopt the pinned state:\n%s", st)
	}
}

func TestBadInputLeavesStateUnchanged(t *testing.T) {
	c := newCluster(t)
	a := newAgent(t, c.env, `
datapath:
  maxServices: 2
`)
	a.ctl("service", "update", "--name", "one", "--frontend", "10.96.0.60:80", "--backends", c.backendList(false))
	before := a.ctl("service", "list")
	for _, args := range [][]string{
		{"--name", "one", "--frontend", "10.96.0.60:80", "--backends", "10.244.0.1:80,10.244.0.1:80"},
		{"--name", "one", "--frontend", "10.96.0.60:80", "--backends", "10.244.0.1:80", "--weights", "x"},
		{"--name", "one", "--frontend", "10.96.0.60:80", "--backends", "10.244.0.1:80", "--weights", "99999999"},
		{"--name", "one", "--frontend", "300.1.1.1:80", "--backends", "10.244.0.1:80"},
		{"--name", "one", "--frontend", "10.96.0.60:80", "--backends", "[fd00::1]:80"},
		{"--name", "two", "--frontend", "10.96.0.60:80", "--backends", "10.244.0.1:80"}, // duplicate frontend
	} {
		out, err := a.ctlErr(append([]string{"service", "update"}, args...)...)
		if err == nil {
			t.Errorf("accepted %v: %s", args, out)
		}
	}
	if after := a.ctl("service", "list"); after != before {
		t.Errorf("refused updates changed the state:\n%s\nvs\n%s", before, after)
	}
	// A full services map: the caller gets an error, the metric counts it,
	// and nothing of the refused change is written.
	a.ctl("service", "update", "--name", "two", "--frontend", "10.96.0.61:80", "--backends", c.backendList(false))
	before = a.ctl("service", "list")
	out, err := a.ctlErr("service", "update", "--name", "three", "--frontend", "10.96.0.62:80", "--backends", c.backendList(false))
	if err == nil || !strings.Contains(out, "capacity") {
		t.Errorf("third service in a 2-entry map: err=%v %s", err, out)
	}
	if after := a.ctl("service", "list"); after != before {
		t.Errorf("refused capacity change altered state:\n%s\nvs\n%s", before, after)
	}
	if v := a.metric("shunt_map_capacity_errors_total"); v != "1" {
		t.Errorf("capacity error metric = %q, want 1", v)
	}
	r := connect(t, c.client, "--target", "10.96.0.60:80", "--count", "10")
	if r.OK != 10 {
		t.Errorf("existing service broken by a refused change: %v", r.Errors)
	}
}

func TestRestartAdoptsAndMigratesAndRefusesForeignLayout(t *testing.T) {
	c := newCluster(t)
	a := newAgent(t, c.env, "")
	vip := "10.96.0.70:80"
	a.ctl("service", "update", "--frontend", vip, "--backends", c.backendList(false))
	a.proc.Stop()

	// A new capacity: the slots map is migrated and the service survives.
	cfg, _ := os.ReadFile(a.cfgPath)
	os.WriteFile(a.cfgPath, append(cfg, []byte("  maxSlots: 4096\n")...), 0o600)
	a.start()
	if !strings.Contains(a.ctl("status"), "4096") {
		t.Errorf("slots map not resized:\n%s", a.ctl("status"))
	}
	if r := connect(t, c.client, "--target", vip, "--count", "10"); r.OK != 10 {
		t.Errorf("service lost in migration: %v", r.Errors)
	}
	a.proc.Stop()

	// A pinned layout of another version is refused with a clear error.
	meta, err := ebpf.LoadPinnedMap(filepath.Join(c.env.BPFFSPath(), "maps", "meta"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := meta.Put(uint32(0), [2]uint32{99, 0}); err != nil {
		t.Fatal(err)
	}
	meta.Close()
	shuntd, _ := harness.AgentBinaries(t)
	out, err := c.env.Node().ExecOpts(harness.ProcOpts{Timeout: 20 * time.Second}, shuntd, "-config", a.cfgPath, "-api-socket", a.socket, "-metrics-addr", "")
	if err == nil || !strings.Contains(string(out), "layout version 99") {
		t.Errorf("foreign layout: err=%v\n%s", err, out)
	}
	// The refused agent left the running datapath alone.
	if r := connect(t, c.client, "--target", vip, "--count", "10"); r.OK != 10 {
		t.Errorf("refused start broke translation: %v", r.Errors)
	}
}

func TestCleanupRemovesEverything(t *testing.T) {
	c := newCluster(t)
	a := newAgent(t, c.env, "")
	vip := "10.96.0.80:80"
	a.ctl("service", "update", "--frontend", vip, "--backends", c.backendList(false))
	if r := connect(t, c.client, "--target", vip, "--count", "5"); r.OK != 5 {
		t.Fatalf("before cleanup: %v", r.Errors)
	}
	a.proc.Stop()
	if out, err := a.ctlErr("cleanup", "--bpffs-root", c.env.BPFFSPath()); err != nil {
		t.Fatalf("cleanup: %v %s", err, out)
	}
	if _, err := os.Stat(c.env.BPFFSPath()); !os.IsNotExist(err) {
		t.Errorf("pins remain: %v", err)
	}
	// No program attached any more: the VIP is not translated (unroutable).
	r := connect(t, c.client, "--target", vip, "--count", "3", "--timeout", "500ms")
	if r.OK != 0 {
		t.Errorf("VIP still translated after cleanup: %v", r.Backends)
	}
	progs, err := attachedPrograms(c.env.CgroupPath())
	if err != nil {
		t.Fatal(err)
	}
	if progs != 0 {
		t.Errorf("%d programs still attached to the test cgroup", progs)
	}
}

// Session affinity (Kubernetes sessionAffinity: ClientIP): a client pod
// keeps its backend while it connects within the timeout and the backend
// stays in the service; other pods are clients of their own.
func TestSocketLBSessionAffinity(t *testing.T) {
	c := newCluster(t)
	other := c.env.NewPod("client2")
	a := newAgent(t, c.env, "")
	vip := "10.96.0.30:80"
	all := c.backendList(false)
	update := func(backends string, extra ...string) {
		a.ctl(append([]string{"service", "update", "--frontend", vip, "--backends", backends}, extra...)...)
	}
	only := func(p *harness.Pod, n int) string {
		t.Helper()
		r := connect(t, p, "--target", vip, "--count", fmt.Sprint(n))
		if r.OK != n || len(r.Backends) != 1 {
			t.Fatalf("%s: %d connections with affinity went to %v (ok %d, errors %v), want one backend", p.Name(), n, r.Backends, r.OK, r.Errors)
		}
		for id := range r.Backends {
			return id
		}
		return ""
	}

	update(all, "--affinity-timeout", "10800")
	first := only(c.client, 60)
	only(other, 60)
	// The backend leaves: the client moves to another one, and stays there.
	var rest []string
	for i, p := range c.backends {
		if fmt.Sprintf("be%d", i) != first {
			rest = append(rest, netip.AddrPortFrom(p.IPv4(), 8080).String())
		}
	}
	update(strings.Join(rest, ","), "--affinity-timeout", "10800")
	second := only(c.client, 60)
	if second == first {
		t.Fatalf("after %s left the service the client still reached it", first)
	}
	// It comes back: the client keeps the backend it has now.
	update(all, "--affinity-timeout", "10800")
	if got := only(c.client, 30); got != second {
		t.Errorf("after %s came back the client moved from %s to %s; affinity should keep %s", first, second, got, second)
	}
	if v := a.metric(`shunt_datapath_events_total{event="affinity_hit"}`); v == "" || v == "0" {
		t.Errorf("affinity_hit events = %q, want > 0", v)
	}

	// Without affinity the same client is balanced again.
	update(all)
	if r := connect(t, c.client, "--target", vip, "--count", "60"); r.OK != 60 || len(r.Backends) < 2 {
		t.Errorf("affinity off: 60 connections went to %v (errors %v), want several backends", r.Backends, r.Errors)
	}

	// The timeout: after 1 s without a connection the client's next one is
	// balanced anew (a fresh pick equals the old backend 1 time in 3, so a
	// few rounds show it).
	update(all, "--affinity-timeout", "1")
	start := only(c.client, 10)
	moved := false
	for round := 0; round < 12 && !moved; round++ {
		time.Sleep(1200 * time.Millisecond)
		moved = only(c.client, 5) != start
	}
	if !moved {
		t.Errorf("with a 1 s timeout the client stayed on %s for 12 rounds 1.2 s apart", start)
	}
}

// TestRevnatForgetsClosedSockets: the reverse-NAT entry that lets a
// translated socket see the VIP lives as long as the socket. While they
// are open the applications see the VIP; once 60 connections of each kind
// (TCP over IPv4, IPv6 and a v4-mapped address on an IPv6 socket,
// connected UDP) are closed, sock_release has removed their entries, so
// the LRU never has to evict live sockets' entries for dead ones.
func TestRevnatForgetsClosedSockets(t *testing.T) {
	c := newCluster(t)
	a := newAgent(t, c.env, "")
	a.ctl("service", "update", "--frontend", "10.96.0.10:80", "--protocol", "tcp", "--backends", c.backendList(false))
	a.ctl("service", "update", "--frontend", "[fd00:96::10]:80", "--protocol", "tcp", "--backends", c.backendList(true))
	a.ctl("service", "update", "--frontend", "10.96.0.11:53", "--protocol", "udp", "--backends", c.backendList(false))
	entries := func() string {
		t.Helper()
		return a.metric(`shunt_map_entries{map="revnat"}`)
	}
	if n := entries(); n != "0" {
		t.Fatalf("revnat holds %s entries before any connection", n)
	}
	for _, tc := range []struct{ target, proto, udp string }{
		{"10.96.0.10:80", "tcp", ""},
		{"[fd00:96::10]:80", "tcp", ""},
		{"[::ffff:10.96.0.10]:80", "tcp", ""},
		{"10.96.0.11:53", "udp", "connected"},
	} {
		args := []string{"--target", tc.target, "--proto", tc.proto, "--count", "60"}
		if tc.udp != "" {
			args = append(args, "--udp", tc.udp)
		}
		r := connect(t, c.client, args...)
		if r.Fail != 0 || r.OK != 60 {
			t.Fatalf("%s: %d ok, %d failed: %v", tc.target, r.OK, r.Fail, r.Errors)
		}
		for addr, n := range r.Peers {
			if addr != tc.target {
				t.Errorf("%s: app saw peer %s (%d times): its revnat entry was missing", tc.target, addr, n)
			}
		}
		if n := entries(); n != "0" {
			t.Errorf("after 60 closed %s connections to %s, revnat holds %s entries, want 0", tc.proto, tc.target, n)
		}
	}
	// The translations really happened (the entries existed).
	if v := a.metric(`shunt_datapath_events_total{event="revnat_hit"}`); v == "" || v == "0" {
		t.Errorf("revnat_hit = %q: no peer was answered from revnat", v)
	}
}
