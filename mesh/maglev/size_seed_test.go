package maglev

import (
	"errors"
	"slices"
	"testing"
)

const allowedList = "(allowed: 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)"

func TestValidateSize(t *testing.T) {
	for _, m := range Sizes() {
		if err := ValidateSize(m); err != nil {
			t.Errorf("ValidateSize(%d) = %v", m, err)
		}
	}
	if ValidateSize(DefaultSize) != nil {
		t.Error("DefaultSize not valid")
	}
	for _, tc := range []struct {
		m    uint32
		want string
	}{
		{0, "invalid maglev table size 0: not prime " + allowedList},
		{1, "invalid maglev table size 1: not prime " + allowedList},
		{2, "invalid maglev table size 2: prime but not a supported preset " + allowedList},
		{1000, "invalid maglev table size 1000: not prime " + allowedList},
		{16384, "invalid maglev table size 16384: not prime " + allowedList},
		{65537, "invalid maglev table size 65537: prime but not a supported preset " + allowedList},
		{65519, "invalid maglev table size 65519: prime but not a supported preset " + allowedList},
		{4294967291, "invalid maglev table size 4294967291: prime but not a supported preset " + allowedList},
		{4294967295, "invalid maglev table size 4294967295: not prime " + allowedList},
	} {
		err := ValidateSize(tc.m)
		if err == nil || err.Error() != tc.want || !errors.Is(err, ErrInvalidSize) {
			t.Errorf("ValidateSize(%d) = %v\nwant %s", tc.m, err, tc.want)
		}
	}
	// Sizes returns a copy.
	s := Sizes()
	s[0] = 7
	if Sizes()[0] != 251 {
		t.Error("Sizes exposes internal state")
	}
}

func TestIsPrime(t *testing.T) {
	for _, m := range Sizes() {
		if !isPrime(m) {
			t.Errorf("preset %d not prime", m)
		}
	}
	var got []uint32
	for m := uint32(0); m < 40; m++ {
		if isPrime(m) {
			got = append(got, m)
		}
	}
	if want := []uint32{2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37}; !slices.Equal(got, want) {
		t.Errorf("primes below 40: %v", got)
	}
}

func TestRecommendSize(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want uint32
	}{
		{-1, 251}, {0, 251}, {1, 251}, {2, 251}, {3, 509}, {163, 16381}, {164, 32749},
		{650, 65521}, {655, 65521}, {656, 131071}, {1000, 131071}, {1310, 131071},
	} {
		got, err := RecommendSize(tc.n)
		if err != nil || got != tc.want {
			t.Errorf("RecommendSize(%d) = %d, %v; want %d", tc.n, got, err, tc.want)
		}
		if got < uint32(max(tc.n, 0))*100 {
			t.Errorf("RecommendSize(%d) = %d < 100N", tc.n, got)
		}
	}
	got, err := RecommendSize(1311)
	if got != 131071 || !errors.Is(err, ErrInvalidSize) ||
		err.Error() != "invalid maglev table size: 1311 backends need M >= 131100, the largest preset is 131071" {
		t.Errorf("RecommendSize(1311) = %d, %v", got, err)
	}
}

func TestParseSeed(t *testing.T) {
	s, err := ParseSeed("c2h1bnQtbWFnbGV2") // "shunt-maglev"
	if err != nil {
		t.Fatal(err)
	}
	if string(s[:]) != "shunt-maglev" || s.String() != "c2h1bnQtbWFnbGV2" {
		t.Fatalf("got %q / %s", s[:], s)
	}
	// Little-endian words: "shun" "t-ma" "glev".
	if s.OffsetSeed() != 0x6e756873 || s.SkipSeed() != 0x616d2d74 || s.DatapathSeed() != 0x76656c67 {
		t.Errorf("words %#x %#x %#x", s.OffsetSeed(), s.SkipSeed(), s.DatapathSeed())
	}
	// base64 -w0 output never has a newline, but a file read verbatim might.
	if s2, err := ParseSeed("c2h1bnQtbWFnbGV2\n"); err != nil || s2 != s {
		t.Errorf("trailing newline: %v", err)
	}

	const hint = " (generate one with: head -c12 /dev/urandom | base64 -w0)"
	for _, tc := range []struct{ in, want string }{
		{"", "invalid maglev seed: empty" + hint},
		{"c2h1bnQt-WFnbGV2", `invalid maglev seed: not standard base64: illegal character '-' at position 8 (URL-safe alphabet; use standard base64 with '+' and '/')` + hint},
		{"c2h1bnQt_WFnbGV2", `invalid maglev seed: not standard base64: illegal character '_' at position 8 (URL-safe alphabet; use standard base64 with '+' and '/')` + hint},
		{" c2h1bnQtbWFnbGV2", `invalid maglev seed: not standard base64: illegal character ' ' at position 0` + hint},
		{"c2h1bnQtbWFnbGV", `invalid maglev seed: not standard base64: unexpected data at position 12 (truncated group, or data after '=' padding)` + hint},
		{"YQ=", `invalid maglev seed: not standard base64: input ends early at position 3 (truncated, or missing '=' padding)` + hint},
		{"YW=j", `invalid maglev seed: not standard base64: misplaced '=' padding at position 2` + hint},
		{"YWJj", "invalid maglev seed: decodes to 3 bytes, want 12" + hint},
		{"c2h1bnQtbWFnbGV2YQ==", "invalid maglev seed: decodes to 13 bytes, want 12" + hint},
		{"AAAAAAAAAAAAAAAAAAAAAA==", "invalid maglev seed: decodes to 16 bytes, want 12" + hint},
	} {
		_, err := ParseSeed(tc.in)
		if err == nil || err.Error() != tc.want || !errors.Is(err, ErrInvalidSeed) {
			t.Errorf("ParseSeed(%q) = %v\nwant %s", tc.in, err, tc.want)
		}
	}
}

func TestSeedText(t *testing.T) {
	g, err := GenerateSeed()
	if err != nil {
		t.Fatal(err)
	}
	txt, _ := g.MarshalText()
	if len(txt) != 16 {
		t.Errorf("seed text %q, want 16 characters", txt)
	}
	var back Seed
	if err := back.UnmarshalText(txt); err != nil || back != g {
		t.Errorf("round trip: %v", err)
	}
	if err := back.UnmarshalText([]byte("nope")); !errors.Is(err, ErrInvalidSeed) {
		t.Errorf("UnmarshalText(nope) = %v", err)
	}
	if h, _ := GenerateSeed(); h == g {
		t.Error("two generated seeds are equal")
	}
}
