package kubenode_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/agent/k8s"
	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/test/kube"
	"github.com/shuntmesh/shunt/test/kubenode"
	"github.com/shuntmesh/shunt/test/ops"
)

const (
	dsNamespace = "shunt-system"
	dsRelease   = "shunt"
	// The image tags (and agent versions) installed, then upgraded to.
	tagA, tagB = "e2e-a", "e2e-b"
	// Where the chart mounts the node's folders in the agent's container.
	podBPFFS, podCgroupfs = "/sys/fs/bpf", "/sys/fs/cgroup"
)

// The cgroup hooks sockmesh attaches (sk_msg attaches to its sockhash).
var cgroupHooks = datapath.CgroupAttachTypes()

// TestDaemonSetOnRealNode installs the Helm chart on a real node: a real
// control plane with kube-controller-manager (DaemonSet, garbage collector,
// EndpointSlice and root CA publisher controllers) and kube-scheduler, the
// kubelet with containerd and runc, and shuntd's image built the way
// `make image` builds it, imported into the node's containerd. helm (built
// from the Go module proxy) installs the release; the DaemonSet's pod runs
// shuntd as the chart says (host network and PID, the chart's capabilities,
// the node's bpffs and cgroups, the in-cluster ServiceAccount) and the
// kubelet's probes make it Ready. The agent attaches only to the node's
// pods cgroup (below the kubelet's private cgroupRoot), balances an
// enrolled pod's connections to a Service over three backend pods; a helm
// upgrade to a new image replaces the agent while a client keeps opening
// connections and one long stream flows: no request fails, no byte is
// lost, and the new agent adopts the pinned maps and links. helm uninstall
// makes the agent remove its datapath: no pin, link, program or map of it
// is left, and the kubelet and containerd cleaned up its pod. Then the node
// is gone and the machine is as before.
func TestDaemonSetOnRealNode(t *testing.T) {
	kubenode.CheckHost(t, "chart", testDaemonSet)
}

// dsTest is the state of one run.
type dsTest struct {
	*cluster // its agent is the DaemonSet's: cluster.a stays nil
	h        *ops.Helm
	values   string // values file
	bpffs    string // the node's bpffs (host path)
	state    string // the agent's state folder (host path)
	podsCg   string // the cgroup the agent attaches to (host path)
	mport    int
}

func testDaemonSet(t *testing.T) {
	h := ops.NewHelm(t) // fails early when helm was not built
	start := time.Now()
	cp := kube.Start(t, kube.Options{
		Controllers: []string{"daemonset-controller", "garbage-collector-controller", "endpointslice-controller", "root-ca-certificate-publisher-controller"},
		Scheduler:   true,
	})
	n := kubenode.Start(t, cp, kubenode.Options{})
	d := &dsTest{cluster: &cluster{t: t, cp: cp, c: cp.Admin(), n: n, log: &harness.SyncBuffer{}}, h: h}
	t.Logf("control plane and node up in %s", time.Since(start).Round(time.Second))
	c, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	// The image, twice: the upgrade needs a second tag.
	start = time.Now()
	for _, tag := range []string{tagA, tagB} {
		archive := filepath.Join(n.Dir(), "images", "shuntd-"+tag+".tar")
		if err := kubenode.BuildShuntdImage(archive, tag); err != nil {
			t.Fatal(err)
		}
		if err := n.ImportImage(c, archive); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("images %s and %s built and imported in %s", tagA, tagB, time.Since(start).Round(time.Second))

	// The node's folders the chart mounts: bpffs and cgroups shared (as
	// systemd mounts them), the agent's own folders in the node's private
	// folder.
	var err error
	if d.bpffs, err = n.SharedBPFFS(); err != nil {
		t.Fatal(err)
	}
	// A new bpffs holds the kernel's own preloaded iterators (maps.debug,
	// progs.debug): what the agent must leave is exactly this.
	bpffsBefore, err := dirNames(d.bpffs)
	if err != nil {
		t.Fatal(err)
	}
	cgfs, err := n.SharedCgroup2()
	if err != nil {
		t.Fatal(err)
	}
	// The agent's container sees the node's cgroup v2 hierarchy at
	// /sys/fs/cgroup.
	inPod := func(hostPath string) string { return podCgroupfs + strings.TrimPrefix(hostPath, n.CgroupV2Mount()) }
	d.state = filepath.Join(n.Dir(), "shunt-state")
	d.podsCg = n.PodsCgroup()
	roots := []string{inPod(n.CgroupV2Path())} // the kubelet's cgroupRoot
	// The agent's metrics listen on every address (host network).
	if d.mport, err = harness.FreePortOn(""); err != nil {
		t.Fatal(err)
	}
	vals := map[string]any{
		"image":     map[string]any{"repository": "shunt/shuntd", "tag": tagA, "pullPolicy": "Never"},
		"hostPaths": map[string]any{"bpffs": d.bpffs, "cgroup": cgfs, "run": filepath.Join(n.Dir(), "shunt-run"), "state": d.state},
		// Attach below the kubelet's cgroupRoot of this node only, never
		// at the machine's cgroup root.
		"config":     map[string]any{"datapath": map[string]any{"cgroup": inPod(d.podsCg)}},
		"kubernetes": map[string]any{"cgroupRoots": roots, "apiServer": map[string]any{"host": "127.0.0.1", "port": cp.Port()}},
		"metrics":    map[string]any{"port": d.mport},
	}
	data, err := yaml.Marshal(vals)
	if err != nil {
		t.Fatal(err)
	}
	d.values = filepath.Join(n.Dir(), "values.yaml")
	if err := os.WriteFile(d.values, data, 0o600); err != nil {
		t.Fatal(err)
	}
	// Whatever happens, the release goes before the node does (the node's
	// cleanup then stops the pods, unmounts the bpffs and frees what may
	// still be pinned there).
	t.Cleanup(d.cleanup)

	start = time.Now()
	d.helm("install", dsRelease, ops.ChartDir, "--create-namespace", "--values", d.values)
	podA := d.agentPod(c, "")
	t.Logf("DaemonSet pod %s Ready %s after helm install", podA.Name, time.Since(start).Round(time.Second))
	d.checkAgentPod(c, podA, tagA)
	stA := d.agentStatus(c, podA)
	if stA.Version != tagA || stA.Cgroup != inPod(d.podsCg) || stA.BPFFS != podBPFFS+"/shunt" {
		t.Errorf("agent status: version %s, cgroup %s, bpffs %s; want %s, %s, %s", stA.Version, stA.Cgroup, stA.BPFFS, tagA, inPod(d.podsCg), podBPFFS+"/shunt")
	}
	objsA := d.checkAttachment(t)
	t.Logf("attached: %d links (%d on %s), %d programs, %d maps pinned", len(objsA.links), objsA.cgroupLinks, d.podsCg, len(objsA.progs), len(objsA.maps))

	// A labelled namespace, three backends behind a Service, a client.
	const ns = "shop"
	if err := d.c.Namespace(c, ns, map[string]string{"shunt.dev/enabled": "true"}); err != nil {
		t.Fatal(err)
	}
	var bes []*corev1.Pod
	for i := range 3 {
		bes = append(bes, d.runPod(n.NewPod(ns, fmt.Sprintf("be%d", i), map[string]string{"app": "web"}, kubenode.ServeContainer(8080))))
	}
	client := d.runPod(n.NewPod(ns, "client", nil, kubenode.AppContainer("app", "pause")))
	svc := webService(ns)
	svc.Spec.Selector = map[string]string{"app": "web"} // EndpointSlices by the controller
	if err := d.c.Create(c, svc); err != nil {
		t.Fatal(err)
	}
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	d.eventually("service and client in the agent", func() string {
		s, ok := d.service(c, podA, vip)
		if !ok {
			return "no service " + vip.String()
		}
		if got, want := backendsOf(s), endpoints(8080, bes...); got != want {
			return fmt.Sprintf("backends %s, want %s", got, want)
		}
		if p, ok := d.podStatus(c, podA, ns+"/client"); !ok || p.Cookie == 0 {
			return "client not enrolled"
		}
		return ""
	})

	// Balanced over the three backends, translated once per connection by
	// the socket LB (no per-packet NAT: the agent counts each one), the app
	// sees the VIP.
	const conns = 90
	s0, _ := d.service(c, podA, vip)
	r := d.connect(client, vip.String(), conns)
	if diff := answeredBy(r, conns, "be0", "be1", "be2"); diff != "" {
		t.Fatalf("client -> %s: %s", vip, diff)
	}
	for be, k := range r.Backends {
		if k < conns/9 {
			t.Errorf("backend %s answered %d of %d connections: not balanced (%v)", be, k, conns, r.Backends)
		}
	}
	if r.Peers[vip.String()] != conns {
		t.Errorf("the app saw peers %v, want %s for all %d", r.Peers, vip, conns)
	}
	s1, _ := d.service(c, podA, vip)
	if got := s1.Translations - s0.Translations; got != conns {
		t.Errorf("the agent translated %d connections to %s, want %d", got, vip, conns)
	}
	t.Logf("%d connections to %s: per backend %v; agent: %d translations", conns, vip, r.Backends, s1.Translations-s0.Translations)

	// Accelerated: a sidecar pair. Both pods carry Istio's status
	// annotation and an istio-proxy container (a Go proxy as uid 1337 on
	// 15001/15006); the app's connection to the Service is steered to its
	// sidecar, the sidecar's to the server pod's inbound listener, and with
	// sockmap auto (the agent's self-test passed in its container) the
	// sidecar-to-sidecar hop is short-circuited: sends are redirected from
	// socket to socket, every byte echoed and checked.
	front, meshVIP := d.sidecarPair(c, podA)
	if st := d.agentStatus(c, podA); !st.SockmapSelfTest.Passed {
		t.Fatalf("the agent's sockmap self-test failed in its container: %+v", st.SockmapSelfTest)
	}
	const meshConns, askBytes = 20, 4096
	f0, _ := d.podStatus(c, podA, "mesh/front")
	e0, _ := d.podStatus(c, podA, "mesh/echo")
	out, err := n.Exec(c, front, "app", kubenode.AppPath, "connect", "--target", meshVIP.String(), "--count", strconv.Itoa(meshConns),
		"--echo", strconv.Itoa(askBytes), "--timeout", "10s")
	if err != nil {
		t.Fatal(err)
	}
	mr, err := harness.ParseConnectResult(out)
	if err != nil {
		t.Fatalf("connect output %q: %v", out, err)
	}
	if diff := answeredBy(mr, meshConns, "echo"); diff != "" {
		t.Fatalf("front -> %s through both sidecars: %s", meshVIP, diff)
	}
	f1, _ := d.podStatus(c, podA, "mesh/front")
	e1, _ := d.podStatus(c, podA, "mesh/echo")
	delta := func(a, b agent.PodStatus, k string) uint64 { return b.Counters[k] - a.Counters[k] }
	for _, x := range []struct {
		pod, counter string
		got, want    uint64
	}{
		{"front", "steer_outbound", delta(f0, f1, "steer_outbound"), meshConns}, // app -> its sidecar
		{"front", "steer_inbound", delta(f0, f1, "steer_inbound"), meshConns},   // sidecar -> echo's inbound listener
		{"front", "sock_insert", delta(f0, f1, "sock_insert"), meshConns},
		{"echo", "origdst_answer", delta(e0, e1, "origdst_answer"), meshConns},
		{"echo", "sock_insert", delta(e0, e1, "sock_insert"), meshConns},
	} {
		if x.got != x.want {
			t.Errorf("pod %s: %s grew by %d, want %d", x.pod, x.counter, x.got, x.want)
		}
	}
	for _, x := range []struct {
		pod  string
		a, b agent.PodStatus
	}{{"front", f0, f1}, {"echo", e0, e1}} {
		if delta(x.a, x.b, "msg_redirect") == 0 || delta(x.a, x.b, "bytes_redirect") < meshConns*askBytes {
			t.Errorf("pod %s: %d sends / %d bytes redirected, want at least the %d echoed bytes", x.pod,
				delta(x.a, x.b, "msg_redirect"), delta(x.a, x.b, "bytes_redirect"), meshConns*askBytes)
		}
	}
	t.Logf("sidecar pair: %d connections through both sidecars; sockmap short-cut front %d sends / %d bytes, echo %d sends / %d bytes",
		meshConns, delta(f0, f1, "msg_redirect"), delta(f0, f1, "bytes_redirect"), delta(e0, e1, "msg_redirect"), delta(e0, e1, "bytes_redirect"))

	// Upgrade to tag B while a client opens a connection every 10 ms (each
	// echoing 512 checked bytes) and one long stream flows; a second stream
	// runs through the accelerated sidecar pair.
	loop, err := n.StartExec(client, "app", kubenode.AppPath, "connect", "--target", vip.String(), "--duration", "15m",
		"--interval", "10ms", "--echo", "512", "--timeout", "10s")
	if err != nil {
		t.Fatal(err)
	}
	stream, err := n.StartExec(client, "app", kubenode.AppPath, "stream", "--target", vip.String(), "--bytes", "100000000000",
		"--chunk", "1000", "--rate-pause", "5ms", "--timeout", "30s")
	if err != nil {
		t.Fatal(err)
	}
	fBefore, _ := d.podStatus(c, podA, "mesh/front")
	eBefore, _ := d.podStatus(c, podA, "mesh/echo")
	meshStream, err := n.StartExec(front, "app", kubenode.AppPath, "stream", "--target", meshVIP.String(), "--bytes", "100000000000",
		"--chunk", "1000", "--rate-pause", "5ms", "--timeout", "30s")
	if err != nil {
		t.Fatal(err)
	}
	d.waitTranslations(c, podA, vip, s1.Translations+20, "the client loop running")
	d.waitRedirected(c, podA, fBefore, eBefore, "the stream through the sidecar pair short-circuited before the upgrade")
	linksA := d.pinnedLinks(t)
	start = time.Now()
	d.helm("upgrade", dsRelease, ops.ChartDir, "--values", d.values, "--set", "image.tag="+tagB)
	podB := d.agentPod(c, string(podA.UID))
	t.Logf("upgraded: pod %s (image %s) Ready %s after helm upgrade", podB.Name, tagB, time.Since(start).Round(time.Second))
	d.checkAgentPod(c, podB, tagB)
	d.waitPodGone(c, podA, false) // the kubelet removes its containers later (checked at the end)
	stB := d.agentStatus(c, podB)
	if stB.Version != tagB || !stB.Adopted {
		t.Errorf("new agent: version %s adopted %v, want %s adopting the pinned maps", stB.Version, stB.Adopted, tagB)
	}
	if logs, _ := n.Logs(podB, "shuntd"); !strings.Contains(logs, "adopted=true") {
		t.Errorf("the new agent's log does not say it adopted the pinned datapath:\n%s", tail(logs, 30))
	}
	// Traffic keeps flowing through the new agent's programs, and the
	// stream through the sidecar pair, whose sockets stay in the pinned
	// sockhash, keeps being short-circuited by the new sk_msg program. (The
	// new agent numbers the pods anew: their counters start from zero.)
	sB, _ := d.service(c, podB, vip)
	d.waitTranslations(c, podB, vip, sB.Translations+50, "connections after the upgrade")
	var fB, eB agent.PodStatus
	d.eventually("sidecar pair enrolled by the new agent", func() string {
		var ok1, ok2 bool
		fB, ok1 = d.podStatus(c, podB, "mesh/front")
		eB, ok2 = d.podStatus(c, podB, "mesh/echo")
		if !ok1 || !ok2 {
			return "not enrolled yet"
		}
		return ""
	})
	d.waitRedirected(c, podB, fB, eB, "the stream through the sidecar pair short-circuited after the upgrade")
	objsB := d.checkAttachment(t)
	linksB := d.pinnedLinks(t)
	if !maps.Equal(linksA, linksB) {
		t.Errorf("pinned links before the upgrade %v, after %v: want the same links (updated in place)", linksA, linksB)
	}
	if !maps.Equal(objsA.maps, objsB.maps) {
		t.Errorf("pinned maps before the upgrade %v, after %v: want the same maps (adopted)", objsA.maps, objsB.maps)
	}
	for id := range objsB.progs {
		if objsA.progs[id] {
			t.Errorf("program %d of the old agent still attached after the upgrade", id)
		}
	}
	for _, e := range []*kubenode.Exec{stream, meshStream} {
		if err := e.Signal(c, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
	}
	if err := loop.Signal(c, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	out, err = loop.Wait(c)
	if err != nil {
		t.Fatal(err)
	}
	lr, err := harness.ParseConnectResult(out)
	if err != nil {
		t.Fatalf("connect loop output %q: %v", out, err)
	}
	if lr.Fail != 0 || lr.OK < 100 || len(lr.Backends) != 3 {
		t.Errorf("connections across the upgrade: %d ok, %d failed %v, backends %v; want none failed, all 3 backends", lr.OK, lr.Fail, lr.Errors, lr.Backends)
	}
	sr := streamResult(t, c, stream, "stream across the upgrade")
	msr := streamResult(t, c, meshStream, "stream through the sidecar pair across the upgrade")
	t.Logf("across the upgrade: %d connections (each echoing 512 bytes) all ok over %v; a stream of %d bytes to %s and one of %d bytes through the sidecar pair (sockmap before and after), echoed and verified",
		lr.OK, lr.Backends, sr.Sent, sr.Backend, msr.Sent)

	// Uninstall: the agent removes its datapath, the kubelet its pod.
	all := objsA.union(objsB)
	start = time.Now()
	d.helm("uninstall", dsRelease)
	d.waitPodGone(c, podB, true)
	d.waitPodGone(c, podA, true)
	t.Logf("uninstalled: pod gone %s after helm uninstall", time.Since(start).Round(time.Second))
	d.eventually("datapath removed", func() string {
		if left := all.alive(); left != "" {
			return left
		}
		if n := attachedTo(t, d.podsCg); n != 0 {
			return fmt.Sprintf("%d programs still attached to %s", n, d.podsCg)
		}
		return ""
	})
	if left, err := dirNames(d.bpffs); err != nil || !slices.Equal(left, bpffsBefore) {
		t.Errorf("the node's bpffs %s holds %v (%v), want only what the kernel put there: %v", d.bpffs, left, err, bpffsBefore)
	}
	if _, err := os.Stat(filepath.Join(d.state, "state.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the agent's state file is left: %v", err)
	}
	// Without Shunt the VIP is unreachable again (no kube-proxy here).
	if r := d.connect(client, vip.String(), 3); r.OK != 0 || r.Errors["ENETUNREACH"] != 3 {
		t.Errorf("after uninstall: %+v, want ENETUNREACH (nothing translates the VIP)", r)
	}
}

// helm runs the cached helm against the control plane, in the release's
// namespace.
func (d *dsTest) helm(args ...string) {
	d.t.Helper()
	if _, err := d.h.Run(append(args, "--kubeconfig", d.cp.AdminKubeconfig, "--namespace", dsNamespace)...); err != nil {
		d.t.Fatal(err)
	}
}

// cleanup uninstalls the release if the test did not (deleting the
// DaemonSet when helm cannot), waits for the agent's pods to go (the agent
// then removes its datapath) and removes what it may have left pinned.
func (d *dsTest) cleanup() {
	t := d.t
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := d.h.Run("uninstall", dsRelease, "--ignore-not-found", "--kubeconfig", d.cp.AdminKubeconfig, "--namespace", dsNamespace); err != nil {
		t.Errorf("cleanup: %v", err)
		ds := &appsv1.DaemonSet{}
		ds.Name, ds.Namespace = dsRelease, dsNamespace
		if err := d.c.Delete(ctx, ds); err != nil && !kube.NotFound(err) {
			t.Errorf("cleanup: delete DaemonSet: %v", err)
		}
	}
	for {
		pods, err := d.agentPods(ctx)
		if err == nil && len(pods) == 0 {
			break
		}
		if ctx.Err() != nil {
			t.Errorf("cleanup: agent pods still there: %d %v", len(pods), err)
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if d.bpffs != "" {
		if err := datapath.Cleanup(filepath.Join(d.bpffs, "shunt")); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	}
}

// agentPods lists the release's pods.
func (d *dsTest) agentPods(ctx context.Context) ([]corev1.Pod, error) {
	var l corev1.PodList
	err := d.c.Do(ctx, "GET", "/api/v1/namespaces/"+dsNamespace+"/pods?labelSelector=app.kubernetes.io%2Finstance%3D"+dsRelease, nil, &l, "")
	return l.Items, err
}

// agentPod waits for the DaemonSet's pod other than the one with uid
// except, created and bound by the controller and the scheduler, to be
// Ready (the kubelet's startup and readiness probes).
func (d *dsTest) agentPod(ctx context.Context, except string) *corev1.Pod {
	d.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	var name, seen string
	for name == "" {
		pods, err := d.agentPods(ctx)
		seen = fmt.Sprintf("%v", err)
		for _, p := range pods {
			seen += fmt.Sprintf(" %s(%s node %q phase %s)", p.Name, p.UID, p.Spec.NodeName, p.Status.Phase)
			if string(p.UID) != except && p.DeletionTimestamp == nil && p.Spec.NodeName == d.n.Name() {
				name = p.Name
			}
		}
		if name == "" && time.Now().After(deadline) {
			d.t.Fatalf("no DaemonSet pod on the node after 3 minutes: %s\ncontroller manager:\n%s", seen, d.cp.Tail("kube-controller-manager.log"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	p, err := d.n.WaitPodReady(ctx, dsNamespace, name)
	if err != nil {
		cur := &corev1.Pod{}
		cur.Name, cur.Namespace = name, dsNamespace
		if d.c.Get(ctx, cur) == nil {
			if logs, err := d.n.Logs(cur, "shuntd"); err == nil {
				d.t.Logf("shuntd log:\n%s", tail(logs, 40))
			}
		}
		d.t.Fatal(err)
	}
	return p
}

// checkAgentPod: the pod runs the chart's container with image tag, and
// the kubelet's probes passed.
func (d *dsTest) checkAgentPod(ctx context.Context, p *corev1.Pod, tag string) {
	d.t.Helper()
	if len(p.Spec.Containers) != 1 || p.Spec.Containers[0].Image != "shunt/shuntd:"+tag {
		d.t.Fatalf("pod %s containers %+v, want shuntd with image shunt/shuntd:%s", p.Name, p.Spec.Containers, tag)
	}
	cs := p.Status.ContainerStatuses[0]
	if !cs.Ready || cs.Started == nil || !*cs.Started || cs.RestartCount != 0 || cs.Image != "docker.io/shunt/shuntd:"+tag {
		d.t.Errorf("container status %+v: want started, ready (probes), never restarted, image docker.io/shunt/shuntd:%s", cs, tag)
	}
	if !p.Spec.HostNetwork || !p.Spec.HostPID || p.Status.PodIP != kubenode.NodeIP.String() {
		d.t.Errorf("pod %s: hostNetwork %v hostPID %v IP %s", p.Name, p.Spec.HostNetwork, p.Spec.HostPID, p.Status.PodIP)
	}
	// Its metrics on the node's address and the chart's port (host
	// network), from this agent.
	hc := http.Client{Timeout: 30 * time.Second}
	resp, err := hc.Get(fmt.Sprintf("http://%s/metrics", net.JoinHostPort(kubenode.NodeIP.String(), strconv.Itoa(d.mport))))
	if err != nil {
		d.t.Fatalf("metrics: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || !strings.Contains(string(body), `version="`+tag+`"`) {
		d.t.Errorf("metrics on the node's port %d: %v; no shunt_build_info of version %s:\n%s", d.mport, err, tag, tail(string(body), 10))
	}
}

// shuntctl runs the image's shuntctl in the agent's container and decodes
// its JSON output. An exec whose output got lost (ctr's output fifos on a
// loaded machine) is retried.
func (d *dsTest) shuntctl(ctx context.Context, p *corev1.Pod, out any, args ...string) error {
	var err error
	for try := 0; try < 5; try++ {
		if try > 0 {
			time.Sleep(time.Second)
		}
		var b []byte
		if b, err = d.n.Exec(ctx, p, "shuntd", append([]string{"/usr/local/bin/shuntctl"}, args...)...); err != nil {
			continue
		}
		if err = json.Unmarshal(b, out); err == nil {
			return nil
		}
		err = fmt.Errorf("shuntctl %s: output %q: %w", strings.Join(args, " "), b, err)
	}
	return err
}

func (d *dsTest) agentStatus(ctx context.Context, p *corev1.Pod) agent.Status {
	d.t.Helper()
	var st agent.Status
	if err := d.shuntctl(ctx, p, &st, "status", "--json"); err != nil {
		d.t.Fatal(err)
	}
	return st
}

// service returns the agent's service with frontend vip (TCP).
func (d *dsTest) service(ctx context.Context, p *corev1.Pod, vip netip.AddrPort) (agent.ServiceStatus, bool) {
	d.t.Helper()
	var svcs []agent.ServiceStatus
	if err := d.shuntctl(ctx, p, &svcs, "service", "list", "--json"); err != nil {
		d.t.Fatal(err)
	}
	for _, s := range svcs {
		if s.Frontend == vip.String() && (s.Protocol == "" || strings.EqualFold(s.Protocol, "tcp")) {
			return s, true
		}
	}
	return agent.ServiceStatus{}, false
}

func (d *dsTest) podStatus(ctx context.Context, p *corev1.Pod, key string) (agent.PodStatus, bool) {
	d.t.Helper()
	for _, ps := range d.agentStatus(ctx, p).Pods {
		if ps.Name == key {
			return ps, true
		}
	}
	return agent.PodStatus{}, false
}

func backendsOf(s agent.ServiceStatus) string {
	var b []string
	for _, be := range s.Backends {
		b = append(b, be.Addr)
	}
	sort.Strings(b)
	return strings.Join(b, " ")
}

// waitTranslations waits until the agent has translated at least want
// connections to vip.
func (d *dsTest) waitTranslations(ctx context.Context, p *corev1.Pod, vip netip.AddrPort, want uint64, what string) {
	d.t.Helper()
	d.eventually(what, func() string {
		if s, _ := d.service(ctx, p, vip); s.Translations < want {
			return fmt.Sprintf("%d translations, waiting for %d", s.Translations, want)
		}
		return ""
	})
}

// waitPodGone waits until the pod is deleted from the API server (the
// kubelet stopped its containers) and, with removed, until the kubelet and
// containerd removed it: no container or sandbox of it left in the
// runtime, no folder of it in the kubelet's (the kubelet's container
// garbage collection runs once a minute).
func (d *dsTest) waitPodGone(ctx context.Context, p *corev1.Pod, removed bool) {
	d.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		var left string
		cur := &corev1.Pod{}
		cur.Name, cur.Namespace = p.Name, p.Namespace
		switch err := d.c.Get(ctx, cur); {
		case err == nil && cur.UID == p.UID:
			left = "still in the API server"
		case err != nil && !kube.NotFound(err):
			left = err.Error()
		}
		if left == "" && removed {
			ids, err := d.n.PodContainers(ctx, string(p.UID))
			if err != nil || len(ids) > 0 {
				left = fmt.Sprintf("runtime containers %v %v", ids, err)
			} else if _, err := os.Stat(d.n.PodDir(string(p.UID))); !errors.Is(err, os.ErrNotExist) {
				left = fmt.Sprintf("kubelet folder %s: %v", d.n.PodDir(string(p.UID)), err)
			}
		}
		if left == "" {
			return
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("pod %s (%s) not cleaned up after 3 minutes: %s\n%s", p.Name, p.UID, left, d.n.Tail("kubelet.log", 20))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// kernelObjects are the agent's kernel objects, by id.
type kernelObjects struct {
	links       map[link.ID]bool
	progs       map[ebpf.ProgramID]bool
	maps        map[ebpf.MapID]bool
	cgroupLinks int
}

func (o kernelObjects) union(p kernelObjects) kernelObjects {
	u := kernelObjects{links: map[link.ID]bool{}, progs: map[ebpf.ProgramID]bool{}, maps: map[ebpf.MapID]bool{}}
	for _, x := range []kernelObjects{o, p} {
		maps.Copy(u.links, x.links)
		maps.Copy(u.progs, x.progs)
		maps.Copy(u.maps, x.maps)
	}
	return u
}

// alive lists the objects still in the kernel ("" when none is).
func (o kernelObjects) alive() string {
	var left []string
	for id := range o.links {
		if l, err := link.NewFromID(id); err == nil {
			l.Close()
			left = append(left, fmt.Sprintf("link %d", id))
		}
	}
	for id := range o.progs {
		if p, err := ebpf.NewProgramFromID(id); err == nil {
			p.Close()
			left = append(left, fmt.Sprintf("program %d", id))
		}
	}
	for id := range o.maps {
		if m, err := ebpf.NewMapFromID(id); err == nil {
			m.Close()
			left = append(left, fmt.Sprintf("map %d", id))
		}
	}
	sort.Strings(left)
	return strings.Join(left, ", ")
}

// pinnedLinks maps each pinned link's file to its id.
func (d *dsTest) pinnedLinks(t *testing.T) map[string]link.ID {
	t.Helper()
	out := map[string]link.ID{}
	dir := filepath.Join(d.bpffs, "shunt", "links")
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		l, err := link.LoadPinnedLink(filepath.Join(dir, e.Name()), nil)
		if err != nil {
			t.Fatal(err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = info.ID
	}
	return out
}

// checkAttachment reads what the agent pinned in the node's bpffs (maps,
// links and their programs) and checks where its programs run: every cgroup
// link on the pods cgroup of this node, the pods cgroup running exactly
// those programs, and none of them anywhere else: no other bpf_link in the
// kernel runs one, and neither the machine's cgroup v2 root nor the node's
// cgroupRoot has one attached.
func (d *dsTest) checkAttachment(t *testing.T) kernelObjects {
	t.Helper()
	o := kernelObjects{links: map[link.ID]bool{}, progs: map[ebpf.ProgramID]bool{}, maps: map[ebpf.MapID]bool{}}
	root := filepath.Join(d.bpffs, "shunt")
	podsID, err := cgroupInode(d.podsCg)
	if err != nil {
		t.Fatal(err)
	}
	err = filepath.WalkDir(root, func(p string, e os.DirEntry, err error) error {
		if err != nil || e.IsDir() || e.Name() == ".lock" {
			return err
		}
		if m, err := ebpf.LoadPinnedMap(p, nil); err == nil {
			info, err := m.Info()
			m.Close()
			if err != nil {
				return err
			}
			id, ok := info.ID()
			if !ok {
				return fmt.Errorf("map %s: the kernel reports no id", p)
			}
			o.maps[id] = true
			return nil
		}
		l, err := link.LoadPinnedLink(p, nil)
		if err != nil {
			return fmt.Errorf("%s is neither a map nor a link: %w", p, err)
		}
		defer l.Close()
		info, err := l.Info()
		if err != nil {
			return err
		}
		o.links[info.ID] = true
		o.progs[info.Program] = true
		if cg := info.Cgroup(); cg != nil {
			o.cgroupLinks++
			if cg.CgroupId != podsID {
				t.Errorf("link %s runs on cgroup id %d, want the node's pods cgroup %s (id %d)", p, cg.CgroupId, d.podsCg, podsID)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("pins under %s: %v", root, err)
	}
	if o.cgroupLinks != len(cgroupHooks) || len(o.maps) == 0 {
		t.Fatalf("pinned under %s: %d cgroup links (want %d), %d maps", root, o.cgroupLinks, len(cgroupHooks), len(o.maps))
	}
	// The programs' own maps are the agent's too (pinned or not).
	for id := range o.progs {
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			t.Fatal(err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			t.Fatal(err)
		}
		ids, ok := info.MapIDs()
		if !ok {
			t.Fatalf("program %d: the kernel reports no map ids", id)
		}
		for _, m := range ids {
			o.maps[m] = true
		}
	}
	// No other bpf_link runs one of them.
	var it link.Iterator
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil {
			continue // gone meanwhile
		}
		if o.progs[info.Program] && !o.links[info.ID] {
			t.Errorf("program %d also runs through link %d (%v), not pinned by the agent", info.Program, info.ID, info.Type)
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	// The pods cgroup runs exactly the agent's programs on its hooks; the
	// machine's root and the node's cgroupRoot run none of them.
	if got := attachedIDs(t, d.podsCg); len(got) != len(cgroupHooks) || !all(got, o.progs) {
		t.Errorf("programs on %s: %v, want the agent's %d", d.podsCg, got, len(cgroupHooks))
	}
	for _, cg := range []string{d.n.CgroupV2Mount(), d.n.CgroupV2Path()} {
		for _, id := range attachedIDs(t, cg) {
			if o.progs[id] {
				t.Errorf("program %d of the agent is attached to %s, outside the node's pods cgroup", id, cg)
			}
		}
	}
	return o
}

func all(ids []ebpf.ProgramID, set map[ebpf.ProgramID]bool) bool {
	for _, id := range ids {
		if !set[id] {
			return false
		}
	}
	return true
}

// attachedIDs lists the programs attached directly to a cgroup on the
// sockmesh hooks.
func attachedIDs(t *testing.T, cgroup string) []ebpf.ProgramID {
	t.Helper()
	f, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var ids []ebpf.ProgramID
	for _, at := range cgroupHooks {
		r, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			t.Fatalf("query %s %v: %v", cgroup, at, err)
		}
		for _, p := range r.Programs {
			ids = append(ids, p.ID)
		}
	}
	slices.Sort(ids)
	return ids
}

func attachedTo(t *testing.T, cgroup string) int { return len(attachedIDs(t, cgroup)) }

// cgroupInode is a cgroup v2 folder's id (its inode number).
func cgroupInode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// dirNames lists a folder's entries.
func dirNames(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out, err
}

// streamResult waits for a stream (podapp stream) that was sent SIGTERM
// and checks that every byte was echoed unchanged.
func streamResult(t *testing.T, ctx context.Context, e *kubenode.Exec, what string) harness.StreamResult {
	t.Helper()
	out, err := e.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var sr harness.StreamResult
	if err := json.Unmarshal(lastLine(out), &sr); err != nil {
		t.Fatalf("%s: output %q: %v", what, out, err)
	}
	if !sr.OK || sr.Sent == 0 || sr.Sent != sr.Received || sr.SHA256Sent != sr.SHA256Received {
		t.Errorf("%s: %+v", what, sr)
	}
	return sr
}

// waitRedirected waits until the agent of pod p has redirected at least
// 100 kB more of each sidecar's sends (pods mesh/front and mesh/echo,
// counters front0 and echo0 before) from socket to socket, none of them
// sent through TCP instead.
func (d *dsTest) waitRedirected(ctx context.Context, p *corev1.Pod, front0, echo0 agent.PodStatus, what string) {
	d.t.Helper()
	const want = 100_000
	d.eventually(what, func() string {
		for _, x := range []struct {
			name string
			was  agent.PodStatus
		}{{"front", front0}, {"echo", echo0}} {
			now, ok := d.podStatus(ctx, p, "mesh/"+x.name)
			if !ok || now.ID != x.was.ID {
				return fmt.Sprintf("pod %s: enrolled %v, id %d (was %d)", x.name, ok, now.ID, x.was.ID)
			}
			if tcp := now.Counters["bytes_tcp"] - x.was.Counters["bytes_tcp"]; tcp != 0 {
				d.t.Fatalf("%s: pod %s sent %d bytes through TCP instead of redirecting them", what, x.name, tcp)
			}
			if got := now.Counters["bytes_redirect"] - x.was.Counters["bytes_redirect"]; got < want {
				return fmt.Sprintf("pod %s: %d bytes redirected, waiting for %d", x.name, got, want)
			}
		}
		return ""
	})
}

// sidecarPair runs, in the labelled namespace "mesh", a server pod "echo"
// behind a Service and a client pod "front", each with an Istio-style
// sidecar, and waits until the agent of pod p has enrolled both with their
// sidecars and has the Service.
func (d *dsTest) sidecarPair(ctx context.Context, p *corev1.Pod) (front *corev1.Pod, vip netip.AddrPort) {
	t := d.t
	t.Helper()
	const ns = "mesh"
	if err := d.c.Namespace(ctx, ns, map[string]string{"shunt.dev/enabled": "true"}); err != nil {
		t.Fatal(err)
	}
	pod := func(name string, labels map[string]string, app corev1.Container) *corev1.Pod {
		proxy := kubenode.AppContainer("istio-proxy", "sidecar", "--outbound", "127.0.0.1:15001", "--inbound", "0.0.0.0:15006")
		uid := int64(1337)
		proxy.SecurityContext = &corev1.SecurityContext{RunAsUser: &uid, RunAsGroup: &uid}
		pod := d.n.NewPod(ns, name, labels, app, proxy)
		pod.Annotations = map[string]string{k8s.IstioStatus: `{"initContainers":["istio-init"],"containers":["istio-proxy"]}`}
		return d.runPod(pod)
	}
	echo := pod("echo", map[string]string{"app": "echo"}, kubenode.ServeContainer(8080))
	front = pod("front", nil, kubenode.AppContainer("app", "pause"))
	svc := webService(ns)
	svc.Spec.Selector = map[string]string{"app": "echo"}
	if err := d.c.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	vip = netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	d.eventually("sidecar pair ready and enrolled", func() string {
		for _, q := range []*corev1.Pod{echo, front} {
			if logs, err := d.n.Logs(q, "istio-proxy"); err != nil || !strings.Contains(logs, "READY\n") {
				return fmt.Sprintf("sidecar of %s not listening: %q %v", q.Name, logs, err)
			}
			if st, ok := d.podStatus(ctx, p, ns+"/"+q.Name); !ok || st.Sidecar == nil || st.Cookie == 0 {
				return fmt.Sprintf("%s not enrolled with its sidecar: %+v", q.Name, st)
			}
		}
		if s, ok := d.service(ctx, p, vip); !ok || backendsOf(s) != endpoints(8080, echo) {
			return fmt.Sprintf("service %s: %+v", vip, s)
		}
		return ""
	})
	return front, vip
}
