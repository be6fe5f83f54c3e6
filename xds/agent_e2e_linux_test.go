package xds_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/cmd/shuntctl/cli"
	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/xds"
)

// TestAgentNACKEndToEnd runs shuntd's agent with its xDS server on the
// socket of the grpc-go client's bootstrap. The client balances over the
// service's backends; then a change made with shuntctl produces a cluster
// gRPC rejects (lb_policy RANDOM, injected by the test hook). The NACK must
// show in `shuntctl xds status`, in shunt_xds_nacks_total{node,type_url}
// on the agent's /metrics and in the log; the rejected clusters must not be
// re-sent (pushes counted) while the client keeps its last good
// configuration and follows the next endpoint change.
func TestAgentNACKEndToEnd(t *testing.T) {
	env := harness.New(t)
	b := xds.StartBackends(t, 3)
	dir := t.TempDir()
	api := filepath.Join(dir, "api.sock")
	gid := os.Getegid()
	cfg := agent.Config{
		APISocket: api,
		StateFile: filepath.Join(dir, "state.json"),
		HostNetNS: env.Node().NetNSPath(),
		XDS:       agent.XDSConfig{Enabled: true, Config: xds.Config{UnixSocket: xds.XDSSocket(), UnixSocketGID: &gid}},
		Services:  []agent.ServiceConfig{echoConfig(b, 1, 1, 1)},
	}
	cfg.Datapath.Root, cfg.Datapath.Cgroup = env.BPFFSPath(), env.CgroupPath()
	reg := prometheus.NewRegistry()
	logs := &xds.LogRecorder{}
	a, err := agent.New(cfg, slog.New(logs), reg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if err := a.StartXDS(reg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.StopXDS)
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- a.Run(ctx, reg) }()
	t.Cleanup(func() {
		cancel()
		if err := <-ran; err != nil {
			t.Errorf("agent Run: %v", err)
		}
	})
	shuntctl := func(args ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		if err := cli.Run(append([]string{"--socket", api}, args...), &out, &errOut); err != nil {
			t.Fatalf("shuntctl %s: %v (%s)", strings.Join(args, " "), err, errOut.String())
		}
		return out.String()
	}
	status := func() xds.Status {
		t.Helper()
		var st xds.Status
		xds.WaitFor(t, "the agent API", func() bool { _, err := os.Stat(api); return err == nil })
		if err := json.Unmarshal([]byte(shuntctl("xds", "status", "--json")), &st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	cds := func() xds.TypeStatus {
		for _, n := range status().Nodes {
			if n.ID == xds.TestNodeID {
				return n.Types[resource.ClusterType]
			}
		}
		return xds.TypeStatus{}
	}

	conn := xds.DialEcho(t)
	xds.WaitSpread(t, conn, b[0], b[1], b[2])
	xds.WaitFor(t, "the clusters to be ACKed", func() bool { c := cds(); return c.SentVersion != "" && c.AckedVersion == c.SentVersion })

	// The next change produces clusters gRPC rejects.
	xds.SetTestHook(a.XDSServer(), xds.RandomLB)
	shuntctl(updateArgs(b, 1, 1, 2)...)
	var nacked xds.TypeStatus
	xds.WaitFor(t, "the NACK in shuntctl xds status", func() bool { nacked = cds(); return nacked.LastNACK != nil })
	if nacked.NACKs != 1 || nacked.LastNACK.Version != nacked.SentVersion || nacked.AckedVersion == nacked.SentVersion ||
		!strings.Contains(nacked.LastNACK.Error, "lbPolicy") {
		t.Fatalf("CDS status after the NACK: %+v, last NACK %+v", nacked, nacked.LastNACK)
	}
	text := shuntctl("xds", "status")
	if !strings.Contains(text, xds.TestNodeID) || !strings.Contains(text, "version "+nacked.SentVersion) || !strings.Contains(text, "lbPolicy") {
		t.Errorf("shuntctl xds status does not show the NACK:\n%s", text)
	}
	m := scrape(t, api)
	nackSeries := fmt.Sprintf(`shunt_xds_nacks_total{node=%q,type_url=%q}`, xds.TestNodeID, resource.ClusterType)
	if m[nackSeries] != 1 {
		t.Errorf("%s = %v, want 1", nackSeries, m[nackSeries])
	}
	if logs.Count("client rejected configuration") != 1 {
		t.Errorf("%d log lines for the NACK, want 1", logs.Count("client rejected configuration"))
	}
	pushSeries := fmt.Sprintf(`shunt_xds_pushes_total{type_url=%q}`, resource.ClusterType)
	cdsPushes := m[pushSeries]

	// The client keeps its last good clusters and follows an endpoint
	// change (the ADS stream is ordered: a resend loop of the rejected
	// clusters would have come first).
	xds.AssertOnly(t, conn, b[0], b[1], b[2])
	shuntctl(updateArgs(b[:2], 1, 1)...)
	xds.WaitSpread(t, conn, b[0], b[1])
	xds.AssertOnly(t, conn, b[0], b[1])
	m = scrape(t, api)
	if m[pushSeries] != cdsPushes || m[nackSeries] != 1 {
		t.Errorf("after the endpoint change: %v CDS pushes (was %v), %v NACKs: the rejected version was re-sent", m[pushSeries], cdsPushes, m[nackSeries])
	}
	if c := cds(); c.NACKs != 1 || c.Pushes != nacked.Pushes {
		t.Errorf("CDS status after the endpoint change: %+v", c)
	}

	// Fixed clusters are sent once and accepted.
	xds.SetTestHook(a.XDSServer(), nil)
	shuntctl(updateArgs(b[:2], 1, 2)...)
	xds.WaitFor(t, "the fixed clusters to be ACKed", func() bool {
		c := cds()
		return c.SentVersion != nacked.SentVersion && c.AckedVersion == c.SentVersion && !c.Pending
	})
	if c := cds(); c.NACKs != 1 || c.Pushes != nacked.Pushes+1 {
		t.Errorf("CDS status after the fix: %+v", c)
	}
}

func echoConfig(b []netip.AddrPort, weights ...uint32) agent.ServiceConfig {
	sc := agent.ServiceConfig{Name: xds.EchoName, Frontend: "10.96.7.7:7070"}
	for i, a := range b {
		w := weights[i]
		sc.Backends = append(sc.Backends, agent.BackendConfig{Addr: a.String(), Weight: &w})
	}
	return sc
}

func updateArgs(b []netip.AddrPort, weights ...uint32) []string {
	sc := echoConfig(b, weights...)
	var bs, ws []string
	for _, bc := range sc.Backends {
		bs = append(bs, bc.Addr)
		ws = append(ws, strconv.Itoa(int(*bc.Weight)))
	}
	return []string{"service", "update", "--name", sc.Name, "--frontend", sc.Frontend,
		"--backends", strings.Join(bs, ","), "--weights", strings.Join(ws, ",")}
}

// scrape reads the agent's /metrics over its API socket: series -> value.
func scrape(t *testing.T, sock string) map[string]float64 {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
	resp, err := hc.Get("http://shuntd/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[line[:i]] = v
		}
	}
	return out
}
