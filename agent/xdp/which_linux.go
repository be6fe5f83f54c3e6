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

// Conntrack is the load balancer's conntrack (lb_ct4, lb_ct6) with the maps
// reading an entry needs: lb_backends (an entry names its backend by id)
// and lb_config (the seed that places flows, the number of sets).
type Conntrack struct {
	V4, V6, Backends, Config *ebpf.Map
}

// Close closes the maps.
func (c Conntrack) Close() error {
	var errs []error
	for _, m := range []*ebpf.Map{c.V4, c.V6, c.Backends, c.Config} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	return errors.Join(errs...)
}

// Lookup reads the conntrack entry of the flow src -> dst as the program
// would (ebpf.ErrKeyNotExist when it has none or its entry fails its
// check), with its backend from lb_backends.
func (c Conntrack) Lookup(proto mesh.Protocol, src, dst netip.AddrPort, v *bpf.XdplbXlbCt) error {
	var cfg bpf.XdplbXlbConfig
	if err := c.Config.Lookup(uint32(0), &cfg); err != nil {
		return fmt.Errorf("read lb_config: %w", err)
	}
	if cfg.CtSets == 0 {
		return fmt.Errorf("no conntrack (lb_config.ct_sets is 0): %w", ebpf.ErrKeyNotExist)
	}
	hash := CTFlowHash(proto, src, dst, cfg.Seed)
	i1, i2 := CTSetsOf(hash, cfg.CtSets)
	pn, sp, dp := protoNum(proto), portN(src.Port()), portN(dst.Port())
	var tail *bpf.XdplbXlbCtTail
	for _, idx := range []uint32{i1, i2} {
		if family(src.Addr()) == afInet {
			var set bpf.XdplbXlbCtSet4
			if err := c.V4.Lookup(idx, &set); err != nil {
				return fmt.Errorf("read lb_ct4 set %d: %w", idx, err)
			}
			s, d := addrWords(src.Addr())[0], addrWords(dst.Addr())[0]
			for i := range set.Way {
				if w := &set.Way[i]; w.Src == s && w.Dst == d && ctMatch(&w.T, pn, sp, dp, hash) {
					tail = &w.T
					break
				}
			}
		} else {
			var set bpf.XdplbXlbCtSet6
			if err := c.V6.Lookup(idx, &set); err != nil {
				return fmt.Errorf("read lb_ct6 set %d: %w", idx, err)
			}
			s, d := addrWords(src.Addr()), addrWords(dst.Addr())
			for i := range set.Way {
				if w := &set.Way[i]; w.Src == s && w.Dst == d && ctMatch(&w.T, pn, sp, dp, hash) {
					tail = &w.T
					break
				}
			}
		}
		if tail != nil {
			break
		}
	}
	if tail == nil {
		return ebpf.ErrKeyNotExist
	}
	*v = bpf.XdplbXlbCt{SvcId: uint32(tail.SvcId), BeId: uint32(tail.BeId), SnatPort: tail.SnatPort,
		Action: tail.Action, Hash: hash, Gen: tail.Gen & ctGenMask}
	if err := c.Backends.Lookup(uint32(tail.BeId), &v.Be); err != nil {
		return fmt.Errorf("read lb_backends %d: %w", tail.BeId, err)
	}
	if uint8(v.Be.Gen) != uint8(tail.Gen>>24) {
		return fmt.Errorf("entry names backend %d of an earlier generation: %w", tail.BeId, ebpf.ErrKeyNotExist)
	}
	return nil
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

// FlowKey is the 5-tuple of the flow src -> dst as the maps that hold
// one lay it out (struct xlb_flow).
func FlowKey(proto mesh.Protocol, src, dst netip.AddrPort) bpf.XdplbXlbFlow {
	return bpf.XdplbXlbFlow{Src: addrWords(src.Addr()), Dst: addrWords(dst.Addr()), Sport: portN(src.Port()),
		Dport: portN(dst.Port()), Proto: protoNum(proto), Family: family(src.Addr())}
}

// OpenPinned opens the load balancer program attached to device (any
// device when "") and the conntrack maps, from the pins under the agent's
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
	}{{bpf.XdplbMapLbCt4, &ct.V4}, {bpf.XdplbMapLbCt6, &ct.V6}, {bpf.XdplbMapLbBackends, &ct.Backends},
		{bpf.XdplbMapLbConfig, &ct.Config}} {
		if *m.dst, err = ebpf.LoadPinnedMap(filepath.Join(dir, "maps", m.name), nil); err != nil {
			prog.Close()
			ct.Close()
			return nil, Conntrack{}, fmt.Errorf("conntrack map %s: %w", m.name, err)
		}
	}
	return prog, ct, nil
}
