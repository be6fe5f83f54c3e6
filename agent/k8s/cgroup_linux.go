package k8s

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/cgroups/v3"
	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/agent"
)

// CgroupRoots returns the hierarchies where kubelet's pod cgroups are
// searched: the cgroup v2 mount (found with containerd/cgroups: /sys/fs/cgroup
// on unified hosts, /sys/fs/cgroup/unified on hybrid ones), then on v1 and
// hybrid hosts the v1 pids, memory and systemd hierarchies (a kubelet on a
// v1 host creates pod cgroups there; runc also joins the v2 tree when one is
// mounted).
func CgroupRoots() []string {
	var roots []string
	if r, err := agent.CgroupV2Root(); err == nil {
		roots = append(roots, r)
	}
	if m := cgroups.Mode(); m == cgroups.Legacy || m == cgroups.Hybrid {
		for _, c := range []string{"pids", "memory", "systemd"} {
			p := filepath.Join("/sys/fs/cgroup", c)
			if st, err := os.Stat(filepath.Join(p, "cgroup.procs")); err == nil && st.Mode().IsRegular() {
				roots = append(roots, p)
			}
		}
	}
	return roots
}

// podCgroupDirs lists where kubelet puts a pod's cgroup, relative to a
// hierarchy root: cgroupfs driver (kubepods/[burstable|besteffort/]pod<uid>)
// and systemd driver (kubepods.slice/[kubepods-<qos>.slice/]kubepods-[<qos>-]pod<uid_>.slice).
// Guaranteed pods sit directly under kubepods.
func podCgroupDirs(uid string) []string {
	u := strings.ReplaceAll(uid, "-", "_")
	return []string{
		"kubepods/pod" + uid,
		"kubepods/burstable/pod" + uid,
		"kubepods/besteffort/pod" + uid,
		"kubepods.slice/kubepods-pod" + u + ".slice",
		"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + u + ".slice",
		"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + u + ".slice",
	}
}

// ErrNoProcess means the pod's cgroup was not found or holds no process yet
// (sandbox not started); the caller retries.
var ErrNoProcess = errors.New("no process in the pod's cgroup yet")

// netnsRef is a resolved pod network namespace: the path the agent opens
// and the namespace's inode, to tell later whether the path still names it.
type netnsRef struct {
	path string
	ino  uint64
	pid  int
}

// nsInode returns the inode of the network namespace at path.
func nsInode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// stillValid tells whether ref's path still names the same namespace (the
// process is alive and was not replaced by a pid reuse in another netns).
func (r netnsRef) stillValid() bool {
	ino, err := nsInode(r.path)
	return err == nil && ino == r.ino
}

// findPodNetNS finds a process of the pod with this UID under one of roots
// and returns its network namespace. The first process found in the pod's
// cgroup tree is used (the sandbox's pause process is normally alone in its
// container cgroup; every container of a pod shares its netns).
func findPodNetNS(roots []string, uid string) (netnsRef, error) {
	if uid == "" {
		return netnsRef{}, fmt.Errorf("pod has no UID")
	}
	for _, root := range roots {
		for _, rel := range podCgroupDirs(uid) {
			dir := filepath.Join(root, rel)
			pid, err := firstProc(dir, 3)
			if err != nil || pid == 0 {
				continue
			}
			path := "/proc/" + strconv.Itoa(pid) + "/ns/net"
			ino, err := nsInode(path)
			if errors.Is(err, fs.ErrPermission) {
				return netnsRef{}, fmt.Errorf("network namespace %s of the pod's process: %w (opening another user's process needs CAP_SYS_PTRACE)", path, err)
			}
			if err != nil {
				continue // exited meanwhile
			}
			return netnsRef{path: path, ino: ino, pid: pid}, nil
		}
	}
	return netnsRef{}, ErrNoProcess
}

// firstProc returns the lowest pid in dir's cgroup.procs, else the first
// found in its children (depth first, sorted, down to depth levels).
func firstProc(dir string, depth int) (int, error) {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return 0, err
	}
	lowest := 0
	for _, f := range strings.Fields(string(data)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 0 && (lowest == 0 || pid < lowest) {
			lowest = pid
		}
	}
	if lowest != 0 || depth == 0 {
		return lowest, nil
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	for _, e := range ents { // ReadDir sorts by name
		if !e.IsDir() {
			continue
		}
		if pid, err := firstProc(filepath.Join(dir, e.Name()), depth-1); err == nil && pid != 0 {
			return pid, nil
		}
	}
	return 0, nil
}
