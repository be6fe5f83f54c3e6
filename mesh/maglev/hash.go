package maglev

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
)

// murmur3 is MurmurHash3_x86_32 (Austin Appleby, public domain) over the bytes
// of key with the given seed. It is the permutation hash of [Build]: a
// backend's offset is murmur3(key, OffsetSeed) % M and its skip is
// murmur3(key, SkipSeed) % (M-1) + 1. Any MurmurHash3_x86_32 implementation
// reproduces it (e.g. Python mmh3.hash(key, seed, signed=False)).
func murmur3(key string, seed uint32) uint32 {
	const (
		c1 = 0xcc9e2d51
		c2 = 0x1b873593
	)
	h := seed
	n := len(key)
	i := 0
	for ; i+4 <= n; i += 4 {
		k := uint32(key[i]) | uint32(key[i+1])<<8 | uint32(key[i+2])<<16 | uint32(key[i+3])<<24
		k *= c1
		k = bits.RotateLeft32(k, 15)
		k *= c2
		h ^= k
		h = bits.RotateLeft32(h, 13)
		h = h*5 + 0xe6546b64
	}
	var k uint32
	switch n - i {
	case 3:
		k ^= uint32(key[i+2]) << 16
		fallthrough
	case 2:
		k ^= uint32(key[i+1]) << 8
		fallthrough
	case 1:
		k ^= uint32(key[i])
		k *= c1
		k = bits.RotateLeft32(k, 15)
		k *= c2
		h ^= k
	}
	h ^= uint32(n)
	h ^= h >> 16
	h *= 0x85ebca6b
	h ^= h >> 13
	h *= 0xc2b2ae35
	h ^= h >> 16
	return h
}

// Tuple is a flow's 5-tuple as [FlowHash] sees it.
//
// Addresses are always 16 bytes in network byte order. An IPv4 address is
// stored IPv4-mapped (::ffff:a.b.c.d, RFC 4291 2.5.5.2): ten zero bytes, two
// 0xff bytes, then the four address bytes; this is what netip.Addr.As16
// returns for an IPv4 address. Ports are plain numbers (host order in Go; the
// byte layout used for hashing is described on [FlowHash]). For protocols
// without ports (ICMP, ...) both ports are 0.
type Tuple struct {
	Src, Dst         [16]byte
	SrcPort, DstPort uint16
	Proto            uint8
}

// NewTuple builds a Tuple from two address/port pairs and an IP protocol
// number (6 = TCP, 17 = UDP). IPv4 addresses become IPv4-mapped.
func NewTuple(src, dst netip.AddrPort, proto uint8) Tuple {
	return Tuple{
		Src:     src.Addr().As16(),
		Dst:     dst.Addr().As16(),
		SrcPort: src.Port(),
		DstPort: dst.Port(),
		Proto:   proto,
	}
}

// ClientOnly is t with the source port zeroed: the tuple whose [FlowHash]
// picks the slot of a service with client-IP session affinity, so that
// every flow of one client address to one frontend lands on the same
// backend, on every node that builds the same table.
func (t Tuple) ClientOnly() Tuple {
	t.SrcPort = 0
	return t
}

// FlowWordCount is the number of 32-bit words [FlowHash] mixes.
const FlowWordCount = 10

// Words returns the ten 32-bit words [FlowHash] mixes; see FlowHash for the
// layout.
func (t Tuple) Words() [FlowWordCount]uint32 {
	var w [FlowWordCount]uint32
	for i := 0; i < 4; i++ {
		w[i] = binary.LittleEndian.Uint32(t.Src[4*i:])
		w[4+i] = binary.LittleEndian.Uint32(t.Dst[4*i:])
	}
	w[8] = uint32(bits.ReverseBytes16(t.SrcPort)) | uint32(bits.ReverseBytes16(t.DstPort))<<16
	w[9] = uint32(t.Proto)
	return w
}

// FlowHash hashes a packet's 5-tuple for a Maglev lookup: the slot is
// FlowHash(t, seed.DatapathSeed()) % M. It is Linux's jhash2(words, 10,
// datapathSeed) (Bob Jenkins' lookup3 hashword) over ten 32-bit words, so an
// eBPF program computes the same value with 32-bit adds, xors and rotates, a
// fixed three mix rounds and one final round, and no tables.
//
// Word layout. Each word is the little-endian load of four bytes, which is
// exactly what a plain __u32 load from the packet yields on a little-endian
// (bpfel) machine, so C can copy header fields without any byte swapping:
//
//	w[0..3]  source address, 16 bytes in network order, word k = bytes 4k..4k+3
//	w[4..7]  destination address, same encoding
//	w[8]     the four port bytes as they appear in the TCP/UDP header
//	         (sport_hi, sport_lo, dport_hi, dport_lo), i.e.
//	         bswap16(sport) | bswap16(dport) << 16 in terms of port numbers,
//	         the raw __u32 at L4 offset 0 on bpfel
//	w[9]     the IP protocol number as a plain value (6 for TCP, 17 for UDP)
//
// For IPv4 (IPv4-mapped, see [Tuple]): w[0] = w[1] = 0, w[2] = 0xffff0000
// (bytes 00 00 ff ff), w[3] = iph->saddr loaded as __u32; likewise w[4..7]
// with iph->daddr. For IPv6, w[0..3] = ip6h->saddr.in6_u.u6_addr32[0..3].
//
// The hash itself, with rol32 a left rotate and all arithmetic mod 2^32:
//
//	a = b = c = 0xdeadbeef + (10 << 2) + datapathSeed
//	for i in 0, 3, 6:  a += w[i]; b += w[i+1]; c += w[i+2]; mix(a, b, c)
//	a += w[9]; final(a, b, c)
//	return c
//
//	mix:   a -= c; a ^= rol32(c, 4);  c += b
//	       b -= a; b ^= rol32(a, 6);  a += c
//	       c -= b; c ^= rol32(b, 8);  b += a
//	       a -= c; a ^= rol32(c, 16); c += b
//	       b -= a; b ^= rol32(a, 19); a += c
//	       c -= b; c ^= rol32(b, 4);  b += a
//	final: c ^= b; c -= rol32(b, 14)
//	       a ^= c; a -= rol32(c, 11)
//	       b ^= a; b -= rol32(a, 25)
//	       c ^= b; c -= rol32(b, 16)
//	       a ^= c; a -= rol32(c, 4)
//	       b ^= a; b -= rol32(a, 14)
//	       c ^= b; c -= rol32(b, 24)
//
// These are __jhash_mix and __jhash_final from include/linux/jhash.h.
func FlowHash(t Tuple, datapathSeed uint32) uint32 {
	w := t.Words()
	return jhash2(w[:], datapathSeed)
}

// jhash2 is Linux's jhash2 (lookup3 hashword) over k with initval.
func jhash2(k []uint32, initval uint32) uint32 {
	a := uint32(0xdeadbeef) + uint32(len(k))<<2 + initval
	b, c := a, a
	for len(k) > 3 {
		a += k[0]
		b += k[1]
		c += k[2]
		a, b, c = jhashMix(a, b, c)
		k = k[3:]
	}
	switch len(k) {
	case 3:
		c += k[2]
		fallthrough
	case 2:
		b += k[1]
		fallthrough
	case 1:
		a += k[0]
		a, b, c = jhashFinal(a, b, c)
	}
	return c
}

func jhashMix(a, b, c uint32) (uint32, uint32, uint32) {
	a -= c
	a ^= bits.RotateLeft32(c, 4)
	c += b
	b -= a
	b ^= bits.RotateLeft32(a, 6)
	a += c
	c -= b
	c ^= bits.RotateLeft32(b, 8)
	b += a
	a -= c
	a ^= bits.RotateLeft32(c, 16)
	c += b
	b -= a
	b ^= bits.RotateLeft32(a, 19)
	a += c
	c -= b
	c ^= bits.RotateLeft32(b, 4)
	b += a
	return a, b, c
}

func jhashFinal(a, b, c uint32) (uint32, uint32, uint32) {
	c ^= b
	c -= bits.RotateLeft32(b, 14)
	a ^= c
	a -= bits.RotateLeft32(c, 11)
	b ^= a
	b -= bits.RotateLeft32(a, 25)
	c ^= b
	c -= bits.RotateLeft32(b, 16)
	a ^= c
	a -= bits.RotateLeft32(c, 4)
	b ^= a
	b -= bits.RotateLeft32(a, 14)
	c ^= b
	c -= bits.RotateLeft32(b, 24)
	return a, b, c
}
