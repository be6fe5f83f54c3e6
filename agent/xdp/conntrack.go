package xdp

import (
	"math/bits"
	"net/netip"

	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
)

// The conntrack's layout (lb_ct4, lb_ct6; bpf/lib/xdplb.h and bpf/lib/ct.h):
// a flow's entry lives in one of XLB_CT_WAYS ways of one of its two sets
// (CTSets), and is valid when its check matches. These helpers compute
// what the datapath computes, to read entries and to write them
// (benchmarks, tests).

// ctGenMask is XLB_CT_GEN_MASK: the service generation's bits of an
// entry's gen (the backend's 8 are above).
const ctGenMask = 1<<24 - 1

// CTWays is the number of flows a conntrack set holds.
const CTWays = int(bpf.XdplbXlbCtGeometryXLB_CT_WAYS)

// ctWords are the tail's four words the check covers, as C reads them.
func ctWords(t *bpf.XdplbXlbCtTail) []uint32 {
	return []uint32{
		uint32(t.Sport) | uint32(t.Dport)<<16,
		uint32(t.Proto) | uint32(t.Action)<<8 | uint32(t.SnatPort)<<16,
		uint32(t.SvcId) | uint32(t.BeId)<<16,
		t.Gen,
	}
}

// CTCheck is xlb_ct_check: the check of an entry's tail for the flow
// whose hash is hash.
func CTCheck(hash uint32, t *bpf.XdplbXlbCtTail) uint32 {
	w := ctWords(t)
	x := ctPair(w[0], w[1])*ctK[0] + ctPair(w[2], w[3])*ctK[1] + uint64(hash)*ctK[2]
	return (uint32(x>>32) ^ uint32(x)) | 1
}

// CTFlowHash is xlb_ct_hash (bpf/lib/ct.h), the conntrack's hash of the
// flow src -> dst with the Maglev datapath seed: it places the flow's entry,
// seeds its check and is the flow's entropy (encapsulation source port /
// flow label, SNAT port search). The Maglev slot comes from
// maglev.FlowHash instead.
func CTFlowHash(proto mesh.Protocol, src, dst netip.AddrPort, seed uint32) uint32 {
	s, d, fam := addrWords(src.Addr()), addrWords(dst.Addr()), family(src.Addr())
	key := ctPair(seed, ^seed)
	lane := func(hi, lo uint32) uint64 { return (ctPair(hi, lo) ^ key) + key }
	tail := ctPair(uint32(portN(src.Port()))|uint32(portN(dst.Port()))<<16, uint32(protoNum(proto))<<8|uint32(fam)) ^ key
	if fam == afInet {
		a := lane(s[0], d[0])
		return ctTop(a*ctK[0]+tail*ctK[1], a*ctK[5]+tail*ctK[6])
	}
	a, b := lane(s[0], s[1]), lane(s[2], s[3])
	c, e := lane(d[0], d[1]), lane(d[2], d[3])
	return ctTop(a*ctK[0]+tail*ctK[1]+b*ctK[2]+c*ctK[3]+e*ctK[4], a*ctK[5]+tail*ctK[6]+b*ctK[7]+c*ctK[8]+e*ctK[9])
}

// ctK are CT_K0..CT_K9 of bpf/lib/ct.h.
var ctK = [10]uint64{0x9e3779b97f4a7c15, 0xc2b2ae3d27d4eb4f, 0x165667b19e3779f9, 0x85ebca77c2b2ae63, 0x27d4eb2f165667c5,
	0xbf58476d1ce4e5b9, 0x94d049bb133111eb, 0xff51afd7ed558ccd, 0xc4ceb9fe1a85ec53, 0xd6e8feb86659fd93}

func ctPair(hi, lo uint32) uint64 { return uint64(hi)<<32 | uint64(lo) }

func ctTop(x1, x2 uint64) uint32 { return uint32(x1>>32)&0xffff0000 | uint32(x2>>48) }

// CTSetsOf returns the two sets (of sets, a power of 2) where the flow
// whose hash is hash may live: ct_set2 in bpf/lib/ct.h.
func CTSetsOf(hash, sets uint32) (uint32, uint32) {
	return hash & (sets - 1), bits.RotateLeft32(hash, 16) & (sets - 1)
}

// CTTail is the tail of the entry of the flow src -> dst (hash: its
// CTFlowHash) holding ct, seen at jiffies seen, with its check.
func CTTail(proto mesh.Protocol, src, dst netip.AddrPort, hash uint32, ct *bpf.XdplbXlbCt, seen uint32) bpf.XdplbXlbCtTail {
	t := bpf.XdplbXlbCtTail{Sport: portN(src.Port()), Dport: portN(dst.Port()), Proto: protoNum(proto),
		Action: ct.Action, SnatPort: ct.SnatPort, SvcId: uint16(ct.SvcId), BeId: uint16(ct.BeId),
		Gen: ct.Gen&ctGenMask | ct.Be.Gen<<24, Seen: seen}
	t.Check = CTCheck(hash, &t)
	return t
}

// ctMatch reports whether t is a valid entry of the flow (proto, sport,
// dport as in the tail; hash its flow hash).
func ctMatch(t *bpf.XdplbXlbCtTail, proto uint8, sport, dport uint16, hash uint32) bool {
	return t.Check != 0 && t.Proto == proto && t.Sport == sport && t.Dport == dport && CTCheck(hash, t) == t.Check
}
