package datapath

import (
	"net/netip"
	"testing"
	"unsafe"

	"github.com/shuntmesh/shunt/mesh"
)

func TestAddrLayoutIsNetworkOrder(t *testing.T) {
	a := MakeAddr(netip.MustParseAddrPort("10.96.0.1:8080"), mesh.UDP)
	mem := (*[20]byte)(unsafe.Pointer(&a))
	want := []byte{10, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x1f, 0x90, afInet, protoUDP}
	for i := range want {
		if mem[i] != want[i] {
			t.Fatalf("memory layout %v, want %v", mem[:], want)
		}
	}
}

func TestAddrRoundTrip(t *testing.T) {
	for _, s := range []string{"10.96.0.1:80", "[fd00:96::a]:53", "255.255.255.255:65535", "[::1]:1"} {
		ap := netip.MustParseAddrPort(s)
		for _, p := range []mesh.Protocol{mesh.TCP, mesh.UDP} {
			a := MakeAddr(ap, p)
			if got := AddrPort(a); got != ap {
				t.Errorf("%s: round trip gave %s", s, got)
			}
			if Protocol(a) != p {
				t.Errorf("%s: protocol %s, want %s", s, Protocol(a), p)
			}
		}
	}
}
