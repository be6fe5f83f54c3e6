package harness

import (
	"fmt"
	"strings"
)

// RedirectOpts configures Pod.RedirectToSidecar. Zero values take Istio's
// defaults.
type RedirectOpts struct {
	// UID/GID of the sidecar, whose own connections are not redirected
	// (default 1337/1337).
	UID, GID uint32
	// OutboundPort: the pod's outbound TCP goes to 127.0.0.1/::1 at this
	// port (default 15001).
	OutboundPort uint16
	// InboundPort: TCP arriving at the pod goes here (default 15006).
	InboundPort uint16
	// NoInbound leaves inbound traffic alone (no PREROUTING rule).
	NoInbound bool
	// ExcludeInboundPorts are not redirected inbound (Istio always excludes
	// its own 15008, 15090, 15021 and 15020; so does this).
	ExcludeInboundPorts []uint16
}

func (o RedirectOpts) withDefaults() RedirectOpts {
	if o.UID == 0 {
		o.UID = SidecarUID
	}
	if o.GID == 0 {
		o.GID = o.UID
	}
	if o.OutboundPort == 0 {
		o.OutboundPort = SidecarOutboundPort
	}
	if o.InboundPort == 0 {
		o.InboundPort = SidecarInboundPort
	}
	return o
}

// IstioRules returns the nat table Istio's istio-iptables installs in a pod
// (same chain names and rule order), in iptables-restore format for IPv4
// (v6 false) or ip6tables-restore (v6 true):
//
//   - PREROUTING → ISTIO_INBOUND: TCP to any port except the excluded ones
//     is REDIRECTed to the inbound port;
//   - OUTPUT → ISTIO_OUTPUT: the sidecar's own connections (uid or gid) and
//     connections to loopback return untouched, except the sidecar's
//     connections to the pod's own address over lo, which go to the inbound
//     port; everything else is REDIRECTed to the outbound port.
func IstioRules(o RedirectOpts, v6 bool) string {
	o = o.withDefaults()
	lo, inboundSrc := "127.0.0.1/32", "127.0.0.6/32"
	if v6 {
		lo, inboundSrc = "::1/128", "::6/128"
	}
	var b strings.Builder
	w := func(f string, a ...any) { fmt.Fprintf(&b, f+"\n", a...) }
	w("*nat")
	w(":ISTIO_OUTPUT - [0:0]")
	w(":ISTIO_REDIRECT - [0:0]")
	if !o.NoInbound {
		w(":ISTIO_INBOUND - [0:0]")
		w(":ISTIO_IN_REDIRECT - [0:0]")
		w("-A PREROUTING -p tcp -j ISTIO_INBOUND")
		for _, p := range append([]uint16{15008, 15090, 15021, 15020}, o.ExcludeInboundPorts...) {
			w("-A ISTIO_INBOUND -p tcp --dport %d -j RETURN", p)
		}
		w("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
		w("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports %d", o.InboundPort)
	}
	w("-A OUTPUT -p tcp -j ISTIO_OUTPUT")
	w("-A ISTIO_OUTPUT -s %s -o lo -j RETURN", inboundSrc)
	for _, owner := range []string{fmt.Sprintf("--uid-owner %d", o.UID), fmt.Sprintf("--gid-owner %d", o.GID)} {
		if !o.NoInbound {
			w("-A ISTIO_OUTPUT ! -d %s -o lo -m owner %s -j ISTIO_IN_REDIRECT", lo, owner)
		}
		w("-A ISTIO_OUTPUT -o lo -m owner ! %s -j RETURN", owner)
		w("-A ISTIO_OUTPUT -m owner %s -j RETURN", owner)
	}
	w("-A ISTIO_OUTPUT -d %s -j RETURN", lo)
	w("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
	w("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports %d", o.OutboundPort)
	w("COMMIT")
	return b.String()
}

// RedirectToSidecar installs Istio's iptables REDIRECT rules (IstioRules)
// for IPv4 and IPv6 in the pod's network namespace. They disappear with the
// namespace.
func (p *Pod) RedirectToSidecar(o RedirectOpts) error {
	for _, v6 := range []bool{false, true} {
		cmd := "iptables-restore"
		if v6 {
			cmd = "ip6tables-restore"
		}
		out, err := p.ExecOpts(ProcOpts{Stdin: strings.NewReader(IstioRules(o, v6))}, cmd, "--noflush")
		if err != nil {
			return fmt.Errorf("%s in %s: %w: %s", cmd, p.netns, err, out)
		}
	}
	return nil
}
