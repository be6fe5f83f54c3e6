package kubenode

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// ImportImage imports an OCI image archive (ociimage.Write,
// scripts/build-image.sh) into the node's containerd, CRI namespace: pods
// then run it with imagePullPolicy Never or IfNotPresent.
func (n *Node) ImportImage(ctx context.Context, archive string) error {
	_, err := n.ctrRun(ctx, "images", "import", archive)
	return err
}

// SharedBPFFS mounts a bpffs of the node's own at <Dir>/bpffs and makes it
// a shared mount, as systemd mounts /sys/fs/bpf on real nodes: a pod can
// then mount it with HostToContainer propagation (containerd refuses that
// for a private source), and what is pinned there is private to the node.
// The node's cleanup unmounts it (and so frees whatever is still pinned).
func (n *Node) SharedBPFFS() (string, error) {
	p := filepath.Join(n.dir, "bpffs")
	if err := os.Mkdir(p, 0o700); err != nil {
		return "", err
	}
	if err := unix.Mount("bpf", p, "bpf", 0, "mode=0700"); err != nil {
		return "", fmt.Errorf("mount bpffs at %s: %w", p, err)
	}
	if err := unix.Mount("", p, "", unix.MS_SHARED, ""); err != nil {
		return "", fmt.Errorf("make %s shared: %w", p, err)
	}
	return p, nil
}

// SharedCgroup2 binds the machine's cgroup v2 hierarchy at <Dir>/cgroup2
// and makes the copy a shared mount, for a pod that mounts the node's
// cgroups with HostToContainer propagation (as on a systemd node, whose
// /sys/fs/cgroup is shared). The machine's own mount keeps its
// propagation, and the copy is the same hierarchy: a path below it names
// the same cgroup as the path below the original. Only the v2 hierarchy is
// bound (a pure cgroup v2 node's layout): it is the one Shunt attaches to
// and finds pods in, and binding the v1 ones would show their hierarchies
// twice to whoever lists the machine's cgroup mounts.
func (n *Node) SharedCgroup2() (string, error) {
	hs, err := cgroupHierarchies()
	if err != nil {
		return "", err
	}
	p := filepath.Join(n.dir, "cgroup2")
	if err := os.Mkdir(p, 0o700); err != nil {
		return "", err
	}
	if err := unix.Mount(hs[0], p, "", unix.MS_BIND, ""); err != nil {
		return "", fmt.Errorf("bind %s at %s: %w", hs[0], p, err)
	}
	if err := unix.Mount("", p, "", unix.MS_SHARED, ""); err != nil {
		return "", fmt.Errorf("make %s shared: %w", p, err)
	}
	return p, nil
}

// CgroupV2Mount is where the machine's cgroup v2 hierarchy is mounted (the
// folder SharedCgroup2 binds).
func (n *Node) CgroupV2Mount() string { return filepath.Dir(n.cg2) }

// PodContainers lists the runtime's containers of the pod with uid, its
// sandbox included (running or not): the kubelet removes them when it has
// cleaned up a deleted pod.
func (n *Node) PodContainers(ctx context.Context, uid string) ([]string, error) {
	out, err := n.ctrRun(ctx, "containers", "ls", "-q", fmt.Sprintf(`labels."io.kubernetes.pod.uid"==%s`, uid))
	return strings.Fields(out), err
}

// PodDir is the kubelet's folder of the pod with uid (volumes, plugins,
// container data).
func (n *Node) PodDir(uid string) string { return filepath.Join(n.dir, "kubelet", "pods", uid) }

// BuildShuntdImage writes shuntd's image for version (named
// docker.io/shunt/shuntd:<version>, stamped with that version) to archive,
// with scripts/build-image.sh: the way `make image` builds it.
func BuildShuntdImage(archive, version string) error {
	cmd := exec.Command(filepath.Join(RepoRoot(), "scripts", "build-image.sh"), "-o", archive, "-v", version)
	cmd.Dir = RepoRoot()
	// go test's own toolchain when go is not on PATH (sudo).
	cmd.Env = append(os.Environ(), "PATH="+os.Getenv("PATH")+":"+filepath.Join(runtime.GOROOT(), "bin"))
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("scripts/build-image.sh -v %s: %v\n%s", version, err, out)
	}
	return nil
}
