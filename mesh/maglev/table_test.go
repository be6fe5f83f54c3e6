package maglev

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"testing"
)

func testSeed(r *rand.Rand) Seed {
	var s Seed
	for i := range s {
		s[i] = byte(r.Uint32())
	}
	return s
}

func equalBackends(n int, w uint32) []Backend {
	bs := make([]Backend, n)
	for i := range bs {
		bs[i] = Backend{Key: fmt.Sprintf("10.%d.%d.%d:8080", i>>16&0xff, i>>8&0xff, i&0xff), Weight: w}
	}
	return bs
}

func mustBuild(t testing.TB, bs []Backend, m uint32, seed Seed) *Table {
	t.Helper()
	tab, err := Build(bs, m, seed)
	if err != nil {
		t.Fatal(err)
	}
	return tab
}

// checkInvariants verifies what every non-error Build must satisfy.
func checkInvariants(t testing.TB, in []Backend, tab *Table) {
	t.Helper()
	bs := tab.Backends()
	if len(bs) != len(in) {
		t.Fatalf("%d backends in table, %d given", len(bs), len(in))
	}
	if !slices.IsSortedFunc(bs, func(a, b Backend) int { return strings.Compare(a.Key, b.Key) }) {
		t.Fatal("backends not sorted by key")
	}
	var wsum uint64
	for _, b := range bs {
		wsum += uint64(b.Weight)
	}
	if wsum == 0 {
		if !tab.Empty() || tab.Slots() != nil || tab.Lookup(12345) != NoBackend {
			t.Fatal("no weight but table not empty")
		}
		return
	}
	if tab.Empty() {
		t.Fatal("table empty despite positive weights")
	}
	slots := tab.Slots()
	if uint32(len(slots)) != tab.Size() {
		t.Fatalf("%d slots, want %d", len(slots), tab.Size())
	}
	counts := make([]uint32, len(bs))
	for s, i := range slots {
		if int(i) >= len(bs) {
			t.Fatalf("slot %d -> %d out of range", s, i)
		}
		if bs[i].Weight == 0 {
			t.Fatalf("slot %d -> drained backend %q", s, bs[i].Key)
		}
		counts[i]++
	}
	if !slices.Equal(counts, tab.Counts()) {
		t.Fatal("Counts() disagrees with Slots()")
	}
	// Exact weights: floor(M*w/W) <= count <= ceil(M*w/W).
	m := uint64(tab.Size())
	for i, b := range bs {
		lo := m * uint64(b.Weight) / wsum
		hi := lo
		if m*uint64(b.Weight)%wsum != 0 {
			hi++
		}
		if c := uint64(counts[i]); c < lo || c > hi {
			t.Fatalf("backend %q weight %d owns %d slots, want %d..%d (M=%d, W=%d)", b.Key, b.Weight, c, lo, hi, m, wsum)
		}
	}
}

func TestBuildEqualWeightsBalance(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 1))
	for _, n := range []int{1, 2, 3, 10, 99, 100, 163, 650} {
		m, err := RecommendSize(n)
		if err != nil {
			t.Fatal(err)
		}
		for trial := 0; trial < 3; trial++ {
			bs := equalBackends(n, uint32(1+r.IntN(1000)))
			tab := mustBuild(t, bs, m, testSeed(r))
			checkInvariants(t, bs, tab)
			c := tab.Counts()
			lo, hi := slices.Min(c), slices.Max(c)
			if hi-lo > 1 {
				t.Errorf("N=%d M=%d: counts %d..%d differ by more than one", n, m, lo, hi)
			}
			// M >= 100N means floor(M/N) >= 100, so max/min <= 101/100.
			if float64(hi)/float64(lo) > 1.01 {
				t.Errorf("N=%d M=%d: max/min = %d/%d > 1.01", n, m, hi, lo)
			}
		}
	}
}

func TestBuildExactWeights(t *testing.T) {
	r := rand.New(rand.NewPCG(2, 2))
	for trial := 0; trial < 60; trial++ {
		n := 1 + r.IntN(60)
		m := sizes[r.IntN(6)]
		bs := equalBackends(n, 0)
		for i := range bs {
			switch trial % 3 {
			case 0:
				bs[i].Weight = uint32(r.IntN(10))
			case 1:
				bs[i].Weight = uint32(1 + r.IntN(1000))
			default:
				bs[i].Weight = r.Uint32() >> uint(r.IntN(32)) // very uneven
			}
		}
		tab, err := Build(bs, m, testSeed(r))
		if errors.Is(err, ErrTooManyBackends) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		checkInvariants(t, bs, tab)
	}
}

func TestBuildWeightsProportional(t *testing.T) {
	bs := []Backend{{Key: "a", Weight: 1}, {Key: "b", Weight: 2}, {Key: "c", Weight: 3}, {Key: "d", Weight: 4}}
	tab := mustBuild(t, bs, 65521, Seed{})
	// 65521 * w / 10 = 6552.1, 13104.2, 19656.3, 26208.4; the remainder of
	// 1 slot goes to the largest fraction (d).
	if got, want := tab.Counts(), []uint32{6552, 13104, 19656, 26209}; !slices.Equal(got, want) {
		t.Fatalf("counts %v, want %v", got, want)
	}
}

func TestBuildOrderIndependent(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 3))
	for trial := 0; trial < 10; trial++ {
		bs := equalBackends(1+r.IntN(80), 1)
		for i := range bs {
			bs[i].Weight = uint32(r.IntN(5))
		}
		seed := testSeed(r)
		m := sizes[2+r.IntN(5)]
		want := mustBuild(t, bs, m, seed)
		orig := slices.Clone(bs)
		shuffled := slices.Clone(bs)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		got := mustBuild(t, shuffled, m, seed)
		if got.Fingerprint() != want.Fingerprint() || !slices.Equal(got.Slots(), want.Slots()) {
			t.Fatalf("shuffled input gave a different table")
		}
		if !slices.Equal(bs, orig) {
			t.Fatal("Build modified its input")
		}
	}
}

func TestBuildDrain(t *testing.T) {
	bs := equalBackends(10, 5)
	bs[3].Weight = 0
	bs[7].Weight = 0
	tab := mustBuild(t, bs, 1021, Seed{1, 2, 3})
	checkInvariants(t, bs, tab)
	c := tab.Counts()
	var sum uint32
	for i, b := range tab.Backends() {
		if b.Weight == 0 && c[i] != 0 {
			t.Errorf("drained %q owns %d slots", b.Key, c[i])
		}
		if b.Weight > 0 && c[i] == 0 {
			t.Errorf("active %q owns no slot", b.Key)
		}
		sum += c[i]
	}
	if sum != 1021 {
		t.Errorf("slots covered %d, want 1021", sum)
	}

	// Draining one backend only moves that backend's slots... plus the
	// usual Maglev reshuffle among survivors, which must stay small.
	before := mustBuild(t, equalBackends(10, 5), 1021, Seed{1, 2, 3})
	one := equalBackends(10, 5)
	one[3].Weight = 0
	after := mustBuild(t, one, 1021, Seed{1, 2, 3})
	moved, among := Disruption(before, after)
	drained := int(before.Counts()[slices.IndexFunc(before.Backends(), func(b Backend) bool { return b.Key == one[3].Key })])
	if moved != drained+among {
		t.Errorf("moved %d != drained slots %d + among survivors %d", moved, drained, among)
	}
}

func TestBuildEmpty(t *testing.T) {
	for _, bs := range [][]Backend{nil, {}, equalBackends(4, 0)} {
		tab, err := Build(bs, DefaultSize, Seed{})
		if err != nil {
			t.Fatalf("Build(%d drained): %v", len(bs), err)
		}
		if !tab.Empty() || tab.Slots() != nil || tab.Lookup(7) != NoBackend {
			t.Fatal("want empty table")
		}
		if _, ok := tab.LookupBackend(7); ok {
			t.Fatal("LookupBackend on empty table returned ok")
		}
		if len(tab.Fingerprint()) != 16 {
			t.Fatalf("fingerprint %q", tab.Fingerprint())
		}
	}
	a, _ := Build(nil, 251, Seed{})
	b, _ := Build(equalBackends(4, 0), 251, Seed{})
	if a.Fingerprint() != b.Fingerprint() {
		t.Error("empty tables of the same M and seed should have the same fingerprint")
	}
}

func TestBuildErrors(t *testing.T) {
	cases := []struct {
		name string
		bs   []Backend
		m    uint32
		err  error
		msg  string
	}{
		{"bad size", equalBackends(2, 1), 1000, ErrInvalidSize, "1000: not prime"},
		{"duplicate", []Backend{{"a", 1}, {"b", 1}, {"a", 0}}, 251, ErrDuplicateKey, `"a"`},
		{"empty key", []Backend{{"", 1}}, 251, ErrEmptyKey, "empty backend key"},
		{"too many", equalBackends(252, 1), 251, ErrTooManyBackends, "252 backends with weight > 0, table size 251"},
	}
	for _, tc := range cases {
		_, err := Build(tc.bs, tc.m, Seed{})
		if !errors.Is(err, tc.err) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: got %v, want %v containing %q", tc.name, err, tc.err, tc.msg)
		}
	}
	// Drained backends do not count against the size.
	bs := equalBackends(300, 0)
	bs[0].Weight = 1
	if _, err := Build(bs, 251, Seed{}); err != nil {
		t.Errorf("300 backends, 1 active, M=251: %v", err)
	}
}

func TestFingerprintSensitivity(t *testing.T) {
	bs := equalBackends(5, 1)
	base := mustBuild(t, bs, 509, Seed{})
	other := []*Table{
		mustBuild(t, bs, 1021, Seed{}),
		mustBuild(t, bs, 509, Seed{0: 1}),
		mustBuild(t, bs, 509, Seed{11: 1}), // datapath seed only: mapping equal, seed differs
		mustBuild(t, append(slices.Clone(bs), Backend{"x", 1}), 509, Seed{}),
	}
	for i, o := range other {
		if o.Fingerprint() == base.Fingerprint() {
			t.Errorf("variant %d has the same fingerprint", i)
		}
	}
	// A drained backend does not change the mapping, so not the fingerprint.
	drained := mustBuild(t, append(slices.Clone(bs), Backend{"x", 0}), 509, Seed{})
	if drained.Fingerprint() != base.Fingerprint() {
		t.Error("adding a drained backend changed the fingerprint")
	}
}

func TestLookup(t *testing.T) {
	bs := equalBackends(7, 1)
	tab := mustBuild(t, bs, 251, Seed{9})
	slots := tab.Slots()
	sorted := tab.Backends()
	for _, h := range []uint32{0, 1, 250, 251, 252, 1 << 31, ^uint32(0)} {
		i := tab.Lookup(h)
		if i != int(slots[h%251]) {
			t.Errorf("Lookup(%d) = %d, want slot %d", h, i, slots[h%251])
		}
		b, ok := tab.LookupBackend(h)
		if !ok || b != sorted[i] {
			t.Errorf("LookupBackend(%d) = %v", h, b)
		}
	}
	// Mutating returned slices must not affect the table.
	slots[0] = 99
	sorted[0].Key = "zzz"
	if tab.Slots()[0] == 99 || tab.Backends()[0].Key == "zzz" {
		t.Error("accessors return internal state")
	}
}

const refEmpty = ^uint32(0)

// referenceBuild is the documented algorithm written as literally as
// possible: explicit rounds with accumulated weight, a full permutation
// array per backend, no heap. Only for small inputs.
func referenceBuild(in []Backend, m uint32, seed Seed) []uint32 {
	bs := slices.Clone(in)
	slices.SortFunc(bs, func(a, b Backend) int { return strings.Compare(a.Key, b.Key) })
	var wsum, wmax uint64
	for _, b := range bs {
		wsum += uint64(b.Weight)
		wmax = max(wmax, uint64(b.Weight))
	}
	quota := make([]uint64, len(bs))
	var sum uint64
	for i, b := range bs {
		quota[i] = uint64(m) * uint64(b.Weight) / wsum
		sum += quota[i]
	}
	for ; sum < uint64(m); sum++ { // hand out the rest by largest remainder
		best := -1
		for i, b := range bs {
			if b.Weight == 0 || quota[i] > uint64(m)*uint64(b.Weight)/wsum {
				continue // already has its extra slot
			}
			if best < 0 || uint64(m)*uint64(b.Weight)%wsum > uint64(m)*uint64(bs[best].Weight)%wsum {
				best = i
			}
		}
		quota[best]++
	}
	perm := make([][]uint32, len(bs))
	for i, b := range bs {
		off := murmur3(b.Key, seed.OffsetSeed()) % m
		skip := murmur3(b.Key, seed.SkipSeed())%(m-1) + 1
		for j := uint64(0); j < uint64(m); j++ {
			perm[i] = append(perm[i], uint32((uint64(off)+j*uint64(skip))%uint64(m)))
		}
	}
	slots := make([]uint32, m)
	for i := range slots {
		slots[i] = refEmpty
	}
	acc := make([]uint64, len(bs))
	nextJ := make([]int, len(bs))
	owned := make([]uint64, len(bs))
	filled := uint32(0)
	for filled < m {
		for i, b := range bs {
			acc[i] += uint64(b.Weight)
			if acc[i] < wmax {
				continue
			}
			acc[i] -= wmax
			if owned[i] == quota[i] {
				continue
			}
			for slots[perm[i][nextJ[i]]] != refEmpty {
				nextJ[i]++
			}
			slots[perm[i][nextJ[i]]] = uint32(i)
			nextJ[i]++
			owned[i]++
			filled++
		}
	}
	return slots
}

func TestBuildMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(4, 4))
	for trial := 0; trial < 200; trial++ {
		n := 1 + r.IntN(12)
		bs := equalBackends(n, 0)
		active := false
		for i := range bs {
			bs[i].Weight = uint32(r.IntN(20))
			active = active || bs[i].Weight > 0
		}
		if !active {
			bs[0].Weight = 3
		}
		m := sizes[r.IntN(3)]
		seed := testSeed(r)
		want := referenceBuild(bs, m, seed)
		for _, sched := range []scheduler{schedAuto, schedRounds, schedHeap} {
			tab, err := build(bs, m, seed, sched)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(tab.Slots(), want) {
				t.Fatalf("trial %d, scheduler %d: differs from the reference algorithm for %v M=%d", trial, sched, bs, m)
			}
		}
	}
}

// TestSchedulersAgree covers weights too uneven for referenceBuild: both
// schedulers must still produce the same table.
func TestSchedulersAgree(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 5))
	for trial := 0; trial < 40; trial++ {
		bs := equalBackends(1+r.IntN(200), 0)
		for i := range bs {
			bs[i].Weight = r.Uint32() >> uint(r.IntN(32))
		}
		bs[0].Weight = max(bs[0].Weight, 1)
		m := sizes[r.IntN(8)]
		seed := testSeed(r)
		a, errA := build(bs, m, seed, schedRounds)
		b, errB := build(bs, m, seed, schedHeap)
		if errA != nil || errB != nil {
			t.Fatal(errA, errB)
		}
		if !slices.Equal(a.Slots(), b.Slots()) {
			t.Fatalf("trial %d: schedulers disagree", trial)
		}
		checkInvariants(t, bs, a)
	}
}

// TestBuildMemory guards the "memory proportional to N" design: a build must
// not allocate anything like an N x M permutation matrix (~170 MB here).
func TestBuildMemory(t *testing.T) {
	bs := equalBackends(650, 1)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	mustBuild(t, bs, 65521, Seed{})
	runtime.ReadMemStats(&after)
	if got := after.TotalAlloc - before.TotalAlloc; got > 2<<20 {
		t.Errorf("Build(N=650, M=65521) allocated %d bytes, want < 2 MiB", got)
	}
}
