package xdplb

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/shuntmesh/shunt/agent/xdp"
)

const (
	tcActOK   = 0
	tcActShot = 2
)

func runTC(t testing.TB, prog *ebpf.Program, in []byte) (uint32, []byte) {
	t.Helper()
	ret, out, err := tryTC(prog, in)
	if err != nil {
		t.Fatalf("BPF_PROG_TEST_RUN (tc) on %d bytes %x: %v", len(in), in, err)
	}
	return ret, out
}

func tryTC(prog *ebpf.Program, in []byte) (uint32, []byte, error) {
	out := make([]byte, len(in)+512)
	opts := &ebpf.RunOptions{Data: in, DataOut: out}
	ret, err := prog.Run(opts)
	return ret, opts.DataOut, err
}

func dsrStats(t *testing.T, d *xdp.Datapath) map[string]uint64 {
	t.Helper()
	c, err := d.DSRCounters()
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]uint64{}
	for i, n := range xdp.DSRStatNames {
		m[n] = c[i]
	}
	return m
}

func checkDSRDelta(t *testing.T, name string, before, after map[string]uint64, want map[string]uint64) {
	t.Helper()
	for _, n := range xdp.DSRStatNames {
		if got := after[n] - before[n]; got != want[n] {
			t.Errorf("%s: dsr counter %s changed by %d, want %d", name, n, got, want[n])
		}
	}
}

// TestDSRUndoesDispatch sends flows through xdplb, then the frames it
// produced through dsr_ingress (as the backend receives them), then the
// backend's reply through dsr_egress: the backend must get the client's
// packet addressed to its own socket, and the client must get a reply from
// the VIP. Expected frames are built independently (gopacket, full
// checksums).
func TestDSRUndoesDispatch(t *testing.T) {
	svcs := fixtureServices()
	d := newLB(t, svcs)
	m := newModel(t, svcs)
	b := builder{t, m}
	ingress, egress := d.DSRPrograms()
	cases := []struct {
		name string
		p    pk
		stat string
	}{
		{"IPIP", pk{src: c4(41000), dst: ap("10.96.0.1:80"), flags: "S"}, "in_ipip"},
		{"IPIP with payload", pk{src: c4(41001), dst: ap("10.96.0.1:80"), flags: "AP", payload: bytes.Repeat([]byte("0123456789"), 100)}, "in_ipip"},
		{"IP6IP6", pk{src: c6(41000), dst: ap("[fd00:96::1]:80"), flags: "S"}, "in_ipip"},
		{"4in6", pk{src: c4(41002), dst: ap("10.96.0.6:80"), flags: "S"}, "in_ipip"},
		{"6in4", pk{src: c6(41002), dst: ap("[fd00:96::7]:80"), flags: "S"}, "in_ipip"},
		{"Geneve", pk{src: c4(41003), dst: ap("10.96.0.3:80"), flags: "S"}, "in_geneve"},
		{"Geneve v6", pk{src: c6(41003), dst: ap("[fd00:96::3]:80"), flags: "S"}, "in_geneve"},
		{"IPv4 option", pk{src: c4(41004), dst: ap("10.96.0.4:80"), flags: "S"}, "in_opt"},
		{"IPv4 option, payload", pk{src: c4(41005), dst: ap("10.96.0.4:80"), flags: "AP", payload: []byte("hello")}, "in_opt"},
		{"IPv6 destination option", pk{src: c6(41004), dst: ap("[fd00:96::4]:80"), flags: "S"}, "in_opt"},
		{"UDP IPIP", pk{src: c4(41006), dst: ap("10.96.0.10:53"), udp: true, payload: []byte("query")}, "in_ipip"},
	}
	for _, c := range cases {
		be := b.backend(c.p)
		verdict, lbOut, err := xdp.RunXDP(d.Program(), c.p.bytes(t))
		if err != nil || verdict != xdp.XDPTx {
			t.Fatalf("%s: xdplb: verdict %d err %v", c.name, verdict, err)
		}
		before := dsrStats(t, d)
		ret, got := runTC(t, ingress, lbOut)
		if ret != tcActOK {
			t.Errorf("%s: dsr_ingress returned %d", c.name, ret)
		}
		want := b.dnat(c.p, be)
		if !bytes.Equal(got, want) {
			t.Errorf("%s: backend receives\n got %s\nwant %s\n%s", c.name, hex.EncodeToString(got), hex.EncodeToString(want), diffLayers(got, want))
		}
		checkDSRDelta(t, c.name+" ingress", before, dsrStats(t, d), map[string]uint64{c.stat: 1})

		// The backend answers from its own socket; the client must see
		// the VIP. (MACs as the backend would send them.)
		reply := pk{src: be.Addr, dst: c.p.src, udp: c.p.udp, flags: "SA", payload: []byte("reply")}
		before = dsrStats(t, d)
		ret, got = runTC(t, egress, reply.bytes(t))
		if ret != tcActOK {
			t.Errorf("%s: dsr_egress returned %d", c.name, ret)
		}
		fromVIP := reply
		fromVIP.src = c.p.dst
		if want := fromVIP.bytes(t); !bytes.Equal(got, want) {
			t.Errorf("%s: reply leaves as\n got %s\nwant %s\n%s", c.name, hex.EncodeToString(got), hex.EncodeToString(want), diffLayers(got, want))
		}
		checkDSRDelta(t, c.name+" egress", before, dsrStats(t, d), map[string]uint64{"out_revnat": 1})
	}

	// Traffic that is not a DSR flow passes untouched.
	for _, c := range []struct {
		name string
		in   []byte
		stat string
	}{
		{"plain TCP to the backend", pk{src: c4(42000), dst: ap("10.1.0.1:8080"), flags: "S"}.bytes(t), ""},
		{"IPIP for an unknown service", func() []byte {
			p := pk{src: c4(42001), dst: ap("10.96.99.1:80"), flags: "S"}
			return b.ipipOf(p.bytes(t), 0, true, 0, be("10.1.0.1:8080", 1), 0)
		}(), "in_no_service"},
	} {
		before := dsrStats(t, d)
		ret, got := runTC(t, ingress, c.in)
		if ret != tcActOK || !bytes.Equal(got, c.in) {
			t.Errorf("%s: dsr_ingress returned %d and changed the frame", c.name, ret)
		}
		want := map[string]uint64{}
		if c.stat != "" {
			want[c.stat] = 1
		}
		checkDSRDelta(t, c.name, before, dsrStats(t, d), want)
	}
	unknownReply := pk{src: ap("10.1.0.1:8080"), dst: c4(42002), flags: "SA"}.bytes(t)
	if ret, got := runTC(t, egress, unknownReply); ret != tcActOK || !bytes.Equal(got, unknownReply) {
		t.Errorf("a reply of no DSR flow was changed (ret %d)", ret)
	}
}

// TestDSRPacketTooBig: an ICMP error about a DSR flow, sent on by the load
// balancer with the service's dispatch, reaches the backend's socket: outer
// destination and quoted source become the backend's address and port
// (translated by the backend side for IPIP, by the load balancer for Geneve
// and the service option), every checksum valid. Expected: the error a
// router would send the backend about the reply the backend itself sent
// (gopacket, full checksums).
func TestDSRPacketTooBig(t *testing.T) {
	svcs := fixtureServices()
	d := newLB(t, svcs)
	m := newModel(t, svcs)
	b := builder{t, m}
	ingress, _ := d.DSRPrograms()
	for _, c := range []struct {
		p     pk
		quote int // see icmpErr
		tx    string
	}{
		{pk{src: c4(43000), dst: ap("10.96.0.1:80"), flags: "S"}, 0, "tx_ipip"},
		{pk{src: c4(43001), dst: ap("10.96.0.1:80"), flags: "S"}, -1, "tx_ipip"}, // quoted TCP checksum
		{pk{src: c6(43000), dst: ap("[fd00:96::1]:80"), flags: "S"}, -1, "tx_ipip"},
		{pk{src: c4(43002), dst: ap("10.96.0.10:53"), udp: true}, 0, "tx_ipip"}, // quoted UDP checksum
		{pk{src: c4(43003), dst: ap("10.96.0.3:80"), flags: "S"}, 0, "tx_geneve"},
		{pk{src: c6(43003), dst: ap("[fd00:96::3]:80"), flags: "S"}, -1, "tx_geneve"},
		{pk{src: c6(43004), dst: ap("[fd00:96::10]:53"), udp: true}, 0, "tx_geneve"},
		{pk{src: c4(43005), dst: ap("10.96.0.4:80"), flags: "S"}, -1, "tx_opt"},
		{pk{src: c4(43006), dst: ap("10.96.0.11:53"), udp: true}, 0, "tx_opt"},
		{pk{src: c6(43007), dst: ap("[fd00:96::4]:80"), flags: "S"}, 0, "tx_opt"},
	} {
		p := c.p
		name := fmt.Sprintf("%s -> %s by %s, quote %d", p.src, p.dst, strings.TrimPrefix(c.tx, "tx_"), c.quote)
		be := b.backend(p)
		ptb := icmpErr(t, routerOf(p.v4()), p.dst.Addr(), replyOf(p.dst, p.src, p.udp), c.quote, 0)
		verdict, lbOut, err := xdp.RunXDP(d.Program(), ptb)
		if err != nil || verdict != xdp.XDPTx {
			t.Fatalf("%s: xdplb: verdict %d err %v", name, verdict, err)
		}
		// The error leaves the load balancer the way the flow's packets do.
		if got := dispatchOfFrame(lbOut); "tx_"+got != c.tx {
			t.Errorf("%s: the load balancer sent the error by %q", name, got)
		}
		before := dsrStats(t, d)
		ret, got := runTC(t, ingress, lbOut)
		if ret != tcActOK {
			t.Fatalf("%s: dsr_ingress returned %d", name, ret)
		}
		from := routerOf(p.v4())
		if c.tx == "tx_opt" {
			from = nodeFor(from)
		}
		want := swapped(icmpErr(t, from, be.Addr.Addr(), replyOf(be.Addr, p.src, p.udp), c.quote, 0))
		if !bytes.Equal(got, want) {
			t.Errorf("%s: backend receives\n got %s\nwant %s\n%s", name, hex.EncodeToString(got), hex.EncodeToString(want), diffLayers(got, want))
		}
		checkDSRDelta(t, name, before, dsrStats(t, d), map[string]uint64{"in_icmp": 1})
	}
}

// TestDSRFragmentedReply: a UDP reply larger than the backend's MTU leaves
// the backend in fragments; every one must leave from the VIP, the first
// (which carries the ports) through dsr_revnat, the later ones from the
// record the first left, keyed by the datagram's identification (two
// datagrams interleaved). Expected: the fragments of the datagram the
// client should get.
func TestDSRFragmentedReply(t *testing.T) {
	svcs := fixtureServices()
	d := newLB(t, svcs)
	m := newModel(t, svcs)
	b := builder{t, m}
	ingress, egress := d.DSRPrograms()
	big := bytes.Repeat([]byte("fragmented reply"), 250) // 4000 bytes
	for _, c := range []struct {
		name string
		p, q pk
	}{
		{"IPIP v4", pk{src: c4(44000), dst: ap("10.96.0.10:53"), udp: true, payload: []byte("q")}, pk{src: c4(44001), dst: ap("10.96.0.10:53"), udp: true, payload: []byte("q")}},
		{"option v4", pk{src: c4(44002), dst: ap("10.96.0.11:53"), udp: true, payload: []byte("q")}, pk{src: c4(44003), dst: ap("10.96.0.11:53"), udp: true, payload: []byte("q")}},
		{"Geneve v6", pk{src: c6(44000), dst: ap("[fd00:96::10]:53"), udp: true, payload: []byte("q")}, pk{src: c6(44001), dst: ap("[fd00:96::10]:53"), udp: true, payload: []byte("q")}},
	} {
		var in, want [2][][]byte
		for i, p := range []pk{c.p, c.q} {
			be := b.backend(p)
			verdict, lbOut, err := xdp.RunXDP(d.Program(), p.bytes(t))
			if err != nil || verdict != xdp.XDPTx {
				t.Fatalf("%s: xdplb: verdict %d err %v", c.name, verdict, err)
			}
			if ret, _ := runTC(t, ingress, lbOut); ret != tcActOK {
				t.Fatalf("%s: dsr_ingress returned %d", c.name, ret)
			}
			reply := pk{src: be.Addr, dst: p.src, udp: true, payload: big}.bytes(t)
			// Datagrams of different flows (IPv4: same identification) or
			// identification (IPv6)
			id6 := uint32(0x7000 + i)
			if i == 1 && p.v4() {
				binary.BigEndian.PutUint16(reply[14+4:], 0x4321)
			}
			in[i] = fragment(reply, 1500, id6)
			fromVIP := pk{src: p.dst, dst: p.src, udp: true, payload: big}.bytes(t)
			if i == 1 && p.v4() {
				binary.BigEndian.PutUint16(fromVIP[14+4:], 0x4321)
			}
			want[i] = fragment(fromVIP, 1500, id6)
		}
		n := len(in[0])
		if n != 3 {
			t.Fatalf("%s: %d fragments, want 3", c.name, n)
		}
		for j := 0; j < n; j++ {
			for i := 0; i < 2; i++ {
				name := fmt.Sprintf("%s: datagram %d fragment %d of %d", c.name, i, j+1, n)
				before := dsrStats(t, d)
				ret, got := runTC(t, egress, in[i][j])
				if ret != tcActOK {
					t.Errorf("%s: dsr_egress returned %d", name, ret)
				}
				if !bytes.Equal(got, want[i][j]) {
					t.Errorf("%s: leaves as\n got %s\nwant %s\n%s", name, hex.EncodeToString(got), hex.EncodeToString(want[i][j]), diffLayers(got, want[i][j]))
				}
				exp := map[string]uint64{"out_frag_later": 1}
				if j == 0 {
					exp = map[string]uint64{"out_revnat": 1, "out_frag_first": 1}
				}
				checkDSRDelta(t, name, before, dsrStats(t, d), exp)
			}
		}
		// The record went with the last fragment: a late copy of a later
		// fragment leaves unchanged, counted.
		for j := 1; j < n; j++ {
			before := dsrStats(t, d)
			if ret, got := runTC(t, egress, in[0][j]); ret != tcActOK || !bytes.Equal(got, in[0][j]) {
				t.Errorf("%s: fragment %d after the last: changed (ret %d)", c.name, j+1, ret)
			}
			checkDSRDelta(t, c.name+" fragment after the last", before, dsrStats(t, d), map[string]uint64{"out_frag_unknown": 1})
		}
	}
	// Fragments of a datagram that is no DSR reply leave unchanged.
	other := fragment(pk{src: ap("10.1.0.1:7777"), dst: c4(45000), udp: true, payload: big}.bytes(t), 1500, 0)
	for j, f := range other {
		before := dsrStats(t, d)
		if ret, got := runTC(t, egress, f); ret != tcActOK || !bytes.Equal(got, f) {
			t.Errorf("fragment %d of a datagram of no DSR flow was changed (ret %d)", j+1, ret)
		}
		exp := map[string]uint64{"out_frag_unknown": 1}
		if j == 0 {
			exp = map[string]uint64{}
		}
		checkDSRDelta(t, "fragment of no DSR flow", before, dsrStats(t, d), exp)
	}
}

// dispatchOfFrame tells how a frame the load balancer sent is encapsulated:
// "ipip", "geneve", "opt" (service option) or "".
func dispatchOfFrame(f []byte) string {
	ip := f[14:]
	proto, l4 := ip[6], ip[40:]
	if ip[0]>>4 == 4 {
		if ip[0]&0x0f == 7 && ip[20] == 0x9e {
			return "opt"
		}
		proto, l4 = ip[9], ip[20:]
	}
	switch {
	case proto == 4 || proto == 41:
		return "ipip"
	case proto == 17 && binary.BigEndian.Uint16(l4[2:]) == 6081:
		return "geneve"
	case proto == 60:
		return "opt"
	}
	return ""
}
