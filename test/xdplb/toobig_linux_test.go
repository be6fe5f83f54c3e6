package xdplb

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/test/harness"
)

// xdpCtx is struct xdp_md, the context of an XDP test run.
type xdpCtx struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// tooBigOf is the load balancer's answer to the client's frame in when it
// would exceed the device MTU once encapsulated: ICMP "fragmentation
// needed" with next-hop MTU mtu (IPv4; TOS bits of the packet with
// precedence internetwork control, id 0, TTL 64) or ICMPv6 "packet too
// big" (hop limit 64) from the node address to the client, quoting the
// client's IP header and the 8 bytes after it, bounced to the router.
func tooBigOf(t testing.TB, in []byte, vlan uint16, client netip.Addr, mtu int) []byte {
	t.Helper()
	off := l2len(vlan)
	ls := l2(lbMAC, routerMAC, vlan, client.Is4())
	if client.Is4() {
		ip := &layers.IPv4{Version: 4, TOS: in[off+1]&0x1e | 0xc0, TTL: 64, Protocol: layers.IPProtocolICMPv4,
			SrcIP: nodeFor(client).AsSlice(), DstIP: client.AsSlice()}
		ic := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(3, 4), Seq: uint16(mtu)}
		return serialize(t, append(ls, ip, ic, gopacket.Payload(in[off:off+20+8]))...)
	}
	ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolICMPv6, SrcIP: nodeFor(client).AsSlice(), DstIP: client.AsSlice()}
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(2, 0)}
	ic.SetNetworkLayerForChecksum(ip)
	body := binary.BigEndian.AppendUint32(nil, uint32(mtu))
	return serialize(t, append(ls, ip, ic, gopacket.Payload(append(body, in[off:off+40+8]...)))...)
}

// sized is p with a payload that makes its IP datagram n bytes long.
func sized(p pk, n int) pk {
	hdr := 20
	if !p.v4() {
		hdr = 40
	}
	l4 := 20
	if p.udp {
		l4 = 8
	}
	p.payload = bytes.Repeat([]byte{'m'}, n-hdr-l4)
	return p
}

// TestFixturesTooBig: a client packet that would exceed the MTU of the
// device it came in on once encapsulated gets ICMP frag-needed / ICMPv6
// packet-too-big back from the load balancer, with the MTU that leaves
// room for the encapsulation (IPIP, 4in6, 6in4, Geneve, the service
// option; v4 and v6; VLAN kept); one that just fits is forwarded; IPv4
// without DF is dropped (it cannot be fragmented here); SNAT does not grow
// packets and is not checked. Byte-exact frames, exact counter deltas; the
// packets enter on a veth of MTU 1500 (the test run's ingress device).
func TestFixturesTooBig(t *testing.T) {
	svcs := fixtureServices()
	d := newLB(t, svcs)
	b := builder{t, newModel(t, svcs)}
	env := harness.New(t)
	node := env.Node()
	ipRun(t, "-n", node.NetNSName(), "link", "add", "xtb0", "type", "veth", "peer", "name", "xtb1")
	ipRun(t, "-n", node.NetNSName(), "link", "set", "dev", "xtb0", "mtu", "1500")
	var ifindex int
	if err := node.InNetNS(func() error {
		iface, err := net.InterfaceByName("xtb0")
		if err == nil {
			ifindex = iface.Index
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	run := func(in []byte) (verdict uint32, out []byte, err error) {
		err = node.InNetNS(func() error {
			opts := &ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+256),
				Context: xdpCtx{DataEnd: uint32(len(in)), IngressIfindex: uint32(ifindex)}}
			verdict, err = d.Program().Run(opts)
			out = opts.DataOut
			return err
		})
		return verdict, out, err
	}

	const mtu = 1500
	var fs []fixture
	add := func(f fixture) { fs = append(fs, f) }
	none := func(front netip.AddrPort, udp bool) map[string]bpf.XdplbXlbSvcStats {
		return map[string]bpf.XdplbXlbSvcStats{xdp.FrontendString(front, proto(udp)): {}}
	}
	// IPIP, an established flow: fits exactly, one byte more does not.
	syn := pk{src: c4(clientPort + 50), dst: ap("10.96.0.1:80"), flags: "S"}
	add(fixture{name: "v4 SYN, IPIP", in: syn.bytes(t), verdict: xdp.XDPTx, out: b.ipip(syn, b.backend(syn)), counters: stats("tx_ipip", "ct_new")})
	fit := sized(pk{src: syn.src, dst: syn.dst, flags: "A"}, mtu-20)
	add(fixture{name: "v4 TCP of 1480 bytes, IPIP: 1500, fits", in: fit.bytes(t), verdict: xdp.XDPTx, out: b.ipip(fit, b.backend(syn)),
		counters: stats("tx_ipip", "ct_hit")})
	big := sized(fit, mtu-20+1)
	add(fixture{name: "v4 TCP of 1481 bytes, IPIP: frag-needed, MTU 1480", in: big.bytes(t), verdict: xdp.XDPTx,
		out: tooBigOf(t, big.bytes(t), 0, client4, mtu-20), counters: stats("tx_too_big", "ct_hit"), svc: none(big.dst, false)})
	tos := big
	tos.tos = 0xb8
	add(fixture{name: "v4 TCP too big with DSCP EF: TOS bits kept, precedence internetwork control", in: tos.bytes(t), verdict: xdp.XDPTx,
		out: tooBigOf(t, tos.bytes(t), 0, client4, mtu-20), counters: stats("tx_too_big", "ct_hit")})
	vl := sized(pk{src: c4(clientPort + 51), dst: ap("10.96.0.1:80"), flags: "A", vlan: 42}, mtu)
	add(fixture{name: "802.1Q tagged v4 TCP too big, new flow: tag kept", in: vl.bytes(t), verdict: xdp.XDPTx,
		out: tooBigOf(t, vl.bytes(t), 42, client4, mtu-20), counters: stats("tx_too_big", "ct_new", "ct_midflow")})
	udp := sized(pk{src: c4(clientPort + 52), dst: ap("10.96.0.10:53"), udp: true}, mtu)
	add(fixture{name: "v4 UDP too big with DF, IPIP", in: udp.bytes(t), verdict: xdp.XDPTx,
		out: tooBigOf(t, udp.bytes(t), 0, client4, mtu-20), counters: stats("tx_too_big", "ct_new")})
	noDF := udp
	noDF.src, noDF.noDF = c4(clientPort+53), true
	add(fixture{name: "v4 UDP too big without DF: dropped", in: noDF.bytes(t), verdict: xdp.XDPDrop,
		counters: stats("drop_too_big", "ct_new"), svc: none(noDF.dst, true)})
	// Every dispatch and family: the MTU left for the client is the
	// device's minus what the dispatch adds.
	for _, c := range []struct {
		how   string
		p     pk
		grows int
	}{
		{"IP6IP6", pk{src: c6(clientPort + 50), dst: ap("[fd00:96::1]:80"), flags: "A"}, 40},
		{"4in6", pk{src: c4(clientPort + 54), dst: ap("10.96.0.6:80"), flags: "A"}, 40},
		{"6in4", pk{src: c6(clientPort + 54), dst: ap("[fd00:96::7]:80"), flags: "A"}, 20},
		{"Geneve", pk{src: c4(clientPort + 55), dst: ap("10.96.0.3:80"), flags: "A"}, 20 + 8 + 8 + 4 + 8},
		{"Geneve v6", pk{src: c6(clientPort + 55), dst: ap("[fd00:96::3]:80"), flags: "A"}, 40 + 8 + 8 + 4 + 20},
		{"service option", pk{src: c4(clientPort + 56), dst: ap("10.96.0.4:80"), flags: "A"}, 8},
		{"service option v6", pk{src: c6(clientPort + 56), dst: ap("[fd00:96::4]:80"), flags: "A"}, 24},
	} {
		in := sized(c.p, mtu-c.grows+1).bytes(t)
		add(fixture{name: fmt.Sprintf("%s -> %s of %d bytes, %s: too big, MTU %d", c.p.src, c.p.dst, mtu-c.grows+1, c.how, mtu-c.grows),
			in: in, verdict: xdp.XDPTx, out: tooBigOf(t, in, 0, c.p.src.Addr(), mtu-c.grows),
			counters: stats("tx_too_big", "ct_new", "ct_midflow"), svc: none(c.p.dst, false)})
	}
	// SNAT rewrites in place: a full-size datagram is forwarded.
	snat := sized(pk{src: c4(clientPort + 57), dst: ap("10.96.0.2:53"), udp: true}, mtu)
	add(fixture{name: "v4 UDP of 1500 bytes, SNAT: forwarded", in: snat.bytes(t), verdict: xdp.XDPTx, out: b.snat(snat, b.backend(snat)),
		counters: stats("tx_snat", "ct_new")})
	runFixtures(t, d, fs, run)
}
