package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/test/harness"
)

var sidecarUser = harness.ProcOpts{UID: 1337, GID: 1337, SetUser: true}

// askOK runs the ask app in p and returns its ORIG and PEER fields.
func askOK(t *testing.T, p *harness.Pod, opts harness.ProcOpts, target string, n int) (orig, peer string) {
	t.Helper()
	opts.Timeout = time.Minute
	out, err := p.Run(opts, "ask", "--target", target, "--bytes", fmt.Sprint(n))
	line := strings.TrimSpace(string(out))
	if err != nil {
		t.Fatalf("ask %s from %s: %v: %s", target, p.Name(), err, line)
	}
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "ORIG" || f[2] != "PEER" || f[len(f)-1] != "OK" {
		t.Fatalf("ask %s: unexpected output %q", target, line)
	}
	return f[1], f[3]
}

func startOrigDst(t *testing.T, p *harness.Pod, listens ...string) {
	t.Helper()
	var args []string
	for _, l := range listens {
		args = append(args, "--listen", l)
	}
	pr := p.Start(sidecarUser, "origdst", args...)
	if err := pr.WaitReady(); err != nil {
		t.Fatal(err)
	}
}

func podStatus(t *testing.T, a *agentProc, name string) agent.PodStatus {
	t.Helper()
	var pods []agent.PodStatus
	if err := json.Unmarshal([]byte(a.ctl("pod", "list", "--json")), &pods); err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("pod %s not listed", name)
	return agent.PodStatus{}
}

// An enrolled app's outbound TCP goes to its sidecar on loopback, which
// learns the original destination from SO_ORIGINAL_DST (v4 and v6), while
// the app still sees what it connected to; excluded ports and ranges,
// loopback and the sidecar's own connections are left alone.
func TestSidecarOutboundSteering(t *testing.T) {
	c := newCluster(t)
	app := c.client
	a := newAgent(t, c.env, fmt.Sprintf(`pods:
- name: shop/app
  netns: %s
  sockmap: "off"
  sidecar:
    excludeOutboundPorts: [9090]
    excludeOutboundCIDRs: ["10.244.1.3/32"]
`, app.NetNSPath()))
	startOrigDst(t, app, "127.0.0.1:15001", "[::1]:15001")
	for _, p := range c.backends {
		pr := p.Start(harness.ProcOpts{}, "serve", "--id", p.Name(), "--listen", "0.0.0.0:9090")
		if err := pr.WaitReady(); err != nil {
			t.Fatal(err)
		}
	}
	a.ctl("service", "update", "--frontend", "10.96.0.10:80", "--backends", c.backendList(false))

	for _, target := range []string{"10.96.0.10:80", "[fd00:96::10]:80", c.backends[0].IPv4().String() + ":8080", "[" + c.backends[1].IPv6().String() + "]:8080"} {
		orig, peer := askOK(t, app, harness.ProcOpts{}, target, 256<<10)
		if orig != target {
			t.Errorf("sidecar learned original destination %s, want %s", orig, target)
		}
		if peer != target {
			t.Errorf("app's getpeername = %s, want %s (what it connected to)", peer, target)
		}
	}

	// Excluded port and excluded range: straight to the destination (the
	// serve app answers with its id; the sidecar would answer ORIG).
	for _, target := range []string{c.backends[0].IPv4().String() + ":9090", c.backends[2].IPv4().String() + ":8080"} {
		r := connect(t, app, "--target", target, "--count", "3")
		if r.OK != 3 {
			t.Fatalf("excluded %s: %d ok, errors %v", target, r.OK, r.Errors)
		}
		for id := range r.Backends {
			if !strings.HasPrefix(id, "be") {
				t.Errorf("excluded %s answered by %q, want the backend itself", target, id)
			}
		}
	}
	// The sidecar's own connections are never steered: uid 1337 reaches
	// the backend, with socket LB translating the VIP.
	r, err := app.Connect(harness.ProcOpts{UID: 1337, GID: 1337, SetUser: true, Timeout: time.Minute}, "--target", "10.96.0.10:80", "--count", "6")
	if err != nil || r.OK != 6 {
		t.Fatalf("sidecar-uid connect: %v %+v", err, r)
	}
	for id := range r.Backends {
		if !strings.HasPrefix(id, "be") {
			t.Errorf("sidecar's own connection answered by %q, want a backend (no loop)", id)
		}
	}

	st := podStatus(t, a, "shop/app")
	if got := st.Counters["steer_outbound"]; got != 4 {
		t.Errorf("steer_outbound = %d, want 4", got)
	}
	if got := st.Counters["origdst_answer"]; got != 4 {
		t.Errorf("origdst_answer = %d, want 4", got)
	}
	if got := st.Counters["steer_skip"]; got < 6 {
		t.Errorf("steer_skip = %d, want ≥ 6 (excluded connections)", got)
	}
	if v := a.metric(`shunt_pod_events_total{event="origdst_answer",namespace="shop"}`); v != "4" {
		t.Errorf("metric origdst_answer for namespace shop = %q, want 4", v)
	}
}

// Same-node sidecar to sidecar: the client pod's sidecar connects to the
// server pod's address and port; Shunt sends it to the server pod's inbound
// listener (15006) on the first try, the server's sidecar learns the
// original destination, and with sockmap auto both ends are short-circuited
// (the self-test passed on this kernel) and every byte arrives.
func TestSidecarToSidecarSameNode(t *testing.T) {
	env := harness.New(t)
	client, server := env.NewPod("client"), env.NewPod("server")
	cfg := func(mode string) string {
		return fmt.Sprintf(`pods:
- name: front/client
  netns: %s
  sockmap: %q
  sidecar: {}
- name: back/server
  netns: %s
  sockmap: %q
  sidecar: {}
`, client.NetNSPath(), mode, server.NetNSPath(), mode)
	}
	a := newAgent(t, env, cfg("auto"))
	startOrigDst(t, server, "0.0.0.0:15006", "[::]:15006")
	if st := a.status(); !st.SockmapSelfTest.Passed {
		t.Fatalf("sockmap self-test failed on this kernel: %+v", st.SockmapSelfTest)
	}

	for i, target := range []string{server.IPv4().String() + ":8080", "[" + server.IPv6().String() + "]:8080"} {
		orig, _ := askOK(t, client, sidecarUser, target, 4<<20)
		if orig != target {
			t.Fatalf("server sidecar learned %s, want %s", orig, target)
		}
		cs, ss := podStatus(t, a, "front/client"), podStatus(t, a, "back/server")
		if got := cs.Counters["steer_inbound"]; got != uint64(i+1) {
			t.Errorf("client steer_inbound = %d, want %d", got, i+1)
		}
		if got := ss.Counters["origdst_answer"]; got != uint64(i+1) {
			t.Errorf("server origdst_answer = %d, want %d", got, i+1)
		}
		for _, p := range []agent.PodStatus{cs, ss} {
			if p.Counters["sock_insert"] != uint64(i+1) {
				t.Errorf("%s: sock_insert = %d, want %d (both ends accelerated)", p.Name, p.Counters["sock_insert"], i+1)
			}
			if p.Counters["msg_redirect"] == 0 || p.Counters["bytes_redirect"] < 4<<20 {
				t.Errorf("%s: %d messages / %d bytes redirected, want all 4 MiB", p.Name, p.Counters["msg_redirect"], p.Counters["bytes_redirect"])
			}
		}
	}

	// An app (not the sidecar) of the client pod talking to the server's
	// sidecar directly: auto leaves app sockets alone.
	before := podStatus(t, a, "front/client").Counters["sock_insert"]
	startOrigDst(t, client, "127.0.0.1:15001")
	askOK(t, client, harness.ProcOpts{}, server.IPv4().String()+":8080", 64<<10)
	if got := podStatus(t, a, "front/client").Counters["sock_insert"]; got != before {
		t.Errorf("auto put an app socket in the sockhash (%d -> %d inserts)", before, got)
	}

	// Through a Service: the sidecar's connection to the VIP is balanced to
	// the server pod, then steered to its inbound port; the app sees the
	// VIP, the server's sidecar the pod address. Once every connection of
	// this test is closed, no reverse-NAT entry is left (neither the
	// socket LB's, replaced by the steering's, nor the steering's).
	a.ctl("service", "update", "--frontend", "10.96.0.50:80", "--protocol", "tcp", "--backends", server.IPv4().String()+":8080")
	orig, peer := askOK(t, client, sidecarUser, "10.96.0.50:80", 64<<10)
	if orig != server.IPv4().String()+":8080" || peer != "10.96.0.50:80" {
		t.Errorf("through the VIP: server sidecar learned %s (want %s:8080), the client saw %s (want the VIP)", orig, server.IPv4(), peer)
	}
	if n := a.metric(`shunt_map_entries{map="revnat"}`); n != "0" {
		t.Errorf("revnat holds %s entries after every connection closed, want 0", n)
	}
}

// sockmap off: steering still works, nothing is accelerated; on: the app's
// loopback leg to its sidecar is accelerated too.
func TestSidecarSockmapModes(t *testing.T) {
	env := harness.New(t)
	pod := env.NewPod("app")
	a := newAgent(t, env, fmt.Sprintf("pods:\n- name: m/app\n  netns: %s\n  sockmap: \"off\"\n  sidecar: {}\n", pod.NetNSPath()))
	startOrigDst(t, pod, "127.0.0.1:15001")
	askOK(t, pod, harness.ProcOpts{}, "10.96.7.7:80", 1<<20)
	if st := podStatus(t, a, "m/app"); st.Counters["sock_insert"] != 0 || st.Counters["steer_outbound"] != 1 {
		t.Fatalf("sockmap off: counters %v", st.Counters)
	}
	a.ctl("pod", "update", "--name", "m/app", "--netns", pod.NetNSPath(), "--sidecar", "--sockmap", "on")
	askOK(t, pod, harness.ProcOpts{}, "10.96.7.7:80", 1<<20)
	st := podStatus(t, a, "m/app")
	if st.Counters["sock_insert"] != 2 {
		t.Errorf("sockmap on: sock_insert = %d, want 2 (app and sidecar ends)", st.Counters["sock_insert"])
	}
	if st.Counters["bytes_redirect"] < 2<<20 {
		t.Errorf("sockmap on: %d bytes redirected, want the 1 MiB both ways", st.Counters["bytes_redirect"])
	}
}

// istioRules installs the nat rules of Istio's init container (outbound
// part) in p's network namespace.
func istioRules(t *testing.T, p *harness.Pod) {
	t.Helper()
	for _, r := range [][]string{
		{"-N", "ISTIO_REDIRECT"},
		{"-A", "ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"},
		{"-N", "ISTIO_OUTPUT"},
		{"-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT"},
		{"-A", "ISTIO_OUTPUT", "-m", "owner", "--uid-owner", "1337", "-j", "RETURN"},
		{"-A", "ISTIO_OUTPUT", "-d", "127.0.0.1/32", "-j", "RETURN"},
		{"-A", "ISTIO_OUTPUT", "-j", "ISTIO_REDIRECT"},
	} {
		if out, err := p.Exec("iptables", append([]string{"-w", "-t", "nat"}, r...)...); err != nil {
			t.Fatalf("iptables %v: %v %s", r, err, out)
		}
	}
}

// redirected returns the packets ISTIO_REDIRECT has redirected in p.
func redirected(t *testing.T, p *harness.Pod) string {
	t.Helper()
	out, err := p.Exec("iptables", "-w", "-t", "nat", "-L", "ISTIO_REDIRECT", "-v", "-x", "-n")
	if err != nil {
		t.Fatalf("iptables -L: %v %s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return strings.Fields(lines[len(lines)-1])[0]
}

// With Istio's iptables rules still in the pod, Shunt's steering wins
// before netfilter: nothing is redirected twice, nothing loops, and the
// sidecar gets Shunt's original destination (not 127.0.0.1:15001, which is
// what conntrack would answer for the steered connection). A pod that is not
// enrolled keeps working through iptables alone, with the kernel's answer.
func TestSidecarWithIstioIptables(t *testing.T) {
	env := harness.New(t)
	enrolled, plain := env.NewPod("enrolled"), env.NewPod("plain")
	istioRules(t, enrolled)
	istioRules(t, plain)
	newAgent(t, env, fmt.Sprintf("pods:\n- name: ns/enrolled\n  netns: %s\n  sidecar: {}\n", enrolled.NetNSPath()))
	startOrigDst(t, enrolled, "127.0.0.1:15001")
	startOrigDst(t, plain, "127.0.0.1:15001")

	orig, peer := askOK(t, enrolled, harness.ProcOpts{}, "10.96.0.10:80", 64<<10)
	if orig != "10.96.0.10:80" || peer != "10.96.0.10:80" {
		t.Errorf("enrolled pod with Istio rules: sidecar saw %s, app saw %s; want 10.96.0.10:80 for both", orig, peer)
	}
	if n := redirected(t, enrolled); n != "0" {
		t.Errorf("iptables redirected %s packets of a connection Shunt already steered", n)
	}
	orig, _ = askOK(t, plain, harness.ProcOpts{}, "10.96.0.10:80", 64<<10)
	if orig != "10.96.0.10:80" {
		t.Errorf("not enrolled, iptables only: sidecar saw %s, want 10.96.0.10:80 (from conntrack)", orig)
	}
	if n := redirected(t, plain); n == "0" {
		t.Error("the pod that is not enrolled was not redirected by iptables")
	}
}

// Accelerated connections live through an agent kill -9 and restart: a
// sidecar-to-sidecar stream keeps flowing, every byte checked, and new
// connections are steered and accelerated by the new agent.
func TestSidecarAcceleratedSurviveAgentRestart(t *testing.T) {
	env := harness.New(t)
	client, server := env.NewPod("client"), env.NewPod("server")
	a := newAgent(t, env, fmt.Sprintf("pods:\n- name: a/client\n  netns: %s\n  sidecar: {}\n- name: b/server\n  netns: %s\n  sidecar: {}\n",
		client.NetNSPath(), server.NetNSPath()))
	startOrigDst(t, server, "0.0.0.0:15006")
	// A stream through the accelerated path: ask sends until told to stop
	// (after the restart) and checks the echo.
	dir := t.TempDir()
	os.Chmod(dir, 0o755) // the stream runs as the sidecar's uid
	stop := filepath.Join(dir, "stop")
	done := make(chan error, 1)
	var out []byte
	go func() {
		var err error
		out, err = client.Run(harness.ProcOpts{UID: 1337, GID: 1337, SetUser: true, Timeout: 2 * time.Minute},
			"ask", "--target", server.IPv4().String()+":8080", "--duration", "90s", "--until", stop)
		done <- err
	}()
	deadline := time.Now().Add(30 * time.Second)
	for podStatus(t, a, "a/client").Counters["msg_redirect"] == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the stream was never accelerated: client %v server %v", podStatus(t, a, "a/client").Counters, podStatus(t, a, "b/server").Counters)
		}
		time.Sleep(20 * time.Millisecond)
	}
	a.kill9()
	a.start()
	select {
	case err := <-done:
		t.Fatalf("the stream ended before the agent was back (%v): the restart was not exercised", err)
	default:
	}
	// Keep streaming a little through the new agent's programs, then stop.
	time.Sleep(200 * time.Millisecond)
	if err := os.WriteFile(stop, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("stream across the restart: %v: %s", err, out)
	}
	before := podStatus(t, a, "a/client").Counters["sock_insert"]
	askOK(t, client, sidecarUser, server.IPv4().String()+":8080", 1<<20)
	if got := podStatus(t, a, "a/client").Counters["sock_insert"]; got != before+1 {
		t.Errorf("new connection after the restart: sock_insert %d -> %d, want +1", before, got)
	}
}
