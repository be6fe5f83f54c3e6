package xdplb

import (
	"math/rand/v2"
	"net/netip"
)

type rng struct{ *rand.Rand }

func newRand() rng { return rng{rand.New(rand.NewPCG(4, 0x78647062))} }

func (r rng) addr4() netip.Addr {
	return netip.AddrFrom4([4]byte{byte(1 + r.IntN(223)), byte(r.IntN(256)), byte(r.IntN(256)), byte(1 + r.IntN(254))})
}

func (r rng) addr6() netip.Addr {
	var b [16]byte
	b[0], b[1] = 0x20, 0x01
	for i := 2; i < 16; i++ {
		b[i] = byte(r.IntN(256))
	}
	return netip.AddrFrom16(b)
}

func (r rng) port() uint16 { return uint16(1024 + r.IntN(64000)) }
