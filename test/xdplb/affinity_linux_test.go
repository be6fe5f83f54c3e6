package xdplb

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/mesh"
)

// TestClientIPAffinity: for a service with client-IP affinity, every new
// flow of one client address goes to one backend whatever its source port
// (TCP DSR, UDP SNAT, IPv4 and IPv6), while different clients still spread
// over all backends in proportion; the same flows to a service without
// affinity spread. Turning affinity off and on keeps established flows on
// their backends and changes only how new flows are placed.
func TestClientIPAffinity(t *testing.T) {
	svcs := fixtureServices()
	d := newLB(t, svcs)
	m := newModel(t, svcs)
	ct := d.Conntrack()
	which := func(p mesh.Protocol, src, dst netip.AddrPort) xdp.WhichResult {
		t.Helper()
		res, err := xdp.Which(d.Program(), ct, p, src, dst)
		if err != nil {
			t.Fatal(err)
		}
		if res.Verdict != "XDP_TX" {
			t.Fatalf("%s %s -> %s: %+v", p, src, dst, res)
		}
		return res
	}
	// backendsOf sends one flow from each of ports source ports from
	// base up.
	backendsOf := func(p mesh.Protocol, client netip.Addr, dst netip.AddrPort, base, ports int) map[netip.AddrPort]int {
		t.Helper()
		got := map[netip.AddrPort]int{}
		for i := range ports {
			got[which(p, netip.AddrPortFrom(client, uint16(base+i)), dst).Backend]++
		}
		return got
	}
	tcpAff, udpAff6 := ap("10.96.0.12:80"), ap("[fd00:96::12]:53")
	tcpPlain := ap("10.96.0.1:80") // same backends, no affinity

	r := newRand()
	for range 5 {
		c4, c6 := r.addr4(), r.addr6()
		if got := backendsOf(mesh.TCP, c4, tcpAff, 20000, 200); len(got) != 1 {
			t.Errorf("200 TCP flows of %s to %s went to %v, want one backend", c4, tcpAff, got)
		}
		// 100, not 200: each SNAT flow keeps one of the fixture's 1000
		// node ports, and five clients on one backend would take them all.
		if got := backendsOf(mesh.UDP, c6, udpAff6, 20000, 100); len(got) != 1 {
			t.Errorf("100 UDP flows of %s to %s (SNAT) went to %v, want one backend", c6, udpAff6, got)
		}
		if got := backendsOf(mesh.TCP, c4, tcpPlain, 20000, 200); len(got) != 3 {
			t.Errorf("200 TCP flows of %s to %s (no affinity) went to %v, want all 3 backends", c4, tcpPlain, got)
		}
	}

	// Different clients spread over the three backends of equal weight,
	// each client on the backend the Go model gives its address.
	share := map[netip.AddrPort]int{}
	const clients = 900
	for range clients {
		src := netip.AddrPortFrom(r.addr4(), r.port())
		res := which(mesh.TCP, src, tcpAff)
		if want := m.pick(t, src, tcpAff, false); res.Backend != want.Addr {
			t.Fatalf("%s -> %s: datapath %s, Go Maglev (client only) %s", src, tcpAff, res.Backend, want.Addr)
		}
		share[res.Backend]++
	}
	for _, b := range svcs[0].Backends {
		// 300 expected; ±3.5 standard deviations of a binomial(900, 1/3).
		if n := share[b.Addr]; n < 250 || n > 350 {
			t.Errorf("backend %s took %d of %d clients, want about a third (%v)", b.Addr, n, clients, share)
		}
	}

	// Established flows keep their backend when affinity is turned off
	// and on again; new flows follow the current setting.
	client := r.addr4()
	est := make([]netip.AddrPort, 30)
	for i := range est {
		est[i] = netip.AddrPortFrom(client, uint16(30000+i))
	}
	first := which(mesh.TCP, est[0], tcpAff).Backend
	for _, src := range est[1:] {
		if res := which(mesh.TCP, src, tcpAff); res.Backend != first {
			t.Fatalf("%s -> %s: %s, want the client's backend %s", src, tcpAff, res.Backend, first)
		}
	}
	i := slices.IndexFunc(svcs, func(s xdp.Service) bool { return s.Frontend == tcpAff && s.Proto == mesh.TCP })
	for phase, on := range []bool{false, true} {
		svcs[i].ClientIPAffinity = on
		if _, err := d.Sync(svcs); err != nil {
			t.Fatal(err)
		}
		for _, src := range est {
			res := which(mesh.TCP, src, tcpAff)
			if !res.Established || res.Backend != first {
				t.Errorf("affinity %v: established %s -> %s: %+v, want its backend %s", on, src, tcpAff, res, first)
			}
		}
		got := backendsOf(mesh.TCP, client, tcpAff, 40000+1000*phase, 100) // ports not used before
		if on && len(got) != 1 || !on && len(got) != 3 {
			t.Errorf("affinity %v: 100 new flows of %s went to %v", on, client, got)
		}
	}
}
