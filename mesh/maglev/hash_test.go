package maglev

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// Published MurmurHash3_x86_32 vectors (SMHasher / Wikipedia).
func TestMurmur3Vectors(t *testing.T) {
	for _, tc := range []struct {
		in   string
		seed uint32
		want uint32
	}{
		{"", 0, 0},
		{"", 1, 0x514e28b7},
		{"", 0xffffffff, 0x81f16f39},
		{"test", 0, 0xba6bd213},
		{"test", 0x9747b28c, 0x704b81dc},
		{"Hello, world!", 0, 0xc0363e43},
		{"Hello, world!", 0x9747b28c, 0x24884cba},
		{"Hello, world!", 1234, 0xfaf6cdb3},
		{"a", 0x9747b28c, 0x7fa09ea6},
		{"aa", 0x9747b28c, 0x5d211726},
		{"aaa", 0x9747b28c, 0x283e0130},
		{"aaaa", 0x9747b28c, 0x5a97808a},
		{"abc", 0, 0xb3dd93fa},
		{"The quick brown fox jumps over the lazy dog", 0, 0x2e4ff723},
		{"The quick brown fox jumps over the lazy dog", 0x9747b28c, 0x2fa826cd},
	} {
		if got := murmur3(tc.in, tc.seed); got != tc.want {
			t.Errorf("murmur3(%q, %#x) = %#08x, want %#08x", tc.in, tc.seed, got, tc.want)
		}
	}
}

// jhashBytes is Linux jhash() / lookup3 hashlittle() on a little-endian
// machine, built from the same mix and final steps as FlowHash. It exists to
// check those steps against Bob Jenkins' published vectors.
func jhashBytes(k []byte, initval uint32) uint32 {
	a := uint32(0xdeadbeef) + uint32(len(k)) + initval
	b, c := a, a
	for len(k) > 12 {
		a += binary.LittleEndian.Uint32(k[0:])
		b += binary.LittleEndian.Uint32(k[4:])
		c += binary.LittleEndian.Uint32(k[8:])
		a, b, c = jhashMix(a, b, c)
		k = k[12:]
	}
	if len(k) == 0 {
		return c
	}
	var tail [12]byte
	copy(tail[:], k)
	a += binary.LittleEndian.Uint32(tail[0:])
	b += binary.LittleEndian.Uint32(tail[4:])
	c += binary.LittleEndian.Uint32(tail[8:])
	_, _, c = jhashFinal(a, b, c)
	return c
}

func TestJhashVectors(t *testing.T) {
	for _, tc := range []struct {
		in   string
		seed uint32
		want uint32
	}{
		{"", 0, 0xdeadbeef},
		{"", 0xdeadbeef, 0xbd5b7dde},
		{"Four score and seven years ago", 0, 0x17770551},
		{"Four score and seven years ago", 1, 0xcd628161},
		{"jenkins", 0, 0x0c0e7df9},
	} {
		if got := jhashBytes([]byte(tc.in), tc.seed); got != tc.want {
			t.Errorf("jhash(%q, %#x) = %#08x, want %#08x", tc.in, tc.seed, got, tc.want)
		}
	}
	// jhash2 over words equals jhash over their little-endian bytes when the
	// length is a multiple of 4 bytes (true for lookup3 and for Linux).
	r := rand.New(rand.NewPCG(1, 2))
	for n := 0; n <= 13; n++ {
		w := make([]uint32, n)
		b := make([]byte, 4*n)
		for i := range w {
			w[i] = r.Uint32()
			binary.LittleEndian.PutUint32(b[4*i:], w[i])
		}
		seed := r.Uint32()
		if got, want := jhash2(w, seed), jhashBytes(b, seed); got != want {
			t.Errorf("jhash2(%d words) = %#08x, jhash(bytes) = %#08x", n, got, want)
		}
	}
}

func TestTupleWords(t *testing.T) {
	tu := NewTuple(netip.MustParseAddrPort("10.0.0.1:1234"), netip.MustParseAddrPort("192.168.1.2:80"), 6)
	w := tu.Words()
	want := [FlowWordCount]uint32{
		0, 0, 0xffff0000, 0x0100000a, // ::ffff:10.0.0.1, bytes 0a 00 00 01 loaded little-endian
		0, 0, 0xffff0000, 0x0201a8c0, // ::ffff:192.168.1.2
		0x5000d204, // bytes 04 d2 00 50: port 1234 then port 80, big endian on the wire
		6,
	}
	if w != want {
		t.Fatalf("Words() = %#x\nwant      %#x", w, want)
	}
	v6 := NewTuple(netip.MustParseAddrPort("[2001:db8::1]:443"), netip.MustParseAddrPort("[2001:db8::2]:8443"), 17)
	if got := v6.Words(); got[0] != 0xb80d0120 || got[3] != 0x01000000 || got[7] != 0x02000000 || got[9] != 17 {
		t.Fatalf("IPv6 words = %#x", got)
	}
	if FlowHash(tu, 0) == FlowHash(tu, 1) {
		t.Error("datapath seed does not change the hash")
	}
}

func randomTuple(r *rand.Rand) Tuple {
	var tu Tuple
	if r.IntN(2) == 0 {
		var a, b [4]byte
		binary.LittleEndian.PutUint32(a[:], r.Uint32())
		binary.LittleEndian.PutUint32(b[:], r.Uint32())
		tu.Src = netip.AddrFrom4(a).As16()
		tu.Dst = netip.AddrFrom4(b).As16()
	} else {
		for i := range tu.Src {
			tu.Src[i] = byte(r.Uint32())
			tu.Dst[i] = byte(r.Uint32())
		}
	}
	tu.SrcPort = uint16(r.Uint32())
	tu.DstPort = uint16(r.Uint32())
	tu.Proto = []uint8{6, 17, 1, 132}[r.IntN(4)]
	return tu
}

func formatFlow(tu Tuple, seed uint32) string {
	return fmt.Sprintf("%s %s %d %d %d %d", hex.EncodeToString(tu.Src[:]), hex.EncodeToString(tu.Dst[:]),
		tu.SrcPort, tu.DstPort, tu.Proto, seed)
}

func parseFlow(t *testing.T, f []string) (Tuple, uint32) {
	t.Helper()
	var tu Tuple
	src, err1 := hex.DecodeString(f[0])
	dst, err2 := hex.DecodeString(f[1])
	sp, err3 := strconv.ParseUint(f[2], 10, 16)
	dp, err4 := strconv.ParseUint(f[3], 10, 16)
	pr, err5 := strconv.ParseUint(f[4], 10, 8)
	sd, err6 := strconv.ParseUint(f[5], 10, 32)
	for _, err := range []error{err1, err2, err3, err4, err5, err6} {
		if err != nil {
			t.Fatalf("bad flow line %q: %v", f, err)
		}
	}
	copy(tu.Src[:], src)
	copy(tu.Dst[:], dst)
	tu.SrcPort, tu.DstPort, tu.Proto = uint16(sp), uint16(dp), uint8(pr)
	return tu, uint32(sd)
}

// TestFlowHashGolden pins FlowHash on fixed flows stored in testdata so any
// change to the hash or the word layout is caught. The file is also usable
// by the kernel-side test as input/expected-output pairs.
func TestFlowHashGolden(t *testing.T) {
	path := filepath.Join("testdata", "flowhash.golden")
	if *update {
		r := rand.New(rand.NewPCG(0x5348554e, 0x54464c4f))
		var buf bytes.Buffer
		buf.WriteString("# src dst sport dport proto datapath_seed hash (decimal); regenerate: go test -run TestFlowHashGolden -update\n")
		for i := 0; i < 256; i++ {
			tu, seed := randomTuple(r), r.Uint32()
			if i == 0 {
				tu, seed = NewTuple(netip.MustParseAddrPort("10.0.0.1:1234"), netip.MustParseAddrPort("10.0.0.2:80"), 6), 0
			}
			fmt.Fprintf(&buf, "%s %d\n", formatFlow(tu, seed), FlowHash(tu, seed))
		}
		if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 7 {
			t.Fatalf("bad line %q", line)
		}
		tu, seed := parseFlow(t, f)
		want, err := strconv.ParseUint(f[6], 10, 32)
		if err != nil {
			t.Fatal(err)
		}
		if got := FlowHash(tu, seed); got != uint32(want) {
			t.Errorf("FlowHash(%s) = %d, want %d", strings.Join(f[:6], " "), got, want)
		}
		n++
	}
	if n < 100 {
		t.Fatalf("only %d golden flows", n)
	}
}

// TestFlowHashMatchesC compiles testdata/flowhash_ref.c, a C version written
// the way the eBPF program loads header fields, and compares 10,000 random
// flows. Skipped when no C compiler is installed or the host is big-endian.
func TestFlowHashMatchesC(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("the C reference models a little-endian (bpfel) machine")
	}
	cc := ""
	for _, name := range []string{os.Getenv("CC"), "cc", "clang", "gcc"} {
		if name == "" {
			continue
		}
		if p, err := exec.LookPath(name); err == nil {
			cc = p
			break
		}
	}
	if cc == "" {
		t.Skip("no C compiler found")
	}
	bin := filepath.Join(t.TempDir(), "flowhash_ref")
	if out, err := exec.Command(cc, "-O2", "-Wall", "-Werror", "-o", bin, filepath.Join("testdata", "flowhash_ref.c")).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", cc, err, out)
	}
	r := rand.New(rand.NewPCG(7, 0x6d61676c))
	const n = 10000
	var in bytes.Buffer
	want := make([]uint32, n)
	for i := range want {
		tu, seed := randomTuple(r), r.Uint32()
		want[i] = FlowHash(tu, seed)
		in.WriteString(formatFlow(tu, seed))
		in.WriteByte('\n')
	}
	cmd := exec.Command(bin)
	cmd.Stdin = &in
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("running C reference: %v", err)
	}
	got := strings.Fields(string(out))
	if len(got) != n {
		t.Fatalf("C reference printed %d hashes, want %d", len(got), n)
	}
	bad := 0
	for i, s := range got {
		v, err := strconv.ParseUint(s, 10, 32)
		if err != nil || uint32(v) != want[i] {
			if bad++; bad <= 5 {
				t.Errorf("flow %d: C %s, Go %d", i, s, want[i])
			}
		}
	}
	if bad > 0 {
		t.Fatalf("%d of %d flows differ between C and Go", bad, n)
	}
}
