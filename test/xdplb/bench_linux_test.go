package xdplb

import (
	"net/netip"
	"testing"
	"time"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/mesh"
)

// Go benchmarks of the load balancer through BPF_PROG_TEST_RUN, one run
// per call (the kernel does not restore the packet between repetitions, and
// xdplb rewrites it). Reported: "kernel-ns/pkt", the kernel's time for the
// run, next to the empty-program overhead, for both conntrack LRU kinds.
// `shuntctl bench xdp` does the same with medians and interleaving.

func benchLB(b *testing.B, conntrack string) *xdp.Datapath {
	b.Helper()
	requireRoot(b)
	cfg := xdp.Config{Seed: testSeed, NodeAddr: node4.String(), Conntrack: conntrack, MaxFlows: 1 << 20, MaxServices: 16, MaxBackends: 64}
	d, err := xdp.Open(cfg, "", nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { d.Close() })
	var bs []xdp.Backend
	for i := 1; i <= 10; i++ {
		bs = append(bs, xdp.Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, 0, byte(i)}), 8080), Weight: 1})
	}
	if _, err := d.Sync([]xdp.Service{{Frontend: ap("10.96.0.1:80"), Proto: mesh.TCP, Mode: mesh.DSR, Backends: bs}}); err != nil {
		b.Fatal(err)
	}
	return d
}

func probe(b *testing.B, i int) []byte {
	src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, byte(100 + i>>16&0x3f), byte(i >> 8)}), uint16(10000+i&0xff))
	f, err := xdp.BuildProbe(mesh.TCP, src, ap("10.96.0.1:80"))
	if err != nil {
		b.Fatal(err)
	}
	return f
}

func runBench(b *testing.B, d *xdp.Datapath, pass bool, frame func(i int) []byte) {
	prog := d.Program()
	if pass {
		prog = d.PassProgram()
	}
	var total time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_, dur, err := prog.Benchmark(frame(i), 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		total += dur
	}
	b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "kernel-ns/pkt")
}

func BenchmarkXDP(b *testing.B) {
	for _, lru := range []string{"percpu", "shared"} {
		b.Run("lru="+lru, func(b *testing.B) {
			d := benchLB(b, lru)
			hot := probe(b, 0)
			if _, _, err := xdp.RunXDP(d.Program(), hot); err != nil {
				b.Fatal(err)
			}
			b.Run("empty-program", func(b *testing.B) { runBench(b, d, true, func(int) []byte { return hot }) })
			b.Run("hot-flow", func(b *testing.B) { runBench(b, d, false, func(int) []byte { return hot }) })
			next := 1 << 20
			b.Run("new-flow", func(b *testing.B) {
				frames := make([][]byte, b.N)
				for i := range frames {
					frames[i] = probe(b, next)
					next++
				}
				runBench(b, d, false, func(i int) []byte { return frames[i] })
			})
			const nflows = 50000
			many := make([][]byte, nflows)
			for i := range many {
				many[i] = probe(b, 1+i)
				xdp.RunXDP(d.Program(), many[i])
			}
			b.Run("many-flows", func(b *testing.B) {
				runBench(b, d, false, func(i int) []byte { return many[(i*7919)%nflows] })
			})
		})
	}
}
