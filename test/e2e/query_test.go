package e2e

import (
	"os"

	"github.com/cilium/ebpf/link"

	"github.com/shuntmesh/shunt/agent/datapath"
)

// attachedPrograms counts the programs attached directly to a cgroup on any
// of the hooks sockmesh uses.
func attachedPrograms(cgroup string) (int, error) {
	f, err := os.Open(cgroup)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n := 0
	for _, at := range datapath.CgroupAttachTypes() {
		r, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			return 0, err
		}
		n += len(r.Programs)
	}
	return n, nil
}
