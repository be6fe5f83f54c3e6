package maglev

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
)

// Backend is one member of a service as Maglev sees it.
type Backend struct {
	// Key is the backend's stable identity, for example "10.0.0.1:80". Tables
	// are built from backends sorted by Key, so every node must derive the
	// same Key for the same backend. Must not be empty.
	Key string
	// Weight is the relative share of slots. 0 drains the backend: it owns no
	// slot and receives no new flows.
	Weight uint32
}

// NoBackend is what [Table.Lookup] returns on an empty table.
const NoBackend = -1

var (
	// ErrDuplicateKey: two backends share a Key.
	ErrDuplicateKey = errors.New("maglev: duplicate backend key")
	// ErrEmptyKey: a backend has an empty Key.
	ErrEmptyKey = errors.New("maglev: empty backend key")
	// ErrTooManyBackends: more backends with weight > 0 than table slots.
	ErrTooManyBackends = errors.New("maglev: more backends than table slots")
)

// Table is an immutable Maglev lookup table. It is safe for concurrent use.
type Table struct {
	m        uint32
	seed     Seed
	backends []Backend // sorted by Key
	slots    []uint32  // len m, index into backends; nil when empty
	counts   []uint32  // slots owned, per backend

	fpOnce sync.Once
	fp     string
}

// Build computes the table of size m for backends with seed; see the package
// documentation for the algorithm. The input slice is not modified and its
// order does not matter. Errors: an unsupported m ([ErrInvalidSize]), an empty
// or duplicate Key ([ErrEmptyKey], [ErrDuplicateKey]), or more backends with
// weight > 0 than slots ([ErrTooManyBackends]). If no backend has weight > 0,
// Build returns an empty table (see [Table.Empty]) and a nil error.
func Build(backends []Backend, m uint32, seed Seed) (*Table, error) {
	return build(backends, m, seed, schedAuto)
}

// scheduler selects how turns are ordered; all give identical tables.
type scheduler int

const (
	schedAuto   scheduler = iota // by cost, see populate
	schedRounds                  // scan every backend once per round
	schedHeap                    // min-heap by (round, index)
)

func build(backends []Backend, m uint32, seed Seed, sched scheduler) (*Table, error) {
	if err := ValidateSize(m); err != nil {
		return nil, err
	}
	sorted := slices.Clone(backends)
	// The sort key (Key, byte-wise) must never change: see the package doc.
	slices.SortFunc(sorted, func(a, b Backend) int { return strings.Compare(a.Key, b.Key) })

	active := 0
	var wsum, wmax uint64
	for i, b := range sorted {
		if b.Key == "" {
			return nil, ErrEmptyKey
		}
		if i > 0 && sorted[i-1].Key == b.Key {
			return nil, fmt.Errorf("%w %q", ErrDuplicateKey, b.Key)
		}
		if b.Weight > 0 {
			active++
			wsum += uint64(b.Weight)
			wmax = max(wmax, uint64(b.Weight))
		}
	}
	if uint64(active) > uint64(m) {
		return nil, fmt.Errorf("%w: %d backends with weight > 0, table size %d", ErrTooManyBackends, active, m)
	}

	t := &Table{m: m, seed: seed, backends: sorted, counts: make([]uint32, len(sorted))}
	if active == 0 {
		return t, nil
	}
	t.slots = populate(sorted, active, wsum, wmax, m, seed, t.counts, sched)
	return t, nil
}

// backendState is the per-backend build state; only backends with a
// positive quota get one, in sorted-Key order.
type backendState struct {
	idx          uint32 // index into the sorted backends
	pos, skip    uint32 // next slot of the permutation, and its step
	count, quota uint32 // slots owned so far, slots to own
	// The next turn (the k-th) is in round ceil(k*wmax/w). It is tracked as
	// k*wmax = q*w + r and advanced by wmax = qs*w + rs, so no division
	// happens per slot.
	w, q, r, qs, rs uint64
}

func (s *backendState) round() uint64 {
	if s.r > 0 {
		return s.q + 1
	}
	return s.q
}

func (s *backendState) advance() {
	s.q += s.qs
	s.r += s.rs
	if s.r >= s.w {
		s.r -= s.w
		s.q++
	}
}

// populate fills the slots; counts receives the slots owned per backend.
func populate(bs []Backend, active int, wsum, wmax uint64, m uint32, seed Seed, counts []uint32, sched scheduler) []uint32 {
	st := quotas(bs, active, wsum, m)
	for k := range st {
		s := &st[k]
		key := bs[s.idx].Key
		s.pos = murmur3(key, seed.OffsetSeed()) % m
		s.skip = murmur3(key, seed.SkipSeed())%(m-1) + 1
		s.w = uint64(bs[s.idx].Weight)
		s.qs, s.rs = wmax/s.w, wmax%s.w
		s.q, s.r = s.qs, s.rs // k = 1
	}

	f := filler{m: m, slots: make([]uint32, m), used: make([]uint64, (m+63)/64)}
	// Both schedulers take turns in exactly the same (round, index) order;
	// they differ only in cost. Scanning all backends once per round costs
	// O(N) per round, and there are about M*wmax/W rounds, so it is cheap
	// while wmax is at most a few times the mean weight (always true for
	// equal weights). Very uneven weights use a heap: O(log N) per turn.
	if sched == schedAuto {
		sched = schedHeap
		if uint64(len(st))*wmax <= 4*wsum {
			sched = schedRounds
		}
	}
	if sched == schedRounds {
		f.byRounds(st)
	} else {
		f.byHeap(st)
	}
	for _, s := range st {
		counts[s.idx] = s.count
	}
	return f.slots
}

// quotas computes each active backend's slot quota by largest remainder and
// returns states for the backends whose quota is positive.
func quotas(bs []Backend, active int, wsum uint64, m uint32) []backendState {
	// M*w < 2^17 * 2^32 and W < 2^17 * 2^32 (at most M active backends),
	// so all of this fits in uint64.
	st := make([]backendState, 0, active)
	rem := make([]uint64, 0, active)
	var assigned uint64
	for i, b := range bs {
		if b.Weight == 0 {
			continue
		}
		num := uint64(m) * uint64(b.Weight)
		st = append(st, backendState{idx: uint32(i), quota: uint32(num / wsum)})
		rem = append(rem, num%wsum)
		assigned += num / wsum
	}
	if extra := uint64(m) - assigned; extra > 0 { // extra < active
		order := make([]int, len(st))
		for k := range order {
			order[k] = k
		}
		slices.SortFunc(order, func(a, b int) int {
			switch {
			case rem[a] > rem[b]:
				return -1
			case rem[a] < rem[b]:
				return 1
			}
			return a - b
		})
		for _, k := range order[:extra] {
			st[k].quota++
		}
	}
	return slices.DeleteFunc(st, func(s backendState) bool { return s.quota == 0 })
}

// filler claims slots along the backends' permutations.
type filler struct {
	m     uint32
	slots []uint32
	used  []uint64 // occupancy bitmap: small enough to stay in L1 while probing
}

// take gives backend s the next free slot on its permutation; it reports
// whether s still wants more slots.
func (f *filler) take(s *backendState) bool {
	pos, step, m := s.pos, s.skip, f.m
	for f.used[pos>>6]&(1<<(pos&63)) != 0 {
		pos += step
		if pos >= m {
			pos -= m
		}
	}
	f.used[pos>>6] |= 1 << (pos & 63)
	f.slots[pos] = s.idx
	pos += step
	if pos >= m {
		pos -= m
	}
	s.pos = pos
	s.count++
	s.advance()
	return s.count < s.quota
}

// byRounds visits the backends in index order once per round that has at
// least one turn, jumping over rounds in which nobody moves.
func (f *filler) byRounds(st []backendState) {
	act := make([]*backendState, len(st))
	r := uint64(math.MaxUint64)
	for k := range st {
		act[k] = &st[k]
		r = min(r, st[k].round())
	}
	for len(act) > 0 {
		nextR := uint64(math.MaxUint64)
		keep := act[:0]
		for _, s := range act {
			if s.round() == r && !f.take(s) {
				continue // quota reached
			}
			nextR = min(nextR, s.round())
			keep = append(keep, s)
		}
		act, r = keep, nextR
	}
}

// byHeap takes turns from a binary min-heap ordered by (round, index).
func (f *filler) byHeap(st []backendState) {
	h := make([]*backendState, len(st))
	for k := range st {
		h[k] = &st[k]
	}
	for k := len(h)/2 - 1; k >= 0; k-- {
		siftDown(h, k)
	}
	for len(h) > 0 {
		if !f.take(h[0]) {
			h[0] = h[len(h)-1]
			h = h[:len(h)-1]
		}
		if len(h) > 0 {
			siftDown(h, 0)
		}
	}
}

func before(a, b *backendState) bool {
	ra, rb := a.round(), b.round()
	return ra < rb || (ra == rb && a.idx < b.idx)
}

func siftDown(h []*backendState, i int) {
	n := len(h)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		c := l
		if r := l + 1; r < n && before(h[r], h[l]) {
			c = r
		}
		if !before(h[c], h[i]) {
			return
		}
		h[i], h[c] = h[c], h[i]
		i = c
	}
}

// Size returns M, the number of slots.
func (t *Table) Size() uint32 { return t.m }

// Seed returns the seed the table was built with.
func (t *Table) Seed() Seed { return t.seed }

// Empty reports whether no backend owns a slot (no backend, or all drained).
func (t *Table) Empty() bool { return t.slots == nil }

// Backends returns a copy of the backends sorted by Key, including drained
// ones. Slot values and [Table.Lookup] results index this list.
func (t *Table) Backends() []Backend { return slices.Clone(t.backends) }

// Slots returns a copy of the M slot values, each an index into
// [Table.Backends]; nil for an empty table.
func (t *Table) Slots() []uint32 { return slices.Clone(t.slots) }

// Counts returns how many slots each backend owns, aligned with
// [Table.Backends].
func (t *Table) Counts() []uint32 { return slices.Clone(t.counts) }

// Lookup returns the index into [Table.Backends] of the backend owning slot
// hash % M, or [NoBackend] if the table is empty.
func (t *Table) Lookup(hash uint32) int {
	if t.slots == nil {
		return NoBackend
	}
	return int(t.slots[hash%t.m])
}

// LookupBackend is [Table.Lookup] returning the Backend itself; ok is false
// for an empty table.
func (t *Table) LookupBackend(hash uint32) (b Backend, ok bool) {
	i := t.Lookup(hash)
	if i == NoBackend {
		return Backend{}, false
	}
	return t.backends[i], true
}

// Fingerprint is a short digest of the table (16 lowercase hex characters)
// that nodes compare to prove they built the same table. It is the first 8
// bytes of SHA-256 over, in order:
//
//  1. M as a little-endian uint32;
//  2. the 12 seed bytes;
//  3. K, the number of backends owning at least one slot, little-endian
//     uint32, then for each of them in sorted Key order the Key's length as
//     a little-endian uint32 followed by the Key's bytes;
//  4. for each slot 0..M-1 the position of its backend within the list of
//     step 3, as a little-endian uint32 (nothing for an empty table).
//
// It therefore covers M, the seed and the slot -> Key mapping, but not
// weights or drained backends, which do not affect the mapping.
func (t *Table) Fingerprint() string {
	t.fpOnce.Do(func() { t.fp = t.fingerprint() })
	return t.fp
}

func (t *Table) fingerprint() string {
	h := sha256.New()
	var w [4]byte
	put := func(v uint32) {
		binary.LittleEndian.PutUint32(w[:], v)
		h.Write(w[:])
	}
	put(t.m)
	h.Write(t.seed[:])
	pos := make([]uint32, len(t.backends))
	var k uint32
	for i, c := range t.counts {
		if c > 0 {
			pos[i] = k
			k++
		}
	}
	put(k)
	for i, b := range t.backends {
		if t.counts[i] > 0 {
			put(uint32(len(b.Key)))
			h.Write([]byte(b.Key))
		}
	}
	buf := make([]byte, 0, 4096)
	for _, s := range t.slots {
		buf = binary.LittleEndian.AppendUint32(buf, pos[s])
		if len(buf) == cap(buf) {
			h.Write(buf)
			buf = buf[:0]
		}
	}
	h.Write(buf)
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// Disruption compares two tables slot by slot. moved counts the slots whose
// owner (by Key) differs, including slots that gain or lose an owner because
// one table is empty. movedAmongSurvivors counts the moved slots whose old
// and new owners are both survivors: backends with weight > 0 in both tables.
// Those moves are not caused by a backend coming or going (or being drained)
// and are the "extra" disruption of Maglev on top of the unavoidable share.
// Both tables must be non-nil and of the same size; otherwise Disruption
// returns (-1, -1).
func Disruption(before, after *Table) (moved int, movedAmongSurvivors int) {
	if before == nil || after == nil || before.m != after.m {
		return -1, -1
	}
	afterIdx := make(map[string]int, len(after.backends))
	for i, b := range after.backends {
		afterIdx[b.Key] = i
	}
	// toAfter maps a before index to the after index of the same Key, or -1.
	toAfter := make([]int, len(before.backends))
	survBefore := make([]bool, len(before.backends))
	survAfter := make([]bool, len(after.backends))
	for i, b := range before.backends {
		j, ok := afterIdx[b.Key]
		if !ok {
			toAfter[i] = -1
			continue
		}
		toAfter[i] = j
		if b.Weight > 0 && after.backends[j].Weight > 0 {
			survBefore[i] = true
			survAfter[j] = true
		}
	}
	for s := uint32(0); s < before.m; s++ {
		bi, ai := NoBackend, NoBackend
		if before.slots != nil {
			bi = int(before.slots[s])
		}
		if after.slots != nil {
			ai = int(after.slots[s])
		}
		switch {
		case bi == NoBackend && ai == NoBackend:
			continue
		case bi == NoBackend || ai == NoBackend:
			moved++
		case toAfter[bi] != ai:
			moved++
			if survBefore[bi] && survAfter[ai] {
				movedAmongSurvivors++
			}
		}
	}
	return moved, movedAmongSurvivors
}
