package cli

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"text/tabwriter"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/mesh"
)

// lbCmd runs `shuntctl lb which|status`.
func lbCmd(c *agent.Client, args []string, w io.Writer) error {
	if len(args) == 0 {
		return errors.New("lb: want which or status")
	}
	switch args[0] {
	case "which":
		return lbWhich(args[1:], w)
	case "status":
		return lbStatus(c, args[1:], w)
	}
	return fmt.Errorf("lb %s: unknown subcommand (want which or status)", args[0])
}

// lbWhich asks the loaded load balancer program (BPF_PROG_TEST_RUN on a
// synthesized packet) where a flow goes.
func lbWhich(args []string, w io.Writer) error {
	fs := newFlags("lb which")
	root := fs.String("bpffs-root", datapath.DefaultRoot, "")
	dev := fs.String("device", "", "")
	asJSON := fs.Bool("json", false, "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("lb which: %w", err)
	}
	if fs.NArg() != 3 {
		return errors.New("lb which: want PROTO SRC:PORT VIP:PORT, e.g. lb which tcp 198.51.100.7:40000 10.96.0.10:80")
	}
	proto, err := mesh.ParseProtocol(fs.Arg(0))
	if err != nil {
		return fmt.Errorf("lb which: %w", err)
	}
	src, err := netip.ParseAddrPort(fs.Arg(1))
	if err != nil {
		return fmt.Errorf("lb which: source %q is not ADDR:PORT", fs.Arg(1))
	}
	dst, err := netip.ParseAddrPort(fs.Arg(2))
	if err != nil {
		return fmt.Errorf("lb which: destination %q is not ADDR:PORT", fs.Arg(2))
	}
	prog, ct, err := xdp.OpenPinned(*root, *dev)
	if err != nil {
		return fmt.Errorf("lb which: %w", err)
	}
	defer prog.Close()
	defer ct.Close()
	res, err := xdp.Which(prog, ct, proto, src, dst)
	if err != nil {
		return fmt.Errorf("lb which: %w", err)
	}
	if *asJSON {
		return printJSON(w, res)
	}
	if res.Verdict != "XDP_TX" {
		fmt.Fprintf(w, "%s %s -> %s: %s (not load-balanced: see `shuntctl lb status` counters)\n", proto, src, dst, res.Verdict)
		return nil
	}
	state := "new flow, Maglev pick"
	if res.Established {
		state = "established flow, conntrack"
	}
	fmt.Fprintf(w, "%s %s -> %s: backend %s via %s", proto, src, dst, res.Backend, res.Dispatch)
	if res.Tunnel.IsValid() {
		fmt.Fprintf(w, " to %s", res.Tunnel)
	}
	fmt.Fprintf(w, " (%s)\n", state)
	return nil
}

func lbStatus(c *agent.Client, args []string, w io.Writer) error {
	fs := newFlags("lb status")
	asJSON := fs.Bool("json", false, "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("lb status: %w", err)
	}
	var st agent.XDPStatus
	if err := c.XDPStatus(&st); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(w, st)
	}
	if !st.Enabled {
		fmt.Fprintln(w, "XDP load balancer: off (no xdp.devices or xdp.dsrDevices configured)")
		return nil
	}
	fmt.Fprintf(w, "XDP load balancer on %v, backend side on %v, Maglev table size %d\n", st.Devices, st.DSRDevices, st.TableSize)
	if len(st.Generic) > 0 {
		fmt.Fprintf(w, "WARNING: generic (slow) XDP on %v: the driver refused native mode\n", st.Generic)
	}
	for _, p := range st.LinkProblems {
		fmt.Fprintf(w, "UNHEALTHY: %s (the agent's resync attaches it again)\n", p)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nLINK\tDEVICE\tKIND\tLINK ID\tPROG ID")
	for _, l := range st.Links {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\n", l.Name, l.Device, l.Kind, l.LinkID, l.ProgID)
	}
	fmt.Fprintln(tw, "\nSERVICE\tFRONTEND\tTABLE FINGERPRINT\tPACKETS\tFLOWS\tNO-BACKEND")
	for _, s := range st.Services {
		fp := s.Fingerprint
		if fp == "" {
			fp = "(empty: no backend)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\n", s.Name, s.Frontend, fp, s.Packets, s.Flows, s.NoBackend)
	}
	fmt.Fprintln(tw, "\nCOUNTER\tVALUE")
	for _, n := range xdp.StatNames {
		fmt.Fprintf(tw, "%s\t%d\n", n, st.Counters[n])
	}
	for _, n := range xdp.DSRStatNames {
		fmt.Fprintf(tw, "dsr_%s\t%d\n", n, st.DSRCounters[n])
	}
	return tw.Flush()
}
