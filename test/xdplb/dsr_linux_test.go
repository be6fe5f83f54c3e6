package xdplb

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
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
// balancer, reaches the backend's socket: outer destination and embedded
// source become the backend's address and port, checksums stay valid.
func TestDSRPacketTooBig(t *testing.T) {
	svcs := fixtureServices()
	d := newLB(t, svcs)
	m := newModel(t, svcs)
	b := builder{t, m}
	ingress, _ := d.DSRPrograms()
	for _, p := range []pk{
		{src: c4(43000), dst: ap("10.96.0.1:80"), flags: "S"},
		{src: c6(43000), dst: ap("[fd00:96::1]:80"), flags: "S"},
		{src: c4(43001), dst: ap("10.96.0.3:80"), flags: "S"}, // Geneve service: the error still comes by IPIP
	} {
		be := b.backend(p)
		ptb := b.ptb(p, 0)
		verdict, lbOut, err := xdp.RunXDP(d.Program(), ptb)
		if err != nil || verdict != xdp.XDPTx {
			t.Fatalf("%s: xdplb: verdict %d err %v", p.dst, verdict, err)
		}
		before := dsrStats(t, d)
		ret, got := runTC(t, ingress, lbOut)
		if ret != tcActOK {
			t.Fatalf("%s: dsr_ingress returned %d", p.dst, ret)
		}
		want := translatePTB(t, swapped(ptb), p, be.Addr)
		if !bytes.Equal(got, want) {
			t.Errorf("%s: backend receives\n got %s\nwant %s\n%s", p.dst, hex.EncodeToString(got), hex.EncodeToString(want), diffLayers(got, want))
		}
		checkDSRDelta(t, fmt.Sprint(p.dst), before, dsrStats(t, d), map[string]uint64{"in_icmp": 1})
	}
}

// translatePTB rewrites an ICMP error frame as the backend must receive it:
// outer destination VIP -> backend, embedded source VIP:port ->
// backend:port, IP header and ICMP checksums recomputed from scratch.
func translatePTB(t *testing.T, frame []byte, p pk, be netip.AddrPort) []byte {
	f := append([]byte(nil), frame...)
	if p.v4() {
		a := be.Addr().As4()
		copy(f[14+16:], a[:]) // outer daddr
		f[14+10], f[14+11] = 0, 0
		binary.BigEndian.PutUint16(f[14+10:], csum(f[14:34]))
		emb := 14 + 20 + 8
		copy(f[emb+12:], a[:]) // embedded saddr
		f[emb+10], f[emb+11] = 0, 0
		binary.BigEndian.PutUint16(f[emb+10:], csum(f[emb:emb+20]))
		binary.BigEndian.PutUint16(f[emb+20:], be.Port())
		f[14+20+2], f[14+20+3] = 0, 0
		binary.BigEndian.PutUint16(f[14+20+2:], csum(f[14+20:14+int(binary.BigEndian.Uint16(f[16:]))]))
		return f
	}
	a := be.Addr().As16()
	copy(f[14+24:], a[:])
	emb := 14 + 40 + 8
	copy(f[emb+8:], a[:])
	binary.BigEndian.PutUint16(f[emb+40:], be.Port())
	icmp := f[14+40:]
	icmp[2], icmp[3] = 0, 0
	pseudo := append([]byte(nil), f[14+8:14+40]...)
	l := make([]byte, 8)
	binary.BigEndian.PutUint32(l, uint32(len(icmp)))
	l[7] = 58
	pseudo = append(pseudo, l...)
	binary.BigEndian.PutUint16(icmp[2:], csum(append(pseudo, icmp...)))
	return f
}
