package k8s_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"sigs.k8s.io/yaml"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/agent/k8s"
	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/test/kube"
)

func TestMain(m *testing.M) { harness.Main(m) }

// testNode is the Node the agent runs as; its addresses are the harness
// node namespace's, so node ports are reachable from harness pods.
const testNode = "shuntk8s-node"

// fixture is a real API server, a harness environment (test cgroup, bpffs
// folder, node netns) and an in-process agent with the Kubernetes source,
// authenticated as the ServiceAccount deploy/rbac.yaml grants get/list/watch.
type fixture struct {
	t     *testing.T
	cp    *kube.ControlPlane
	c     *kube.Client
	env   *harness.Env
	cfg   agent.Config
	a     *agent.Agent
	reg   *prometheus.Registry
	hpods map[string]*harness.Pod // pod key -> harness pod
	log   *harness.SyncBuffer

	cancel context.CancelFunc
	done   chan error
}

// ctx bounds a test's API calls so a hung API server fails the test instead
// of hanging it. It covers the whole test, API server restarts included, on
// a loaded machine: generous, not a timing expectation.
func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return c
}

func newFixture(t *testing.T, opts ...func(*agent.Config)) *fixture {
	t.Helper()
	cp := kube.Start(t, kube.Options{})
	f := &fixture{t: t, cp: cp, c: cp.Admin(), hpods: map[string]*harness.Pod{}, log: &harness.SyncBuffer{}}
	c := ctx(t)
	if err := f.c.Namespace(c, "shunt-system", nil); err != nil {
		t.Fatal(err)
	}
	rbac, err := os.ReadFile("../../deploy/rbac.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := f.c.ApplyYAML(c, rbac); err != nil {
		t.Fatalf("deploy/rbac.yaml: %v", err)
	}
	// The agent is the ServiceAccount of deploy/rbac.yaml, nothing more.
	kc, err := cp.Kubeconfig("system:serviceaccount:shunt-system:shunt", "system:serviceaccounts", "system:serviceaccounts:shunt-system")
	if err != nil {
		t.Fatal(err)
	}
	node := &corev1.Node{}
	node.Name = testNode
	if err := f.c.Create(c, node); err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: harness.NodeIPv4.String()},
		{Type: corev1.NodeInternalIP, Address: harness.NodeIPv6.String()},
		{Type: corev1.NodeHostName, Address: testNode},
	}
	if err := f.c.UpdateStatus(c, node); err != nil {
		t.Fatal(err)
	}
	f.env = harness.New(t)
	f.cfg = agent.Config{
		Datapath:  datapath.Config{Root: f.env.BPFFSPath(), Cgroup: f.env.CgroupPath()},
		HostNetNS: f.env.Node().NetNSPath(),
		// Pods not enrolled keep the kernel's path (kube-proxy's, in a
		// real cluster).
		SocketLB:  agent.SocketLBConfig{HostNamespaceOnly: true},
		StateFile: filepath.Join(t.TempDir(), "state.json"),
		Kubernetes: &agent.KubernetesConfig{
			Kubeconfig: kc, NodeName: testNode, CgroupRoots: []string{f.env.CgroupPath()},
		},
	}
	for _, o := range opts {
		o(&f.cfg)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agent log:\n%s", tail(f.log.String(), 60))
		}
	})
	f.startAgent()
	return f
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// startAgent starts the agent and its Kubernetes source (in this process).
func (f *fixture) startAgent() {
	t := f.t
	t.Helper()
	log := slog.New(slog.NewTextHandler(f.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	f.reg = prometheus.NewRegistry()
	a, err := agent.New(f.cfg, log, f.reg)
	if err != nil {
		t.Fatal(err)
	}
	f.a = a
	rc, err := k8s.RESTConfig(f.cfg.Kubernetes.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	src, err := k8s.New(*a.Config().Kubernetes, rc, a, log, f.reg)
	if err != nil {
		t.Fatal(err)
	}
	c, cancel := context.WithCancel(context.Background())
	f.cancel, f.done = cancel, make(chan error, 1)
	go func() { f.done <- src.Run(c) }()
	t.Cleanup(f.stopAgent)
}

// stopAgent stops the source and closes the agent; the datapath stays
// pinned, as when shuntd exits.
func (f *fixture) stopAgent() {
	if f.cancel == nil {
		return
	}
	f.cancel()
	if err := <-f.done; err != nil {
		f.t.Errorf("source: %v", err)
	}
	f.cancel = nil
	f.a.Close()
}

// metric sums the samples of a metric family (all label values) whose
// labels include want (name=value pairs).
func (f *fixture) metric(name string, want ...string) float64 {
	mfs, err := f.reg.Gather()
	if err != nil {
		f.t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(want); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == want[i] && lp.GetValue() == want[i+1] {
						found = true
					}
				}
				if !found {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			}
		}
	}
	return sum
}

// eventually polls cond until it returns "" (no difference) or the deadline
// passes, then fails with the last difference.
func (f *fixture) eventually(what string, cond func() string) {
	f.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		diff := cond()
		if diff == "" {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("%s: %s", what, diff)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ---- objects ----

// splitYAML returns the documents of a multi-document manifest.
func splitYAML(data []byte) [][]byte {
	var out [][]byte
	for _, d := range strings.Split(string(data), "\n---") {
		if strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(d), "---")) != "" {
			out = append(out, []byte(d))
		}
	}
	return out
}

func decode(t *testing.T, doc []byte) any {
	t.Helper()
	var meta struct{ Kind string }
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		t.Fatal(err)
	}
	var obj any
	switch meta.Kind {
	case "Namespace":
		obj = &corev1.Namespace{}
	case "Service":
		obj = &corev1.Service{}
	case "EndpointSlice":
		obj = &discoveryv1.EndpointSlice{}
	case "Pod":
		obj = &corev1.Pod{}
	default:
		t.Fatalf("unsupported kind %q in test manifest", meta.Kind)
	}
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		t.Fatalf("%s: %v\n%s", meta.Kind, err, doc)
	}
	return obj
}

// applyYAML creates the objects of a manifest, or updates them when they
// exist. A new Pod (spec.nodeName defaults to the test node) gets a harness
// pod with its UID and a pause process, like a sandbox.
func (f *fixture) applyYAML(manifest []byte) {
	t := f.t
	t.Helper()
	for _, doc := range splitYAML(manifest) {
		f.apply(decode(t, doc))
	}
}

func (f *fixture) apply(obj any) {
	t := f.t
	t.Helper()
	c := ctx(t)
	switch o := obj.(type) {
	case *corev1.Namespace:
		cur := &corev1.Namespace{}
		cur.Name = o.Name
		if err := f.c.Get(c, cur); kube.NotFound(err) {
			if err := f.c.Namespace(c, o.Name, o.Labels); err != nil {
				t.Fatal(err)
			}
			if len(o.Annotations) == 0 {
				return
			}
			f.must(f.c.Get(c, cur))
		} else if err != nil {
			t.Fatal(err)
		}
		cur.Labels, cur.Annotations = o.Labels, o.Annotations
		f.must(f.c.Update(c, cur))
	case *corev1.Service:
		status := o.Status
		cur := &corev1.Service{}
		cur.Name, cur.Namespace = o.Name, o.Namespace
		if err := f.c.Get(c, cur); kube.NotFound(err) {
			f.must(f.c.Create(c, o))
		} else if err != nil {
			t.Fatal(err)
		} else {
			o.ResourceVersion = cur.ResourceVersion
			if len(o.Spec.ClusterIPs) == 0 {
				o.Spec.ClusterIP, o.Spec.ClusterIPs = cur.Spec.ClusterIP, cur.Spec.ClusterIPs
			}
			f.must(f.c.Update(c, o))
		}
		if len(status.LoadBalancer.Ingress) > 0 {
			o.Status = status
			f.must(f.c.UpdateStatus(c, o))
		}
	case *discoveryv1.EndpointSlice:
		cur := &discoveryv1.EndpointSlice{}
		cur.Name, cur.Namespace = o.Name, o.Namespace
		if err := f.c.Get(c, cur); kube.NotFound(err) {
			f.must(f.c.Create(c, o))
		} else if err != nil {
			t.Fatal(err)
		} else {
			o.ResourceVersion = cur.ResourceVersion
			f.must(f.c.Update(c, o))
		}
	case *corev1.Pod:
		cur := &corev1.Pod{}
		cur.Name, cur.Namespace = o.Name, o.Namespace
		if err := f.c.Get(c, cur); err == nil {
			cur.Labels, cur.Annotations = o.Labels, o.Annotations
			f.must(f.c.Update(c, cur))
			return
		} else if !kube.NotFound(err) {
			t.Fatal(err)
		}
		if o.Spec.NodeName == "" {
			o.Spec.NodeName = testNode
		}
		if len(o.Spec.Containers) == 0 {
			o.Spec.Containers = []corev1.Container{{Name: "app", Image: "shunt.dev/test:none"}}
		}
		f.must(f.c.Create(c, o))
		f.sandbox(o)
	}
}

// sandbox makes the harness pod of a Pod object: its cgroup carries the
// object's UID, a pause process holds its network namespace.
func (f *fixture) sandbox(p *corev1.Pod) *harness.Pod {
	f.t.Helper()
	hp := f.env.NewPodWithUID(p.Name, string(p.UID))
	pr := hp.Start(harness.ProcOpts{}, "pause")
	if err := pr.WaitReady(); err != nil {
		f.t.Fatal(err)
	}
	f.hpods[p.Namespace+"/"+p.Name] = hp
	return hp
}

func (f *fixture) deleteYAML(manifest []byte) {
	f.t.Helper()
	for _, doc := range splitYAML(manifest) {
		f.must(f.c.Delete(ctx(f.t), decode(f.t, doc)))
	}
}

func (f *fixture) must(err error) {
	f.t.Helper()
	if err != nil {
		f.t.Fatal(err)
	}
}

// ---- dumps ----

// dump prints the Kubernetes source's desired state (from the agent), the
// kernel maps and the rejection counters, deterministically.
func (f *fixture) dump() string {
	t := f.t
	var b strings.Builder
	st := f.a.Desired()
	for _, s := range st.Services {
		fmt.Fprintf(&b, "service %s\n", s.Name)
		var attrs []string
		add := func(k, v string) {
			if v != "" && v != "0" {
				attrs = append(attrs, k+"="+v)
			}
		}
		add("kind", string(s.Kind))
		add("alg", string(s.Algorithm))
		add("mode", string(s.Mode))
		add("affinity", fmt.Sprint(s.AffinityTimeout))
		add("app", s.Origin.AppProtocol)
		fmt.Fprintf(&b, "  %s\n", strings.Join(attrs, " "))
		for _, be := range s.Backends {
			fmt.Fprintf(&b, "  backend %s %s", be.Addr, be.State)
			if be.Name != "" {
				fmt.Fprintf(&b, " %s", be.Name)
			}
			b.WriteString("\n")
		}
	}
	loaded, err := f.a.Datapath().ReadServices()
	if err != nil {
		t.Fatal(err)
	}
	var maps []string
	for k, ls := range loaded {
		var slots []string
		for _, s := range ls.Slots {
			slots = append(slots, datapath.AddrPort(s).String())
		}
		sort.Strings(slots)
		maps = append(maps, strings.TrimSpace(fmt.Sprintf("map %s -> %s", datapath.FormatAddr(k), strings.Join(slots, " "))))
	}
	sort.Strings(maps)
	for _, m := range maps {
		b.WriteString(m + "\n")
	}
	for _, p := range st.Pods {
		fmt.Fprintf(&b, "pod %s socketLB=%s sockmap=%s", p.Name, p.SocketLB, p.Sockmap)
		if p.Sidecar != nil {
			js, err := json.Marshal(p.Sidecar)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(&b, " sidecar=%s", js)
		}
		b.WriteString("\n")
	}
	pods, err := f.a.Datapath().ReadPods()
	if err != nil {
		t.Fatal(err)
	}
	byCookie := map[uint64]string{}
	for k, hp := range f.hpods {
		if c, err := hp.NetNSCookie(); err == nil {
			byCookie[c] = k
		}
	}
	var pl []string
	for c, info := range pods {
		n := byCookie[c]
		if n == "" {
			n = fmt.Sprintf("unknown-netns-%d", c)
		}
		line := fmt.Sprintf("podmap %s socklb=%d", n, info.Socklb)
		if info.Flags&datapath.PodFlagSidecar != 0 {
			line += " sidecar"
		}
		pl = append(pl, line)
	}
	sort.Strings(pl)
	for _, p := range pl {
		b.WriteString(p + "\n")
	}
	for _, r := range []string{"annotation", "conflict", "pod", "port", "service"} {
		if v := f.metric("shunt_k8s_rejected_total", "reason", r); v != 0 {
			fmt.Fprintf(&b, "rejected %s %v\n", r, v)
		}
	}
	return b.String()
}

// wantDump waits until the dump equals want.
func (f *fixture) wantDump(want string) {
	f.t.Helper()
	var got string
	f.eventually("state", func() string {
		got = f.dump()
		if got == want {
			return ""
		}
		return "dump differs:\n" + lineDiff(want, got)
	})
}

// lineDiff shows the lines only in want (-) and only in got (+).
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for _, l := range w {
		if !slices.Contains(g, l) {
			b.WriteString("- " + l + "\n")
		}
	}
	for _, l := range g {
		if !slices.Contains(w, l) {
			b.WriteString("+ " + l + "\n")
		}
	}
	if b.Len() == 0 {
		return "same lines, different order:\n" + got
	}
	return b.String()
}

// settle gives the agent time to apply (only used to record goldens with
// -update; tests wait for an expected state instead).
func (f *fixture) settle() { time.Sleep(time.Second) }
