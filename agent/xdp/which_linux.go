package xdp

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
)

// RunXDP runs prog once on frame with BPF_PROG_TEST_RUN and returns the
// verdict and the frame as the program left it.
func RunXDP(prog *ebpf.Program, frame []byte) (uint32, []byte, error) {
	out := make([]byte, len(frame)+256)
	opts := &ebpf.RunOptions{Data: frame, DataOut: out}
	ret, err := prog.Run(opts)
	if err != nil {
		return 0, nil, fmt.Errorf("BPF_PROG_TEST_RUN: %w", err)
	}
	return ret, opts.DataOut, nil
}

// WhichResult is the load balancer's answer for one flow.
type WhichResult struct {
	Verdict string `json:"verdict"`
	// Backend is the backend's address and port (from the conntrack entry
	// the program used or created).
	Backend netip.AddrPort `json:"backend,omitzero"`
	// Tunnel is the outer destination of an encapsulated packet.
	Tunnel netip.Addr `json:"tunnel,omitzero"`
	// Dispatch: ipip, ip6ip6, 4in6, 6in4, geneve, opt or snat.
	Dispatch string `json:"dispatch,omitempty"`
	// Established is true when the flow already had a conntrack entry.
	Established bool `json:"established"`
}

// Which asks the loaded program where a packet of the flow src -> dst
// would go: it runs prog (BPF_PROG_TEST_RUN) on a probe packet (see
// BuildProbe) and reads the frame it produced and its conntrack entry from
// ct. Like any packet of the flow, the probe is counted and, for a flow the
// load balancer has not seen, creates its conntrack entry.
func Which(prog *ebpf.Program, ct *ebpf.Map, proto mesh.Protocol, src, dst netip.AddrPort) (WhichResult, error) {
	var res WhichResult
	frame, err := BuildProbe(proto, src, dst)
	if err != nil {
		return res, err
	}
	key := FlowKey(proto, src, dst)
	var before bpf.XdplbXlbCt
	res.Established = ct.Lookup(&key, &before) == nil
	v, out, err := RunXDP(prog, frame)
	if err != nil {
		return res, err
	}
	res.Verdict = VerdictName(v)
	if v != XDPTx {
		return res, nil
	}
	disp, err := ParseDispatched(out)
	if err != nil {
		return res, fmt.Errorf("output frame: %w", err)
	}
	res.Dispatch, res.Tunnel = disp.Kind, disp.Tunnel
	var entry bpf.XdplbXlbCt
	if err := ct.Lookup(&key, &entry); err == nil {
		res.Backend = netip.AddrPortFrom(wordsAddr(entry.Be.Addr, entry.Be.Family), portH(entry.Be.Port))
	} else if disp.Kind == "geneve" || disp.Kind == "opt" || disp.Kind == "snat" {
		res.Backend = disp.Dst
	}
	return res, nil
}

// FlowKey is the conntrack key of the flow src -> dst.
func FlowKey(proto mesh.Protocol, src, dst netip.AddrPort) bpf.XdplbXlbFlow {
	return bpf.XdplbXlbFlow{Src: addrWords(src.Addr()), Dst: addrWords(dst.Addr()), Sport: portN(src.Port()),
		Dport: portN(dst.Port()), Proto: protoNum(proto), Family: family(src.Addr())}
}

// OpenPinned opens the load balancer program attached to device (any
// device when "") and the conntrack map, from the pins under the agent's
// bpffs root: what `shuntctl lb which` runs.
func OpenPinned(root, device string) (*ebpf.Program, *ebpf.Map, error) {
	dir := filepath.Join(root, "xdp")
	entries, err := os.ReadDir(filepath.Join(dir, "links"))
	if err != nil {
		return nil, nil, fmt.Errorf("no load balancer pinned under %s (is xdp.devices configured and shuntd started?): %w", dir, err)
	}
	var linkPath string
	for _, e := range entries {
		if name, ok := strings.CutPrefix(e.Name(), "xdp-"); ok && (device == "" || name == device) {
			linkPath = filepath.Join(dir, "links", e.Name())
			break
		}
	}
	if linkPath == "" {
		return nil, nil, fmt.Errorf("no load balancer link for device %q under %s", device, dir)
	}
	l, err := link.LoadPinnedLink(linkPath, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("open %s: %w", linkPath, err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return nil, nil, fmt.Errorf("link %s: %w", linkPath, err)
	}
	prog, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		return nil, nil, fmt.Errorf("program %d of %s: %w", info.Program, linkPath, err)
	}
	ct, err := ebpf.LoadPinnedMap(filepath.Join(dir, "maps", bpf.XdplbMapLbCt), nil)
	if err != nil {
		prog.Close()
		return nil, nil, fmt.Errorf("conntrack map: %w", err)
	}
	return prog, ct, nil
}
