package xdp

import (
	"errors"
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

// Conntrack is the load balancer's conntrack: one LRU map per family
// (lb_ct4, lb_ct6).
type Conntrack struct {
	V4, V6 *ebpf.Map
}

// Close closes both maps.
func (c Conntrack) Close() error {
	var err4, err6 error
	if c.V4 != nil {
		err4 = c.V4.Close()
	}
	if c.V6 != nil {
		err6 = c.V6.Close()
	}
	return errors.Join(err4, err6)
}

// Lookup reads the conntrack entry of the flow src -> dst.
func (c Conntrack) Lookup(proto mesh.Protocol, src, dst netip.AddrPort, v *bpf.XdplbXlbCt) error {
	if src.Addr().Is4() {
		return c.V4.Lookup(FlowKey4(proto, src, dst), v)
	}
	return c.V6.Lookup(FlowKey(proto, src, dst), v)
}

// Which asks the loaded program where a packet of the flow src -> dst
// would go: it runs prog (BPF_PROG_TEST_RUN) on a probe packet (see
// BuildProbe) and reads the frame it produced and its conntrack entry from
// ct. Like any packet of the flow, the probe is counted and, for a flow the
// load balancer has not seen, creates its conntrack entry.
func Which(prog *ebpf.Program, ct Conntrack, proto mesh.Protocol, src, dst netip.AddrPort) (WhichResult, error) {
	var res WhichResult
	frame, err := BuildProbe(proto, src, dst)
	if err != nil {
		return res, err
	}
	var before bpf.XdplbXlbCt
	res.Established = ct.Lookup(proto, src, dst, &before) == nil
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
	if err := ct.Lookup(proto, src, dst, &entry); err == nil {
		res.Backend = netip.AddrPortFrom(wordsAddr(entry.Be.Addr, entry.Be.Family), portH(entry.Be.Port))
	} else if disp.Kind == "geneve" || disp.Kind == "opt" || disp.Kind == "snat" {
		res.Backend = disp.Dst
	}
	return res, nil
}

// FlowKey is the conntrack key of the flow src -> dst in lb_ct6 (and the
// layout of the 5-tuple in the other maps that hold one).
func FlowKey(proto mesh.Protocol, src, dst netip.AddrPort) bpf.XdplbXlbFlow {
	return bpf.XdplbXlbFlow{Src: addrWords(src.Addr()), Dst: addrWords(dst.Addr()), Sport: portN(src.Port()),
		Dport: portN(dst.Port()), Proto: protoNum(proto), Family: family(src.Addr())}
}

// FlowKey4 is the lb_ct4 key of the IPv4 flow src -> dst.
func FlowKey4(proto mesh.Protocol, src, dst netip.AddrPort) bpf.XdplbXlbFlow4 {
	return bpf.XdplbXlbFlow4{Src: addrWords(src.Addr())[0], Dst: addrWords(dst.Addr())[0], Sport: portN(src.Port()),
		Dport: portN(dst.Port()), Proto: protoNum(proto)}
}

// OpenPinned opens the load balancer program attached to device (any
// device when "") and the conntrack map, from the pins under the agent's
// bpffs root: what `shuntctl lb which` runs.
func OpenPinned(root, device string) (*ebpf.Program, Conntrack, error) {
	dir := filepath.Join(root, "xdp")
	entries, err := os.ReadDir(filepath.Join(dir, "links"))
	if err != nil {
		return nil, Conntrack{}, fmt.Errorf("no load balancer pinned under %s (is xdp.devices configured and shuntd started?): %w", dir, err)
	}
	var linkPath string
	for _, e := range entries {
		if name, ok := strings.CutPrefix(e.Name(), "xdp-"); ok && (device == "" || name == device) {
			linkPath = filepath.Join(dir, "links", e.Name())
			break
		}
	}
	if linkPath == "" {
		return nil, Conntrack{}, fmt.Errorf("no load balancer link for device %q under %s", device, dir)
	}
	l, err := link.LoadPinnedLink(linkPath, nil)
	if err != nil {
		return nil, Conntrack{}, fmt.Errorf("open %s: %w", linkPath, err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return nil, Conntrack{}, fmt.Errorf("link %s: %w", linkPath, err)
	}
	prog, err := ebpf.NewProgramFromID(info.Program)
	if err != nil {
		return nil, Conntrack{}, fmt.Errorf("program %d of %s: %w", info.Program, linkPath, err)
	}
	var ct Conntrack
	for _, m := range []struct {
		name string
		dst  **ebpf.Map
	}{{bpf.XdplbMapLbCt4, &ct.V4}, {bpf.XdplbMapLbCt6, &ct.V6}} {
		if *m.dst, err = ebpf.LoadPinnedMap(filepath.Join(dir, "maps", m.name), nil); err != nil {
			prog.Close()
			ct.Close()
			return nil, Conntrack{}, fmt.Errorf("conntrack map %s: %w", m.name, err)
		}
	}
	return prog, ct, nil
}
