package kubenode

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/test/kube"
)

// Sysctls the kubelet writes (setupKernelTunables, unless
// protectKernelDefaults) and the CNI bridge plugin may write (forwarding).
var watchedSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
	"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding",
}

// Host paths the kubelet, libcni and containerd's shims create outside the
// folders their configuration names: the device plugin socket is always
// /var/lib/kubelet/device-plugins/kubelet.sock, libcni caches results in
// /var/lib/cni, the kubelet links container logs in /var/log/containers,
// shims put their sockets in /run/containerd/s. The others are defaults the
// configuration overrides, watched in case a version stops honouring it.
var watchedPaths = []string{
	"/var/lib/kubelet", "/var/lib/cni", "/var/log/containers", "/run/containerd",
	"/var/log/pods", "/usr/libexec/kubernetes", "/var/lib/containerd", "/etc/cni", "/opt/cni",
	"/etc/kubernetes", "/opt/containerd", "/var/run/kubernetes",
}

// deviceSocket is where the kubelet's device manager listens, whatever its
// root folder.
const deviceSocket = "/var/lib/kubelet/device-plugins/kubelet.sock"

// HostSnapshot is the part of the machine a node may change.
type HostSnapshot struct {
	Sysctls map[string]string
	// Links are the host's bridge and veth interfaces.
	Links []string
	// Mounts are mount points of a node (private folders, watched paths).
	Mounts []string
	// Cgroups are shunt-kubenode-* cgroups in any hierarchy.
	Cgroups []string
	// Entries are the watched host paths and everything below them, and
	// the shunt-kubenode-* folders in the temporary folder.
	Entries []string
}

// TakeHostSnapshot records the parts of the machine a node may change.
func TakeHostSnapshot() (HostSnapshot, error) {
	s := HostSnapshot{Sysctls: map[string]string{}}
	var errs []error
	for _, k := range watchedSysctls {
		v, err := os.ReadFile(filepath.Join("/proc/sys", k))
		if errors.Is(err, os.ErrNotExist) {
			continue // e.g. IPv6 disabled: nothing can change it
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		s.Sysctls[k] = strings.TrimSpace(string(v))
	}
	ifs, err := net.Interfaces()
	errs = append(errs, err)
	for _, ifc := range ifs {
		if ifc.Name == Bridge || strings.HasPrefix(ifc.Name, "veth") {
			s.Links = append(s.Links, ifc.Name)
		}
	}
	ms, err := readMountinfo()
	errs = append(errs, err)
	for _, m := range ms {
		if strings.Contains(m.point, "shunt-kubenode-") || underAny(m.point, watchedPaths) {
			s.Mounts = append(s.Mounts, m.point)
		}
	}
	hs, err := cgroupHierarchies()
	errs = append(errs, err)
	for _, h := range hs {
		found, _ := filepath.Glob(filepath.Join(h, "shunt-kubenode-*"))
		s.Cgroups = append(s.Cgroups, found...)
	}
	found, _ := filepath.Glob(filepath.Join(os.TempDir(), "shunt-kubenode-*"))
	s.Entries = append(s.Entries, found...)
	for _, p := range watchedPaths {
		_ = filepath.WalkDir(p, func(path string, d os.DirEntry, err error) error {
			if err == nil {
				s.Entries = append(s.Entries, path)
			}
			return nil
		})
	}
	for _, l := range [][]string{s.Links, s.Mounts, s.Cgroups, s.Entries} {
		sort.Strings(l)
	}
	return s, errors.Join(errs...)
}

func underAny(p string, dirs []string) bool {
	for _, d := range dirs {
		if p == d || strings.HasPrefix(p, d+"/") {
			return true
		}
	}
	return false
}

// Diff lists what a node left compared with before: changed sysctls, new
// links, mounts, cgroups and files (leftovers of an earlier killed run that
// Start removed are not differences).
func (s HostSnapshot) Diff(before HostSnapshot) []string {
	var out []string
	for _, k := range watchedSysctls {
		if s.Sysctls[k] != before.Sysctls[k] {
			out = append(out, fmt.Sprintf("sysctl %s = %s, was %s", k, s.Sysctls[k], before.Sysctls[k]))
		}
	}
	for _, l := range []struct {
		what      string
		now, then []string
	}{{"link", s.Links, before.Links}, {"mount", s.Mounts, before.Mounts}, {"cgroup", s.Cgroups, before.Cgroups}, {"file", s.Entries, before.Entries}} {
		for _, x := range l.now {
			if !slices.Contains(l.then, x) {
				out = append(out, fmt.Sprintf("new %s %s", l.what, x))
			}
		}
	}
	return out
}

// hostState is the machine as it was before the node started.
type hostState struct {
	before HostSnapshot
	err    error
}

func recordHost() *hostState {
	h := &hostState{}
	h.before, h.err = TakeHostSnapshot()
	if h.err == nil {
		if c, err := net.Dial("unix", deviceSocket); err == nil {
			// Another kubelet's device manager: ours would take its socket.
			c.Close()
			h.err = fmt.Errorf("a kubelet listens on %s: refusing to start a second one on this machine", deviceSocket)
		}
	}
	return h
}

// restore writes back the sysctls that changed and removes what appeared in
// the watched host paths since the node started (no container runtime or
// kubelet of the machine runs there: Start refuses to run next to a
// kubelet), deepest first; what was there before is never touched.
func (h *hostState) restore() []error {
	var errs []error
	for k, v := range h.before.Sysctls {
		cur, err := os.ReadFile(filepath.Join("/proc/sys", k))
		if err == nil && strings.TrimSpace(string(cur)) == v {
			continue
		}
		if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0); err != nil {
			errs = append(errs, fmt.Errorf("restore sysctl %s=%s: %w", k, v, err))
		}
	}
	var created []string
	for _, p := range watchedPaths {
		_ = filepath.WalkDir(p, func(path string, d os.DirEntry, err error) error {
			if err == nil && !slices.Contains(h.before.Entries, path) {
				created = append(created, path)
			}
			return nil
		})
	}
	for i := len(created) - 1; i >= 0; i-- { // children after parents in walk order
		if err := os.Remove(created[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errs
}

// nodeLock is the machine-wide lock that serializes nodes (the bridge and
// subnet are fixed): flock(2) on the Kubernetes binaries' cache folder
// across processes, counted within this one so that CheckHost and the
// nodes it starts share it.
var nodeLock struct {
	sync.Mutex
	held int
	f    *os.File
}

// lockNodes takes the machine's node lock (waiting for another process's
// node to end) and returns the function that releases it.
func lockNodes() (func(), error) {
	nodeLock.Lock()
	defer nodeLock.Unlock()
	if nodeLock.held == 0 {
		assets, err := kube.AssetsDir()
		if err != nil {
			return nil, err
		}
		f, err := os.Open(assets)
		if err != nil {
			return nil, fmt.Errorf("lock: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", assets, err)
		}
		nodeLock.f = f
	}
	nodeLock.held++
	var once sync.Once
	return func() {
		once.Do(func() {
			nodeLock.Lock()
			defer nodeLock.Unlock()
			if nodeLock.held--; nodeLock.held == 0 {
				nodeLock.f.Close() // releases the flock
				nodeLock.f = nil
			}
		})
	}, nil
}

// CheckHost runs fn as subtest name (fn starts nodes and the test removes
// them) and fails t if the machine differs afterwards (TakeHostSnapshot,
// Diff). It holds the machine's node lock from the first snapshot to the
// last, so that another test binary's node cannot start in between and be
// mistaken for traces of this one.
func CheckHost(t *testing.T, name string, fn func(t *testing.T)) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Run(name, fn) // Start skips (or fails in CI): nothing to check
		return
	}
	unlock, err := lockNodes()
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	// A killed run's node changed the machine (its kubelet's sysctls, its
	// bridge): put it back first, or the first node's reaping of it would
	// count as this test's traces.
	reapStale(t.Logf)
	before, err := TakeHostSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	t.Run(name, fn)
	after, err := TakeHostSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	if d := after.Diff(before); len(d) > 0 {
		t.Errorf("the node left traces:\n%s", strings.Join(d, "\n"))
	}
}
