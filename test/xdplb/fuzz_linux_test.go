package xdplb

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/agent/xdp"
)

// maxGrowth is the most xdplb adds to a frame: outer IPv6 + UDP + Geneve
// with an IPv6 service option.
const maxGrowth = 40 + 8 + 8 + 4 + 20

// seedFrames are the fixtures' inputs plus deterministic mutations of them
// (truncations, flipped bytes), so plain `go test` already runs a few
// hundred odd frames.
func seedFrames(t testing.TB) [][]byte {
	svcs := fixtureServices()
	m := newModel(t, svcs)
	var frames [][]byte
	for _, f := range fixtures(t, m) {
		frames = append(frames, f.in)
	}
	r := rand.New(rand.NewPCG(1, 2))
	base := len(frames)
	for i := 0; i < 400; i++ {
		src := frames[r.IntN(base)]
		if len(src) < 16 {
			continue
		}
		f := append([]byte(nil), src...)
		switch i % 3 {
		case 0:
			f = f[:14+r.IntN(len(f)-13)]
		case 1:
			for j := 0; j < 1+r.IntN(4); j++ {
				f[r.IntN(len(f))] ^= byte(1 + r.IntN(255))
			}
		case 2:
			f[14+r.IntN(min(40, len(f)-14))] = byte(r.IntN(256))
		}
		frames = append(frames, f)
	}
	return frames
}

// FuzzXDPLB runs arbitrary frames through xdplb: the program must never
// fail or abort, must return DROP, PASS or TX, must hand PASSed frames to
// the kernel untouched, and may only grow a frame by one encapsulation.
func FuzzXDPLB(f *testing.F) {
	requireRoot(f)
	for _, fr := range seedFrames(f) {
		f.Add(fr)
	}
	d := newLB(f, fixtureServices())
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 14 || len(in) > 4000 {
			return // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header
		}
		verdict, out, err := xdp.RunXDP(d.Program(), in)
		if err != nil {
			t.Fatalf("run: %v", err)
		}
		switch verdict {
		case xdp.XDPPass:
			if !bytes.Equal(out, in) {
				t.Fatalf("PASS changed the frame:\n in %x\nout %x", in, out)
			}
		case xdp.XDPDrop:
		case xdp.XDPTx:
			if len(out) < len(in) || len(out) > len(in)+maxGrowth {
				t.Fatalf("TX frame of %d bytes from %d", len(out), len(in))
			}
		default:
			t.Fatalf("verdict %s", xdp.VerdictName(verdict))
		}
	})
}

// FuzzDSR runs arbitrary frames through both backend-side programs: they
// must never fail and only return TC_ACT_OK or TC_ACT_SHOT.
func FuzzDSR(f *testing.F) {
	requireRoot(f)
	d := newLB(f, fixtureServices())
	// The load balancer's outputs are the interesting inputs here.
	for _, fr := range seedFrames(f) {
		f.Add(fr)
		if v, out, err := xdp.RunXDP(d.Program(), fr); err == nil && v == xdp.XDPTx {
			f.Add(out)
			for i := 0; i < 4 && len(out) > 15; i++ {
				f.Add(out[:14+len(out)*i/4%(len(out)-14)])
			}
		}
	}
	ingress, egress := d.DSRPrograms()
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) <= 14 || len(in) > 4000 {
			return // BPF_PROG_TEST_RUN for tc refuses a bare Ethernet header
		}
		for _, prog := range []struct {
			name string
			p    *ebpf.Program
		}{{"ingress", ingress}, {"egress", egress}} {
			r, _, err := tryTC(prog.p, in)
			if errors.Is(err, unix.EINVAL) {
				// The kernel refuses to build an skb from some frames
				// (for instance an IP header cut short) before any
				// program runs: nothing to check.
				return
			}
			if err != nil {
				t.Fatalf("%s: %v", prog.name, err)
			}
			if r != tcActOK && r != tcActShot {
				t.Fatalf("%s returned %d", prog.name, r)
			}
		}
	})
}
