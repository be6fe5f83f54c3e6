package xdplb

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// MAC addresses of the fixtures: the router that hands packets to the load
// balancer, and the load balancer's NIC.
var (
	routerMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01}
	lbMAC     = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}
)

// pk describes a packet a test builds with gopacket.
type pk struct {
	src, dst netip.AddrPort
	udp      bool
	flags    string // TCP flags: S, A, R, F, P in any combination
	vlan     uint16
	ttl      uint8 // default 64
	tos      uint8
	payload  []byte
	ipOpts   []layers.IPv4Option
	mf       bool   // IPv4 more-fragments
	noDF     bool   // IPv4 without don't-fragment
	fragOff  uint16 // IPv4 fragment offset (8-byte units)
	frag6    bool   // IPv6 fragment header
	badL4    bool   // corrupt the TCP/UDP checksum
	badIP    bool   // corrupt the IPv4 header checksum
	srcMAC   net.HardwareAddr
	dstMAC   net.HardwareAddr
}

func (p pk) v4() bool { return p.src.Addr().Is4() }

func (p pk) macs() (src, dst net.HardwareAddr) {
	src, dst = routerMAC, lbMAC
	if p.srcMAC != nil {
		src = p.srcMAC
	}
	if p.dstMAC != nil {
		dst = p.dstMAC
	}
	return src, dst
}

// l2 returns the Ethernet (and VLAN) layers for an IP packet of family v4.
func l2(src, dst net.HardwareAddr, vlan uint16, v4 bool) []gopacket.SerializableLayer {
	et := layers.EthernetTypeIPv6
	if v4 {
		et = layers.EthernetTypeIPv4
	}
	eth := &layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: et}
	if vlan == 0 {
		return []gopacket.SerializableLayer{eth}
	}
	eth.EthernetType = layers.EthernetTypeDot1Q
	return []gopacket.SerializableLayer{eth, &layers.Dot1Q{VLANIdentifier: vlan, Type: et}}
}

func serialize(t testing.TB, ls ...gopacket.SerializableLayer) []byte {
	t.Helper()
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}, ls...); err != nil {
		t.Fatalf("serialize: %v", err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

// ipLayer returns the IP layer of p.
func (p pk) ipLayer(proto layers.IPProtocol) (gopacket.NetworkLayer, []gopacket.SerializableLayer) {
	ttl := p.ttl
	if ttl == 0 {
		ttl = 64
	}
	if p.v4() {
		ip := &layers.IPv4{Version: 4, TOS: p.tos, Id: 0x1234, TTL: ttl, Protocol: proto,
			SrcIP: p.src.Addr().AsSlice(), DstIP: p.dst.Addr().AsSlice(), Options: p.ipOpts, FragOffset: p.fragOff}
		if p.mf {
			ip.Flags = layers.IPv4MoreFragments
		} else if p.fragOff == 0 && !p.noDF {
			ip.Flags = layers.IPv4DontFragment
		}
		return ip, []gopacket.SerializableLayer{ip}
	}
	ip := &layers.IPv6{Version: 6, TrafficClass: p.tos, HopLimit: ttl, NextHeader: proto,
		SrcIP: p.src.Addr().AsSlice(), DstIP: p.dst.Addr().AsSlice()}
	if p.frag6 {
		ip.NextHeader = layers.IPProtocolIPv6Fragment
		return ip, []gopacket.SerializableLayer{ip, &layers.IPv6Fragment{NextHeader: proto, Identification: 7, MoreFragments: true}}
	}
	return ip, []gopacket.SerializableLayer{ip}
}

// bytes serializes p as a frame the router sends to the load balancer.
func (p pk) bytes(t testing.TB) []byte {
	t.Helper()
	smac, dmac := p.macs()
	ls := l2(smac, dmac, p.vlan, p.v4())
	var l4 gopacket.SerializableLayer
	var netl gopacket.NetworkLayer
	var ipls []gopacket.SerializableLayer
	if p.udp {
		netl, ipls = p.ipLayer(layers.IPProtocolUDP)
		u := &layers.UDP{SrcPort: layers.UDPPort(p.src.Port()), DstPort: layers.UDPPort(p.dst.Port())}
		u.SetNetworkLayerForChecksum(netl)
		l4 = u
	} else {
		netl, ipls = p.ipLayer(layers.IPProtocolTCP)
		tc := &layers.TCP{SrcPort: layers.TCPPort(p.src.Port()), DstPort: layers.TCPPort(p.dst.Port()),
			Seq: 1000, Window: 64240}
		for _, f := range p.flags {
			switch f {
			case 'S':
				tc.SYN = true
			case 'A':
				tc.ACK = true
				tc.Ack = 2000
			case 'R':
				tc.RST = true
			case 'F':
				tc.FIN = true
			case 'P':
				tc.PSH = true
			}
		}
		tc.SetNetworkLayerForChecksum(netl)
		l4 = tc
	}
	ls = append(ls, ipls...)
	ls = append(ls, l4, gopacket.Payload(p.payload))
	b := serialize(t, ls...)
	off := l2len(p.vlan)
	if p.badIP {
		b[off+10] ^= 0x5a
	}
	if p.badL4 {
		ipl := 40
		if p.v4() {
			ipl = int(b[off]&0x0f) * 4
		}
		if p.udp {
			b[off+ipl+6] ^= 0x5a
		} else {
			b[off+ipl+16] ^= 0x5a
		}
	}
	return b
}

func l2len(vlan uint16) int {
	if vlan != 0 {
		return 18
	}
	return 14
}

// swapped returns frame with its MAC addresses exchanged, as the load
// balancer bounces it back to the router.
func swapped(frame []byte) []byte {
	out := append([]byte(nil), frame...)
	copy(out[0:6], frame[6:12])
	copy(out[6:12], frame[0:6])
	return out
}

// csum is the Internet checksum (RFC 1071) of b, as stored in a header.
func csum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// outerIP builds the outer header the load balancer prepends: IPv4 (DF,
// TTL 64, id 0, TOS from the inner packet) or IPv6 (hop limit 64, traffic
// class from the inner packet, flow label from the flow hash).
func outerIP(src, dst netip.Addr, proto uint8, payload int, tos uint8, hash uint32) []byte {
	if dst.Is4() {
		h := make([]byte, 20)
		h[0] = 0x45
		h[1] = tos
		binary.BigEndian.PutUint16(h[2:], uint16(20+payload))
		binary.BigEndian.PutUint16(h[6:], 0x4000)
		h[8] = 64
		h[9] = proto
		s, d := src.As4(), dst.As4()
		copy(h[12:], s[:])
		copy(h[16:], d[:])
		binary.BigEndian.PutUint16(h[10:], csum(h))
		return h
	}
	h := make([]byte, 40)
	binary.BigEndian.PutUint32(h[0:], 6<<28|uint32(tos)<<20|hash&0xfffff)
	binary.BigEndian.PutUint16(h[4:], uint16(payload))
	h[6] = proto
	h[7] = 64
	s, d := src.As16(), dst.As16()
	copy(h[8:], s[:])
	copy(h[24:], d[:])
	return h
}

// encap returns frame (already MAC-swapped) with hdr inserted after its L2
// header and the EtherType set for the outer family.
func encap(frame []byte, vlan uint16, outer4 bool, hdr ...[]byte) []byte {
	off := l2len(vlan)
	out := append([]byte(nil), frame[:off]...)
	et := uint16(0x86dd)
	if outer4 {
		et = 0x0800
	}
	binary.BigEndian.PutUint16(out[off-2:], et)
	for _, h := range hdr {
		out = append(out, h...)
	}
	return append(out, frame[off:]...)
}

// ipLen is the length of the IP datagram in frame.
func ipLen(frame []byte, vlan uint16) int {
	off := l2len(vlan)
	if frame[off]>>4 == 4 {
		return int(binary.BigEndian.Uint16(frame[off+2:]))
	}
	return 40 + int(binary.BigEndian.Uint16(frame[off+4:]))
}

// geneveHdr is UDP + Geneve + Shunt's option carrying svc, for an inner
// datagram of innerLen bytes.
func geneveHdr(svc netip.AddrPort, innerLen int, hash uint32) []byte {
	var opt []byte
	if svc.Addr().Is4() {
		a := svc.Addr().As4()
		opt = append(a[:], 0, 0, 0, 0)
		binary.BigEndian.PutUint16(opt[4:], svc.Port())
	} else {
		a := svc.Addr().As16()
		opt = append(a[:], 0, 0, 0, 0)
		binary.BigEndian.PutUint16(opt[16:], svc.Port())
	}
	g := []byte{byte((4 + len(opt)) / 4), 0x40, 0, 0, 0, 0, 0, 0}
	ethType := uint16(0x86dd)
	if svc.Addr().Is4() {
		ethType = 0x0800
	}
	binary.BigEndian.PutUint16(g[2:], ethType)
	g = append(g, 0xff, 0xf0, 0x81, byte(len(opt)/4))
	g = append(g, opt...)
	u := make([]byte, 8)
	binary.BigEndian.PutUint16(u[0:], 0xc000|uint16(hash&0x3fff))
	binary.BigEndian.PutUint16(u[2:], 6081)
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(g)+innerLen))
	return append(u, g...)
}

// replyOf is a reply from src to dst (TCP ACK or UDP, 16 bytes of payload)
// as an ICMP error quotes it.
func replyOf(src, dst netip.AddrPort, udp bool) pk {
	return pk{src: src, dst: dst, udp: udp, flags: "A", payload: bytes.Repeat([]byte{'x'}, 16)}
}

// icmpErr is an ICMP "fragmentation needed" (IPv4, next-hop MTU 1400) or an
// ICMPv6 "packet too big" (MTU 1280) from src to dst, quoting the first
// quote bytes of the IP packet of reply (0: its IP header and 16 bytes
// after it, which holds a UDP header's checksum but not a TCP header's; -1:
// all of it). A
// router sends it to the load balancer; checksums computed by gopacket.
func icmpErr(t testing.TB, src, dst netip.Addr, reply pk, quote int, ttl uint8) []byte {
	t.Helper()
	rb := reply.bytes(t)[14:]
	if quote < 0 {
		quote = len(rb)
	}
	if quote == 0 {
		quote = 20 + 16
		if !src.Is4() {
			quote = 40 + 16
		}
	}
	if ttl == 0 {
		ttl = 64
	}
	ls := l2(routerMAC, lbMAC, 0, src.Is4())
	if src.Is4() {
		ip := &layers.IPv4{Version: 4, TTL: ttl, Protocol: layers.IPProtocolICMPv4, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		ic := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(3, 4), Seq: 1400} // next-hop MTU 1400
		return serialize(t, append(ls, ip, ic, gopacket.Payload(rb[:quote]))...)
	}
	ip := &layers.IPv6{Version: 6, HopLimit: ttl, NextHeader: layers.IPProtocolICMPv6, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(2, 0)}
	ic.SetNetworkLayerForChecksum(ip)
	mtu := []byte{0, 0, 0x05, 0x00} // MTU 1280
	return serialize(t, append(ls, ip, ic, gopacket.Payload(append(mtu, rb[:quote]...)))...)
}

// fragment splits the IP datagram of frame (Ethernet, no VLAN; IPv4
// without options or IPv6 without extension headers) into fragments of at
// most mtu bytes, first to last, as Linux sends them: IPv4 keeps the
// header's identification; IPv6 gets a fragment header with identification
// id6. Header checksums are computed here.
func fragment(frame []byte, mtu int, id6 uint32) [][]byte {
	eth, ipb := frame[:14], frame[14:]
	var out [][]byte
	if ipb[0]>>4 == 4 {
		hdr, data := ipb[:20], ipb[20:binary.BigEndian.Uint16(ipb[2:])]
		step := (mtu - 20) &^ 7
		for off := 0; off < len(data); off += step {
			n := min(step, len(data)-off)
			h := append([]byte(nil), hdr...)
			binary.BigEndian.PutUint16(h[2:], uint16(20+n))
			fo := uint16(off / 8)
			if off+n < len(data) {
				fo |= 0x2000 // more fragments
			}
			binary.BigEndian.PutUint16(h[6:], fo)
			h[10], h[11] = 0, 0
			binary.BigEndian.PutUint16(h[10:], csum(h))
			f := append(append(append([]byte(nil), eth...), h...), data[off:off+n]...)
			out = append(out, f)
		}
		return out
	}
	hdr, data := ipb[:40], ipb[40:40+int(binary.BigEndian.Uint16(ipb[4:]))]
	step := (mtu - 48) &^ 7
	for off := 0; off < len(data); off += step {
		n := min(step, len(data)-off)
		h := append([]byte(nil), hdr...)
		binary.BigEndian.PutUint16(h[4:], uint16(8+n))
		h[6] = 44
		fh := make([]byte, 8)
		fh[0] = hdr[6]
		fo := uint16(off)
		if off+n < len(data) {
			fo |= 1
		}
		binary.BigEndian.PutUint16(fh[2:], fo)
		binary.BigEndian.PutUint32(fh[4:], id6)
		f := append(append(append(append([]byte(nil), eth...), h...), fh...), data[off:off+n]...)
		out = append(out, f)
	}
	return out
}

// optInsert inserts Shunt's service option into the IP packet of frame (no
// options or extension headers yet): the 8-byte IPv4 option 158 (header
// checksum recomputed) or a 24-byte IPv6 Destination Options header with
// option 0x1e.
func optInsert(f []byte, vlan uint16, svc netip.AddrPort) []byte {
	off := l2len(vlan)
	out := append([]byte(nil), f[:off]...)
	if f[off]>>4 == 4 {
		h := append([]byte(nil), f[off:off+20]...)
		h[0] = 0x47
		binary.BigEndian.PutUint16(h[2:], binary.BigEndian.Uint16(h[2:])+8)
		a := svc.Addr().As4()
		h = append(h, 0x9e, 8, byte(svc.Port()>>8), byte(svc.Port()))
		h = append(h, a[:]...)
		h[10], h[11] = 0, 0
		binary.BigEndian.PutUint16(h[10:], csum(h))
		out = append(out, h...)
		return append(out, f[off+20:]...)
	}
	h := append([]byte(nil), f[off:off+40]...)
	opt := []byte{h[6], 2, 0x1e, 18, byte(svc.Port() >> 8), byte(svc.Port())}
	a := svc.Addr().As16()
	opt = append(opt, a[:]...)
	opt = append(opt, 1, 0)
	h[6] = 60
	binary.BigEndian.PutUint16(h[4:], binary.BigEndian.Uint16(h[4:])+24)
	out = append(append(out, h...), opt...)
	return append(out, f[off+40:]...)
}
