package kubenode

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"

	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/test/kube"
)

// Fixed network of the node (one node at a time on a machine: Start holds a
// lock).
const (
	// Bridge is the CNI bridge; it carries the node IP.
	Bridge = "shuntk8s0"
	// NetworkName is the CNI network's name (libcni cache files start with it).
	NetworkName = "shuntk8s"
	// Images made by Start and imported into containerd's k8s.io namespace.
	AppImage   = "shunt.dev/podapp:v1"
	PauseImage = "shunt.dev/pause:v1"
	// AppPath is podapp's path in AppImage.
	AppPath = "/podapp"
)

var (
	// NodeIP is the node's address, on the bridge.
	NodeIP = netip.MustParseAddr("10.88.77.1")
	// PodSubnet is where pods get addresses (host-local: .10 to .250).
	PodSubnet = netip.MustParsePrefix("10.88.77.0/24")

	podRangeStart = netip.MustParseAddr("10.88.77.10")
	podRangeEnd   = netip.MustParseAddr("10.88.77.250")
)

// Options change how the node runs.
type Options struct {
	// Name is the Node's name (default "shunt-kubenode").
	Name string
}

// Node is a running kubelet + containerd joined to a control plane.
type Node struct {
	t    testing.TB
	cp   *kube.ControlPlane
	c    *kube.Client
	name string
	id   string
	dir  string // private folder

	cgroupName string   // shunt-kubenode-<id>: the kubelet's cgroupRoot
	cgroups    []string // that cgroup in every hierarchy (v2 first)
	cg2        string   // <cgroup2 mount>/shunt-kubenode-<id>

	ctr     string // ctr binary
	sock    string // containerd socket
	podLogs string

	host *hostState

	mu         sync.Mutex
	containerd *exec.Cmd
	kubelet    *exec.Cmd
	done       map[*exec.Cmd]chan struct{}
	unlock     func() // releases the machine's node lock
	execs      int
}

// Start runs a node for the test and waits until it is Ready: it builds
// and imports the images, starts containerd and the kubelet. Everything is
// removed by t.Cleanup. A missing binary or kernel feature fails the test.
func Start(t testing.TB, cp *kube.ControlPlane, opts Options) *Node {
	t.Helper()
	if os.Geteuid() != 0 {
		// As test/harness: privileged tests skip without root, except in
		// CI, where they must run.
		if os.Getenv("CI") != "" {
			t.Fatalf("kubenode: a real node needs root")
		}
		t.Skip("kubenode: a real node needs root")
	}
	if opts.Name == "" {
		opts.Name = "shunt-kubenode"
	}
	n := &Node{t: t, cp: cp, c: cp.Admin(), name: opts.Name, done: map[*exec.Cmd]chan struct{}{}}
	t.Cleanup(n.cleanup)
	if err := n.start(); err != nil {
		t.Fatalf("kubenode: %v", err)
	}
	return n
}

// Name is the Node's name (pods' spec.nodeName).
func (n *Node) Name() string { return n.name }

// Dir is the node's private folder.
func (n *Node) Dir() string { return n.dir }

// CgroupRoot is the kubelet's cgroupRoot, relative to each hierarchy
// ("/shunt-kubenode-<id>").
func (n *Node) CgroupRoot() string { return "/" + n.cgroupName }

// CgroupV2Path is the kubelet's cgroupRoot in the cgroup v2 hierarchy.
func (n *Node) CgroupV2Path() string { return n.cg2 }

// PodsCgroup is the cgroup v2 folder holding every pod
// (<CgroupV2Path>/kubepods): attach programs here.
func (n *Node) PodsCgroup() string { return filepath.Join(n.cg2, "kubepods") }

// CgroupRoots are the node's cgroupRoot in each hierarchy, cgroup v2 first:
// the folders below which the kubelet's layout starts.
func (n *Node) CgroupRoots() []string { return append([]string(nil), n.cgroups...) }

// ContainerdSocket is containerd's socket.
func (n *Node) ContainerdSocket() string { return n.sock }

func randID() string {
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func (n *Node) start() error {
	bins, err := findBinaries()
	if err != nil {
		return err
	}
	n.ctr = bins["ctr"]
	// One node at a time on this machine: the bridge and subnet are fixed.
	if n.unlock, err = lockNodes(); err != nil {
		return err
	}

	reapStale(n.t.Logf)
	n.id = randID()
	n.cgroupName = "shunt-kubenode-" + n.id
	n.dir = filepath.Join(os.TempDir(), n.cgroupName)
	if err := os.Mkdir(n.dir, 0o700); err != nil {
		return err
	}
	n.host = recordHost()
	if err := n.host.err; err != nil {
		return err
	}
	// For the next Start, should this test binary be killed.
	if data, err := json.Marshal(n.host.before); err != nil {
		return err
	} else if err := os.WriteFile(filepath.Join(n.dir, hostRecord), data, 0o600); err != nil {
		return err
	}
	if err := n.makeCgroups(); err != nil {
		return fmt.Errorf("cgroups: %w", err)
	}
	if err := n.makeBridge(); err != nil {
		return fmt.Errorf("bridge: %w", err)
	}
	if err := n.startContainerd(bins); err != nil {
		return err
	}
	if err := n.importImages(); err != nil {
		return err
	}
	return n.startKubelet(bins["kubelet"])
}

// hostRecord is the file in the private folder holding the machine's state
// before the node started (HostSnapshot, JSON).
const hostRecord = "host.json"

// reapStale removes what a killed run left (it could not clean up): its
// cgroups and their processes (shims and containers outlive a killed test),
// the mounts, the bridge, the sysctls and host paths as its record says they
// were, and its private folder. The caller holds the lock (Start,
// CheckHost), so no live node owns them.
func reapStale(logf func(format string, args ...any)) {
	hs, err := cgroupHierarchies()
	if err != nil {
		return
	}
	stale := map[string]bool{}
	for _, g := range []string{filepath.Join(hs[0], "shunt-kubenode-*"), filepath.Join(os.TempDir(), "shunt-kubenode-*")} {
		found, _ := filepath.Glob(g)
		for _, f := range found {
			stale[filepath.Base(f)] = true
		}
	}
	// Newest first: the oldest record's sysctls are written last. (Start
	// reaps before it records, so a record normally holds the machine's
	// own values; should two ever be left, the oldest is the closest.)
	names := slices.Collect(maps.Keys(stale))
	age := func(name string) time.Time {
		fi, err := os.Stat(filepath.Join(os.TempDir(), name, hostRecord))
		if err != nil {
			return time.Time{} // no record: nothing to restore, order irrelevant
		}
		return fi.ModTime()
	}
	slices.SortFunc(names, func(a, b string) int { return age(b).Compare(age(a)) })
	for _, name := range names {
		logf("kubenode: removing the leftovers of a killed run: %s", name)
		report := func(err error) {
			if err != nil {
				logf("kubenode: leftovers of %s: %v", name, err)
			}
		}
		dir := filepath.Join(os.TempDir(), name)
		report(killCgroup(filepath.Join(hs[0], name)))
		report(unmountUnder(dir))
		for i := len(hs) - 1; i >= 0; i-- {
			report(removeCgroupTree(filepath.Join(hs[i], name)))
		}
		report(deleteBridge())
		var before HostSnapshot
		if data, err := os.ReadFile(filepath.Join(dir, hostRecord)); err == nil && json.Unmarshal(data, &before) == nil {
			report(errors.Join((&hostState{before: before}).restore()...))
		}
		report(os.RemoveAll(dir))
	}
}

// findBinaries finds what the node runs; any missing one is an error.
func findBinaries() (map[string]string, error) {
	out := map[string]string{}
	var missing []string
	for _, b := range []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "nsenter"} {
		p, err := exec.LookPath(b)
		if err != nil {
			missing = append(missing, b)
			continue
		}
		out[b] = p
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(cniBinDir, p)); err != nil {
			missing = append(missing, filepath.Join(cniBinDir, p))
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("missing %s (scripts/install-deps.sh installs containerd, runc, containernetworking-plugins)", strings.Join(missing, ", "))
	}
	kl, err := kube.FindBinary("kubelet")
	if err != nil {
		return nil, err
	}
	out["kubelet"] = kl
	return out, nil
}

// cniBinDir is where Debian's containernetworking-plugins installs.
const cniBinDir = "/usr/lib/cni"

// ---- cgroups ----

// cgroupHierarchies lists the mounted cgroup hierarchies: the v2 one first,
// then every v1 one (hybrid hosts).
func cgroupHierarchies() ([]string, error) {
	mounts, err := readMountinfo()
	if err != nil {
		return nil, err
	}
	var v2 string
	var v1 []string
	for _, m := range mounts {
		switch m.fstype {
		case "cgroup2":
			if v2 == "" {
				v2 = m.point
			}
		case "cgroup":
			v1 = append(v1, m.point)
		}
	}
	if v2 == "" {
		return nil, errors.New("no cgroup v2 hierarchy mounted")
	}
	return append([]string{v2}, v1...), nil
}

// makeCgroups creates the kubelet's cgroupRoot in every hierarchy (the
// kubelet checks it exists in each) and the "node" child of the v2 one for
// containerd and the kubelet.
func (n *Node) makeCgroups() error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		p := filepath.Join(h, n.cgroupName)
		if err := os.Mkdir(p, 0o755); err != nil {
			return err
		}
		n.cgroups = append(n.cgroups, p)
		// cpuset (v1): a new cgroup has no CPUs or memory nodes until set.
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			mine, err := os.ReadFile(filepath.Join(p, f))
			if err != nil || len(bytes.TrimSpace(mine)) > 0 {
				continue
			}
			parent, err := os.ReadFile(filepath.Join(h, f))
			if err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(p, f), bytes.TrimSpace(parent), 0); err != nil {
				return fmt.Errorf("%s: %w", filepath.Join(p, f), err)
			}
		}
	}
	n.cg2 = n.cgroups[0]
	return os.Mkdir(filepath.Join(n.cg2, "node"), 0o755)
}

// ---- network ----

func (n *Node) makeBridge() error {
	if _, err := net.InterfaceByName(Bridge); err == nil {
		// We hold the lock: a bridge of that name is a leftover of a
		// killed run.
		n.t.Logf("kubenode: removing a leftover bridge %s", Bridge)
		if err := deleteBridge(); err != nil {
			return err
		}
	}
	for _, args := range [][]string{
		{"link", "add", Bridge, "type", "bridge"},
		{"addr", "add", netip.PrefixFrom(NodeIP, PodSubnet.Bits()).String(), "dev", Bridge},
		{"link", "set", Bridge, "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
		}
	}
	return nil
}

// deleteBridge removes the bridge and the veths attached to it (the
// network namespaces holding their peers may outlive a killed runtime).
func deleteBridge() error {
	br, err := net.InterfaceByName(Bridge)
	if err != nil {
		return nil
	}
	var errs []error
	ifs, _ := net.Interfaces()
	for _, ifc := range ifs {
		if m, err := os.Readlink(filepath.Join("/sys/class/net", ifc.Name, "master")); err == nil && filepath.Base(m) == br.Name {
			if out, err := exec.Command("ip", "link", "del", ifc.Name).CombinedOutput(); err != nil {
				if _, gone := net.InterfaceByName(ifc.Name); gone != nil {
					continue // its pod's network namespace went meanwhile, and the veth with it
				}
				errs = append(errs, fmt.Errorf("ip link del %s: %v: %s", ifc.Name, err, bytes.TrimSpace(out)))
			}
		}
	}
	if out, err := exec.Command("ip", "link", "del", Bridge).CombinedOutput(); err != nil {
		errs = append(errs, fmt.Errorf("ip link del %s: %v: %s", Bridge, err, bytes.TrimSpace(out)))
	}
	return errors.Join(errs...)
}

// ---- processes ----

// spawn starts cmd in the node's cgroup (v2 "node" child) with its output
// in the log file, in its own process group, killed if the test binary dies.
func (n *Node) spawn(cmd *exec.Cmd, logName string) error {
	f, err := os.OpenFile(filepath.Join(n.dir, logName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	cg, err := os.Open(filepath.Join(n.cg2, "node"))
	if err != nil {
		return err
	}
	defer cg.Close()
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL, UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	started := make(chan error, 1)
	done := make(chan struct{})
	// PDEATHSIG fires when the forking thread ends: a locked thread that
	// lives as long as the process.
	go func() {
		runtime.LockOSThread()
		err := cmd.Start()
		started <- err
		if err == nil {
			_ = cmd.Wait()
		}
		close(done)
	}()
	if err := <-started; err != nil {
		return err
	}
	n.mu.Lock()
	n.done[cmd] = done
	n.mu.Unlock()
	return nil
}

func (n *Node) exited(cmd *exec.Cmd) bool {
	n.mu.Lock()
	ch := n.done[cmd]
	n.mu.Unlock()
	if ch == nil {
		return true
	}
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// stop ends a process started by spawn by its PID: SIGTERM, SIGKILL after
// grace, and waits until it is reaped.
func (n *Node) stop(cmd *exec.Cmd, grace time.Duration) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	n.mu.Lock()
	ch := n.done[cmd]
	delete(n.done, cmd)
	n.mu.Unlock()
	if ch == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-ch:
	case <-time.After(grace):
		_ = cmd.Process.Kill()
		<-ch
	}
}

// Tail returns the last lines of a log of the node: containerd.log or
// kubelet.log.
func (n *Node) Tail(name string, lines int) string {
	data, _ := os.ReadFile(filepath.Join(n.dir, name))
	l := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// ---- containerd ----

func (n *Node) startContainerd(bins map[string]string) error {
	d := func(p ...string) string { return filepath.Join(append([]string{n.dir}, p...)...) }
	for _, p := range []string{d("cni", "net.d"), d("runc"), d("fifo"), d("images")} {
		if err := os.MkdirAll(p, 0o700); err != nil {
			return err
		}
	}
	n.sock = d("containerd", "containerd.sock")
	conflist := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": %q, "plugins": [{
  "type": "bridge", "bridge": %q, "isGateway": false, "ipMasq": false, "hairpinMode": false,
  "ipam": {"type": "host-local", "dataDir": %q,
    "ranges": [[{"subnet": %q, "rangeStart": %q, "rangeEnd": %q, "gateway": %q}]]}
}]}
`, NetworkName, Bridge, d("cni", "ipam"), PodSubnet, podRangeStart, podRangeEnd, NodeIP)
	if err := os.WriteFile(d("cni", "net.d", "10-shuntk8s.conflist"), []byte(conflist), 0o600); err != nil {
		return err
	}
	// The runtime v1 plugin stays: the tasks service needs it.
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.internal.v1.opt"]

[grpc]
  address = %q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %q
        BinaryName = %q
`, d("containerd", "root"), d("containerd", "state"), n.sock, PauseImage, cniBinDir, d("cni", "net.d"), d("runc"), bins["runc"])
	if err := os.WriteFile(d("containerd.toml"), []byte(cfg), 0o600); err != nil {
		return err
	}
	cmd := exec.Command(bins["containerd"], "--config", d("containerd.toml"))
	if err := n.spawn(cmd, "containerd.log"); err != nil {
		return fmt.Errorf("containerd: %w", err)
	}
	n.mu.Lock()
	n.containerd = cmd
	n.mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := n.ctrCmd(context.Background(), "version").CombinedOutput()
		if err == nil {
			return nil
		}
		if n.exited(cmd) || time.Now().After(deadline) {
			return fmt.Errorf("containerd not up: %v: %s\n%s", err, bytes.TrimSpace(out), n.Tail("containerd.log", 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ctrCmd is ctr against the node's containerd, in the CRI namespace.
func (n *Node) ctrCmd(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, n.ctr, append([]string{"--address", n.sock, "--namespace", "k8s.io"}, args...)...)
}

func (n *Node) ctrRun(ctx context.Context, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := n.ctrCmd(ctx, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("ctr %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.String(), nil
}

// importImages builds podapp and pause (static), writes their one-layer
// OCI archives and imports them.
func (n *Node) importImages() error {
	for _, im := range []struct{ name, pkg, path string }{
		{AppImage, "./test/kubenode/podapp", AppPath},
		{PauseImage, "./test/kubenode/pause", "/pause"},
	} {
		bin := filepath.Join(n.dir, "images", filepath.Base(im.pkg))
		if err := BuildStatic(im.pkg, bin); err != nil {
			return err
		}
		data, err := os.ReadFile(bin)
		if err != nil {
			return err
		}
		img := Image{Name: im.name, Files: []ImageFile{{Path: im.path, Mode: 0o755, Data: data}}, Entrypoint: []string{im.path}}
		archive := bin + ".tar"
		f, err := os.Create(archive)
		if err != nil {
			return err
		}
		err = img.WriteOCIArchive(f)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("image %s: %w", im.name, err)
		}
		if err := n.ImportImage(context.Background(), archive); err != nil {
			return err
		}
	}
	return nil
}

// RepoRoot is the folder of Shunt's go.mod.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// BuildStatic builds the main package pkg (relative to the repository
// root, e.g. "./test/kubenode/podapp") as a static binary (CGO_ENABLED=0).
func BuildStatic(pkg, out string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(goBin, "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
	cmd.Dir = RepoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if o, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v\n%s", pkg, err, o)
	}
	return nil
}

// ---- kubelet ----

func (n *Node) startKubelet(bin string) error {
	d := func(p ...string) string { return filepath.Join(append([]string{n.dir}, p...)...) }
	n.podLogs = d("pod-logs")
	kc, err := n.cp.Kubeconfig("system:node:"+n.name, "system:nodes", "system:masters")
	if err != nil {
		return err
	}
	port, err := harness.FreePortOn(NodeIP.String())
	if err != nil {
		return err
	}
	caFile := d("ca.crt")
	if err := os.WriteFile(caFile, n.cp.CA, 0o600); err != nil {
		return err
	}
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: %s
containerRuntimeEndpoint: unix://%s
failSwapOn: false
makeIPTablesUtilChains: false
podLogsDir: %s
volumePluginDir: %s
address: %s
port: %d
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %s}
authorization: {mode: AlwaysAllow}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
hairpinMode: none
resolvConf: /etc/resolv.conf
serializeImagePulls: false
`, n.CgroupRoot(), n.sock, n.podLogs, d("volume-plugins"), NodeIP, port, caFile)
	if err := os.WriteFile(d("kubelet.yaml"), []byte(cfg), 0o600); err != nil {
		return err
	}
	cmd := exec.Command(bin, "--config", d("kubelet.yaml"), "--kubeconfig", kc,
		"--root-dir", d("kubelet"), "--cert-dir", d("kubelet-pki"),
		"--hostname-override", n.name, "--node-ip", NodeIP.String(), "--v=2")
	if err := n.spawn(cmd, "kubelet.log"); err != nil {
		return fmt.Errorf("kubelet: %w", err)
	}
	n.mu.Lock()
	n.kubelet = cmd
	n.mu.Unlock()
	// Ready: registered, runtime and network up.
	deadline := time.Now().Add(90 * time.Second)
	ctx := context.Background()
	for {
		node := &corev1.Node{}
		node.Name = n.name
		err := n.c.Get(ctx, node)
		if err == nil {
			for _, c := range node.Status.Conditions {
				if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
					return nil
				}
			}
		}
		if n.exited(cmd) || time.Now().After(deadline) {
			return fmt.Errorf("node %s not Ready (%v):\n%s", n.name, err, n.Tail("kubelet.log", 40))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// ---- cleanup ----

// cleanup removes everything the node caused, attempting every step and
// reporting each failure.
func (n *Node) cleanup() {
	t := n.t
	if t.Failed() && n.dir != "" {
		t.Logf("kubelet log tail:\n%s", n.Tail("kubelet.log", 40))
		t.Logf("containerd log tail:\n%s", n.Tail("containerd.log", 20))
	}
	report := func(format string, args ...any) { t.Errorf("kubenode cleanup: "+format, args...) }
	n.mu.Lock()
	kubelet, containerd := n.kubelet, n.containerd
	n.mu.Unlock()
	// 1. Pods: the kubelet stops them properly (CNI DEL, netns unmount).
	if kubelet != nil && !n.exited(kubelet) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		if pods, err := n.listPods(ctx); err == nil {
			for i := range pods {
				_ = n.c.Delete(ctx, &pods[i])
			}
			for containerd != nil && !n.exited(containerd) && ctx.Err() == nil {
				if ids, err := n.taskIDs(ctx); err != nil || len(ids) == 0 {
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
		cancel()
	}
	// 2. The kubelet, by PID.
	n.stop(kubelet, 15*time.Second)
	// 3. What is left in the runtime, then containerd by PID.
	if containerd != nil && !n.exited(containerd) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		if err := n.removeContainers(ctx); err != nil {
			report("%v", err)
		}
		cancel()
	}
	n.stop(containerd, 15*time.Second)
	// 4. Stragglers (shims, containers) in the node's cgroup subtree only.
	if n.cg2 != "" {
		if err := killCgroup(n.cg2); err != nil {
			report("%v", err)
		}
	}
	// 5. Mounts under the private folder, deepest first.
	if n.dir != "" {
		if err := unmountUnder(n.dir); err != nil {
			report("%v", err)
		}
	}
	// 6. Cgroups in every hierarchy.
	for i := len(n.cgroups) - 1; i >= 0; i-- {
		if err := removeCgroupTree(n.cgroups[i]); err != nil {
			report("%v", err)
		}
	}
	// 7. Network.
	if n.host != nil {
		if err := deleteBridge(); err != nil {
			report("%v", err)
		}
	}
	// 8. Sysctls and host paths.
	if n.host != nil {
		for _, err := range n.host.restore() {
			report("%v", err)
		}
	}
	// 9. The private folder.
	if n.dir != "" {
		if err := os.RemoveAll(n.dir); err != nil {
			report("remove %s: %v", n.dir, err)
		}
	}
	if n.unlock != nil {
		n.unlock()
	}
}

func (n *Node) listPods(ctx context.Context) ([]corev1.Pod, error) {
	var l corev1.PodList
	err := n.c.Do(ctx, "GET", "/api/v1/pods?fieldSelector=spec.nodeName%3D"+n.name, nil, &l, "")
	return l.Items, err
}

// taskIDs lists the runtime's tasks (running or stopped).
func (n *Node) taskIDs(ctx context.Context) ([]string, error) {
	out, err := n.ctrRun(ctx, "tasks", "ls", "-q")
	return strings.Fields(out), err
}

// removeContainers kills and deletes every task and container of the
// runtime's k8s.io namespace.
func (n *Node) removeContainers(ctx context.Context) error {
	var errs []error
	ids, err := n.taskIDs(ctx)
	if err != nil {
		return err
	}
	for _, id := range ids {
		if _, err := n.ctrRun(ctx, "tasks", "rm", "--force", id); err != nil {
			errs = append(errs, err)
		}
	}
	out, err := n.ctrRun(ctx, "containers", "ls", "-q")
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, id := range strings.Fields(out) {
		if _, err := n.ctrRun(ctx, "containers", "rm", id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killCgroup kills every process in the cgroup v2 subtree at path (only
// there) and waits until it is empty.
func killCgroup(path string) error {
	if _, err := os.Stat(path); err != nil {
		return nil
	}
	if err := os.WriteFile(filepath.Join(path, "cgroup.kill"), []byte("1"), 0); err != nil {
		return fmt.Errorf("kill %s: %w", path, err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		data, err := os.ReadFile(filepath.Join(path, "cgroup.events"))
		if err != nil || strings.Contains(string(data), "populated 0") {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s still populated after cgroup.kill", path)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// removeCgroupTree removes a cgroup folder and its descendants, deepest
// first (v1 hierarchies hold no process once the v2 subtree was killed).
func removeCgroupTree(path string) error {
	var dirs []string
	err := filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := unix.Rmdir(dirs[i])
			if err == nil || errors.Is(err, unix.ENOENT) {
				break
			}
			if errors.Is(err, unix.EBUSY) && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
				continue
			}
			errs = append(errs, fmt.Errorf("rmdir %s: %w", dirs[i], err))
			break
		}
	}
	return errors.Join(errs...)
}

// ---- mounts ----

type mountEntry struct{ point, fstype string }

// readMountinfo lists this process's mounts (mount point, file system type).
func readMountinfo() ([]mountEntry, error) {
	ms, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil, err
	}
	out := make([]mountEntry, 0, len(ms))
	for _, m := range ms {
		out = append(out, mountEntry{point: m.Mountpoint, fstype: m.FSType})
	}
	return out, nil
}

// mountsUnder lists the mount points at or below dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	ms, err := readMountinfo()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, m := range ms {
		if m.point == dir || strings.HasPrefix(m.point, dir+"/") {
			out = append(out, m.point)
		}
	}
	// mountinfo lists parents before children: reverse.
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out, nil
}

// unmountUnder unmounts everything at or below dir, deepest first, lazily
// when a mount is busy, until none is left.
func unmountUnder(dir string) error {
	for round := 0; round < 10; round++ {
		ms, err := mountsUnder(dir)
		if err != nil {
			return err
		}
		if len(ms) == 0 {
			return nil
		}
		for _, m := range ms {
			if err := unix.Unmount(m, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				_ = unix.Unmount(m, unix.MNT_DETACH)
			}
		}
	}
	ms, _ := mountsUnder(dir)
	return fmt.Errorf("mounts left under %s: %v", dir, ms)
}
