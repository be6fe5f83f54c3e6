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
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"sigs.k8s.io/yaml"

	"github.com/shuntmesh/shunt/agent"
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
	shuntd, shuntctl := binaries(t)
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
	// The chart's own ServiceAccount and RBAC.
	for _, o := range r.objs {
		if o.Kind == "ServiceAccount" || o.Kind == "ClusterRole" || o.Kind == "ClusterRoleBinding" {
			if err := kc.ApplyYAML(ctx, o.YAML); err != nil {
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

	run := 0
	// works runs the agent with caps and reports what it could not do.
	works := func(caps []string) error {
		run++
		dir := t.TempDir()
		root := filepath.Join(env.BPFFSPath(), fmt.Sprintf("caps%d", run))
		mport, err := FreePort()
		if err != nil {
			t.Fatal(err)
		}
		metrics := fmt.Sprintf("127.0.0.1:%d", mport)
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
		cfg["hostNetNS"], cfg["apiSocket"], cfg["stateFile"], cfg["metricsAddr"] = env.Node().NetNSPath(), filepath.Join(dir, "api.sock"), filepath.Join(dir, "state.json"), metrics
		set("datapath", "cgroup", env.CgroupPath())
		set("datapath", "bpffsRoot", root)
		set("xds", "unixSocket", filepath.Join(dir, "xds.sock"))
		set("kubernetes", "kubeconfig", kubeconfig)
		set("kubernetes", "cgroupRoots", []string{env.CgroupPath()})
		set("xdp", "netns", lb.NetNSPath())
		data, err := yaml.Marshal(cfg)
		if err != nil {
			t.Fatal(err)
		}
		cfgFile, seedFile := filepath.Join(dir, "shunt.yaml"), filepath.Join(dir, "seed")
		if err := os.WriteFile(cfgFile, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(seedFile, []byte(r.seed), 0o644); err != nil {
			t.Fatal(err)
		}
		bounding := "-all"
		for _, c := range caps {
			bounding += ",+" + strings.ToLower(c)
		}
		args := append([]string{"--reuid=0", "--regid=0", "--clear-groups", "--bounding-set=" + bounding, "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs", "--", shuntd},
			agentArgs(t, r, cfgFile, seedFile, nodeName, lb.IPv4().String())...)
		var log lockedLog
		cmd := exec.Command(setpriv, args...)
		cmd.Stdout, cmd.Stderr = &log, &log
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		defer func() {
			cmd.Process.Kill()
			<-done
			if out, err := exec.Command(shuntctl, "cleanup", "--bpffs-root", root).CombinedOutput(); err != nil {
				t.Errorf("cleanup %s: %v: %s", root, err, out)
			}
		}()
		firstError := func() string {
			for _, l := range strings.Split(log.String(), "\n") {
				if strings.Contains(l, "level=ERROR") || strings.Contains(l, "level=WARN") {
					return l
				}
			}
			return strings.TrimSpace(log.String())
		}
		// Ready: programs attached and the Kubernetes state applied.
		deadline := time.Now().Add(60 * time.Second)
		for {
			resp, err := http.Get("http://" + metrics + "/readyz")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			select {
			case <-done:
				return fmt.Errorf("shuntd exited: %s", firstError())
			default:
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("not ready after 60s: %s", firstError())
			}
			time.Sleep(100 * time.Millisecond)
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(dir, "xds.sock"), &st); err != nil || st.Gid != 1337 {
			return fmt.Errorf("xDS socket: %v, group %d: %s", err, st.Gid, firstError())
		}
		// The pod is enrolled: its netns was opened through its process.
		var enrolled bool
		for end := time.Now().Add(20 * time.Second); time.Now().Before(end) && !enrolled; time.Sleep(200 * time.Millisecond) {
			out, err := exec.Command(shuntctl, "--socket", filepath.Join(dir, "api.sock"), "pod", "list", "--json").Output()
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
			return fmt.Errorf("pod capns/app not enrolled: %s", firstError())
		}
		res, err := app.Connect(harness.ProcOpts{Timeout: time.Minute}, "--target", vip+":80", "--count", "5")
		if err != nil || res.OK != 5 || res.Backends["be0"] != 5 {
			return fmt.Errorf("the pod's connections to the Service: %v %+v", err, res)
		}
		resp, err := http.Get("http://" + metrics + "/metrics")
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

type lockedLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
