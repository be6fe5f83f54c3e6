package xdp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/shuntmesh/shunt/mesh"
)

// Probe MAC addresses of packets built by BuildProbe.
var (
	ProbeSrcMAC = net.HardwareAddr{0x02, 0x53, 0x48, 0x00, 0x00, 0x01}
	ProbeDstMAC = net.HardwareAddr{0x02, 0x53, 0x48, 0x00, 0x00, 0x02}
)

// BuildProbe builds an Ethernet frame from src to dst: for TCP an ACK (a
// packet of an established flow: the load balancer answers from conntrack
// if the flow is known and from the Maglev table otherwise, without
// replacing an existing conntrack entry as a SYN would), for UDP a datagram
// with a 4-byte payload.
func BuildProbe(proto mesh.Protocol, src, dst netip.AddrPort) ([]byte, error) {
	if src.Addr().Is4() != dst.Addr().Is4() {
		return nil, errors.New("source and destination differ in address family")
	}
	eth := &layers.Ethernet{SrcMAC: ProbeSrcMAC, DstMAC: ProbeDstMAC}
	var ip gopacket.NetworkLayer
	var l3 gopacket.SerializableLayer
	if src.Addr().Is4() {
		eth.EthernetType = layers.EthernetTypeIPv4
		v4 := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Flags: layers.IPv4DontFragment,
			SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice()}
		v4.Protocol = ipProto(proto)
		ip, l3 = v4, v4
	} else {
		eth.EthernetType = layers.EthernetTypeIPv6
		v6 := &layers.IPv6{Version: 6, HopLimit: 64, SrcIP: src.Addr().AsSlice(), DstIP: dst.Addr().AsSlice(),
			NextHeader: ipProto(proto)}
		ip, l3 = v6, v6
	}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}
	var err error
	if proto == mesh.UDP {
		u := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
		u.SetNetworkLayerForChecksum(ip)
		err = gopacket.SerializeLayers(buf, opts, eth, l3, u, gopacket.Payload("shnt"))
	} else {
		t := &layers.TCP{SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()), Seq: 1, Ack: 1, ACK: true, Window: 64240}
		t.SetNetworkLayerForChecksum(ip)
		err = gopacket.SerializeLayers(buf, opts, eth, l3, t)
	}
	if err != nil {
		return nil, fmt.Errorf("build probe: %w", err)
	}
	return buf.Bytes(), nil
}

func ipProto(p mesh.Protocol) layers.IPProtocol {
	if p == mesh.UDP {
		return layers.IPProtocolUDP
	}
	return layers.IPProtocolTCP
}

// XDP verdicts.
const (
	XDPAborted  = 0
	XDPDrop     = 1
	XDPPass     = 2
	XDPTx       = 3
	XDPRedirect = 4
)

// VerdictName names an XDP return code.
func VerdictName(v uint32) string {
	switch v {
	case XDPAborted:
		return "XDP_ABORTED"
	case XDPDrop:
		return "XDP_DROP"
	case XDPPass:
		return "XDP_PASS"
	case XDPTx:
		return "XDP_TX"
	case XDPRedirect:
		return "XDP_REDIRECT"
	}
	return fmt.Sprintf("verdict %d", v)
}

// Dispatched is what a frame the load balancer sent out says about where
// it goes.
type Dispatched struct {
	// Kind: ipip, ip6ip6, 4in6, 6in4, geneve, opt, snat (or "" if the
	// frame is none of these).
	Kind string
	// Tunnel is the outer destination (ipip, geneve); zero otherwise.
	Tunnel netip.Addr
	// Dst is the destination of the (inner) packet: the backend for
	// geneve, opt and snat; the VIP for IPIP kinds.
	Dst netip.AddrPort
	// Service is the VIP:port carried in a Geneve or IP option.
	Service netip.AddrPort
	// Src is the (inner) source: the client, or the node for snat.
	Src netip.AddrPort
}

// ParseDispatched decodes a frame produced by xdplb.
func ParseDispatched(frame []byte) (Dispatched, error) {
	var d Dispatched
	pkt := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.Default)
	ls := pkt.Layers() // an undecodable payload (DNS, ...) does not matter
	var nets []gopacket.Layer
	var geneve *layers.Geneve
	var l4 gopacket.Layer
	for _, l := range ls {
		switch v := l.(type) {
		case *layers.IPv4, *layers.IPv6:
			nets = append(nets, l)
		case *layers.Geneve:
			geneve = v
		case *layers.TCP, *layers.UDP:
			if _, isG := l.(*layers.UDP); isG && l.(*layers.UDP).DstPort == 6081 && geneve == nil {
				continue
			}
			l4 = l
		case *layers.IPv6Destination:
			for _, o := range v.Options {
				if o.OptionType == 0x1e && len(o.OptionData) == 18 {
					a, _ := netip.AddrFromSlice(o.OptionData[2:18])
					d.Service = netip.AddrPortFrom(a, binary.BigEndian.Uint16(o.OptionData[:2]))
					d.Kind = "opt"
				}
			}
		}
	}
	if len(nets) == 0 || l4 == nil {
		if el := pkt.ErrorLayer(); el != nil {
			return d, fmt.Errorf("decode: %v", el.Error())
		}
		return d, errors.New("no IP/TCP/UDP headers")
	}
	inner := nets[len(nets)-1]
	src, dst := addrsOf(inner)
	var sp, dp uint16
	switch v := l4.(type) {
	case *layers.TCP:
		sp, dp = uint16(v.SrcPort), uint16(v.DstPort)
	case *layers.UDP:
		sp, dp = uint16(v.SrcPort), uint16(v.DstPort)
	}
	d.Src, d.Dst = netip.AddrPortFrom(src, sp), netip.AddrPortFrom(dst, dp)
	switch {
	case geneve != nil:
		d.Kind = "geneve"
		_, d.Tunnel = addrsOf(nets[0])
		for _, o := range geneve.Options {
			if o.Class == 0xfff0 && o.Type == 0x81 {
				switch len(o.Data) {
				case 8:
					a, _ := netip.AddrFromSlice(o.Data[:4])
					d.Service = netip.AddrPortFrom(a, binary.BigEndian.Uint16(o.Data[4:6]))
				case 20:
					a, _ := netip.AddrFromSlice(o.Data[:16])
					d.Service = netip.AddrPortFrom(a, binary.BigEndian.Uint16(o.Data[16:18]))
				}
			}
		}
	case len(nets) == 2:
		_, d.Tunnel = addrsOf(nets[0])
		o4 := d.Tunnel.Is4()
		i4 := src.Is4()
		switch {
		case o4 && i4:
			d.Kind = "ipip"
		case !o4 && !i4:
			d.Kind = "ip6ip6"
		case !o4 && i4:
			d.Kind = "4in6"
		default:
			d.Kind = "6in4"
		}
	case d.Kind == "opt":
	default:
		if v4, ok := inner.(*layers.IPv4); ok {
			for _, o := range v4.Options {
				if o.OptionType == 0x9e && len(o.OptionData) == 6 {
					a, _ := netip.AddrFromSlice(o.OptionData[2:6])
					d.Service = netip.AddrPortFrom(a, binary.BigEndian.Uint16(o.OptionData[:2]))
					d.Kind = "opt"
				}
			}
		}
		if d.Kind == "" {
			d.Kind = "snat"
		}
	}
	return d, nil
}

func addrsOf(l gopacket.Layer) (src, dst netip.Addr) {
	switch v := l.(type) {
	case *layers.IPv4:
		src, _ = netip.AddrFromSlice(v.SrcIP.To4())
		dst, _ = netip.AddrFromSlice(v.DstIP.To4())
	case *layers.IPv6:
		src, _ = netip.AddrFromSlice(v.SrcIP)
		dst, _ = netip.AddrFromSlice(v.DstIP)
	}
	return src, dst
}
