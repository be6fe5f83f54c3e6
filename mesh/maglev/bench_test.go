package maglev

import (
	"fmt"
	"testing"
)

// BenchmarkBuild measures a full table build. The design target is
// N=650, M=65521 in <= 3 ms and <= 8 MB.
func BenchmarkBuild(b *testing.B) {
	seed := Seed{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	for _, n := range []int{10, 100, 650, 1000} {
		for _, m := range []uint32{16381, 65521, 131071} {
			bs := equalBackends(n, 1)
			b.Run(fmt.Sprintf("N=%d/M=%d", n, m), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if _, err := Build(bs, m, seed); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkBuildWeighted is the target cell with uneven weights (1..16).
func BenchmarkBuildWeighted(b *testing.B) {
	seed := Seed{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	bs := equalBackends(650, 1)
	for i := range bs {
		bs[i].Weight = uint32(1 + i%16)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Build(bs, 65521, seed); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkFingerprint(b *testing.B) {
	tab, err := Build(equalBackends(650, 1), 65521, Seed{})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		_ = tab.fingerprint() // uncached

	}
}

func BenchmarkFlowHash(b *testing.B) {
	tu := Tuple{SrcPort: 1234, DstPort: 80, Proto: 6}
	var sink uint32
	for b.Loop() {
		tu.SrcPort++
		sink += FlowHash(tu, 42)
	}
	_ = sink
}
