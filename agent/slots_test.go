package agent

import (
	"net/netip"
	"testing"

	"github.com/shuntmesh/shunt/mesh"
)

func backends(weights ...uint32) []mesh.Backend {
	var out []mesh.Backend
	for i, w := range weights {
		out = append(out, mesh.Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)}), 80), Weight: w})
	}
	return out
}

func count(idx []int, n int) []int {
	c := make([]int, n)
	for _, i := range idx {
		c[i]++
	}
	return c
}

func TestExpandSlotsExactWeights(t *testing.T) {
	for _, tc := range []struct {
		weights []uint32
		want    []int
	}{
		{[]uint32{1, 1, 1}, []int{1, 1, 1}},
		{[]uint32{3, 1}, []int{3, 1}},
		{[]uint32{100, 200, 300}, []int{1, 2, 3}}, // reduced by the gcd
		{[]uint32{7}, []int{1}},
		{[]uint32{2, 3, 5}, []int{2, 3, 5}},
	} {
		got := count(ExpandSlots(backends(tc.weights...), 16384), len(tc.weights))
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("weights %v: slot counts %v, want %v", tc.weights, got, tc.want)
				break
			}
		}
	}
}

func TestExpandSlotsApportionsOverLimit(t *testing.T) {
	// Coprime large weights cannot be represented exactly in 100 slots.
	w := []uint32{65535, 1, 30000, 12345}
	idx := ExpandSlots(backends(w...), 100)
	if len(idx) != 100 {
		t.Fatalf("%d slots, want exactly the limit 100", len(idx))
	}
	c := count(idx, len(w))
	var total float64
	for _, x := range w {
		total += float64(x)
	}
	for i, x := range w {
		if c[i] < 1 {
			t.Errorf("backend %d with weight %d got no slot", i, x)
		}
		ideal := float64(x) / total * 100
		if d := float64(c[i]) - ideal; d > 1.5 || d < -1.5 {
			t.Errorf("backend %d: %d slots, ideal %.2f", i, c[i], ideal)
		}
	}
}

func TestExpandSlotsInterleaves(t *testing.T) {
	idx := ExpandSlots(backends(2, 2), 16384)
	if len(idx) != 2 || idx[0] == idx[1] {
		t.Fatalf("2:2 should reduce to one slot each, got %v", idx)
	}
	idx = ExpandSlots(backends(3, 1), 16384)
	if idx[0] != 0 || idx[1] != 1 {
		t.Errorf("first round should hold every backend once: %v", idx)
	}
}

func TestExpandSlotsEmpty(t *testing.T) {
	if got := ExpandSlots(nil, 10); got != nil {
		t.Errorf("no backends: %v", got)
	}
}

func TestActiveSetDrainAndTerminating(t *testing.T) {
	s := mesh.Service{Backends: backends(1, 0, 1)}
	s.Backends[2].State = mesh.Terminating
	set := s.ActiveSet()
	if len(set) != 1 || set[0].Addr != s.Backends[0].Addr {
		t.Fatalf("active set %v: want only the active, non-drained backend", set)
	}
	s.Backends[0].State = mesh.Terminating
	set = s.ActiveSet()
	if len(set) != 2 {
		t.Fatalf("with no active backend left the terminating ones (weight>0) serve: %v", set)
	}
	s.Backends[0].Weight, s.Backends[2].Weight = 0, 0
	if set := s.ActiveSet(); len(set) != 0 {
		t.Fatalf("all drained: %v", set)
	}
}
