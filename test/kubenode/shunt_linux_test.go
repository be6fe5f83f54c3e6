package kubenode_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/agent/k8s"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/test/kube"
	"github.com/shuntmesh/shunt/test/kubenode"
)

// cluster is a real control plane, a real node and Shunt's agent running in
// this process with the Kubernetes source (as the ServiceAccount of
// deploy/rbac.yaml), attached to the node's pods cgroup, with
// socketLB.hostNamespaceOnly: pods not enrolled keep the kernel's path,
// which here has no kube-proxy: a VIP is unreachable from a pod.
type cluster struct {
	t   *testing.T
	cp  *kube.ControlPlane
	c   *kube.Client
	n   *kubenode.Node
	a   *agent.Agent
	log *harness.SyncBuffer
}

func newCluster(t *testing.T) *cluster {
	cp := kube.Start(t, kube.Options{})
	n := kubenode.Start(t, cp, kubenode.Options{})
	cl := &cluster{t: t, cp: cp, c: cp.Admin(), n: n, log: &harness.SyncBuffer{}}
	c := ctx(t)
	if err := cl.c.Namespace(c, "shunt-system", nil); err != nil {
		t.Fatal(err)
	}
	rbac, err := os.ReadFile(filepath.Join(kubenode.RepoRoot(), "deploy", "rbac.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.c.ApplyYAML(c, rbac); err != nil {
		t.Fatal(err)
	}
	kc, err := cp.Kubeconfig("system:serviceaccount:shunt-system:shunt", "system:serviceaccounts", "system:serviceaccounts:shunt-system")
	if err != nil {
		t.Fatal(err)
	}
	if err := harness.EnsureBPFFS(); err != nil {
		t.Fatal(err)
	}
	bpffs, err := os.MkdirTemp(harness.BPFFSRoot, "shunt-kubenode-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := datapath.Cleanup(bpffs); err != nil {
			t.Errorf("datapath cleanup: %v", err)
		}
		if err := os.RemoveAll(bpffs); err != nil {
			t.Errorf("remove %s: %v", bpffs, err)
		}
	})
	cfg := agent.Config{
		Datapath:  datapath.Config{Root: bpffs, Cgroup: n.PodsCgroup()},
		SocketLB:  agent.SocketLBConfig{HostNamespaceOnly: true},
		StateFile: filepath.Join(t.TempDir(), "state.json"),
		Kubernetes: &agent.KubernetesConfig{
			Kubeconfig: kc, NodeName: n.Name(),
			// The node's kubelet has its own cgroupRoot: the kubelet's
			// layout starts below it in every hierarchy.
			CgroupRoots: n.CgroupRoots(),
		},
	}
	log := slog.New(slog.NewTextHandler(cl.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	reg := prometheus.NewRegistry()
	a, err := agent.New(cfg, log, reg)
	if err != nil {
		t.Fatal(err)
	}
	cl.a = a
	rc, err := k8s.RESTConfig(kc)
	if err != nil {
		t.Fatal(err)
	}
	src, err := k8s.New(*a.Config().Kubernetes, rc, a, log, reg)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("source: %v", err)
		}
		a.Close()
		if t.Failed() {
			t.Logf("agent log:\n%s", tail(cl.log.String(), 60))
		}
	})
	return cl
}

func tail(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// eventually polls cond until it returns "" or a minute passes.
func (cl *cluster) eventually(what string, cond func() string) {
	cl.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		diff := cond()
		if diff == "" {
			return
		}
		if time.Now().After(deadline) {
			cl.t.Fatalf("%s: %s", what, diff)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// connect runs podapp connect in the pod's app container.
func (cl *cluster) connect(pod *corev1.Pod, target string, count int) harness.ConnectResult {
	cl.t.Helper()
	out, err := cl.n.Exec(ctx(cl.t), pod, "app", kubenode.AppPath, "connect", "--target", target, "--count", strconv.Itoa(count), "--timeout", "2s")
	if err != nil {
		cl.t.Fatal(err)
	}
	r, err := harness.ParseConnectResult(out)
	if err != nil {
		cl.t.Fatalf("connect output %q: %v", out, err)
	}
	return r
}

// answeredBy returns "" when all count connections succeeded, each
// answered by one of want, and every one of want answered.
func answeredBy(r harness.ConnectResult, count int, want ...string) string {
	if r.OK != count {
		return fmt.Sprintf("%d of %d connections ok: %v", r.OK, count, r.Errors)
	}
	var got []string
	for id := range r.Backends {
		got = append(got, id)
	}
	sort.Strings(got)
	sort.Strings(want)
	if !slices.Equal(got, want) {
		return fmt.Sprintf("answered by %v, want %v", r.Backends, want)
	}
	return ""
}

// slots returns the sorted backends of frontend in the kernel's services map.
func (cl *cluster) slots(frontend netip.AddrPort) string {
	loaded, err := cl.a.Datapath().ReadServices()
	if err != nil {
		cl.t.Fatal(err)
	}
	ls, ok := loaded[datapath.MakeAddr(frontend, mesh.TCP)]
	if !ok {
		return "(absent)"
	}
	var s []string
	for _, sl := range ls.Slots {
		if a := datapath.AddrPort(sl).String(); !slices.Contains(s, a) {
			s = append(s, a)
		}
	}
	sort.Strings(s)
	return strings.Join(s, " ")
}

func endpoints(port int, pods ...*corev1.Pod) string {
	var s []string
	for _, p := range pods {
		s = append(s, fmt.Sprintf("%s:%d", p.Status.PodIP, port))
	}
	sort.Strings(s)
	return strings.Join(s, " ")
}

// enrolled returns the agent's status of pod key (ns/name), if enrolled.
func (cl *cluster) enrolled(key string) (agent.PodStatus, bool) {
	st, err := cl.a.Status()
	if err != nil {
		cl.t.Fatal(err)
	}
	for _, p := range st.Pods {
		if p.Name == key {
			return p, true
		}
	}
	return agent.PodStatus{}, false
}

func (cl *cluster) counter(name string) uint64 {
	st, err := cl.a.Status()
	if err != nil {
		cl.t.Fatal(err)
	}
	return st.Counters[name]
}

func (cl *cluster) labelNamespace(ns string, on bool) {
	cl.t.Helper()
	n := &corev1.Namespace{}
	n.Name = ns
	patch := `{"metadata":{"labels":{"shunt.dev/enabled":null}}}`
	if on {
		patch = `{"metadata":{"labels":{"shunt.dev/enabled":"true"}}}`
	}
	if err := cl.c.MergePatch(ctx(cl.t), n, patch); err != nil {
		cl.t.Fatal(err)
	}
}

func (cl *cluster) runPod(pod *corev1.Pod) *corev1.Pod {
	cl.t.Helper()
	p, err := cl.n.RunPod(ctx(cl.t), pod)
	if err != nil {
		cl.t.Fatal(err)
	}
	return p
}

func webService(ns string) *corev1.Service {
	s := &corev1.Service{}
	s.Name, s.Namespace = "web", ns
	s.Spec.Ports = []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}
	return s
}

// End to end on a real node: real pods from the kubelet and containerd, a
// Service with a ClusterIP and an EndpointSlice over three backend pods, and
// Shunt with socketLB.hostNamespaceOnly. Labelling the namespace enrolls the
// client pod (its UID → the kubelet's cgroupfs cgroup → its process → its
// network namespace, the same one the pod's own processes report) and its
// connections to the VIP are balanced by Shunt over the three backends;
// without Shunt the VIP is unreachable (no kube-proxy). Unlabelling takes the
// pod out while a connection made through Shunt keeps carrying verified
// bytes; the backend set follows pods added and removed; a deleted pod
// leaves the datapath. Then the node is gone and the machine is as before.
func TestShuntOnRealNode(t *testing.T) {
	kubenode.CheckHost(t, "cluster", func(t *testing.T) {
		cl := newCluster(t)
		t.Run("socketLB", cl.testSocketLB)
		t.Run("sidecar", cl.testSidecar)
	})
}

func (cl *cluster) testSocketLB(t *testing.T) {
	cl.t = t
	c := ctx(t)
	const ns = "shop"
	if err := cl.c.Namespace(c, ns, nil); err != nil {
		t.Fatal(err)
	}
	var bes []*corev1.Pod
	for i := range 3 {
		bes = append(bes, cl.runPod(cl.n.NewPod(ns, fmt.Sprintf("be%d", i), map[string]string{"app": "web"}, kubenode.ServeContainer(8080))))
	}
	client := cl.runPod(cl.n.NewPod(ns, "client", nil, kubenode.AppContainer("app", "pause")))
	svc := webService(ns)
	if err := cl.c.Create(c, svc); err != nil {
		t.Fatal(err)
	}
	if err := cl.n.EndpointSlice(c, svc, bes...); err != nil {
		t.Fatal(err)
	}
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	// The same backends behind a NodePort: its frontend is the node's
	// address (the Node's InternalIP, which the agent reads).
	svcNP := webService(ns)
	svcNP.Name, svcNP.Spec.Type = "web-np", corev1.ServiceTypeNodePort
	if err := cl.c.Create(c, svcNP); err != nil {
		t.Fatal(err)
	}
	if err := cl.n.EndpointSlice(c, svcNP, bes...); err != nil {
		t.Fatal(err)
	}
	nodePort := netip.AddrPortFrom(kubenode.NodeIP, uint16(svcNP.Spec.Ports[0].NodePort))
	cl.eventually("services in the map", func() string {
		for _, fe := range []netip.AddrPort{vip, nodePort} {
			if got, want := cl.slots(fe), endpoints(8080, bes...); got != want {
				return fmt.Sprintf("%s: slots %s, want %s", fe, got, want)
			}
		}
		return ""
	})

	// Not enrolled: the pod's socket keeps the VIP (hostNamespaceOnly),
	// and nothing else translates it.
	bypass := cl.counter("bypass_netns")
	if r := cl.connect(client, vip.String(), 5); r.OK != 0 || r.Errors["ENETUNREACH"] != 5 {
		t.Fatalf("before the label: %+v, want ENETUNREACH (no kube-proxy)", r)
	}
	if got := cl.counter("bypass_netns") - bypass; got != 5 {
		t.Errorf("bypass_netns grew by %d, want 5 (Shunt saw the connections and left them)", got)
	}
	if r := cl.connect(client, nodePort.String(), 3); r.OK != 0 || r.Errors["ECONNREFUSED"] != 3 {
		t.Fatalf("NodePort %s before the label: %+v, want ECONNREFUSED (nothing listens there without Shunt)", nodePort, r)
	}

	// Label: Shunt balances the pod's connections over the three backends.
	cl.labelNamespace(ns, true)
	cl.eventually("enrolled after the namespace label", func() string {
		return okOnly(cl.connect(client, vip.String(), 1))
	})
	revnat := cl.counter("revnat_hit")
	r := cl.connect(client, vip.String(), 60)
	if d := answeredBy(r, 60, "be0", "be1", "be2"); d != "" {
		t.Fatalf("enrolled: %s", d)
	}
	if len(r.Peers) != 1 || r.Peers[vip.String()] != 60 {
		t.Errorf("the app saw peers %v, want the VIP", r.Peers)
	}
	if got := cl.counter("revnat_hit") - revnat; got < 60 {
		t.Errorf("revnat_hit grew by %d, want ≥ 60 (getpeername answered with the VIP by Shunt)", got)
	}
	// The NodePort too.
	r = cl.connect(client, nodePort.String(), 30)
	if d := answeredBy(r, 30, "be0", "be1", "be2"); d != "" {
		t.Errorf("NodePort %s from the pod: %s", nodePort, d)
	}
	if len(r.Peers) != 1 || r.Peers[nodePort.String()] != 30 {
		t.Errorf("the app saw peers %v, want the NodePort %s", r.Peers, nodePort)
	}

	// The pod Shunt enrolled is this pod: same network namespace cookie as
	// its own process reports, found through the kubelet's cgroupfs layout.
	out, err := cl.n.Exec(c, client, "app", kubenode.AppPath, "info")
	if err != nil {
		t.Fatal(err)
	}
	var info harness.ProcInfo
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatal(err)
	}
	cid, err := kubenode.ContainerID(client, "app")
	if err != nil {
		t.Fatal(err)
	}
	podCgroup := fmt.Sprintf("%s/kubepods/besteffort/pod%s", cl.n.CgroupRoot(), client.UID)
	if want := podCgroup + "/" + cid; info.Cgroup != want {
		t.Errorf("the pod's process is in cgroup %s, want %s", info.Cgroup, want)
	}
	st, ok := cl.enrolled(ns + "/client")
	if !ok {
		t.Fatal("client not in the agent's status")
	}
	if st.Cookie != info.NetNSCookie || st.UID != string(client.UID) {
		t.Errorf("enrolled cookie %d uid %s, the pod's netns cookie is %d, uid %s", st.Cookie, st.UID, info.NetNSCookie, client.UID)
	}
	// Every pod of the namespace is enrolled (the backends too), each
	// under its own network namespace's cookie.
	if pods, err := cl.a.Datapath().ReadPods(); err != nil || len(pods) != 4 || pods[info.NetNSCookie].Id != st.ID {
		t.Errorf("pods map %v (%v), want 4 pods, the client (id %d) under cookie %d", pods, err, st.ID, info.NetNSCookie)
	}
	pid, ok := strings.CutSuffix(strings.TrimPrefix(st.NetNS, "/proc/"), "/ns/net")
	if !ok {
		t.Fatalf("enrolled through %s, want /proc/<pid>/ns/net", st.NetNS)
	}
	data, err := os.ReadFile("/proc/" + pid + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), "\n0::"+podCgroup+"/") && !strings.HasPrefix(string(data), "0::"+podCgroup+"/") {
		t.Errorf("the process enrollment used (pid %s) is in\n%s\nwant cgroup v2 %s/<container>", pid, data, podCgroup)
	}

	// A connection made through Shunt...
	stream, err := cl.n.StartExec(client, "app", kubenode.AppPath, "stream", "--target", vip.String(), "--bytes", "1000000000", "--chunk", "1000", "--rate-pause", "5ms")
	if err != nil {
		t.Fatal(err)
	}
	cpid, err := cl.n.ContainerPID(c, client, "app")
	if err != nil {
		t.Fatal(err)
	}
	cl.eventually("stream established to a backend", func() string {
		out, err := exec.Command("nsenter", "--net=/proc/"+strconv.Itoa(cpid)+"/ns/net", "ss", "-Htn", "state", "established").CombinedOutput()
		if err != nil || !strings.Contains(string(out), ":8080") {
			return fmt.Sprintf("no connection to a backend yet: %s %v", out, err)
		}
		return ""
	})
	// ...survives the unlabel, which takes the pod out of the datapath.
	cl.labelNamespace(ns, false)
	cl.eventually("back to the kernel path after the unlabel", func() string {
		if _, ok := cl.enrolled(ns + "/client"); ok {
			return "still enrolled"
		}
		if r := cl.connect(client, vip.String(), 1); r.Errors["ENETUNREACH"] != 1 {
			return fmt.Sprintf("a new connection: %+v", r)
		}
		return ""
	})
	if pods, err := cl.a.Datapath().ReadPods(); err != nil || len(pods) != 0 {
		t.Errorf("pods map after the unlabel: %v %v", pods, err)
	}
	select {
	case <-stream.Done():
		o, err := stream.Wait(c)
		t.Fatalf("the stream ended before it was stopped: %s %v", o, err)
	default:
	}
	time.Sleep(500 * time.Millisecond) // bytes keep flowing after the switch
	if err := stream.Signal(c, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	out, err = stream.Wait(c)
	if err != nil {
		t.Fatal(err)
	}
	var sr harness.StreamResult
	if err := json.Unmarshal(lastLine(out), &sr); err != nil {
		t.Fatalf("stream output %q: %v", out, err)
	}
	if !sr.OK || !strings.HasPrefix(sr.Backend, "be") || sr.Sent == 0 || sr.Sent != sr.Received || sr.SHA256Sent != sr.SHA256Received {
		t.Fatalf("in-flight connection across the unlabel: %+v", sr)
	}
	t.Logf("in-flight connection across the unlabel: %d bytes echoed and verified, backend %s", sr.Sent, sr.Backend)

	// The backend set follows the pods: one added, one removed.
	cl.labelNamespace(ns, true)
	cl.eventually("enrolled again", func() string { return okOnly(cl.connect(client, vip.String(), 1)) })
	bes = append(bes, cl.runPod(cl.n.NewPod(ns, "be3", map[string]string{"app": "web"}, kubenode.ServeContainer(8080))))
	if err := cl.n.EndpointSlice(c, svc, bes...); err != nil {
		t.Fatal(err)
	}
	cl.eventually("scaled to 4", func() string {
		if got, want := cl.slots(vip), endpoints(8080, bes...); got != want {
			return fmt.Sprintf("slots %s, want %s", got, want)
		}
		return ""
	})
	if d := answeredBy(cl.connect(client, vip.String(), 80), 80, "be0", "be1", "be2", "be3"); d != "" {
		t.Fatalf("4 backends: %s", d)
	}
	if err := cl.n.DeletePod(c, bes[0]); err != nil {
		t.Fatal(err)
	}
	bes = bes[1:]
	if err := cl.n.EndpointSlice(c, svc, bes...); err != nil {
		t.Fatal(err)
	}
	cl.eventually("scaled to 3", func() string {
		if got, want := cl.slots(vip), endpoints(8080, bes...); got != want {
			return fmt.Sprintf("slots %s, want %s", got, want)
		}
		return ""
	})
	if d := answeredBy(cl.connect(client, vip.String(), 60), 60, "be1", "be2", "be3"); d != "" {
		t.Fatalf("be0 removed: %s", d)
	}

	// The pod goes away: so does its enrollment.
	if err := cl.n.DeletePod(c, client); err != nil {
		t.Fatal(err)
	}
	cl.eventually("client left the datapath", func() string {
		if _, ok := cl.enrolled(ns + "/client"); ok {
			return "still enrolled"
		}
		pods, err := cl.a.Datapath().ReadPods()
		if _, ok := pods[info.NetNSCookie]; err != nil || ok || len(pods) != 3 {
			return fmt.Sprintf("pods map %v %v, want the 3 backends only", pods, err)
		}
		return ""
	})
}

func okOnly(r harness.ConnectResult) string {
	if r.OK != 1 {
		return fmt.Sprintf("%+v", r)
	}
	return ""
}

func lastLine(b []byte) []byte {
	l := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	return l[len(l)-1]
}

// stats sends SIGUSR1 to the sidecar container and returns the counters of
// the STATS line it prints (read from its container log).
func (cl *cluster) sidecarStats(pod *corev1.Pod, seen int) (harness.SidecarStats, int) {
	t := cl.t
	t.Helper()
	cid, err := kubenode.ContainerID(pod, "istio-proxy")
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.n.Kill(ctx(t), cid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	var st harness.SidecarStats
	var n int
	cl.eventually("sidecar STATS line", func() string {
		logs, err := cl.n.Logs(pod, "istio-proxy")
		if err != nil {
			return err.Error()
		}
		var lines []string
		for _, l := range strings.Split(logs, "\n") {
			if j, ok := strings.CutPrefix(l, "STATS "); ok {
				lines = append(lines, j)
			}
		}
		if len(lines) <= seen {
			return fmt.Sprintf("%d STATS lines, waiting for line %d", len(lines), seen+1)
		}
		n = len(lines)
		if err := json.Unmarshal([]byte(lines[n-1]), &st); err != nil {
			return err.Error()
		}
		return ""
	})
	return st, n
}

// A sidecar pod from Kubernetes: Istio's status annotation marks the pod,
// the istio-proxy container runs a Go proxy (read/write relays, no io.Copy)
// as uid 1337 on 15001/15006, traffic.sidecar.istio.io/excludeOutboundPorts
// exempts a port. The app's connection to a Service VIP is steered to the
// proxy, whose SO_ORIGINAL_DST answers the VIP; the proxy's own connection
// is balanced by Shunt to the backend; the excluded port is not steered.
func (cl *cluster) testSidecar(t *testing.T) {
	cl.t = t
	c := ctx(t)
	const ns = "mesh"
	if err := cl.c.Namespace(c, ns, map[string]string{"shunt.dev/enabled": "true"}); err != nil {
		t.Fatal(err)
	}
	be := kubenode.AppContainer("app", "serve", "--id", "$(POD_NAME)", "--listen", "0.0.0.0:8080", "--listen", "0.0.0.0:9090")
	be.ReadinessProbe = kubenode.ServeContainer(8080).ReadinessProbe
	echo := cl.runPod(cl.n.NewPod(ns, "echo", nil, be))
	svc := webService(ns)
	if err := cl.c.Create(c, svc); err != nil {
		t.Fatal(err)
	}
	if err := cl.n.EndpointSlice(c, svc, echo); err != nil {
		t.Fatal(err)
	}
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)

	proxy := kubenode.AppContainer("istio-proxy", "sidecar", "--outbound", "127.0.0.1:15001", "--inbound", "0.0.0.0:15006", "--log-conns")
	uid := int64(1337)
	proxy.SecurityContext = &corev1.SecurityContext{RunAsUser: &uid, RunAsGroup: &uid}
	pod := cl.n.NewPod(ns, "meshy", nil, kubenode.AppContainer("app", "pause"), proxy)
	pod.Annotations = map[string]string{
		k8s.IstioStatus:               `{"initContainers":["istio-init"],"containers":["istio-proxy"]}`,
		k8s.IstioExcludeOutboundPorts: "9090",
	}
	pod = cl.runPod(pod)
	// No readiness probe on the proxy (the kubelet's probe would be a
	// connection without an original destination): it says READY.
	cl.eventually("sidecar listening", func() string {
		if logs, err := cl.n.Logs(pod, "istio-proxy"); err != nil || !strings.Contains(logs, "READY\n") {
			return fmt.Sprintf("log %q %v", logs, err)
		}
		return ""
	})
	cl.eventually("pod enrolled with its sidecar", func() string {
		st, ok := cl.enrolled(ns + "/meshy")
		if !ok || st.Sidecar == nil {
			return fmt.Sprintf("status %+v", st)
		}
		if st.Sidecar.UID != 1337 || !slices.Equal(st.Sidecar.ExcludeOutboundPorts, []uint16{9090}) {
			return fmt.Sprintf("sidecar %+v, want uid 1337 (runAsUser), excluded port 9090", *st.Sidecar)
		}
		if got, want := cl.slots(vip), endpoints(8080, echo); got != want {
			return fmt.Sprintf("slots %s, want %s", got, want)
		}
		return ""
	})
	before, _ := cl.enrolled(ns + "/meshy")
	_, seen := cl.sidecarStats(pod, 0)
	statsBefore, seen := cl.sidecarStats(pod, seen)

	// The app connects to the VIP: steered to the proxy, which learns the
	// VIP and connects there itself (balanced by Shunt: uid 1337 is exempt
	// from steering, not from the socket LB).
	r := cl.connect(pod, vip.String(), 10)
	if d := answeredBy(r, 10, "echo"); d != "" || r.Peers[vip.String()] != 10 {
		t.Fatalf("app -> VIP through the sidecar: %s, peers %v", d, r.Peers)
	}
	after, _ := cl.enrolled(ns + "/meshy")
	for k, want := range map[string]uint64{"steer_outbound": 10, "origdst_answer": 10} {
		if got := after.Counters[k] - before.Counters[k]; got != want {
			t.Errorf("pod counter %s grew by %d, want %d", k, got, want)
		}
	}
	stats, seen := cl.sidecarStats(pod, seen)
	if got := stats.OutboundAccepted - statsBefore.OutboundAccepted; got != 10 {
		t.Errorf("the sidecar accepted %d outbound connections, want 10", got)
	}
	if got := stats.OrigDstOK - statsBefore.OrigDstOK; got != 10 || stats.OrigDstFailed != 0 || stats.Loops != 0 {
		t.Errorf("SO_ORIGINAL_DST: %d answered (want 10), %d failed, %d loops", got, stats.OrigDstFailed, stats.Loops)
	}
	logs, err := cl.n.Logs(pod, "istio-proxy")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(logs, "CONN outbound "+vip.String()+"\n"); got != 10 {
		t.Errorf("the sidecar learned the original destination %s %d times, want 10; log:\n%s", vip, got, logs)
	}

	// The excluded port goes straight to the pod.
	r = cl.connect(pod, echo.Status.PodIP+":9090", 3)
	if d := answeredBy(r, 3, "echo"); d != "" {
		t.Fatalf("excluded port: %s", d)
	}
	final, _ := cl.enrolled(ns + "/meshy")
	if got := final.Counters["steer_outbound"] - after.Counters["steer_outbound"]; got != 0 {
		t.Errorf("excluded port: %d connections steered", got)
	}
	if got := final.Counters["steer_skip"] - after.Counters["steer_skip"]; got < 3 {
		t.Errorf("excluded port: steer_skip grew by %d, want ≥ 3", got)
	}
	s, seen := cl.sidecarStats(pod, seen)
	if s.OutboundAccepted != stats.OutboundAccepted {
		t.Errorf("excluded port: the sidecar accepted %d more", s.OutboundAccepted-stats.OutboundAccepted)
	}

	// Same-node sidecar to sidecar: a second Istio-style pod serves a
	// Service. The client's proxy connects to that VIP; Shunt balances it
	// to the server pod and steers it to that pod's inbound listener
	// (15006), whose proxy learns the pod address as the original
	// destination and hands the connection to its app. The first request
	// succeeds (no learning round).
	srvProxy := kubenode.AppContainer("istio-proxy", "sidecar", "--outbound", "127.0.0.1:15001", "--inbound", "0.0.0.0:15006", "--log-conns")
	srvProxy.SecurityContext = proxy.SecurityContext
	srvApp := kubenode.AppContainer("app", "serve", "--id", "$(POD_NAME)", "--listen", "0.0.0.0:8080")
	srv := cl.n.NewPod(ns, "meshy-server", map[string]string{"app": "meshy-server"}, srvApp, srvProxy)
	srv.Annotations = map[string]string{k8s.IstioStatus: `{"initContainers":["istio-init"],"containers":["istio-proxy"]}`}
	srv = cl.runPod(srv)
	cl.eventually("server sidecar listening", func() string {
		if logs, err := cl.n.Logs(srv, "istio-proxy"); err != nil || !strings.Contains(logs, "READY\n") {
			return fmt.Sprintf("log %q %v", logs, err)
		}
		return ""
	})
	meshSvc := webService(ns)
	meshSvc.Name = "meshy-server"
	if err := cl.c.Create(c, meshSvc); err != nil {
		t.Fatal(err)
	}
	if err := cl.n.EndpointSlice(c, meshSvc, srv); err != nil {
		t.Fatal(err)
	}
	meshVIP := netip.AddrPortFrom(netip.MustParseAddr(meshSvc.Spec.ClusterIP), 80)
	cl.eventually("server pod enrolled with its sidecar, service in the map", func() string {
		if st, ok := cl.enrolled(ns + "/meshy-server"); !ok || st.Sidecar == nil {
			return fmt.Sprintf("status %+v", st)
		}
		if got, want := cl.slots(meshVIP), endpoints(8080, srv); got != want {
			return fmt.Sprintf("slots %s, want %s", got, want)
		}
		return ""
	})
	before, _ = cl.enrolled(ns + "/meshy")
	_, srvSeen := cl.sidecarStats(srv, 0)
	srvBefore, srvSeen := cl.sidecarStats(srv, srvSeen)
	r = cl.connect(pod, meshVIP.String(), 10)
	if d := answeredBy(r, 10, "meshy-server"); d != "" || r.Peers[meshVIP.String()] != 10 {
		t.Fatalf("app -> sidecar -> server's sidecar -> server: %s, peers %v", d, r.Peers)
	}
	after, _ = cl.enrolled(ns + "/meshy")
	for k, want := range map[string]uint64{"steer_outbound": 10, "steer_inbound": 10} {
		if got := after.Counters[k] - before.Counters[k]; got != want {
			t.Errorf("client pod counter %s grew by %d, want %d", k, got, want)
		}
	}
	srvStats, _ := cl.sidecarStats(srv, srvSeen)
	if got := srvStats.InboundAccepted - srvBefore.InboundAccepted; got != 10 || srvStats.OrigDstFailed != 0 || srvStats.Loops != 0 {
		t.Errorf("server sidecar: %d inbound connections (want 10), %d without original destination, %d loops", got, srvStats.OrigDstFailed, srvStats.Loops)
	}
	srvLogs, err := cl.n.Logs(srv, "istio-proxy")
	if err != nil {
		t.Fatal(err)
	}
	if want := "CONN inbound " + srv.Status.PodIP + ":8080\n"; strings.Count(srvLogs, want) != 10 {
		t.Errorf("the server's sidecar learned %q %d times, want 10; log:\n%s", want, strings.Count(srvLogs, want), srvLogs)
	}
}
