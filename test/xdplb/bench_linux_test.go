package xdplb

import (
	"net/netip"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/test/bench"
)

// Go benchmarks of the load balancer through BPF_PROG_TEST_RUN with repeat
// b.N: bench.Replayer hands each run the next frame (the kernel does not
// restore the packet between runs, and xdplb rewrites it) and tail-calls
// the program. Reported: "kernel-ns/pkt", the kernel's mean time per run,
// next to an empty program run the same way, for both conntrack LRU kinds.
// `shuntctl bench xdp` does the same with interleaved repetitions.

func benchLB(b *testing.B, conntrack string) *xdp.Datapath {
	b.Helper()
	requireRoot(b)
	cfg := xdp.Config{Seed: testSeed, NodeAddr: node4.String(), Conntrack: conntrack, MaxFlows: 1 << 21, MaxServices: 16, MaxBackends: 64}
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

func BenchmarkXDP(b *testing.B) {
	const established = 50000
	cpu := runtime.NumCPU() - 1
	rp, err := bench.NewReplayer(established + 1<<20)
	if err != nil {
		b.Fatal(err)
	}
	defer rp.Close()
	flows := make([][]byte, established)
	for i := range flows {
		flows[i] = probe(b, i)
	}
	if err := rp.Load(0, flows); err != nil {
		b.Fatal(err)
	}
	next := 1 << 20
	for _, lru := range []string{"percpu", "shared"} {
		b.Run("lru="+lru, func(b *testing.B) {
			d := benchLB(b, lru)
			for _, f := range flows {
				if _, _, err := xdp.RunXDP(d.Program(), f); err != nil {
					b.Fatal(err)
				}
			}
			run := func(b *testing.B, prog *ebpf.Program, base, n int) {
				if err := rp.Position(map[int][2]int{cpu: {base, n}}); err != nil {
					b.Fatal(err)
				}
				b.ResetTimer()
				ns, err := rp.Run(prog, cpu, false, b.N)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(ns, "kernel-ns/pkt")
			}
			b.Run("empty-program", func(b *testing.B) { run(b, d.PassProgram(), 0, 1) })
			b.Run("hot-flow", func(b *testing.B) { run(b, d.Program(), 0, 1) })
			b.Run("established-flows", func(b *testing.B) { run(b, d.Program(), 0, established) })
			b.Run("new-flow", func(b *testing.B) {
				n := min(b.N, 1<<20)
				fresh := make([][]byte, n)
				for i := range fresh {
					fresh[i] = probe(b, next)
					next++
				}
				if err := rp.Load(established, fresh); err != nil {
					b.Fatal(err)
				}
				run(b, d.Program(), established, n)
			})
		})
	}
}
