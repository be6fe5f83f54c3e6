package datapath

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
)

// Address families and protocols as stored in struct shunt_addr.
const (
	afInet   = 2
	afInet6  = 10
	protoTCP = 6
	protoUDP = 17
)

// MakeAddr converts an address, port and protocol to the datapath layout
// (network byte order in memory, IPv4 in ip[0]).
func MakeAddr(ap netip.AddrPort, proto mesh.Protocol) Addr {
	var a bpf.SockmeshShuntAddr
	ip := ap.Addr()
	if ip.Is4() || ip.Is4In6() {
		b := ip.Unmap().As4()
		a.Family = afInet
		a.Ip[0] = binary.NativeEndian.Uint32(b[:])
	} else {
		b := ip.As16()
		a.Family = afInet6
		for i := range 4 {
			a.Ip[i] = binary.NativeEndian.Uint32(b[i*4:])
		}
	}
	var p [2]byte
	binary.BigEndian.PutUint16(p[:], ap.Port())
	a.Port = binary.NativeEndian.Uint16(p[:])
	switch proto {
	case mesh.UDP:
		a.Proto = protoUDP
	default:
		a.Proto = protoTCP
	}
	return a
}

// AddrPort converts back from the datapath layout.
func AddrPort(a Addr) netip.AddrPort {
	var p [2]byte
	binary.NativeEndian.PutUint16(p[:], a.Port)
	port := binary.BigEndian.Uint16(p[:])
	if a.Family == afInet {
		var b [4]byte
		binary.NativeEndian.PutUint32(b[:], a.Ip[0])
		return netip.AddrPortFrom(netip.AddrFrom4(b), port)
	}
	var b [16]byte
	for i := range 4 {
		binary.NativeEndian.PutUint32(b[i*4:], a.Ip[i])
	}
	return netip.AddrPortFrom(netip.AddrFrom16(b), port)
}

// Protocol returns the protocol of a datapath address.
func Protocol(a Addr) mesh.Protocol {
	if a.Proto == protoUDP {
		return mesh.UDP
	}
	return mesh.TCP
}

// FormatAddr renders a datapath address as "addr:port/proto".
func FormatAddr(a Addr) string {
	return fmt.Sprintf("%s/%s", AddrPort(a), map[mesh.Protocol]string{mesh.TCP: "tcp", mesh.UDP: "udp"}[Protocol(a)])
}
