package agent_test

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/test/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

func newAgent(t *testing.T, env *harness.Env, cfg agent.Config) *agent.Agent {
	t.Helper()
	cfg.Datapath.Root = env.BPFFSPath()
	cfg.Datapath.Cgroup = env.CgroupPath()
	cfg.HostNetNS = env.Node().NetNSPath()
	cfg.StateFile = filepath.Join(t.TempDir(), "state.json")
	a, err := agent.New(cfg, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func svc(name, front string, backends ...string) mesh.Service {
	s := mesh.Service{Name: name, Frontend: mesh.Frontend{Addr: netip.MustParseAddrPort(front), Proto: mesh.TCP}}
	for _, b := range backends {
		s.Backends = append(s.Backends, mesh.Backend{Addr: netip.MustParseAddrPort(b), Weight: 1})
	}
	return s
}

// mapServices reads the kernel maps back: frontend → sorted backend slots.
func mapServices(t *testing.T, a *agent.Agent) map[string][]string {
	t.Helper()
	loaded, err := a.Datapath().ReadServices()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for k, ls := range loaded {
		var bs []string
		for _, s := range ls.Slots {
			bs = append(bs, datapath.AddrPort(s).String())
		}
		slices.Sort(bs)
		out[datapath.AddrPort(k).String()] = bs
	}
	return out
}

func wantServices(t *testing.T, a *agent.Agent, want map[string][]string) {
	t.Helper()
	got := mapServices(t, a)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("services map:\n got %v\nwant %v", got, want)
	}
}

// Sources own their names; deltas change only what they name; a refused
// delta changes nothing; a frontend can move between services in one delta.
func TestApplyDeltasBySource(t *testing.T) {
	env := harness.New(t)
	a := newAgent(t, env, agent.Config{Services: []agent.ServiceConfig{{Name: "cfg", Frontend: "10.96.0.1:80", Backends: []agent.BackendConfig{{Addr: "10.244.1.1:80"}}}}})
	var seen []agent.Delta
	a.Subscribe(func(d agent.Delta) { seen = append(seen, d) })
	if len(seen) != 1 || !seen[0].Replace || len(seen[0].Services) != 1 {
		t.Fatalf("first notification should be the whole state, got %+v", seen)
	}

	const k8s = "kubernetes"
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(a.Apply(k8s, agent.Delta{Services: []mesh.Service{
		svc("a", "10.96.0.10:80", "10.244.1.2:80", "10.244.1.3:80"),
		svc("b", "10.96.0.11:80", "10.244.1.4:80"),
	}}))
	wantServices(t, a, map[string][]string{
		"10.96.0.1:80":  {"10.244.1.1:80"},
		"10.96.0.10:80": {"10.244.1.2:80", "10.244.1.3:80"},
		"10.96.0.11:80": {"10.244.1.4:80"},
	})

	// A name of another source, a taken frontend, an invalid service: each
	// refused with the field named, nothing written.
	for _, c := range []struct {
		d    agent.Delta
		want string
	}{
		{agent.Delta{Services: []mesh.Service{svc("cfg", "10.96.0.20:80", "10.244.1.9:80")}}, `services[cfg].name: service name already defined by source "config"`},
		{agent.Delta{Services: []mesh.Service{svc("c", "10.96.0.1:80", "10.244.1.9:80")}}, `services[c].frontend: frontend 10.96.0.1:80 already used by service "cfg"`},
		{agent.Delta{Services: []mesh.Service{svc("c", "10.96.0.21:80", "[fd00::1]:80")}}, `services[c].backends[0]: address family`},
		{agent.Delta{DeleteServices: []string{"cfg"}}, `services[cfg].name: service belongs to source "config"`},
		{agent.Delta{Services: []mesh.Service{svc("c", "10.96.0.21:80", "10.244.1.9:80")}, DeleteServices: []string{"c"}}, "both updated and deleted"},
	} {
		err := a.Apply(k8s, c.d)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Apply(%+v) = %v, want error containing %q", c.d, err, c.want)
		}
	}
	if err := a.DeleteService("a"); err == nil || !strings.Contains(err.Error(), "managed by kubernetes") {
		t.Errorf("shuntctl delete of a kubernetes service = %v, want a refusal", err)
	}

	// Move a's frontend to b and b's to a new one in one delta: valid.
	must(a.Apply(k8s, agent.Delta{Services: []mesh.Service{
		svc("a", "10.96.0.11:80", "10.244.1.2:80"),
		svc("b", "10.96.0.12:80", "10.244.1.4:80"),
	}}))
	wantServices(t, a, map[string][]string{
		"10.96.0.1:80":  {"10.244.1.1:80"},
		"10.96.0.11:80": {"10.244.1.2:80"},
		"10.96.0.12:80": {"10.244.1.4:80"},
	})

	// Replace: what the source no longer names is deleted; other sources
	// are untouched.
	n := len(seen)
	must(a.Apply(k8s, agent.Delta{Replace: true, Services: []mesh.Service{svc("b", "10.96.0.12:80", "10.244.1.4:80")}}))
	wantServices(t, a, map[string][]string{
		"10.96.0.1:80":  {"10.244.1.1:80"},
		"10.96.0.12:80": {"10.244.1.4:80"},
	})
	if d := seen[len(seen)-1]; len(seen) != n+1 || d.Replace || len(d.Services) != 0 || !slices.Equal(d.DeleteServices, []string{"a"}) {
		t.Fatalf("notification for the replace should name only the deleted service, got %+v", seen[n:])
	}
	// Re-applying the same content notifies nothing and writes nothing.
	n = len(seen)
	must(a.Apply(k8s, agent.Delta{Services: []mesh.Service{svc("b", "10.96.0.12:80", "10.244.1.4:80")}}))
	if len(seen) != n {
		t.Fatalf("no-op delta notified %+v", seen[n:])
	}
	if got := a.Desired(); len(got.Services) != 2 || got.Services[0].Name != "b" || got.Services[1].Name != "cfg" {
		t.Fatalf("Desired() = %+v", got.Services)
	}
}

// Capacity is checked before the first write: a delta that does not fit is
// refused whole, with ErrCapacity, and the maps keep what they had.
func TestApplyCapacityRefusedWhole(t *testing.T) {
	env := harness.New(t)
	a := newAgent(t, env, agent.Config{Datapath: datapath.Config{MaxServices: 16, MaxSlots: 48}})
	var svcs []mesh.Service
	for i := range 10 {
		svcs = append(svcs, svc(fmt.Sprintf("s%d", i), fmt.Sprintf("10.96.1.%d:80", i+1), "10.244.1.1:80", "10.244.1.2:80", "10.244.1.3:80", "10.244.1.4:80", "10.244.1.5:80"))
	}
	if err := a.Apply("kubernetes", agent.Delta{Services: svcs[:8]}); err != nil {
		t.Fatal(err)
	}
	before := mapServices(t, a)
	err := a.Apply("kubernetes", agent.Delta{Services: svcs[8:]})
	if !errors.Is(err, datapath.ErrCapacity) {
		t.Fatalf("Apply over capacity = %v, want ErrCapacity", err)
	}
	if after := mapServices(t, a); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("refused delta changed the maps:\n before %v\n after %v", before, after)
	}
	// Deleting two and adding two in one delta fits.
	if err := a.Apply("kubernetes", agent.Delta{Services: svcs[8:], DeleteServices: []string{"s0", "s1"}}); err != nil {
		t.Fatal(err)
	}
	if got := len(mapServices(t, a)); got != 8 {
		t.Fatalf("%d services in the map, want 8", got)
	}
}

// Pods: unique network namespaces across sources, stable ids, deletions
// free the cookie for another pod.
func TestApplyPods(t *testing.T) {
	env := harness.New(t)
	p1, p2 := env.NewPod("p1"), env.NewPod("p2")
	a := newAgent(t, env, agent.Config{})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(a.Apply("kubernetes", agent.Delta{Pods: []mesh.Pod{{Name: "ns/p1", NetNS: p1.NetNSPath()}, {Name: "ns/p2", NetNS: p2.NetNSPath(), SocketLB: mesh.Bypass}}}))
	c1, _ := p1.NetNSCookie()
	c2, _ := p2.NetNSCookie()
	pods, err := a.Datapath().ReadPods()
	must(err)
	if len(pods) != 2 || pods[c1].Id == 0 || pods[c2].Id == 0 || pods[c1].Id == pods[c2].Id {
		t.Fatalf("pods map = %+v", pods)
	}
	id2 := pods[c2].Id
	err = a.UpdatePod(mesh.Pod{Name: "other", NetNS: p1.NetNSPath()})
	if err == nil || !strings.Contains(err.Error(), `already enrolled as pod "ns/p1"`) {
		t.Fatalf("second pod on the same netns = %v, want a refusal", err)
	}
	// Re-enroll p1's namespace under a new name in the delta that deletes
	// the old one: allowed; p2 keeps its id.
	must(a.Apply("kubernetes", agent.Delta{Pods: []mesh.Pod{{Name: "ns/p1-new", NetNS: p1.NetNSPath()}}, DeletePods: []string{"ns/p1"}}))
	pods, err = a.Datapath().ReadPods()
	must(err)
	if len(pods) != 2 || pods[c2].Id != id2 {
		t.Fatalf("pods map after rename = %+v (p2 id was %d)", pods, id2)
	}
	must(a.Apply("kubernetes", agent.Delta{Replace: true}))
	pods, err = a.Datapath().ReadPods()
	must(err)
	if len(pods) != 0 {
		t.Fatalf("pods map after an empty replace = %+v", pods)
	}
}

// Resync repairs drift: entries deleted or changed behind the agent's back
// come back.
func TestResyncRepairsDrift(t *testing.T) {
	env := harness.New(t)
	a := newAgent(t, env, agent.Config{})
	if err := a.Apply("kubernetes", agent.Delta{Services: []mesh.Service{svc("a", "10.96.0.10:80", "10.244.1.2:80")}}); err != nil {
		t.Fatal(err)
	}
	want := mapServices(t, a)
	for k := range want {
		f := datapath.MakeAddr(netip.MustParseAddrPort(k), mesh.TCP)
		if err := a.Datapath().Maps().Services.Delete(&f); err != nil {
			t.Fatal(err)
		}
	}
	if len(mapServices(t, a)) != 0 {
		t.Fatal("drift not in place")
	}
	if err := a.Resync(); err != nil {
		t.Fatal(err)
	}
	wantServices(t, a, want)
}

// An agent restart (a new process adopting the pinned maps) keeps every
// pod's id, so its counters go on instead of starting from zero, and a pod
// that is new to the restarted agent never takes an id an adopted pod still
// holds.
func TestRestartKeepsPodIDsAndCounters(t *testing.T) {
	env := harness.New(t)
	p1, p2, p3 := env.NewPod("p1"), env.NewPod("p2"), env.NewPod("p3")
	// Kubernetes expected: its pinned entries stay until it has synced.
	cfg := agent.Config{Kubernetes: &agent.KubernetesConfig{}}
	a := newAgent(t, env, cfg)
	sc := &mesh.Sidecar{}
	pod := func(name string, p *harness.Pod) mesh.Pod {
		return mesh.Pod{Name: "ns/" + name, NetNS: p.NetNSPath(), Sidecar: sc}
	}
	if err := a.Apply(agent.SourceKubernetes, agent.Delta{Replace: true, Pods: []mesh.Pod{pod("p1", p1), pod("p2", p2)}}); err != nil {
		t.Fatal(err)
	}
	// p2's app connects out: steered to its sidecar's port (nothing listens
	// there, the connection is refused; the steering is counted).
	const conns = 3
	for range conns {
		p2.Connect(harness.ProcOpts{}, "--target", "10.96.9.9:80")
	}
	steered := func(a *agent.Agent, name string) (id uint32, n uint64) {
		t.Helper()
		st, err := a.Status()
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range st.Pods {
			if p.Pod.Name == name {
				return p.ID, p.Counters["steer_outbound"]
			}
		}
		t.Fatalf("pod %s not enrolled: %+v", name, st.Pods)
		return 0, 0
	}
	id1, _ := steered(a, "ns/p1")
	id2, before := steered(a, "ns/p2")
	if before != conns {
		t.Fatalf("p2 steered %d connections, want %d", before, conns)
	}
	a.Close()

	a2 := newAgent(t, env, cfg)
	// The Kubernetes source comes back with a new pod first, then the others.
	if err := a2.Apply(agent.SourceKubernetes, agent.Delta{Pods: []mesh.Pod{pod("p3", p3)}}); err != nil {
		t.Fatal(err)
	}
	if err := a2.Apply(agent.SourceKubernetes, agent.Delta{Replace: true, Pods: []mesh.Pod{pod("p1", p1), pod("p2", p2), pod("p3", p3)}}); err != nil {
		t.Fatal(err)
	}
	n1, _ := steered(a2, "ns/p1")
	n2, after := steered(a2, "ns/p2")
	n3, fresh := steered(a2, "ns/p3")
	if n1 != id1 || n2 != id2 {
		t.Errorf("ids after the restart: p1 %d p2 %d, were %d %d", n1, n2, id1, id2)
	}
	if n3 == id1 || n3 == id2 || n3 == 0 {
		t.Errorf("the new pod got id %d (p1 %d, p2 %d)", n3, id1, id2)
	}
	if after != before || fresh != 0 {
		t.Errorf("steer_outbound after the restart: p2 %d (was %d), new pod p3 %d", after, before, fresh)
	}
	p2.Connect(harness.ProcOpts{}, "--target", "10.96.9.9:80")
	if _, n := steered(a2, "ns/p2"); n != before+1 {
		t.Errorf("p2 steered %d after one more connection, want %d", n, before+1)
	}
}
