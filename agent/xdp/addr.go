package xdp

import (
	"encoding/binary"
	"net/netip"

	"github.com/shuntmesh/shunt/mesh"
)

// Address families and protocols as the programs store them.
const (
	afInet   = 2
	afInet6  = 10
	protoTCP = 6
	protoUDP = 17
)

// addrWords converts an address to the datapath's four words (network byte
// order in memory; IPv4 in word 0, the rest zero).
func addrWords(a netip.Addr) [4]uint32 {
	var w [4]uint32
	if a.Is4() || a.Is4In6() {
		b := a.Unmap().As4()
		w[0] = binary.NativeEndian.Uint32(b[:])
		return w
	}
	b := a.As16()
	for i := range 4 {
		w[i] = binary.NativeEndian.Uint32(b[i*4:])
	}
	return w
}

// wordsAddr converts back; family selects IPv4 (word 0) or IPv6.
func wordsAddr(w [4]uint32, family uint8) netip.Addr {
	if family == afInet {
		var b [4]byte
		binary.NativeEndian.PutUint32(b[:], w[0])
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	for i := range 4 {
		binary.NativeEndian.PutUint32(b[i*4:], w[i])
	}
	return netip.AddrFrom16(b)
}

func family(a netip.Addr) uint8 {
	if a.Is4() || a.Is4In6() {
		return afInet
	}
	return afInet6
}

// portN is a port as the datapath stores it (network order in memory).
func portN(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

// portH converts a stored port back to a number.
func portH(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

func protoNum(p mesh.Protocol) uint8 {
	if p == mesh.UDP {
		return protoUDP
	}
	return protoTCP
}

func netipAddrPort(w [4]uint32, fam uint8, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(wordsAddr(w, fam), portH(port))
}
