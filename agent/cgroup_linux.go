package agent

import (
	"errors"
	"fmt"

	"github.com/containerd/cgroups/v3"
	"golang.org/x/sys/unix"
)

// CgroupV2Root finds the cgroup v2 hierarchy: /sys/fs/cgroup on unified
// hosts, /sys/fs/cgroup/unified on hybrid ones (v1 controllers plus a v2
// tree). Legacy hosts without a v2 tree cannot run the socket hooks.
func CgroupV2Root() (string, error) {
	var root string
	switch cgroups.Mode() {
	case cgroups.Unified:
		root = "/sys/fs/cgroup"
	case cgroups.Hybrid:
		root = "/sys/fs/cgroup/unified"
	default:
		return "", errors.New("no cgroup v2 hierarchy mounted (legacy cgroup v1 host): mount cgroup2 or set datapath.cgroup")
	}
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil || st.Type != unix.CGROUP2_SUPER_MAGIC {
		return "", fmt.Errorf("%s is not a cgroup v2 mount", root)
	}
	return root, nil
}
