package k8s_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/test/kube"
)

const vip = "10.96.5.5"

func webService(ns string) *corev1.Service {
	s := &corev1.Service{}
	s.Name, s.Namespace = "web", ns
	s.Spec.ClusterIP = vip
	s.Spec.Ports = []corev1.ServicePort{{Name: "http", Port: 80}}
	return s
}

func ptr[T any](v T) *T { return &v }

// webSlice is the EndpointSlice of service web with the given backends on
// the named port http = 8080.
func webSlice(ns string, backends ...*harness.Pod) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{AddressType: discoveryv1.AddressTypeIPv4}
	sl.Name, sl.Namespace = "web-1", ns
	sl.Labels = map[string]string{discoveryv1.LabelServiceName: "web"}
	sl.Ports = []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080))}}
	for _, b := range backends {
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{b.IPv4().String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)},
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Name: b.Name(), Namespace: ns},
		})
	}
	return sl
}

func namespace(name string, enabled bool) *corev1.Namespace {
	n := &corev1.Namespace{}
	n.Name = name
	if enabled {
		n.Labels = map[string]string{"shunt.dev/enabled": "true"}
	}
	return n
}

// answeredBy connects n times from p to the VIP and returns who answered.
func answeredBy(t *testing.T, p *harness.Pod, n int) harness.ConnectResult {
	t.Helper()
	r, err := p.Connect(harness.ProcOpts{Timeout: time.Minute}, "--target", vip+":80", "--count", fmt.Sprint(n), "--timeout", "2s")
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// only returns "" when every one of n connections succeeded and was
// answered by one of ids.
func only(r harness.ConnectResult, n int, ids ...string) string {
	if r.OK != n {
		return fmt.Sprintf("%d of %d connections ok: %v", r.OK, n, r.Errors)
	}
	for id := range r.Backends {
		found := false
		for _, w := range ids {
			found = found || id == w
		}
		if !found {
			return fmt.Sprintf("answered by %v, want only %v", r.Backends, ids)
		}
	}
	return ""
}

// End to end on the real datapath: a client pod whose Pod object lives in
// the API server is enrolled when its namespace is labelled, and its
// connections to the Service VIP are balanced by Shunt over the
// EndpointSlice's backends; unlabelled (or opted out by a pod label) it goes
// back to the kernel's path while a connection made through Shunt keeps
// working; the backend set follows EndpointSlice changes.
func TestEnrollmentTraffic(t *testing.T) {
	f := newFixture(t)
	c := ctx(t)
	var bes []*harness.Pod
	for i := 0; i < 3; i++ {
		p := f.env.NewPod(fmt.Sprintf("be%d", i))
		if err := p.Start(harness.ProcOpts{}, "serve", "--id", p.Name(), "--listen", "0.0.0.0:8080").WaitReady(); err != nil {
			t.Fatal(err)
		}
		bes = append(bes, p)
	}
	// The kernel's path (kube-proxy's in a real cluster) is a server on the
	// VIP in the node namespace, where the pods' default route leads.
	node := f.env.Node()
	if out, err := node.Exec("ip", "addr", "add", vip+"/32", "dev", "lo"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if err := node.Start(harness.ProcOpts{}, "serve", "--id", "kernel", "--listen", vip+":80").WaitReady(); err != nil {
		t.Fatal(err)
	}

	f.apply(namespace("app", false))
	f.apply(webService("app"))
	f.apply(webSlice("app", bes...))
	pod := &corev1.Pod{}
	pod.Name, pod.Namespace = "client", "app"
	f.apply(pod)
	client := f.hpods["app/client"]

	// The service is in the maps, the client is not enrolled: kernel path.
	f.eventually("service in the map", func() string {
		if got := f.mapSlots(vip + ":80/tcp"); got != "10.244.1.1:8080 10.244.1.2:8080 10.244.1.3:8080" {
			return "slots " + got
		}
		return ""
	})
	if d := only(answeredBy(t, client, 20), 20, "kernel"); d != "" {
		t.Fatalf("not enrolled: %s", d)
	}

	// Label the namespace: Shunt balances the client's connections.
	f.apply(namespace("app", true))
	f.eventually("enrolled after the namespace label", func() string { return only(answeredBy(t, client, 1), 1, "be0", "be1", "be2") })
	r := answeredBy(t, client, 60)
	if d := only(r, 60, "be0", "be1", "be2"); d != "" || len(r.Backends) < 2 {
		t.Fatalf("enrolled: %s %v", d, r.Backends)
	}
	for peer := range r.Peers {
		if peer != vip+":80" {
			t.Errorf("the app saw peer %s, want the VIP", peer)
		}
	}

	// A long connection made through Shunt...
	stream := client.Start(harness.ProcOpts{}, "stream", "--target", vip+":80", "--bytes", "1000000000", "--chunk", "1000", "--rate-pause", "5ms")
	f.eventually("stream established to a backend", func() string {
		out, err := client.Exec("ss", "-Htn", "state", "established")
		if err != nil || !strings.Contains(string(out), ":8080") {
			return fmt.Sprintf("no connection to a backend yet: %s %v", out, err)
		}
		return ""
	})
	// ... survives the unlabel, which sends new connections to the kernel.
	f.apply(namespace("app", false))
	f.eventually("back to the kernel path after the unlabel", func() string { return only(answeredBy(t, client, 1), 1, "kernel") })
	if d := only(answeredBy(t, client, 20), 20, "kernel"); d != "" {
		t.Fatalf("unlabelled: %s", d)
	}
	select {
	case <-stream.Done():
		t.Fatalf("the stream ended before it was stopped: %s %s", stream.Stdout(), stream.Stderr())
	default:
	}
	// Let it run a little more after the switch, then end it.
	time.Sleep(200 * time.Millisecond)
	if err := stream.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := stream.Wait(); err != nil {
		t.Fatal(err)
	}
	var sr harness.StreamResult
	if err := json.Unmarshal(stream.Stdout(), &sr); err != nil {
		t.Fatalf("stream output %q: %v", stream.Stdout(), err)
	}
	if !sr.OK || !strings.HasPrefix(sr.Backend, "be") || sr.Sent == 0 || sr.Sent != sr.Received {
		t.Fatalf("in-flight connection across the unlabel: %+v", sr)
	}

	// A pod label opts the pod out of an enabled namespace, and back in.
	f.apply(namespace("app", true))
	f.eventually("enrolled again", func() string { return only(answeredBy(t, client, 1), 1, "be0", "be1", "be2") })
	cur := &corev1.Pod{}
	cur.Name, cur.Namespace = "client", "app"
	f.must(f.c.MergePatch(c, cur, `{"metadata":{"labels":{"shunt.dev/enabled":"false"}}}`))
	f.eventually("opted out by the pod label", func() string { return only(answeredBy(t, client, 1), 1, "kernel") })
	f.must(f.c.MergePatch(c, cur, `{"metadata":{"labels":{"shunt.dev/enabled":null}}}`))
	f.eventually("opted in again", func() string { return only(answeredBy(t, client, 1), 1, "be0", "be1", "be2") })

	// The backend set follows the EndpointSlice.
	f.apply(webSlice("app", bes[0], bes[1]))
	f.eventually("be2 removed", func() string { return only(answeredBy(t, client, 30), 30, "be0", "be1") })
	f.apply(webSlice("app", bes[2]))
	f.eventually("only be2", func() string { return only(answeredBy(t, client, 30), 30, "be2") })

	// The pod goes away: its enrollment goes too.
	f.must(f.c.Delete(c, cur))
	f.eventually("pod removed from the pods map", func() string {
		pods, err := f.a.Datapath().ReadPods()
		if err != nil {
			return err.Error()
		}
		if len(pods) != 0 {
			return fmt.Sprintf("%d pods enrolled", len(pods))
		}
		return ""
	})
}

// mapSlots returns the sorted backend slots of frontend in the kernel map.
func (f *fixture) mapSlots(frontend string) string {
	for _, line := range strings.Split(f.dump(), "\n") {
		if rest, ok := strings.CutPrefix(line, "map "+frontend+" ->"); ok {
			return strings.TrimSpace(rest)
		}
	}
	return "(absent)"
}

// mapsSnapshot is the services map (with ids and revisions: a rewrite bumps
// the revision) and the pods map.
func (f *fixture) mapsSnapshot() string {
	f.t.Helper()
	loaded, err := f.a.Datapath().ReadServices()
	if err != nil {
		f.t.Fatal(err)
	}
	var lines []string
	for k, ls := range loaded {
		var slots []string
		for _, s := range ls.Slots {
			slots = append(slots, datapath.AddrPort(s).String())
		}
		lines = append(lines, fmt.Sprintf("svc %s id=%d rev=%d %v", datapath.FormatAddr(k), ls.ID, ls.Rev, slots))
	}
	pods, err := f.a.Datapath().ReadPods()
	if err != nil {
		f.t.Fatal(err)
	}
	for c := range pods {
		lines = append(lines, fmt.Sprintf("pod %d", c))
	}
	return sortedLines(lines)
}

func sortedLines(l []string) string {
	sort.Strings(l)
	return strings.Join(l, "\n")
}

// The API server going away never changes the datapath: not while the agent
// runs (watch errors, periodic resyncs), not when the agent starts while it
// is down (the pinned entries stay until the source has synced). When it is
// back, the agent reconciles, and entries that did not change are not
// rewritten (their map revision stays).
func TestAPIServerDownKeepsDatapath(t *testing.T) {
	f := newFixture(t)
	c := ctx(t)
	be := f.env.NewPod("be0")
	be2 := f.env.NewPod("be1")
	f.apply(namespace("keep", true))
	f.apply(webService("keep"))
	f.apply(webSlice("keep", be))
	gone := webService("keep")
	gone.Name, gone.Spec.ClusterIP = "gone", "10.96.5.6"
	f.apply(gone)
	pod := &corev1.Pod{}
	pod.Name, pod.Namespace = "client", "keep"
	f.apply(pod)
	f.eventually("initial state", func() string {
		if f.mapSlots(vip+":80/tcp") != "10.244.1.1:8080" || f.mapSlots("10.96.5.6:80/tcp") != "" {
			return "services not in the maps yet:\n" + f.dump()
		}
		if f.metric("shunt_pods_enrolled") != 1 {
			return "client not enrolled"
		}
		return ""
	})
	before := f.mapsSnapshot()

	// API server down while the agent runs.
	f.cp.StopAPIServer()
	f.eventually("agent noticed", func() string {
		if f.metric("shunt_k8s_api_errors_total") == 0 || f.metric("shunt_k8s_api_up") != 0 {
			return "no failed API request counted yet"
		}
		return ""
	})
	if err := f.a.Resync(); err != nil {
		t.Fatal(err)
	}
	if got := f.mapsSnapshot(); got != before {
		t.Fatalf("maps changed while the API server was down:\n%s", lineDiff(before, got))
	}

	// Back: the agent reconciles; untouched entries are not rewritten.
	f.cp.StartAPIServer(t)
	f.apply(webSlice("keep", be, be2))
	f.eventuallyLong("slice change after the restart", func() string {
		if s := f.mapSlots(vip + ":80/tcp"); s != "10.244.1.1:8080 10.244.1.2:8080" {
			return "slots " + s
		}
		return ""
	})
	after := f.mapsSnapshot()
	for _, line := range strings.Split(before, "\n") {
		if !strings.HasPrefix(line, "svc "+vip) && !strings.Contains(after, line) {
			t.Errorf("entry rewritten or lost across the API server restart: %q\nnow:\n%s", line, after)
		}
	}

	// The agent restarts while the API server is down: the pinned entries
	// stay, also the ones the cluster no longer has, until it is back.
	f.stopAgent()
	f.must(f.c.Delete(c, gone))
	f.cp.StopAPIServer()
	f.startAgent()
	if err := f.a.Resync(); err != nil {
		t.Fatal(err)
	}
	st, err := f.a.Status()
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(st.PendingSources) != "[kubernetes]" {
		t.Errorf("pending sources %v, want [kubernetes]", st.PendingSources)
	}
	if got := f.mapsSnapshot(); got != after {
		t.Fatalf("an agent started without API server changed the maps:\n%s", lineDiff(after, got))
	}
	f.cp.StartAPIServer(t)
	f.eventuallyLong("synced after the API server came back", func() string {
		if s := f.mapSlots("10.96.5.6:80/tcp"); s != "(absent)" {
			return "deleted service still in the map: " + s
		}
		if f.metric("shunt_k8s_synced") != 1 {
			return "not synced"
		}
		return ""
	})
	final := f.mapsSnapshot()
	for _, line := range strings.Split(after, "\n") {
		if !strings.HasPrefix(line, "svc 10.96.5.6") && !strings.Contains(final, line) {
			t.Errorf("entry rewritten or lost across the agent restart: %q\nnow:\n%s", line, final)
		}
	}
	if st, _ := f.a.Status(); len(st.PendingSources) != 0 {
		t.Errorf("still pending: %v", st.PendingSources)
	}
}

// eventuallyLong is eventually with room for client-go's relist backoff.
func (f *fixture) eventuallyLong(what string, cond func() string) {
	f.t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		diff := cond()
		if diff == "" {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("%s: %s", what, diff)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The shuntd binary takes its state from the cluster with -kubeconfig and
// -node-name (the wiring in cmd/shuntd), reports it on /metrics and writes
// the maps.
func TestShuntdKubeconfig(t *testing.T) {
	cp := kube.Start(t, kube.Options{})
	c := cp.Admin()
	f := &fixture{t: t, cp: cp, c: c, hpods: map[string]*harness.Pod{}}
	f.apply(namespace("bin", false))
	f.apply(webService("bin"))
	f.apply(&discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-1", Namespace: "bin", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080))}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.244.7.7"}}},
	})
	env := harness.New(t)
	dir := t.TempDir()
	bin, _ := harness.AgentBinaries(t)
	cfg := fmt.Sprintf("datapath:\n  bpffsRoot: %s\n  cgroup: %s\nkubernetes:\n  nodeAddresses: [10.244.0.1]\n  cgroupRoots: [%s]\n",
		env.BPFFSPath(), env.CgroupPath(), env.CgroupPath())
	if err := os.WriteFile(filepath.Join(dir, "shunt.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	metrics := fmt.Sprintf("http://127.0.0.1:%d/metrics", port)
	cmd := exec.Command(bin, "-config", filepath.Join(dir, "shunt.yaml"), "-kubeconfig", cp.AdminKubeconfig, "-node-name", testNode,
		"-host-netns", env.Node().NetNSPath(), "-api-socket", filepath.Join(dir, "sock"), "-state-file", filepath.Join(dir, "state.json"),
		"-metrics-addr", fmt.Sprintf("127.0.0.1:%d", port))
	var logs harness.SyncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // by PID
		<-exited
		if err := datapath.Cleanup(env.BPFFSPath()); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if t.Failed() {
			t.Logf("shuntd log:\n%s", tail(logs.String(), 40))
		}
	})
	f.eventually("shuntd synced with the service in its map", func() string {
		select {
		case <-exited:
			t.Fatalf("shuntd exited: %s", logs.String())
		default:
		}
		resp, err := http.Get(metrics)
		if err != nil {
			return err.Error()
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(body), "\nshunt_k8s_synced 1\n") {
			return "not synced yet"
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(env.BPFFSPath(), "maps", bpf.SockmeshMapServices), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return err.Error()
		}
		defer m.Close()
		var v bpf.SockmeshSvcValue
		k := datapath.MakeAddr(netip.MustParseAddrPort(vip+":80"), mesh.TCP)
		if err := m.Lookup(&k, &v); err != nil || v.Count != 1 {
			return fmt.Sprintf("service %s: %v, %d slots", vip, err, v.Count)
		}
		return ""
	})
}

// A Service the agent refuses (its frontend belongs to a service of the
// configuration file) is left out and counted; the other Services of the
// same change are applied, and the configured service is untouched.
func TestRefusedServiceDoesNotBlockOthers(t *testing.T) {
	f := newFixture(t, func(c *agent.Config) {
		c.Services = []agent.ServiceConfig{{Name: "configured", Frontend: "10.96.7.7:80", Backends: []agent.BackendConfig{{Addr: "10.244.9.1:80"}}}}
	})
	clash := webService("x")
	clash.Name, clash.Spec.ClusterIP = "clash", "10.96.7.7"
	ok := webService("x")
	ok.Name, ok.Spec.ClusterIP = "ok", "10.96.7.8"
	f.apply(namespace("x", false))
	f.apply(clash)
	f.apply(ok)
	f.eventually("the other service applied, the clash counted", func() string {
		if s := f.mapSlots("10.96.7.8:80/tcp"); s != "" {
			return "ok service: " + s
		}
		if s := f.mapSlots("10.96.7.7:80/tcp"); s != "10.244.9.1:80" {
			return "configured service changed: " + s
		}
		if f.metric("shunt_k8s_rejected_total", "reason", "service") == 0 {
			return "refusal not counted"
		}
		return ""
	})
	for _, s := range f.a.Desired().Services {
		if strings.HasPrefix(s.Name, "x/clash") {
			t.Errorf("refused service in the desired state: %s", s.Name)
		}
	}
}
