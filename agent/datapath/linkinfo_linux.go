package datapath

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Attached tells whether l still runs its program on its target. A bpf_link
// detached behind the agent's back (BPF_LINK_DETACH, e.g. `bpftool link
// detach`), or whose cgroup or device went away, stays a valid file
// descriptor and pin but runs nothing: the kernel then reports its target as
// 0 (cgroup id, ifindex, map id) in the link's info.
func Attached(l link.Link) (bool, error) {
	info, err := l.Info()
	if err != nil {
		return false, err
	}
	switch {
	case info.Cgroup() != nil:
		return info.Cgroup().CgroupId != 0, nil
	case info.XDP() != nil:
		return info.XDP().Ifindex != 0, nil
	case info.TCX() != nil:
		return info.TCX().Ifindex != 0, nil
	case info.Type == linkTypeSockmap:
		// cilium/ebpf does not decode sockmap link info: read it raw.
		fd, ok := l.(interface{ FD() int })
		if !ok {
			return false, fmt.Errorf("sockmap link without a file descriptor")
		}
		id, err := sockmapLinkMapID(fd.FD())
		return id != 0, err
	}
	return true, nil // a kind this agent does not create: assume attached
}

// sockmapLinkMapID returns the map id of a BPF_LINK_TYPE_SOCKMAP link
// (struct bpf_link_info: type, id, prog_id, then the union at offset 16,
// whose sockmap member starts with map_id).
func sockmapLinkMapID(fd int) (uint32, error) {
	var buf [64]byte
	// union bpf_attr's info member: bpf_fd, info_len, info (a pointer in
	// an __aligned_u64: 64-bit only, as is the rest of the agent).
	attr := struct {
		fd      uint32
		infoLen uint32
		info    unsafe.Pointer
	}{fd: uint32(fd), infoLen: uint32(len(buf)), info: unsafe.Pointer(&buf[0])}
	_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_OBJ_GET_INFO_BY_FD, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	if errno != 0 {
		return 0, fmt.Errorf("link info: %w", errno)
	}
	return binary.NativeEndian.Uint32(buf[16:20]), nil
}
