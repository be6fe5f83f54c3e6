package maglev

import (
	"encoding/binary"
	"errors"
	"slices"
	"strconv"
	"testing"
)

// FuzzBuild decodes a seed, a small table size and a backend list from
// arbitrary bytes; Build must never panic and every table it returns must
// keep the invariants (checkInvariants) and not depend on input order.
//
// data is a sequence of 5-byte records: one byte selecting the Key (so
// duplicates happen), four bytes of little-endian weight (full uint32 range,
// so extreme weight ratios happen).
func FuzzBuild(f *testing.F) {
	f.Add([]byte("shunt-maglev"), uint8(0), []byte{1, 1, 0, 0, 0, 2, 2, 0, 0, 0, 3, 0, 0, 0, 0})
	f.Add([]byte{}, uint8(1), []byte{1, 0xff, 0xff, 0xff, 0xff, 2, 1, 0, 0, 0})
	f.Add([]byte("0123456789ab"), uint8(2), []byte{7, 5, 0, 0, 0, 7, 5, 0, 0, 0})
	f.Add([]byte{9}, uint8(3), []byte{})
	f.Fuzz(func(t *testing.T, seedBytes []byte, sizeSel uint8, data []byte) {
		var seed Seed
		copy(seed[:], seedBytes)
		m := sizes[int(sizeSel)%4] // 251..2039 keeps each run fast
		var bs []Backend
		dup := false
		seen := map[string]bool{}
		for len(data) >= 5 && len(bs) < 300 {
			key := "10.0.0." + strconv.Itoa(int(data[0])) + ":80"
			if seen[key] {
				dup = true
			}
			seen[key] = true
			bs = append(bs, Backend{Key: key, Weight: binary.LittleEndian.Uint32(data[1:5])})
			data = data[5:]
		}
		active := 0
		for _, b := range bs {
			if b.Weight > 0 {
				active++
			}
		}
		tab, err := Build(bs, m, seed)
		switch {
		case dup:
			if !errors.Is(err, ErrDuplicateKey) {
				t.Fatalf("duplicate keys: got %v", err)
			}
			return
		case active > int(m):
			if !errors.Is(err, ErrTooManyBackends) {
				t.Fatalf("%d active backends, M=%d: got %v", active, m, err)
			}
			return
		case err != nil:
			t.Fatalf("unexpected error: %v", err)
		}
		checkInvariants(t, bs, tab)
		if tab.Empty() != (active == 0) {
			t.Fatalf("Empty() = %v with %d active backends", tab.Empty(), active)
		}
		rev := slices.Clone(bs)
		slices.Reverse(rev)
		tab2, err := Build(rev, m, seed)
		if err != nil || tab2.Fingerprint() != tab.Fingerprint() {
			t.Fatalf("reversed input: %v, fingerprint %s vs %s", err, tab2.Fingerprint(), tab.Fingerprint())
		}
		for _, sched := range []scheduler{schedRounds, schedHeap} {
			if tab3, err := build(bs, m, seed, sched); err != nil || tab3.Fingerprint() != tab.Fingerprint() {
				t.Fatalf("scheduler %d disagrees: %v", sched, err)
			}
		}
		if moved, among := Disruption(tab, tab2); moved != 0 || among != 0 {
			t.Fatalf("identical tables: disruption %d/%d", moved, among)
		}
	})
}
