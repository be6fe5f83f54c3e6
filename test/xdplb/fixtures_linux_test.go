package xdplb

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
)

var (
	client4 = netip.MustParseAddr("198.51.100.10")
	client6 = netip.MustParseAddr("2001:db8::10")
)

func c4(port uint16) netip.AddrPort { return netip.AddrPortFrom(client4, port) }
func c6(port uint16) netip.AddrPort { return netip.AddrPortFrom(client6, port) }

// fixture is one packet through the program: Katran style.
type fixture struct {
	name    string
	in      []byte
	verdict uint32
	// out is the expected frame; nil means "unchanged" (PASS) or not
	// compared (DROP).
	out []byte
	// counters are the exact deltas of lb_stats (by StatNames); every
	// other counter must stay unchanged.
	counters map[string]uint64
	// svc are exact deltas of per-service counters, by frontend.
	svc map[string]bpf.XdplbXlbSvcStats
}

// builder makes the expected frames from the Go-side model.
type builder struct {
	t testing.TB
	m *model
}

func (b builder) hash(p pk) uint32 { return b.m.hash(p.src, p.dst, p.udp) }

func (b builder) backend(p pk) xdp.Backend { return b.m.pick(b.t, p.src, p.dst, p.udp) }

// ipip: the frame bounced with an outer header to the backend's tunnel
// address; the inner packet unchanged.
func (b builder) ipip(p pk, be xdp.Backend) []byte {
	in := p.bytes(b.t)
	return b.ipipOf(in, p.vlan, p.v4(), p.tos, be, b.hash(p))
}

func (b builder) ipipOf(in []byte, vlan uint16, inner4 bool, tos uint8, be xdp.Backend, hash uint32) []byte {
	tun := tunnelOf(be)
	proto := uint8(41)
	if inner4 {
		proto = 4
	}
	outer := outerIP(nodeFor(tun), tun, proto, ipLen(in, vlan), tos, hash)
	return encap(swapped(in), vlan, tun.Is4(), outer)
}

// dnat is p addressed to the backend, bounced.
func (b builder) dnat(p pk, be xdp.Backend) []byte {
	q := p
	q.dst = be.Addr
	return swapped(q.bytes(b.t))
}

func (b builder) geneve(p pk, be xdp.Backend) []byte {
	return geneveOf(b.dnat(p, be), p.vlan, p.dst, be, p.tos, b.hash(p))
}

// geneveOf is inner (already bounced and DNATed) in the load balancer's
// Geneve encapsulation to be's tunnel address, with svc in the option.
func geneveOf(inner []byte, vlan uint16, svc netip.AddrPort, be xdp.Backend, tos uint8, hash uint32) []byte {
	tun := tunnelOf(be)
	n := ipLen(inner, vlan)
	gh := geneveHdr(svc, n, hash)
	outer := outerIP(nodeFor(tun), tun, 17, len(gh)+n, tos, hash)
	return encap(inner, vlan, tun.Is4(), outer, gh)
}

func (b builder) opt(p pk, be xdp.Backend) []byte {
	q := p
	q.dst = be.Addr
	if p.v4() {
		data := make([]byte, 6)
		binary.BigEndian.PutUint16(data, p.dst.Port())
		a := p.dst.Addr().As4()
		copy(data[2:], a[:])
		q.ipOpts = []layers.IPv4Option{{OptionType: 0x9e, OptionLength: 8, OptionData: data}}
		// The frame keeps the input's Ethernet padding after the datagram.
		in := p.bytes(b.t)
		exp := swapped(q.bytes(b.t))
		exp = exp[:l2len(p.vlan)+ipLen(exp, p.vlan)]
		return append(exp, in[l2len(p.vlan)+ipLen(in, p.vlan):]...)
	}
	return optInsert(swapped(q.bytes(b.t)), p.vlan, p.dst)
}

// snat is p from the node address and port to the backend, bounced.
func (b builder) snat(p pk, be xdp.Backend) []byte {
	q := p
	q.src = netip.AddrPortFrom(nodeFor(p.src.Addr()), snatPort(b.hash(p)))
	q.dst = be.Addr
	return swapped(q.bytes(b.t))
}

// reply is the backend's answer to a SNATed p as it reaches the load
// balancer, and what the load balancer makes of it.
func (b builder) reply(p pk, be xdp.Backend) (in, out []byte) {
	r := pk{src: be.Addr, dst: netip.AddrPortFrom(nodeFor(p.src.Addr()), snatPort(b.hash(p))), udp: p.udp, flags: "A", payload: []byte("pong")}
	in = r.bytes(b.t)
	r.src, r.dst = p.dst, p.src
	return in, swapped(r.bytes(b.t))
}

// ptb is an ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6)
// from a router on the path of the reply of flow p (VIP -> client), sent to
// the VIP.
func (b builder) ptb(p pk, ttl uint8) []byte {
	return icmpErr(b.t, routerOf(p.v4()), p.dst.Addr(), replyOf(p.dst, p.src, p.udp), 0, ttl)
}

func routerOf(v4 bool) netip.Addr {
	if v4 {
		return netip.MustParseAddr("203.0.113.1")
	}
	return netip.MustParseAddr("2001:db8:ffff::1")
}

func stats(n ...string) map[string]uint64 {
	m := map[string]uint64{}
	for _, s := range n {
		m[s]++
	}
	return m
}

func fixtures(t testing.TB, m *model) []fixture {
	b := builder{t, m}
	var fs []fixture
	add := func(f fixture) { fs = append(fs, f) }
	vip := ap("10.96.0.1:80")
	vip6 := ap("[fd00:96::1]:80")
	svc1 := "10.96.0.1:80/tcp"

	// Not for the load balancer.
	arp := serialize(t, &layers.Ethernet{SrcMAC: routerMAC, DstMAC: layers.EthernetBroadcast, EthernetType: layers.EthernetTypeARP},
		&layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4,
			Operation: layers.ARPRequest, SourceHwAddress: routerMAC, SourceProtAddress: []byte{10, 0, 0, 254},
			DstHwAddress: make([]byte, 6), DstProtAddress: []byte{10, 96, 0, 1}})
	add(fixture{name: "ARP request for a VIP", in: arp, verdict: xdp.XDPPass, counters: stats("pass_not_ip")})
	nsIP := &layers.IPv6{Version: 6, HopLimit: 255, NextHeader: layers.IPProtocolICMPv6, SrcIP: ip("fe80::1").AsSlice(), DstIP: ip("ff02::1:ff00:1").AsSlice()}
	nsICMP := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborSolicitation, 0)}
	nsICMP.SetNetworkLayerForChecksum(nsIP)
	ns := serialize(t, append(l2(routerMAC, lbMAC, 0, false), nsIP, nsICMP,
		&layers.ICMPv6NeighborSolicitation{TargetAddress: ip("fd00:96::1").AsSlice()})...)
	add(fixture{name: "ND neighbor solicitation for a VIP", in: ns, verdict: xdp.XDPPass, counters: stats("pass_icmp")})
	add(fixture{name: "unknown VIP", in: pk{src: c4(clientPort), dst: ap("10.96.99.99:80"), flags: "S"}.bytes(t),
		verdict: xdp.XDPPass, counters: stats("pass_not_vip")})
	add(fixture{name: "VIP, other port", in: pk{src: c4(clientPort), dst: ap("10.96.0.1:81"), flags: "S"}.bytes(t),
		verdict: xdp.XDPPass, counters: stats("pass_not_vip")})
	add(fixture{name: "VIP, other protocol (UDP to a TCP service)", in: pk{src: c4(clientPort), dst: vip, udp: true}.bytes(t),
		verdict: xdp.XDPPass, counters: stats("pass_not_vip")})
	add(fixture{name: "UDP to the node address, no SNAT flow", in: pk{src: ap("10.1.0.1:5353"), dst: netip.AddrPortFrom(node4, 40500), udp: true}.bytes(t),
		verdict: xdp.XDPPass, counters: stats("pass_not_vip")})

	// IPIP: SYN, established, mid-flow pick, RST.
	syn := pk{src: c4(clientPort + 1), dst: vip, flags: "S"}
	be1 := b.backend(syn)
	add(fixture{name: "v4 TCP SYN, IPIP", in: syn.bytes(t), verdict: xdp.XDPTx, out: b.ipip(syn, be1),
		counters: stats("tx_ipip", "ct_new"), svc: map[string]bpf.XdplbXlbSvcStats{svc1: {Packets: 1, Bytes: uint64(len(syn.bytes(t))), Flows: 1}}})
	ack := syn
	ack.flags, ack.payload = "AP", []byte("GET / HTTP/1.1\r\n\r\n")
	add(fixture{name: "v4 TCP ACK of the flow (conntrack)", in: ack.bytes(t), verdict: xdp.XDPTx, out: b.ipip(ack, be1),
		counters: stats("tx_ipip", "ct_hit"), svc: map[string]bpf.XdplbXlbSvcStats{svc1: {Packets: 1, Bytes: uint64(len(ack.bytes(t)))}}})
	mid := pk{src: c4(clientPort + 2), dst: vip, flags: "A"}
	add(fixture{name: "v4 TCP ACK of an unknown flow: Maglev pick", in: mid.bytes(t), verdict: xdp.XDPTx, out: b.ipip(mid, b.backend(mid)),
		counters: stats("tx_ipip", "ct_new", "ct_midflow")})
	rst := syn
	rst.flags = "RA"
	add(fixture{name: "v4 TCP RST removes the conntrack entry", in: rst.bytes(t), verdict: xdp.XDPTx, out: b.ipip(rst, be1),
		counters: stats("tx_ipip", "ct_hit", "ct_rst")})
	add(fixture{name: "v4 TCP ACK after RST: picked again", in: ack.bytes(t), verdict: xdp.XDPTx, out: b.ipip(ack, be1),
		counters: stats("tx_ipip", "ct_new", "ct_midflow")})
	rstNew := pk{src: c4(clientPort + 3), dst: vip, flags: "R"}
	add(fixture{name: "v4 TCP RST of an unknown flow: forwarded, no entry", in: rstNew.bytes(t), verdict: xdp.XDPTx,
		out: b.ipip(rstNew, b.backend(rstNew)), counters: stats("tx_ipip", "ct_new", "ct_midflow")})
	add(fixture{name: "v4 TCP RST of an unknown flow again: still no entry", in: rstNew.bytes(t), verdict: xdp.XDPTx,
		out: b.ipip(rstNew, b.backend(rstNew)), counters: stats("tx_ipip", "ct_new", "ct_midflow")})
	tos := pk{src: c4(clientPort + 4), dst: vip, flags: "S", tos: 0xb8}
	add(fixture{name: "v4 TCP SYN with DSCP EF: copied to the outer header", in: tos.bytes(t), verdict: xdp.XDPTx, out: b.ipip(tos, b.backend(tos)),
		counters: stats("tx_ipip", "ct_new")})
	vl := pk{src: c4(clientPort + 5), dst: vip, flags: "S", vlan: 42}
	add(fixture{name: "802.1Q tagged SYN: tag kept", in: vl.bytes(t), verdict: xdp.XDPTx, out: b.ipip(vl, b.backend(vl)),
		counters: stats("tx_ipip", "ct_new")})
	badL4 := pk{src: c4(clientPort + 6), dst: vip, flags: "S", badL4: true}
	add(fixture{name: "bad TCP checksum: forwarded unchanged (the backend checks it)", in: badL4.bytes(t), verdict: xdp.XDPTx,
		out: b.ipip(badL4, b.backend(badL4)), counters: stats("tx_ipip", "ct_new")})
	add(fixture{name: "v6 TCP SYN, IP6IP6", in: pk{src: c6(clientPort), dst: vip6, flags: "S"}.bytes(t), verdict: xdp.XDPTx,
		out:      b.ipip(pk{src: c6(clientPort), dst: vip6, flags: "S"}, b.backend(pk{src: c6(clientPort), dst: vip6, flags: "S"})),
		counters: stats("tx_ipip", "ct_new")})
	p4in6 := pk{src: c4(clientPort), dst: ap("10.96.0.6:80"), flags: "S"}
	add(fixture{name: "v4 TCP SYN, 4in6 (IPv6 tunnel address)", in: p4in6.bytes(t), verdict: xdp.XDPTx, out: b.ipip(p4in6, b.backend(p4in6)),
		counters: stats("tx_ipip", "ct_new")})
	p6in4 := pk{src: c6(clientPort), dst: ap("[fd00:96::7]:80"), flags: "S"}
	add(fixture{name: "v6 TCP SYN, 6in4 (IPv4 tunnel address)", in: p6in4.bytes(t), verdict: xdp.XDPTx, out: b.ipip(p6in4, b.backend(p6in4)),
		counters: stats("tx_ipip", "ct_new")})

	// Geneve and IP option.
	for _, p := range []pk{
		{src: c4(clientPort + 10), dst: ap("10.96.0.3:80"), flags: "S"},
		{src: c4(clientPort + 11), dst: ap("10.96.0.3:80"), flags: "S", vlan: 7},
		{src: c6(clientPort + 10), dst: ap("[fd00:96::3]:80"), flags: "S"},
		{src: c4(clientPort + 12), dst: ap("10.96.0.8:80"), flags: "S"}, // hybrid TCP: DSR
	} {
		add(fixture{name: fmt.Sprintf("%s -> %s SYN, Geneve (vlan %d)", p.src, p.dst, p.vlan), in: p.bytes(t), verdict: xdp.XDPTx,
			out: b.geneve(p, b.backend(p)), counters: stats("tx_geneve", "ct_new")})
	}
	for _, p := range []pk{
		{src: c4(clientPort + 13), dst: ap("10.96.0.4:80"), flags: "S"},
		{src: c4(clientPort + 14), dst: ap("10.96.0.4:80"), flags: "S", vlan: 7, payload: []byte("data")},
		{src: c6(clientPort + 13), dst: ap("[fd00:96::4]:80"), flags: "S"},
	} {
		add(fixture{name: fmt.Sprintf("%s -> %s SYN, IP option (vlan %d)", p.src, p.dst, p.vlan), in: p.bytes(t), verdict: xdp.XDPTx,
			out: b.opt(p, b.backend(p)), counters: stats("tx_opt", "ct_new")})
	}

	// SNAT and its replies.
	for _, p := range []pk{
		{src: c4(clientPort + 20), dst: ap("10.96.0.2:53"), udp: true, payload: []byte("query")},
		{src: c6(clientPort + 20), dst: ap("[fd00:96::2]:53"), udp: true, payload: []byte("query")},
		{src: c4(clientPort + 21), dst: ap("10.96.0.8:80"), udp: true, payload: []byte("hybrid")}, // hybrid UDP: SNAT
	} {
		be := b.backend(p)
		add(fixture{name: fmt.Sprintf("%s -> %s UDP, SNAT", p.src, p.dst), in: p.bytes(t), verdict: xdp.XDPTx,
			out: b.snat(p, be), counters: stats("tx_snat", "ct_new")})
		add(fixture{name: fmt.Sprintf("%s -> %s UDP again, SNAT (conntrack)", p.src, p.dst), in: p.bytes(t), verdict: xdp.XDPTx,
			out: b.snat(p, be), counters: stats("tx_snat", "ct_hit")})
		in, out := b.reply(p, be)
		add(fixture{name: fmt.Sprintf("reply %s -> node, reverse SNAT to %s", be.Addr, p.src), in: in, verdict: xdp.XDPTx, out: out,
			counters: stats("tx_snat_reply")})
	}
	udp0 := pk{src: c4(clientPort + 22), dst: ap("10.96.0.2:53"), udp: true, payload: []byte("q")}
	in0 := udp0.bytes(t)
	in0[14+20+6], in0[14+20+7] = 0, 0 // IPv4 UDP without checksum
	out0 := b.snat(udp0, b.backend(udp0))
	out0[14+20+6], out0[14+20+7] = 0, 0
	add(fixture{name: "UDP without checksum stays without after SNAT", in: in0, verdict: xdp.XDPTx, out: out0, counters: stats("tx_snat", "ct_new")})

	// Passed to the kernel.
	add(fixture{name: "IPv4 options to a VIP", verdict: xdp.XDPPass, counters: stats("pass_ip_options"),
		in: pk{src: c4(clientPort), dst: vip, flags: "S", ipOpts: []layers.IPv4Option{{OptionType: 1}, {OptionType: 1}, {OptionType: 1}, {OptionType: 0}}}.bytes(t)})
	add(fixture{name: "first fragment to a VIP", in: pk{src: c4(clientPort), dst: vip, flags: "S", mf: true}.bytes(t),
		verdict: xdp.XDPPass, counters: stats("pass_fragment")})
	add(fixture{name: "later fragment to a VIP", in: pk{src: c4(clientPort), dst: vip, udp: true, fragOff: 185}.bytes(t),
		verdict: xdp.XDPPass, counters: stats("pass_fragment")})
	add(fixture{name: "IPv6 fragment to a VIP", in: pk{src: c6(clientPort), dst: vip6, flags: "S", frag6: true}.bytes(t),
		verdict: xdp.XDPPass, counters: stats("pass_fragment")})
	add(fixture{name: "TTL 1 to a VIP", in: pk{src: c4(clientPort), dst: vip, flags: "S", ttl: 1}.bytes(t),
		verdict: xdp.XDPPass, counters: stats("pass_ttl")})
	add(fixture{name: "hop limit 1 to a VIP", in: pk{src: c6(clientPort), dst: vip6, flags: "S", ttl: 1}.bytes(t),
		verdict: xdp.XDPPass, counters: stats("pass_ttl")})
	add(fixture{name: "bad IPv4 header checksum to a VIP", in: pk{src: c4(clientPort), dst: vip, flags: "S", badIP: true}.bytes(t),
		verdict: xdp.XDPPass, counters: stats("pass_bad_csum")})
	echo := serialize(t, append(l2(routerMAC, lbMAC, 0, true),
		&layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: client4.AsSlice(), DstIP: vip.Addr().AsSlice()},
		&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0), Id: 1, Seq: 1})...)
	add(fixture{name: "ICMP echo to a VIP", in: echo, verdict: xdp.XDPPass, counters: stats("pass_icmp")})

	// Truncated and malformed.
	full := syn.bytes(t)
	add(fixture{name: "Ethernet header only", in: full[:14], verdict: xdp.XDPPass, counters: stats("pass_malformed")})
	add(fixture{name: "truncated IPv4 header", in: full[:14+12], verdict: xdp.XDPPass, counters: stats("pass_malformed")})
	add(fixture{name: "truncated TCP header", in: full[:14+20+10], verdict: xdp.XDPPass, counters: stats("pass_malformed")})
	short := append([]byte(nil), full[:14+20+20]...)
	binary.BigEndian.PutUint16(short[16:], 20+20+100) // total length beyond the frame
	add(fixture{name: "IPv4 total length beyond the frame", in: short, verdict: xdp.XDPPass, counters: stats("pass_malformed")})
	v5 := append([]byte(nil), full...)
	v5[14] = 0x55
	add(fixture{name: "IP version 5", in: v5, verdict: xdp.XDPPass, counters: stats("pass_malformed")})
	full6 := pk{src: c6(clientPort), dst: vip6, flags: "S"}.bytes(t)
	add(fixture{name: "truncated IPv6 header", in: full6[:14+30], verdict: xdp.XDPPass, counters: stats("pass_malformed")})
	add(fixture{name: "truncated VLAN header", in: vl.bytes(t)[:15], verdict: xdp.XDPPass, counters: stats("pass_malformed")})

	// A service whose only backend is drained.
	drained := pk{src: c4(clientPort), dst: ap("10.96.0.9:80"), flags: "S"}
	add(fixture{name: "new flow to a service without backend", in: drained.bytes(t), verdict: xdp.XDPDrop,
		counters: stats("drop_no_backend"), svc: map[string]bpf.XdplbXlbSvcStats{"10.96.0.9:80/tcp": {NoBackend: 1}}})

	// ICMP errors about VIP flows go to the flow's backend.
	ack2 := pk{src: c4(clientPort + 2), dst: vip, flags: "A"} // the mid-flow pick above
	ptb4 := b.ptb(ack2, 0)
	add(fixture{name: "ICMP frag-needed for a VIP flow: to its backend", in: ptb4, verdict: xdp.XDPTx,
		out: b.ipipOf(ptb4, 0, true, 0, b.backend(ack2), b.hash(ack2)), counters: stats("tx_icmp")})
	add(fixture{name: "ICMP frag-needed with TTL 1", in: b.ptb(ack2, 1), verdict: xdp.XDPPass, counters: stats("pass_ttl")})
	f6 := pk{src: c6(clientPort), dst: vip6, flags: "S"}
	ptb6 := b.ptb(f6, 0)
	add(fixture{name: "ICMPv6 packet-too-big for a VIP flow: to its backend", in: ptb6, verdict: xdp.XDPTx,
		out: b.ipipOf(ptb6, 0, false, 0, b.backend(f6), b.hash(f6)), counters: stats("tx_icmp")})
	unknownFlow := pk{src: c4(clientPort + 99), dst: ap("10.96.99.99:80"), flags: "A"}
	add(fixture{name: "ICMP frag-needed for another destination", in: b.ptb(unknownFlow, 0), verdict: xdp.XDPPass, counters: stats("pass_icmp")})

	// ... the way the flow's own packets go: Geneve or the service option,
	// translated here so the backend's socket gets it as is (outer
	// destination and quoted source become the backend's, with the option
	// the outer source the node address; checksums of the
	// outer header, ICMP, quoted header and, when quoted, quoted TCP
	// header follow). Expected: the error a router would send the backend
	// about the reply the backend itself sent, from gopacket.
	for i, p := range []pk{
		{src: c4(clientPort + 30), dst: ap("10.96.0.3:80"), flags: "A"},
		{src: c6(clientPort + 30), dst: ap("[fd00:96::3]:80"), flags: "A"},
		{src: c4(clientPort + 31), dst: ap("10.96.0.4:80"), flags: "A"},
		{src: c6(clientPort + 31), dst: ap("[fd00:96::4]:80"), flags: "A"},
	} {
		for _, quote := range []int{0, -1} { // 16 bytes past the header; the whole reply (TCP checksum quoted)
			be := b.backend(p)
			router := routerOf(p.v4())
			in := icmpErr(t, router, p.dst.Addr(), replyOf(p.dst, p.src, false), quote, 0)
			nat := swapped(icmpErr(t, router, be.Addr.Addr(), replyOf(be.Addr, p.src, false), quote, 0))
			out, how := geneveOf(nat, 0, p.dst, be, 0, b.hash(p)), "Geneve"
			if i >= 2 { // routed back through the router: from the node address
				nat = swapped(icmpErr(t, nodeFor(router), be.Addr.Addr(), replyOf(be.Addr, p.src, false), quote, 0))
				out, how = optInsert(nat, 0, p.dst), "the service option"
			}
			add(fixture{name: fmt.Sprintf("ICMP error about %s -> %s (quote %d): translated, by %s", p.src, p.dst, quote, how),
				in: in, verdict: xdp.XDPTx, out: out, counters: stats("tx_icmp")})
		}
	}
	// SNAT: translated back like the replies: from the node address to the
	// backend, quoting the reply as the backend sent it (backend -> node
	// address and port; its UDP checksum follows).
	for _, p := range []pk{
		{src: c4(clientPort + 20), dst: ap("10.96.0.2:53"), udp: true}, // SNATed above
		{src: c6(clientPort + 20), dst: ap("[fd00:96::2]:53"), udp: true},
	} {
		be := b.backend(p)
		node := netip.AddrPortFrom(nodeFor(p.src.Addr()), snatPort(b.hash(p)))
		in := icmpErr(t, routerOf(p.v4()), p.dst.Addr(), replyOf(p.dst, p.src, true), 0, 0)
		out := swapped(icmpErr(t, node.Addr(), be.Addr.Addr(), replyOf(be.Addr, node, true), 0, 0))
		add(fixture{name: fmt.Sprintf("ICMP error about SNAT flow %s -> %s: translated back to %s", p.src, p.dst, be.Addr), in: in,
			verdict: xdp.XDPTx, out: out, counters: stats("tx_icmp"), svc: map[string]bpf.XdplbXlbSvcStats{
				xdp.FrontendString(p.dst, mesh.UDP): {Packets: 1, Bytes: uint64(len(in))}}})
	}
	// Client-IP affinity: the slot is the client's (port zeroed), the
	// encapsulation's entropy and the SNAT port stay the flow's own; an
	// ICMP error about a flow without conntrack entry finds the same
	// backend as the flow.
	aff := pk{src: c4(clientPort + 50), dst: ap("10.96.0.12:80"), flags: "S"}
	add(fixture{name: "new flow to a client-IP affinity service: the client's slot", in: aff.bytes(t), verdict: xdp.XDPTx,
		out: b.ipip(aff, b.backend(aff)), counters: stats("tx_ipip", "ct_new")})
	affNoCT := pk{src: c4(clientPort + 51), dst: ap("10.96.0.12:80"), flags: "A"}
	ptbAff := b.ptb(affNoCT, 0)
	add(fixture{name: "ICMP frag-needed about an affinity flow without conntrack entry: the client's backend", in: ptbAff,
		verdict: xdp.XDPTx, out: b.ipipOf(ptbAff, 0, true, 0, b.backend(affNoCT), b.hash(affNoCT)), counters: stats("tx_icmp")})
	affUDP := pk{src: c6(clientPort + 50), dst: ap("[fd00:96::12]:53"), udp: true, payload: []byte("query")}
	add(fixture{name: "UDP to a client-IP affinity SNAT service: the client's backend, the flow's node port", in: affUDP.bytes(t),
		verdict: xdp.XDPTx, out: b.snat(affUDP, b.backend(affUDP)), counters: stats("tx_snat", "ct_new")})

	noCT := pk{src: c4(clientPort + 40), dst: ap("10.96.0.2:53"), udp: true}
	add(fixture{name: "ICMP error about a SNAT flow without conntrack entry (node port unknown)", in: b.ptb(noCT, 0),
		verdict: xdp.XDPPass, counters: stats("pass_icmp")})

	// A UDP reply larger than the backend's MTU comes back in fragments:
	// each leaves from the VIP to the client, the first through lb_snat,
	// the later ones from the first's record (gone with the last).
	// Expected: the fragments of the datagram the client should get.
	big := bytes.Repeat([]byte("0123456789abcdef"), 190) // 3040 bytes: 3 fragments at MTU 1500
	for _, p := range []pk{
		{src: c4(clientPort + 20), dst: ap("10.96.0.2:53"), udp: true},
		{src: c6(clientPort + 20), dst: ap("[fd00:96::2]:53"), udp: true},
	} {
		be := b.backend(p)
		node := netip.AddrPortFrom(nodeFor(p.src.Addr()), snatPort(b.hash(p)))
		in := fragment(pk{src: be.Addr, dst: node, udp: true, payload: big}.bytes(t), 1500, 0x5151)
		want := fragment(pk{src: p.dst, dst: p.src, udp: true, payload: big}.bytes(t), 1500, 0x5151)
		svc := xdp.FrontendString(p.dst, mesh.UDP)
		for i := range in {
			ev := "frag_later"
			if i == 0 {
				ev = "frag_first"
			}
			add(fixture{name: fmt.Sprintf("fragment %d of %d of a SNAT reply %s -> %s", i+1, len(in), be.Addr, node), in: in[i],
				verdict: xdp.XDPTx, out: swapped(want[i]), counters: stats("tx_snat_reply", ev),
				svc: map[string]bpf.XdplbXlbSvcStats{svc: {Packets: 1, Bytes: uint64(len(in[i]))}}})
		}
		add(fixture{name: fmt.Sprintf("last fragment of %s again: its record is gone", be.Addr), in: in[len(in)-1],
			verdict: xdp.XDPPass, counters: stats("pass_fragment", "frag_unknown")})
		add(fixture{name: fmt.Sprintf("middle fragment of %s without its first", be.Addr), in: in[1],
			verdict: xdp.XDPPass, counters: stats("pass_fragment", "frag_unknown")})
		other := fragment(pk{src: netip.AddrPortFrom(be.Addr.Addr(), 9999), dst: node, udp: true, payload: big}.bytes(t), 1500, 0x5152)
		add(fixture{name: fmt.Sprintf("first fragment to the node address from %s, no SNAT flow", be.Addr), in: other[0],
			verdict: xdp.XDPPass, counters: stats("pass_fragment")})
	}
	return fs
}

func readStats(t *testing.T, d *xdp.Datapath) []uint64 {
	t.Helper()
	c, err := d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestFixtures runs every fixture in order through BPF_PROG_TEST_RUN.
func TestFixtures(t *testing.T) {
	svcs := fixtureServices()
	d := newLB(t, svcs)
	m := newModel(t, svcs)
	fs := fixtures(t, m)
	t.Logf("%d fixtures", len(fs))
	runFixtures(t, d, fs, func(in []byte) (uint32, []byte, error) { return xdp.RunXDP(d.Program(), in) })
}

// runFixtures runs fs in order through run (the load balancer d on one
// frame) and checks verdict, output and counter deltas of each.
func runFixtures(t *testing.T, d *xdp.Datapath, fs []fixture, run func(in []byte) (uint32, []byte, error)) {
	t.Helper()
	for _, f := range fs {
		beforeStats := readStats(t, d)
		beforeSvc, err := d.ServiceCounters()
		if err != nil {
			t.Fatal(err)
		}
		verdict, out, err := run(f.in)
		if err != nil {
			t.Fatalf("%s: %v", f.name, err)
		}
		if verdict != f.verdict {
			t.Errorf("%s: verdict %s, want %s", f.name, xdp.VerdictName(verdict), xdp.VerdictName(f.verdict))
		}
		want := f.out
		if want == nil && f.verdict == xdp.XDPPass {
			want = f.in
		}
		if want != nil && !bytes.Equal(out, want) {
			t.Errorf("%s: output differs\n got %s\nwant %s\n%s", f.name, hex.EncodeToString(out), hex.EncodeToString(want), diffLayers(out, want))
		}
		after := readStats(t, d)
		for i, name := range xdp.StatNames {
			if got, exp := after[i]-beforeStats[i], f.counters[name]; got != exp {
				t.Errorf("%s: counter %s changed by %d, want %d", f.name, name, got, exp)
			}
		}
		if f.svc != nil {
			afterSvc, err := d.ServiceCounters()
			if err != nil {
				t.Fatal(err)
			}
			for name, exp := range f.svc {
				a, b0 := afterSvc[name], beforeSvc[name]
				got := bpf.XdplbXlbSvcStats{Packets: a.Packets - b0.Packets, Bytes: a.Bytes - b0.Bytes, Flows: a.Flows - b0.Flows, NoBackend: a.NoBackend - b0.NoBackend}
				if got != exp {
					t.Errorf("%s: service %s counters changed by %+v, want %+v", f.name, name, got, exp)
				}
			}
		}
	}
}

// diffLayers decodes both frames for a readable failure message.
func diffLayers(got, want []byte) string {
	g := gopacket.NewPacket(got, layers.LayerTypeEthernet, gopacket.Default)
	w := gopacket.NewPacket(want, layers.LayerTypeEthernet, gopacket.Default)
	return "got:\n" + g.Dump() + "\nwant:\n" + w.Dump()
}

// TestWhichMatchesMaglev compares the backend the loaded program picks for
// 10,000 random flows with the pick mesh/maglev computes in Go.
func TestWhichMatchesMaglev(t *testing.T) {
	svcs := fixtureServices()
	d := newLB(t, svcs)
	m := newModel(t, svcs)
	ct := d.Conntrack()
	r := newRand()
	for i := 0; i < 10000; i++ {
		var src, dst netip.AddrPort
		udp := i%4 == 3
		switch i % 4 {
		case 0, 3:
			src, dst = netip.AddrPortFrom(r.addr4(), r.port()), ap("10.96.0.1:80")
			if udp {
				dst = ap("10.96.0.10:53")
			}
		case 1:
			src, dst = netip.AddrPortFrom(r.addr6(), r.port()), ap("[fd00:96::1]:80")
		case 2:
			src, dst = netip.AddrPortFrom(r.addr4(), r.port()), ap("10.96.0.3:80")
		}
		res, err := xdp.Which(d.Program(), ct, proto(udp), src, dst)
		if err != nil {
			t.Fatal(err)
		}
		want := m.pick(t, src, dst, udp)
		if res.Verdict != "XDP_TX" || res.Backend != want.Addr {
			t.Fatalf("flow %d %s -> %s (%s): datapath %+v, Go Maglev %s", i, src, dst, proto(udp), res, want.Addr)
		}
	}
	_ = mesh.TCP
}

// TestConntrackFollowsService: established flows are forwarded from
// conntrack without a frontend lookup, but only while their service lives:
// once it is deleted they pass to the kernel, and when the frontend comes
// back they are picked afresh (their old entries are stale).
func TestConntrackFollowsService(t *testing.T) {
	svcs := fixtureServices()
	d := newLB(t, svcs)
	syn := pk{src: c4(45000), dst: ap("10.96.0.1:80"), flags: "S"}
	ack := syn
	ack.flags = "A"
	step := func(name string, in []byte, verdict uint32, want ...string) {
		t.Helper()
		before := readStats(t, d)
		v, _, err := xdp.RunXDP(d.Program(), in)
		if err != nil {
			t.Fatal(err)
		}
		after := readStats(t, d)
		got := map[string]uint64{}
		for i, n := range xdp.StatNames {
			if after[i] != before[i] {
				got[n] = after[i] - before[i]
			}
		}
		if v != verdict || fmt.Sprint(got) != fmt.Sprint(stats(want...)) {
			t.Errorf("%s: %s %v, want %s %v", name, xdp.VerdictName(v), got, xdp.VerdictName(verdict), stats(want...))
		}
	}
	step("SYN", syn.bytes(t), xdp.XDPTx, "tx_ipip", "ct_new")
	step("ACK", ack.bytes(t), xdp.XDPTx, "tx_ipip", "ct_hit")
	if _, err := d.Sync(svcs[1:]); err != nil { // delete 10.96.0.1:80
		t.Fatal(err)
	}
	step("ACK after the service was deleted", ack.bytes(t), xdp.XDPPass, "pass_not_vip")
	if _, err := d.Sync(svcs); err != nil {
		t.Fatal(err)
	}
	step("ACK after the frontend came back", ack.bytes(t), xdp.XDPTx, "tx_ipip", "ct_new", "ct_midflow")
	step("ACK again", ack.bytes(t), xdp.XDPTx, "tx_ipip", "ct_hit")
}
