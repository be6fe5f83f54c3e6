package bench

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

// TestMain lets the test binary act as the benchmark's workers: they are
// the running binary re-executed as `<binary> bench worker ...`.
func TestMain(m *testing.M) {
	if len(os.Args) > 2 && os.Args[1] == "bench" && os.Args[2] == "worker" {
		os.Exit(Worker(os.Args[3:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// The sidecar benchmark in quick mode, one workload, end to end: every
// configuration, with both proxies and both topologies, moved bytes that
// were all verified, and the counters show the path each one claims
// (MeasureSidecar fails otherwise; the cells' evidence is checked again
// here). Nothing about timing is asserted.
func TestSidecarBenchQuick(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces, cgroups, eBPF)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := MeasureSidecar(ctx, SidecarOptions{Workloads: []string{"rr4k"}, Quick: true, CPU: -1, Log: logWriter{t}})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.SelfTest {
		t.Fatal("Shunt's sockmap self-test failed on this kernel: auto accelerates nothing")
	}
	// 2 topologies × (direct + 4 configurations × 2 proxies).
	if len(rep.Cells) != 18 {
		t.Fatalf("%d cells, want 18", len(rep.Cells))
	}
	for _, c := range rep.Cells {
		name := c.Key() + " topology " + string(rune('0'+c.Topology))
		if len(c.Rates) != 1 || c.Rates[0] <= 0 || c.Conns != 1 {
			t.Errorf("%s: rates %v, %d connections", name, c.Rates, c.Conns)
		}
		// Echo: every byte received was compared with the request.
		if c.Sent < 4<<10 || c.Verified != c.Recv || c.Recv-helloSize != c.Sent-1 {
			t.Errorf("%s: sent %d, received %d, verified %d", name, c.Sent, c.Recv, c.Verified)
		}
		moved := c.Sent + c.Recv
		wantProxies := map[string]bool{}
		if c.Proxy != "" {
			wantProxies["sidecar"] = true
			if c.Topology == 2 {
				wantProxies["server sidecar"] = true
			}
		}
		if len(c.Proxied) != len(wantProxies) {
			t.Errorf("%s: proxies on the path %v, want %v", name, c.Proxied, wantProxies)
		}
		for p := range wantProxies {
			if c.Proxied[p] != moved {
				t.Errorf("%s: %s forwarded %d bytes, the client moved %d", name, p, c.Proxied[p], moved)
			}
		}
		switch c.Config {
		case SCDirect:
			if c.Counters != nil || c.Redirect != nil {
				t.Errorf("%s: counters %v %v", name, c.Counters, c.Redirect)
			}
		case SCIPTables:
			if c.Redirect["client pod outbound"] != 1 || (c.Topology == 2) != (c.Redirect["server pod inbound"] == 1) {
				t.Errorf("%s: REDIRECT hits %v", name, c.Redirect)
			}
			if c.Counters != nil {
				t.Errorf("%s: Shunt counted something: %v", name, c.Counters)
			}
		default:
			cl, sv := c.Counters["client pod"], c.Counters["server pod"]
			if cl["steer_outbound"] != 1 || cl["origdst_answer"] != 1 {
				t.Errorf("%s: client pod steering %v", name, cl)
			}
			accelerated := c.Config == SCOn || (c.Config == SCAuto && c.Topology == 2)
			if !accelerated {
				if cl["bytes_redirect"]+sv["bytes_redirect"]+cl["sock_insert"]+sv["sock_insert"] != 0 {
					t.Errorf("%s: accelerated something: client %v, server %v", name, cl, sv)
				}
				continue
			}
			// Redirected bytes: at most every byte of each accelerated
			// leg; MeasureSidecar checked the exact expectation.
			if cl["bytes_redirect"] == 0 || sv["bytes_redirect"] == 0 {
				t.Errorf("%s: nothing redirected: client %v, server %v", name, cl, sv)
			}
			if c.Config == SCAuto && (cl["bytes_redirect"] > c.Sent || cl["sock_insert"] != 1) {
				t.Errorf("%s: auto accelerated more than the sidecar→sidecar hop: %v", name, cl)
			}
			if c.Config == SCOn && cl["sock_insert"] != 3 {
				t.Errorf("%s: sock_insert %d in the client pod, want 3 (app, both sidecar sockets)", name, cl["sock_insert"])
			}
		}
	}
	var b strings.Builder
	rep.Write(&b, false)
	t.Log("\n" + b.String())
}
