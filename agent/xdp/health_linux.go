package xdp

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf/link"
)

// LinkProblem is a configured attachment that is not in place: its device
// does not run the agent's program through the agent's pinned link.
type LinkProblem struct {
	Name   string `json:"name"`
	Device string `json:"device"`
	Reason string `json:"reason"`
	// pinOnly: the link is attached, only its pin is gone.
	pinOnly bool
}

func (p LinkProblem) String() string { return fmt.Sprintf("%s on %s: %s", p.Name, p.Device, p.Reason) }

// linkProblems checks every configured attachment (nothing when the
// datapath was opened without a bpffs root: nothing is attached then). A
// link can be detached behind the agent's back (BPF_LINK_DETACH, e.g.
// `bpftool link detach`), lose its device (deleted, or replaced by one of
// the same name) or its pin. Called with d.mu held.
func (d *Datapath) linkProblems() ([]LinkProblem, error) {
	if d.root == "" {
		return nil, nil
	}
	ifindex := map[string]int{}
	devErr := map[string]error{}
	err := inNetNS(d.cfg.NetNS, func() error {
		for _, a := range d.attachments() {
			iface, err := net.InterfaceByName(a.device)
			if err != nil {
				devErr[a.device] = err
				continue
			}
			ifindex[a.device] = iface.Index
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var out []LinkProblem
	for _, a := range d.attachments() {
		p := LinkProblem{Name: a.name, Device: a.device}
		l, held := d.links[a.name]
		switch {
		case devErr[a.device] != nil:
			p.Reason = fmt.Sprintf("device: %v", devErr[a.device])
		case !held:
			p.Reason = "not attached"
		default:
			p.Reason = linkReason(l, a, ifindex[a.device])
			if p.Reason == "" {
				if _, err := os.Stat(filepath.Join(d.linksDir(), a.name)); err != nil {
					p.Reason, p.pinOnly = fmt.Sprintf("attached, but its pin is gone (%v): a restarted agent would not find it", err), true
				}
			}
		}
		if p.Reason != "" {
			out = append(out, p)
		}
	}
	return out, nil
}

// linkReason says what is wrong with link l of attachment a, whose device
// has ifindex want; "" when nothing is.
func linkReason(l link.Link, a attachment, want int) string {
	info, err := l.Info()
	if err != nil {
		return fmt.Sprintf("link info: %v", err)
	}
	got := -1
	if x := info.XDP(); x != nil {
		got = int(x.Ifindex)
	} else if t := info.TCX(); t != nil {
		got = int(t.Ifindex)
	}
	switch {
	case got == 0:
		return fmt.Sprintf("link %d detached (its device went away or it was detached behind the agent's back)", info.ID)
	case got != want:
		return fmt.Sprintf("link %d is on ifindex %d, the device is ifindex %d (replaced)", info.ID, got, want)
	}
	pi, err := a.prog.Info()
	if err != nil {
		return fmt.Sprintf("program info: %v", err)
	}
	if id, ok := pi.ID(); ok && id != info.Program {
		return fmt.Sprintf("link %d runs program %d, not the agent's %d", info.ID, info.Program, id)
	}
	return ""
}

// LinkProblems lists the configured attachments that are not in place.
func (d *Datapath) LinkProblems() ([]LinkProblem, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.linkProblems()
}

// CheckLinks reports whether every configured device runs its program
// (xdplb on Devices, dsr ingress and egress on DSRDevices) through the
// agent's pinned link; the error names each device that does not and why.
func (d *Datapath) CheckLinks() error {
	ps, err := d.LinkProblems()
	if err != nil {
		return err
	}
	if len(ps) == 0 {
		return nil
	}
	msgs := make([]string, len(ps))
	for i, p := range ps {
		msgs[i] = p.String()
	}
	return errors.New(strings.Join(msgs, "; "))
}

// RepairLinks puts back what CheckLinks finds missing: a lost pin is pinned
// again; a defunct link is released and the program attached anew (and
// pinned). It returns what it repaired; a device that is gone stays a
// problem (and an error).
func (d *Datapath) RepairLinks() ([]LinkProblem, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ps, err := d.linkProblems()
	if err != nil || len(ps) == 0 {
		return nil, err
	}
	byName := map[string]attachment{}
	for _, a := range d.attachments() {
		byName[a.name] = a
	}
	var repaired []LinkProblem
	var errs []error
	err = inNetNS(d.cfg.NetNS, func() error {
		for _, p := range ps {
			a := byName[p.Name]
			if l, ok := d.links[p.Name]; ok {
				if p.pinOnly {
					// The library still believes the link pinned there.
					if err := errors.Join(l.Unpin(), l.Pin(filepath.Join(d.linksDir(), a.name))); err != nil {
						errs = append(errs, fmt.Errorf("pin link %s again: %w", a.name, err))
						continue
					}
					repaired = append(repaired, p)
					continue
				}
				l.Close()
				delete(d.links, p.Name)
			}
			if err := d.attach(a); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", p, err))
				continue
			}
			repaired = append(repaired, p)
		}
		return nil
	})
	return repaired, errors.Join(err, errors.Join(errs...))
}
