package e2e

import (
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
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
	for _, at := range []ebpf.AttachType{
		ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
		ebpf.AttachCGroupUDP4Sendmsg, ebpf.AttachCGroupUDP6Sendmsg,
		ebpf.AttachCGroupUDP4Recvmsg, ebpf.AttachCGroupUDP6Recvmsg,
		ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername,
	} {
		r, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
		if err != nil {
			return 0, err
		}
		n += len(r.Programs)
	}
	return n, nil
}
