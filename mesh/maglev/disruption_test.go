package maglev

import (
	"fmt"
	"slices"
	"testing"
)

// TestDisruptionReport measures (and logs; run with -v) how many slots move
// when one backend is removed or added. Only invariants are asserted: every
// slot of a removed backend moves, every slot of an added backend moved to
// it, and everything else that moved did so between survivors.
func TestDisruptionReport(t *testing.T) {
	seed := Seed{'s', 'h', 'u', 'n', 't', '-', 'm', 'a', 'g', 'l', 'e', 'v'}
	for _, tc := range []struct {
		n int
		m uint32
	}{{100, 16381}, {650, 65521}, {1000, 131071}} {
		bs := equalBackends(tc.n, 1)
		base := mustBuild(t, bs, tc.m, seed)
		idxOf := func(tab *Table, key string) int {
			return slices.IndexFunc(tab.Backends(), func(b Backend) bool { return b.Key == key })
		}

		// Remove one backend.
		victim := bs[tc.n/2]
		removed := mustBuild(t, slices.Delete(slices.Clone(bs), tc.n/2, tc.n/2+1), tc.m, seed)
		moved, among := Disruption(base, removed)
		own := int(base.Counts()[idxOf(base, victim.Key)])
		if moved < own || moved != own+among || among < 0 || moved > int(tc.m) {
			t.Errorf("N=%d M=%d remove: moved %d, among survivors %d, victim owned %d", tc.n, tc.m, moved, among, own)
		}
		logDisruption(t, "remove", tc.n, tc.m, moved, among)

		// Add one backend.
		added := Backend{Key: "10.255.255.254:8080", Weight: 1}
		grown := mustBuild(t, append(slices.Clone(bs), added), tc.m, seed)
		moved, among = Disruption(base, grown)
		own = int(grown.Counts()[idxOf(grown, added.Key)])
		if moved < own || moved != own+among || moved > int(tc.m) {
			t.Errorf("N=%d M=%d add: moved %d, among survivors %d, new backend owns %d", tc.n, tc.m, moved, among, own)
		}
		logDisruption(t, "add", tc.n, tc.m, moved, among)

		// Symmetry of the measure: removing the added backend again.
		back, backAmong := Disruption(grown, base)
		if back != moved || backAmong != among {
			t.Errorf("Disruption not symmetric: %d/%d vs %d/%d", moved, among, back, backAmong)
		}
	}
}

func logDisruption(t *testing.T, what string, n int, m uint32, moved, among int) {
	t.Helper()
	t.Logf("N=%4d M=%6d %-6s: moved %5d slots (%5.2f%%), among survivors %4d (%4.2f%%), 1/N = %.2f%%",
		n, m, what, moved, pct(moved, m), among, pct(among, m), 100/float64(n))
}

func pct(x int, m uint32) float64 { return 100 * float64(x) / float64(m) }

func TestDisruptionEdgeCases(t *testing.T) {
	a := mustBuild(t, equalBackends(3, 1), 251, Seed{})
	b := mustBuild(t, equalBackends(3, 1), 509, Seed{})
	empty := mustBuild(t, nil, 251, Seed{})
	if m, s := Disruption(a, b); m != -1 || s != -1 {
		t.Errorf("different sizes: %d/%d", m, s)
	}
	if m, s := Disruption(nil, a); m != -1 || s != -1 {
		t.Errorf("nil: %d/%d", m, s)
	}
	if m, s := Disruption(a, a); m != 0 || s != 0 {
		t.Errorf("same table: %d/%d", m, s)
	}
	if m, s := Disruption(a, empty); m != 251 || s != 0 {
		t.Errorf("to empty: %d/%d", m, s)
	}
	if m, s := Disruption(empty, a); m != 251 || s != 0 {
		t.Errorf("from empty: %d/%d", m, s)
	}
	// Changing a weight keeps every backend a survivor: all moves count.
	w := equalBackends(3, 1)
	w[0].Weight = 2
	c := mustBuild(t, w, 251, Seed{})
	if m, s := Disruption(a, c); m == 0 || m != s {
		t.Errorf("reweight: moved %d, among survivors %d; want equal and > 0", m, s)
	}
}

func ExampleDisruption() {
	seed := Seed{'s', 'h', 'u', 'n', 't', '-', 'm', 'a', 'g', 'l', 'e', 'v'}
	before, _ := Build([]Backend{{"10.0.0.1:80", 1}, {"10.0.0.2:80", 1}, {"10.0.0.3:80", 1}}, 251, seed)
	after, _ := Build([]Backend{{"10.0.0.1:80", 1}, {"10.0.0.2:80", 1}}, 251, seed)
	moved, among := Disruption(before, after)
	fmt.Println(moved >= int(before.Counts()[2]), moved-among == int(before.Counts()[2]))
	// Output: true true
}
