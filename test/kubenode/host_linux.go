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
	// Paths are the watched host paths that exist.
	Paths map[string]bool
	// Links are the host's bridge and veth interfaces.
	Links []string
	// Mounts are mount points of a node (private folders, watched paths).
	Mounts []string
	// Cgroups are shunt-kubenode-* cgroups in any hierarchy.
	Cgroups []string
	// Entries are files in /tmp named shunt-kubenode-*, in
	// /var/log/containers, in /var/lib/cni/results.
	Entries []string
}

// TakeHostSnapshot records the parts of the machine a node may change.
func TakeHostSnapshot() (HostSnapshot, error) {
	s := HostSnapshot{Sysctls: map[string]string{}, Paths: map[string]bool{}}
	var errs []error
	for _, k := range watchedSysctls {
		v, err := os.ReadFile(filepath.Join("/proc/sys", k))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		s.Sysctls[k] = strings.TrimSpace(string(v))
	}
	for _, p := range watchedPaths {
		if _, err := os.Lstat(p); err == nil {
			s.Paths[p] = true
		}
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
	for _, g := range []string{filepath.Join(os.TempDir(), "shunt-kubenode-*"), "/var/log/containers/*", "/var/lib/cni/results/*"} {
		found, _ := filepath.Glob(g)
		s.Entries = append(s.Entries, found...)
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

// Diff lists what differs from before (empty: the machine is as it was).
func (s HostSnapshot) Diff(before HostSnapshot) []string {
	var out []string
	for _, k := range watchedSysctls {
		if s.Sysctls[k] != before.Sysctls[k] {
			out = append(out, fmt.Sprintf("sysctl %s = %s, was %s", k, s.Sysctls[k], before.Sysctls[k]))
		}
	}
	for _, p := range watchedPaths {
		if s.Paths[p] != before.Paths[p] {
			out = append(out, fmt.Sprintf("path %s exists: %v, was %v", p, s.Paths[p], before.Paths[p]))
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
		for _, x := range l.then {
			if !slices.Contains(l.now, x) {
				out = append(out, fmt.Sprintf("%s %s gone", l.what, x))
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
		if _, err := os.Lstat(deviceSocket); err == nil {
			// Another kubelet's device manager: ours would take its socket.
			h.err = fmt.Errorf("%s exists: a kubelet seems to run on this machine; refusing to start a second one", deviceSocket)
		}
	}
	return h
}

// restore writes back the sysctls that changed and removes what the node
// created outside its private folder (dir): watched paths that did not
// exist, else only the node's entries in them.
func (h *hostState) restore(dir string) []error {
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
	for _, p := range watchedPaths {
		if h.before.Paths[p] {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
		}
	}
	if h.before.Paths["/var/lib/kubelet"] {
		if err := os.Remove(deviceSocket); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	// Log links into the node's folder, libcni cache files of its network.
	if links, err := filepath.Glob("/var/log/containers/*"); err == nil {
		for _, l := range links {
			if target, err := os.Readlink(l); err == nil && strings.HasPrefix(target, dir+"/") {
				if err := os.Remove(l); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	if files, err := filepath.Glob("/var/lib/cni/results/" + NetworkName + "-*"); err == nil {
		for _, f := range files {
			if err := os.Remove(f); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errs
}
