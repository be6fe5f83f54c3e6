package cli

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/shuntmesh/shunt/mesh/maglev"
)

// maglevCmd runs `shuntctl maglev table`: pure Go, no agent needed.
func maglevCmd(args []string, w io.Writer) error {
	if len(args) == 0 || args[0] != "table" {
		return errors.New("maglev: want table")
	}
	fs := newFlags("maglev table")
	seedS := fs.String("seed", "", "")
	size := fs.Uint("size", uint(maglev.DefaultSize), "")
	backends := fs.String("backends", "", "")
	asJSON := fs.Bool("json", false, "")
	if err := fs.Parse(args[1:]); err != nil {
		return fmt.Errorf("maglev table: %w", err)
	}
	seed, err := maglev.ParseSeed(*seedS)
	if err != nil {
		return fmt.Errorf("maglev table: --seed: %w", err)
	}
	var bs []maglev.Backend
	for i, item := range splitList(*backends) {
		addr, wt, hasW := strings.Cut(item, "*")
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			return fmt.Errorf("maglev table: --backends[%d]: %q is not ADDR:PORT[*WEIGHT]", i, item)
		}
		b := maglev.Backend{Key: ap.String(), Weight: 1} // the key format the agent uses
		if hasW {
			v, err := strconv.ParseUint(wt, 10, 32)
			if err != nil {
				return fmt.Errorf("maglev table: --backends[%d]: weight %q is not a non-negative integer", i, wt)
			}
			b.Weight = uint32(v)
		}
		bs = append(bs, b)
	}
	if len(bs) == 0 {
		return errors.New("maglev table: --backends is required (ADDR:PORT[*WEIGHT],...)")
	}
	t, err := maglev.Build(bs, uint32(*size), seed)
	if err != nil {
		return fmt.Errorf("maglev table: %w", err)
	}
	type row struct {
		Backend string  `json:"backend"`
		Weight  uint32  `json:"weight"`
		Slots   uint32  `json:"slots"`
		Share   float64 `json:"share"`
	}
	out := struct {
		Size        uint32 `json:"size"`
		Fingerprint string `json:"fingerprint"`
		Backends    []row  `json:"backends"`
	}{Size: t.Size()}
	if !t.Empty() {
		out.Fingerprint = t.Fingerprint()
	}
	counts := t.Counts()
	for i, b := range t.Backends() {
		out.Backends = append(out.Backends, row{b.Key, b.Weight, counts[i], float64(counts[i]) / float64(t.Size())})
	}
	if *asJSON {
		return printJSON(w, out)
	}
	if out.Fingerprint == "" {
		fmt.Fprintf(w, "size %d: empty table (no backend with weight > 0)\n", out.Size)
	} else {
		fmt.Fprintf(w, "size %d fingerprint %s\n", out.Size, out.Fingerprint)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKEND\tWEIGHT\tSLOTS\tSHARE")
	for _, r := range out.Backends {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.2f%%\n", r.Backend, r.Weight, r.Slots, 100*r.Share)
	}
	return tw.Flush()
}
