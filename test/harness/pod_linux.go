package harness

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Pod is a network namespace plus a cgroup in which processes run. The node
// namespace (Env.Node) is a Pod too, without veth and with cgroup <test>/node.
type Pod struct {
	env       *Env
	name      string
	netns     string // name under /run/netns
	nsPath    string
	cgroup    string // where processes are placed (container scope)
	podCgroup string // pod slice (== cgroup for the node)
	uid       string
	container string
	hostVeth  string
	index     int
	ipv4      netip.Addr
	ipv6      netip.Addr
	isNode    bool

	teardownOnce sync.Once
	teardownErrs []error
}

var podNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$`)

// NewPod creates pod name: netns shunt-<id>-<name>, a veth pair (node side
// sh<id>-<n>, pod side eth0), addresses 10.244.1.<n>/32 and fd00:244::<n>/128
// on eth0 (n = 1, 2, ... in creation order; written in hex in the v6 address),
// a default route via 169.254.1.1 / fe80::1 on eth0, and /32 + /128 routes in
// the node namespace. The cgroup is
// <test>/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope.
func (e *Env) NewPod(name string) *Pod {
	e.t.Helper()
	return e.newPod(name, newUUID())
}

var uidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// NewPodWithUID is NewPod with a given pod UID (lower-case UUID), e.g. the
// metadata.uid of a Pod object created in a test API server, so that an
// agent finds this pod's cgroup from the object.
func (e *Env) NewPodWithUID(name, uid string) *Pod {
	e.t.Helper()
	if !uidRE.MatchString(uid) {
		e.t.Fatalf("harness: bad pod UID %q (want a lower-case UUID)", uid)
	}
	return e.newPod(name, uid)
}

func (e *Env) newPod(name, uid string) *Pod {
	e.t.Helper()
	if !podNameRE.MatchString(name) || name == nodeName {
		e.t.Fatalf("harness: bad pod name %q (lower-case letters, digits and '-', at most 40, not %q)", name, nodeName)
	}
	e.mu.Lock()
	if _, dup := e.byName[name]; dup {
		e.mu.Unlock()
		e.t.Fatalf("harness: pod %q already exists", name)
	}
	if e.nextIdx >= maxPodsPerEnv {
		e.mu.Unlock()
		e.t.Fatalf("harness: at most %d pods per Env", maxPodsPerEnv)
	}
	e.nextIdx++
	idx := e.nextIdx
	container := randHex(32)
	slice := filepath.Join(e.cgroup, "kubepods.slice", "kubepods-besteffort.slice",
		"kubepods-besteffort-pod"+strings.ReplaceAll(uid, "-", "_")+".slice")
	p := &Pod{
		env:       e,
		name:      name,
		netns:     netnsPrefix + e.id + "-" + name,
		podCgroup: slice,
		cgroup:    filepath.Join(slice, "cri-containerd-"+container+".scope"),
		uid:       uid,
		container: container,
		hostVeth:  fmt.Sprintf("sh%s-%d", e.id, idx),
		index:     idx,
		ipv4:      netip.AddrFrom4([4]byte{10, 244, 1, byte(idx)}),
		ipv6:      netip.AddrFrom16([16]byte{0xfd, 0x00, 0x02, 0x44, 14: byte(idx >> 8), 15: byte(idx)}),
	}
	p.nsPath = filepath.Join(netnsDir, p.netns)
	e.byName[name] = p
	e.pods = append(e.pods, p)
	e.mu.Unlock()

	e.t.Cleanup(func() {
		for _, err := range p.teardown() {
			e.t.Errorf("harness cleanup: %v", err)
		}
	})
	if err := os.MkdirAll(p.cgroup, 0o755); err != nil {
		e.t.Fatalf("harness: pod %s cgroup: %v", name, err)
	}
	if err := p.setupNetwork(); err != nil {
		e.t.Fatalf("harness: pod %s network: %v", name, err)
	}
	return p
}

func (p *Pod) setupNetwork() error {
	node := p.env.node.netns
	if err := addNetNS(p.netns); err != nil {
		return err
	}
	err := inNetNS(p.nsPath, func() error {
		return writeSysctls(map[string]string{
			"net/ipv6/conf/all/accept_dad":       "0",
			"net/ipv6/conf/default/accept_dad":   "0",
			"net/ipv6/conf/default/disable_ipv6": "0",
		})
	})
	if err != nil {
		return err
	}
	v4, v6 := p.ipv4.String(), p.ipv6.String()
	// The veth is created from the node namespace with its peer directly in
	// the pod's: the machine's own namespace never sees either end.
	if err := ipBatch(node, [][]string{
		{"link", "add", p.hostVeth, "type", "veth", "peer", "name", "eth0", "netns", p.netns},
		{"link", "set", p.hostVeth, "up"},
		{"addr", "add", GatewayIPv6.String() + "/64", "dev", p.hostVeth, "nodad"},
		{"route", "add", v4 + "/32", "dev", p.hostVeth, "scope", "link"},
		{"route", "add", v6 + "/128", "dev", p.hostVeth},
	}); err != nil {
		return err
	}
	return ipBatch(p.netns, [][]string{
		{"link", "set", "lo", "up"},
		{"link", "set", "eth0", "up"},
		{"addr", "add", v4 + "/32", "dev", "eth0"},
		{"addr", "add", v6 + "/128", "dev", "eth0", "nodad"},
		{"route", "add", GatewayIPv4.String() + "/32", "dev", "eth0", "scope", "link"},
		{"route", "add", "default", "via", GatewayIPv4.String(), "dev", "eth0", "src", v4},
		{"route", "add", "::/0", "via", GatewayIPv6.String(), "dev", "eth0", "src", v6},
	})
}

// Delete tears the pod down now (processes, veth, netns, node routes,
// cgroups), as its cleanup would. Idempotent; errors are reported with
// t.Errorf. Afterwards NewPod may reuse the name.
func (p *Pod) Delete() {
	if p.isNode {
		p.env.t.Errorf("harness: the node cannot be deleted")
		return
	}
	for _, err := range p.teardown() {
		p.env.t.Errorf("harness: delete pod %s: %v", p.name, err)
	}
	// The name may be reused by a new pod (it gets a new index and addresses).
	p.env.mu.Lock()
	if p.env.byName[p.name] == p {
		delete(p.env.byName, p.name)
	}
	p.env.mu.Unlock()
}

// teardown runs once; later calls return nil.
func (p *Pod) teardown() []error {
	var errs []error
	p.teardownOnce.Do(func() {
		for _, pr := range p.env.procsIn(p) {
			pr.killAndWait()
			p.env.untrackProc(pr)
		}
		if err := killCgroupTree(p.podCgroup); err != nil {
			errs = append(errs, err)
		}
		if _, err := os.Stat(p.env.node.nsPath); err == nil {
			if linkExists(p.env.node.netns, p.hostVeth) {
				if err := run("ip", "-n", p.env.node.netns, "link", "del", p.hostVeth); err != nil {
					errs = append(errs, err)
				}
			}
		}
		if err := deleteNetNS(p.netns); err != nil {
			errs = append(errs, err)
		}
		if err := removeCgroupTree(p.podCgroup); err != nil {
			errs = append(errs, err)
		}
		p.teardownErrs = errs
	})
	return errs
}

func linkExists(netns, dev string) bool {
	return exec.Command("ip", "-n", netns, "link", "show", "dev", dev).Run() == nil
}

// Name is the name given to NewPod ("node" for the node).
func (p *Pod) Name() string { return p.name }

// NetNSName is the name under /run/netns (shunt-<id>-<name>).
func (p *Pod) NetNSName() string { return p.netns }

// NetNSPath is /run/netns/shunt-<id>-<name>.
func (p *Pod) NetNSPath() string { return p.nsPath }

// CgroupPath is the cgroup processes of the pod run in (the container scope).
func (p *Pod) CgroupPath() string { return p.cgroup }

// PodCgroupPath is the pod-level slice (parent of CgroupPath); for the node
// it equals CgroupPath.
func (p *Pod) PodCgroupPath() string { return p.podCgroup }

// UID is the pod's random UID (with dashes; the cgroup uses underscores).
func (p *Pod) UID() string { return p.uid }

// ContainerID is the 64-hex-digit id in the scope name.
func (p *Pod) ContainerID() string { return p.container }

// HostVeth is the node-side veth name ("" for the node).
func (p *Pod) HostVeth() string { return p.hostVeth }

// IPv4 is the pod's (or node's) IPv4 address.
func (p *Pod) IPv4() netip.Addr { return p.ipv4 }

// IPv6 is the pod's (or node's) IPv6 address.
func (p *Pod) IPv6() netip.Addr { return p.ipv6 }

// Env is the environment the pod belongs to.
func (p *Pod) Env() *Env { return p.env }

// IsNode reports whether p is the node namespace.
func (p *Pod) IsNode() bool { return p.isNode }

// InNetNS runs fn on a locked OS thread that has joined the pod's network
// namespace (mount namespace unchanged). Goroutines started by fn do not run
// in the namespace. Useful for netlink/ifindex/XDP work.
func (p *Pod) InNetNS(fn func() error) error { return inNetNS(p.nsPath, fn) }

// NetNSCookie is the namespace's cookie as bpf_get_netns_cookie sees it.
func (p *Pod) NetNSCookie() (uint64, error) {
	var cookie uint64
	err := p.InNetNS(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		return err
	})
	return cookie, err
}

// ---- helpers ----

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ipBatch runs `ip -n netns -batch -` with one command per line (stops at
// the first failure).
func ipBatch(netns string, cmds [][]string) error {
	var in strings.Builder
	for _, c := range cmds {
		in.WriteString(strings.Join(c, " ") + "\n")
	}
	cmd := exec.Command("ip", "-n", netns, "-batch", "-")
	cmd.Stdin = strings.NewReader(in.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ip -n %s -batch: %v: %s\ncommands:\n%s", netns, err, strings.TrimSpace(string(out)), in.String())
	}
	return nil
}

// netnsAddMu serializes `ip netns add` of this process: the first one
// turns /run/netns into a shared bind mount, which must not race.
var netnsAddMu sync.Mutex

func addNetNS(name string) error {
	netnsAddMu.Lock()
	defer netnsAddMu.Unlock()
	return run("ip", "netns", "add", name)
}

func deleteNetNS(name string) error {
	if _, err := os.Lstat(filepath.Join(netnsDir, name)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return run("ip", "netns", "del", name)
}

// inNetNS runs fn on a dedicated, locked OS thread inside the netns at path.
// If the thread cannot be switched back it is left locked, so the Go runtime
// discards it when the goroutine ends.
func inNetNS(path string, fn func() error) error {
	type result struct {
		err   error
		panic any
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{err: fmt.Errorf("open own netns: %w", err)}
			return
		}
		defer unix.Close(orig)
		target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{err: fmt.Errorf("open %s: %w", path, err)}
			return
		}
		defer unix.Close(target)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			res <- result{err: fmt.Errorf("setns %s: %w", path, err)}
			return
		}
		var r result
		func() {
			defer func() { r.panic = recover() }()
			r.err = fn()
		}()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			res <- result{err: errors.Join(r.err, fmt.Errorf("setns back: %w", err)), panic: r.panic}
			return // thread stays locked and dies with this goroutine
		}
		runtime.UnlockOSThread()
		res <- r
	}()
	r := <-res
	if r.panic != nil {
		panic(r.panic)
	}
	return r.err
}

// writeSysctls writes /proc/sys/<key> = value in the calling thread's netns.
func writeSysctls(kv map[string]string) error {
	for k, v := range kv {
		if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", strings.ReplaceAll(k, "/", "."), v, err)
		}
	}
	return nil
}

func newUUID() string {
	raw := randBytes(16)
	raw[6] = raw[6]&0x0f | 0x40
	raw[8] = raw[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", raw[0:4], raw[4:6], raw[6:8], raw[8:10], raw[10:16])
}
