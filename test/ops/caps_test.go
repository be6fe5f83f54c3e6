package ops

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"sigs.k8s.io/yaml"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/test/kube"
)

func TestMain(m *testing.M) { harness.Main(m) }

// TestChartCapabilities runs the real shuntd as the chart's DaemonSet runs
// it — uid 0 with exactly the capabilities the chart adds (bounding set,
// no_new_privs, as a container runtime sets them), the rendered
// configuration file and command line, the chart's RBAC against a real
// kube-apiserver — and checks that it does its whole job: the programs and
// the XDP load balancer attached, the xDS socket handed to the sidecars'
// group, a pod whose only process runs as another user (like the pause
// container) enrolled from its Pod object, and that pod's connections to a
// Service balanced. Then it removes each capability in turn: every one must
// be needed (the agent fails to start or cannot do part of its job).
//
// The difference from a real pod: no container runtime (seccomp, AppArmor,
// mount namespace); the real-node test of the chart exercises those.
func TestChartCapabilities(t *testing.T) {
	setpriv := Binary(t, "setpriv")
	h := NewHelm(t)
	vals := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(vals, []byte("xdp:\n  devices: [eth0]\n  dsrDevices: [eth0]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := render(t, h, "xdp", vals)
	caps := chartCapabilities(t, r)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cp := kube.Start(t, kube.Options{})
	kc := cp.Admin()
	if err := kc.Namespace(ctx, releaseNS, nil); err != nil {
		t.Fatal(err)
	}
	// The chart's own ServiceAccount and RBAC, and its DaemonSet (which
	// the agent watches to tell an uninstall from a restart).
	for _, o := range r.objs {
		switch o.Kind {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "DaemonSet":
			if err := create(ctx, kc, o); err != nil {
				t.Fatalf("%s %s: %v", o.Kind, o.Name, err)
			}
		}
	}
	kubeconfig, err := cp.Kubeconfig("system:serviceaccount:"+releaseNS+":shunt", "system:serviceaccounts", "system:serviceaccounts:"+releaseNS)
	if err != nil {
		t.Fatal(err)
	}
	const nodeName = "shunt-caps-node"
	node := &corev1.Node{}
	node.Name = nodeName
	if err := kc.Create(ctx, node); err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: harness.NodeIPv4.String()}}
	if err := kc.UpdateStatus(ctx, node); err != nil {
		t.Fatal(err)
	}

	env := harness.New(t)
	be := env.NewPod("be0")
	if err := be.Start(harness.ProcOpts{}, "serve", "--id", "be0", "--listen", "0.0.0.0:8080").WaitReady(); err != nil {
		t.Fatal(err)
	}
	if err := kc.Namespace(ctx, "capns", map[string]string{"shunt.dev/enabled": "true"}); err != nil {
		t.Fatal(err)
	}
	const vip = "10.96.60.60"
	svc := &corev1.Service{}
	svc.Name, svc.Namespace = "web", "capns"
	svc.Spec.ClusterIP = vip
	svc.Spec.Ports = []corev1.ServicePort{{Name: "http", Port: 80}}
	if err := kc.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	name, port, ready := "http", int32(8080), true
	sl := &discoveryv1.EndpointSlice{AddressType: discoveryv1.AddressTypeIPv4}
	sl.Name, sl.Namespace = "web-1", "capns"
	sl.Labels = map[string]string{discoveryv1.LabelServiceName: "web"}
	sl.Ports = []discoveryv1.EndpointPort{{Name: &name, Port: &port}}
	sl.Endpoints = []discoveryv1.Endpoint{{Addresses: []string{be.IPv4().String()}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}}
	if err := kc.Create(ctx, sl); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{}
	pod.Name, pod.Namespace = "app", "capns"
	pod.Spec.NodeName = nodeName
	pod.Spec.Containers = []corev1.Container{{Name: "app", Image: "shunt.dev/test:none"}}
	if err := kc.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	app := env.NewPodWithUID("app", string(pod.UID))
	// The pod's sandbox process runs as another user, as pause does (65535).
	if err := app.Start(harness.ProcOpts{UID: 65535, GID: 65535, SetUser: true}, "pause").WaitReady(); err != nil {
		t.Fatal(err)
	}
	lb := env.NewPod("lb") // the node device the XDP load balancer attaches to

	// works runs the agent with caps and reports what it could not do.
	works := func(caps []string) error {
		a := startChartAgent(t, r, env, chartAgentOpts{caps: caps, setpriv: setpriv, kubeconfig: kubeconfig, nodeName: nodeName, xdpNetNS: lb.NetNSPath(), hostIP: lb.IPv4().String()})
		defer a.remove() // the next run attaches XDP to the same device
		if err := a.waitReady(); err != nil {
			return err
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(a.dir, "xds.sock"), &st); err != nil || st.Gid != 1337 {
			return fmt.Errorf("xDS socket: %v, group %d: %s", err, st.Gid, a.firstError())
		}
		// The pod is enrolled: its netns was opened through its process.
		var enrolled bool
		for end := time.Now().Add(20 * time.Second); time.Now().Before(end) && !enrolled; time.Sleep(200 * time.Millisecond) {
			out, err := exec.Command(a.shuntctl, "--socket", filepath.Join(a.dir, "api.sock"), "pod", "list", "--json").Output()
			if err != nil {
				continue
			}
			var pods []agent.PodStatus
			if json.Unmarshal(out, &pods) == nil {
				for _, p := range pods {
					enrolled = enrolled || (p.Name == "capns/app" && p.Cookie != 0)
				}
			}
		}
		if !enrolled {
			return fmt.Errorf("pod capns/app not enrolled: %s", a.firstError())
		}
		res, err := app.Connect(harness.ProcOpts{Timeout: time.Minute}, "--target", vip+":80", "--count", "5")
		if err != nil || res.OK != 5 || res.Backends["be0"] != 5 {
			return fmt.Errorf("the pod's connections to the Service: %v %+v", err, res)
		}
		resp, err := http.Get("http://" + a.metrics + "/metrics")
		if err != nil {
			return err
		}
		var body bytes.Buffer
		body.ReadFrom(resp.Body)
		resp.Body.Close()
		var attached, detached, xdpLinks int
		for _, l := range strings.Split(body.String(), "\n") {
			if !strings.HasPrefix(l, "shunt_program_attached{") {
				continue
			}
			if strings.HasSuffix(l, " 1") {
				attached++
			} else {
				detached++
			}
			if strings.Contains(l, `datapath="xdp"`) {
				xdpLinks++
			}
		}
		if detached != 0 || xdpLinks != 3 || attached < 12 {
			return fmt.Errorf("programs: %d attached, %d detached, %d XDP/tc links (want 3)", attached, detached, xdpLinks)
		}
		return nil
	}

	if err := works(caps); err != nil {
		t.Fatalf("shuntd with the chart's capabilities %v: %v", caps, err)
	}
	t.Logf("capabilities %v: everything works", caps)
	for _, c := range caps {
		less := slices.DeleteFunc(slices.Clone(caps), func(x string) bool { return x == c })
		err := works(less)
		if err == nil {
			t.Errorf("shuntd works without %s: the chart should not add it", c)
			continue
		}
		t.Logf("without %s: %v", c, err)
	}
}

// create creates a rendered object in the API server.
func create(ctx context.Context, kc *kube.Client, o Object) error {
	paths := map[string]string{
		"ServiceAccount": "/api/v1/namespaces/%s/serviceaccounts", "ConfigMap": "/api/v1/namespaces/%s/configmaps",
		"Secret": "/api/v1/namespaces/%s/secrets", "DaemonSet": "/apis/apps/v1/namespaces/%s/daemonsets",
		"ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles", "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
		"Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/%s/roles", "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/%s/rolebindings",
	}
	p, ok := paths[o.Kind]
	if !ok {
		return fmt.Errorf("create: kind %s", o.Kind)
	}
	if strings.Contains(p, "%s") {
		p = fmt.Sprintf(p, o.Namespace)
	}
	body, err := yaml.YAMLToJSON(o.YAML)
	if err != nil {
		return err
	}
	return kc.Do(ctx, "POST", p, body, nil, "")
}

type chartAgentOpts struct {
	caps                 []string // nil: run as the test (root, every capability)
	setpriv              string
	kubeconfig, nodeName string
	xdpNetNS, hostIP     string
	root, stateDir       string // bpffs folder and state folder; default: new ones
}

// chartAgent is shuntd run as the chart's DaemonSet runs it: its rendered
// configuration file (with the test's paths) and its own arguments.
type chartAgent struct {
	t                 *testing.T
	dir, root         string
	metrics, shuntctl string
	cmd               *exec.Cmd
	done              chan struct{}
	log               *harness.SyncBuffer
}

var agentRuns int

func startChartAgent(t *testing.T, r *rendering, env *harness.Env, o chartAgentOpts) *chartAgent {
	t.Helper()
	shuntd, shuntctl := harness.AgentBinaries(t)
	agentRuns++
	a := &chartAgent{t: t, dir: o.stateDir, root: o.root, shuntctl: shuntctl, done: make(chan struct{}), log: &harness.SyncBuffer{}}
	if a.dir == "" {
		a.dir = t.TempDir()
	}
	if a.root == "" {
		a.root = filepath.Join(env.BPFFSPath(), fmt.Sprintf("agent%d", agentRuns))
	}
	mport, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	a.metrics = fmt.Sprintf("127.0.0.1:%d", mport)
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(r.config), &cfg); err != nil {
		t.Fatal(err)
	}
	// Where the pod's paths and the node's devices are in this test.
	set := func(section, key string, v any) {
		m, _ := cfg[section].(map[string]any)
		if m == nil {
			m = map[string]any{}
			cfg[section] = m
		}
		m[key] = v
	}
	cfg["hostNetNS"], cfg["apiSocket"], cfg["stateFile"], cfg["metricsAddr"] = env.Node().NetNSPath(), filepath.Join(a.dir, "api.sock"), filepath.Join(a.dir, "state.json"), a.metrics
	set("datapath", "cgroup", env.CgroupPath())
	set("datapath", "bpffsRoot", a.root)
	set("xds", "unixSocket", filepath.Join(a.dir, "xds.sock"))
	set("kubernetes", "kubeconfig", o.kubeconfig)
	set("kubernetes", "cgroupRoots", []string{env.CgroupPath()})
	if o.xdpNetNS != "" {
		set("xdp", "netns", o.xdpNetNS)
	}
	data, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfgFile, seedFile := filepath.Join(a.dir, "shunt.yaml"), filepath.Join(a.dir, "seed")
	if err := os.WriteFile(cfgFile, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(seedFile, []byte(r.seed), 0o644); err != nil {
		t.Fatal(err)
	}
	args := agentArgs(t, r, cfgFile, seedFile, o.nodeName, o.hostIP)
	bin := shuntd
	if o.caps != nil {
		bounding := "-all"
		for _, c := range o.caps {
			bounding += ",+" + strings.ToLower(c)
		}
		args = append([]string{"--reuid=0", "--regid=0", "--clear-groups", "--bounding-set=" + bounding, "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs", "--", shuntd}, args...)
		bin = o.setpriv
	}
	a.cmd = exec.Command(bin, args...)
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.cmd.Wait(); close(a.done) }()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("shuntd log:\n%s", a.log.String())
		}
		a.remove()
	})
	return a
}

// remove kills shuntd and removes its datapath (shuntctl cleanup).
func (a *chartAgent) remove() {
	a.stop(syscall.SIGKILL)
	if out, err := exec.Command(a.shuntctl, "cleanup", "--bpffs-root", a.root).CombinedOutput(); err != nil {
		a.t.Errorf("cleanup %s: %v: %s", a.root, err, out)
	}
}

// stop signals shuntd (by PID) and waits for it to exit.
func (a *chartAgent) stop(sig syscall.Signal) {
	select {
	case <-a.done:
		return
	default:
	}
	a.cmd.Process.Signal(sig)
	select {
	case <-a.done:
	case <-time.After(30 * time.Second):
		a.cmd.Process.Kill()
		<-a.done
	}
}

// firstError is the first warning or error shuntd logged.
func (a *chartAgent) firstError() string {
	for _, l := range strings.Split(a.log.String(), "\n") {
		if strings.Contains(l, "level=ERROR") || strings.Contains(l, "level=WARN") {
			return l
		}
	}
	return strings.TrimSpace(a.log.String())
}

// waitReady waits for /readyz (programs attached, Kubernetes state applied).
func (a *chartAgent) waitReady() error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + a.metrics + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-a.done:
			return fmt.Errorf("shuntd exited: %s", a.firstError())
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after 60s: %s", a.firstError())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// attachedPrograms counts the programs attached to a cgroup on the socket
// hooks sockmesh uses.
func attachedPrograms(t *testing.T, cgroup string) int {
	t.Helper()
	f, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	for _, at := range datapath.CgroupAttachTypes() {
		r, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			t.Fatal(err)
		}
		n += len(r.Programs)
	}
	return n
}

// TestChartUninstallRemovesDatapath: the agent, run as the chart's
// DaemonSet runs it (installed with helm into a real kube-apiserver), keeps
// its datapath attached and pinned when stopped after an upgrade (the next
// agent adopts it), and removes all of it — links, pins, state file — when
// stopped after `helm uninstall` deleted its DaemonSet. (No kubelet here:
// the test starts and stops shuntd where kubelet would.)
func TestChartUninstallRemovesDatapath(t *testing.T) {
	h := NewHelm(t)
	cp := kube.Start(t, kube.Options{})
	kc := cp.Admin()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	helm := func(args ...string) {
		t.Helper()
		if _, err := h.Run(append(args, "--kubeconfig", cp.AdminKubeconfig, "--namespace", releaseNS)...); err != nil {
			t.Fatal(err)
		}
	}
	helm("install", "shunt", ChartDir, "--create-namespace")
	r := render(t, h, "defaults") // what was installed
	kubeconfig, err := cp.Kubeconfig("system:serviceaccount:"+releaseNS+":shunt", "system:serviceaccounts", "system:serviceaccounts:"+releaseNS)
	if err != nil {
		t.Fatal(err)
	}
	const nodeName = "shunt-uninstall-node"
	node := &corev1.Node{}
	node.Name = nodeName
	if err := kc.Create(ctx, node); err != nil {
		t.Fatal(err)
	}
	env := harness.New(t)
	root, state := filepath.Join(env.BPFFSPath(), "agent"), t.TempDir()
	opts := chartAgentOpts{kubeconfig: kubeconfig, nodeName: nodeName, root: root, stateDir: state}

	a := startChartAgent(t, r, env, opts)
	if err := a.waitReady(); err != nil {
		t.Fatal(err)
	}
	if n := attachedPrograms(t, env.CgroupPath()); n == 0 {
		t.Fatal("no program attached to the test cgroup")
	}
	// An upgrade: the DaemonSet changes, the agent is stopped: the datapath
	// stays, and the next agent adopts it.
	helm("upgrade", "shunt", ChartDir, "--set", "image.tag=0.1.1")
	a.stop(syscall.SIGTERM)
	if n := attachedPrograms(t, env.CgroupPath()); n == 0 {
		t.Fatalf("after an upgrade's stop, no program attached: %s", a.log.String())
	}
	if _, err := os.Stat(filepath.Join(root, "links")); err != nil {
		t.Fatalf("after an upgrade's stop: %v", err)
	}
	a = startChartAgent(t, r, env, opts)
	if err := a.waitReady(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(a.log.String(), "adopted=true") {
		t.Errorf("the new agent did not adopt the pinned datapath: %s", a.log.String())
	}

	// Uninstall: the DaemonSet (and right after it the agent's RBAC) goes;
	// when the agent is stopped, it removes everything.
	helm("uninstall", "shunt")
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(a.log.String(), "DaemonSet is being deleted") {
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not see its DaemonSet deleted: %s", a.log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	a.stop(syscall.SIGTERM)
	if !strings.Contains(a.log.String(), "removed the datapath") {
		t.Errorf("shuntd log: %s", a.log.String())
	}
	if n := attachedPrograms(t, env.CgroupPath()); n != 0 {
		t.Errorf("after uninstall, %d programs still attached", n)
	}
	if _, err := os.Stat(root); !os.IsNotExist(err) {
		t.Errorf("after uninstall, the bpffs folder: %v", err)
	}
	if _, err := os.Stat(filepath.Join(state, "state.json")); !os.IsNotExist(err) {
		t.Errorf("after uninstall, the state file: %v", err)
	}
}
