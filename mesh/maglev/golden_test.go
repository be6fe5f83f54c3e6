package maglev

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// goldenCase is one pinned table. Backends are "key=weight" in input
// order, Counts the slots per backend in sorted order, Head the Keys owning
// the first 32 slots; Fingerprint covers every slot.
type goldenCase struct {
	Name        string   `json:"name"`
	M           uint32   `json:"m"`
	Seed        string   `json:"seed"`
	Backends    []string `json:"backends"`
	Fingerprint string   `json:"fingerprint"`
	Counts      string   `json:"counts"`
	Head        []string `json:"head"`
}

func encodeBackends(bs []Backend) []string {
	var out []string
	for _, b := range bs {
		out = append(out, b.Key+"="+strconv.FormatUint(uint64(b.Weight), 10))
	}
	return out
}

func decodeBackends(t *testing.T, in []string) []Backend {
	t.Helper()
	var bs []Backend
	for _, s := range in {
		i := strings.LastIndexByte(s, '=')
		w, err := strconv.ParseUint(s[i+1:], 10, 32)
		if i < 0 || err != nil {
			t.Fatalf("bad golden backend %q", s)
		}
		bs = append(bs, Backend{Key: s[:i], Weight: uint32(w)})
	}
	return bs
}

func goldenInputs() []goldenCase {
	ips := func(n int, w uint32) []string {
		var bs []Backend
		for i := 0; i < n; i++ {
			bs = append(bs, Backend{Key: "10.0.0." + strconv.Itoa(i+1) + ":80", Weight: w})
		}
		return encodeBackends(bs)
	}
	return []goldenCase{
		{Name: "m251-3-equal", M: 251, Seed: "c2h1bnQtbWFnbGV2", Backends: ips(3, 1)},
		{Name: "m251-3-equal-zero-seed", M: 251, Seed: "AAAAAAAAAAAAAAAA", Backends: ips(3, 1)},
		{Name: "m251-weighted-drain", M: 251, Seed: "c2h1bnQtbWFnbGV2", Backends: []string{
			"10.0.0.1:80=1", "10.0.0.2:80=2", "10.0.0.3:80=3", "10.0.0.4:80=0",
		}},
		{Name: "m509-ipv6-mixed", M: 509, Seed: "q83vASNFZ4mrze8B", Backends: []string{
			"[2001:db8::1]:443=100", "[2001:db8::2]:443=100", "10.1.2.3:443=50",
			"[2001:db8::a]:443=250", "10.1.2.4:443=1",
		}},
		{Name: "m2039-very-uneven", M: 2039, Seed: "q83vASNFZ4mrze8B", Backends: []string{
			"a=4294967295", "b=1", "c=65536", "d=4000000000", "e=3", "f=0", "g=123456789",
		}},
		{Name: "m16381-100-equal", M: 16381, Seed: "c2h1bnQtbWFnbGV2", Backends: ips(100, 7)},
		{Name: "m251-all-drained", M: 251, Seed: "c2h1bnQtbWFnbGV2", Backends: ips(3, 0)},
	}
}

func computeGolden(t *testing.T, in goldenCase) goldenCase {
	t.Helper()
	seed, err := ParseSeed(in.Seed)
	if err != nil {
		t.Fatal(err)
	}
	tab, err := Build(decodeBackends(t, in.Backends), in.M, seed)
	if err != nil {
		t.Fatalf("%s: %v", in.Name, err)
	}
	out := in
	out.Fingerprint = tab.Fingerprint()
	out.Counts = strings.Trim(fmt.Sprint(tab.Counts()), "[]")
	out.Head = nil
	bs := tab.Backends()
	for i, s := range tab.Slots() {
		if i == 32 {
			break
		}
		out.Head = append(out.Head, bs[s].Key)
	}
	return out
}

// TestGolden pins fingerprints, slot counts and the first slots of a few
// tables. Regenerate with `go test -run TestGolden -update` only when a
// change to the table contents is intended: every node in a cluster must run
// the same algorithm, so such a change needs a coordinated rollout.
func TestGolden(t *testing.T) {
	path := filepath.Join("testdata", "golden.json")
	if *update {
		var all []goldenCase
		for _, in := range goldenInputs() {
			all = append(all, computeGolden(t, in))
		}
		data, err := json.MarshalIndent(all, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var want []goldenCase
	if err := json.Unmarshal(data, &want); err != nil {
		t.Fatal(err)
	}
	if len(want) != len(goldenInputs()) {
		t.Fatalf("golden file has %d cases, code has %d; run with -update", len(want), len(goldenInputs()))
	}
	for _, w := range want {
		t.Run(w.Name, func(t *testing.T) {
			got := computeGolden(t, w)
			if got.Fingerprint != w.Fingerprint {
				t.Errorf("fingerprint %s, want %s", got.Fingerprint, w.Fingerprint)
			}
			if got.Counts != w.Counts {
				t.Errorf("counts %v, want %v", got.Counts, w.Counts)
			}
			if !slices.Equal(got.Head, w.Head) {
				t.Errorf("first slots\n got %v\nwant %v", got.Head, w.Head)
			}
		})
	}
}
