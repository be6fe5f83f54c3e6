package agent

import (
	"github.com/shuntmesh/shunt/mesh"
)

// ExpandSlots turns a service's selectable backends (mesh.Service.ActiveSet:
// weight > 0, sorted) into the slot list the datapath picks from uniformly at
// random: each backend appears in proportion to its weight.
//
// Weights are first divided by their greatest common divisor, so 1:1 gives
// one slot each and 3:1 four slots. When the reduced weights sum to more
// than limit, slots are apportioned by largest remainder over limit slots,
// with at least one slot per backend; a backend's share then deviates from
// its weight by less than 1/limit.
func ExpandSlots(backends []mesh.Backend, limit int) []int {
	if len(backends) == 0 {
		return nil
	}
	g := uint64(0)
	for _, b := range backends {
		g = gcd(g, uint64(b.Weight))
	}
	if g == 0 {
		return nil
	}
	w := make([]uint64, len(backends))
	var total uint64
	for i, b := range backends {
		w[i] = uint64(b.Weight) / g
		total += w[i]
	}
	counts := make([]uint64, len(backends))
	if total <= uint64(limit) {
		copy(counts, w)
	} else {
		counts = apportion(w, total, uint64(max(limit, len(backends))))
	}
	var out []int
	// Interleave so that any prefix of the slot list is already mixed.
	for round := uint64(0); ; round++ {
		added := false
		for i, c := range counts {
			if round < c {
				out = append(out, i)
				added = true
			}
		}
		if !added {
			return out
		}
	}
}

// apportion distributes n slots over weights w (sum total) by largest
// remainder, giving each at least one.
func apportion(w []uint64, total, n uint64) []uint64 {
	counts := make([]uint64, len(w))
	rem := make([]uint64, len(w))
	var used uint64
	for i, x := range w {
		q := x * n
		counts[i] = q / total
		rem[i] = q % total
		if counts[i] == 0 {
			counts[i] = 1
			rem[i] = 0
		}
		used += counts[i]
	}
	for used < n {
		best := -1
		for i := range w {
			if best < 0 || rem[i] > rem[best] {
				best = i
			}
		}
		counts[best]++
		rem[best] = 0
		used++
	}
	// The at-least-one rule can overshoot: take from the largest.
	for used > n {
		big := 0
		for i := range counts {
			if counts[i] > counts[big] {
				big = i
			}
		}
		counts[big]--
		used--
	}
	return counts
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}
