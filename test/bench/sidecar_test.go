package bench

import (
	"bytes"
	"math"
	"strings"
	"testing"
	"time"
)

func TestParseWorkload(t *testing.T) {
	for in, want := range map[string]Workload{
		"rr1":       {Name: "rr1", Size: 1, Conns: 1},
		"rr4k":      {Name: "rr4k", Size: 4096, Conns: 1},
		"rr64kx8":   {Name: "rr64kx8", Size: 64 << 10, Conns: 8},
		"stream":    {Name: "stream", Stream: true, Size: 64 << 10, Conns: 1},
		"stream16k": {Name: "stream16k", Stream: true, Size: 16 << 10, Conns: 1},
	} {
		got, err := ParseWorkload(in)
		if err != nil || got != want {
			t.Errorf("ParseWorkload(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "rr", "rr0", "rr-1", "rr2000k", "rr1x0", "rr1x65", "stream4", "streamx", "tcp_rr", "rr4m"} {
		if _, err := ParseWorkload(bad); err == nil {
			t.Errorf("ParseWorkload(%q): no error", bad)
		}
	}
	w, _ := ParseWorkload("rr1x4")
	if got := w.Describe(); got != "1 B request/response, 4 connections" {
		t.Errorf("Describe = %q", got)
	}
}

func TestHistPercentiles(t *testing.T) {
	h := Hist{}
	for i := 1; i <= 1000; i++ {
		h.Add(time.Duration(i) * time.Microsecond)
	}
	if h.Count() != 1000 {
		t.Fatalf("count %d", h.Count())
	}
	for p, want := range map[float64]time.Duration{50: 500 * time.Microsecond, 99: 990 * time.Microsecond, 100: time.Millisecond} {
		got := h.Percentile(p)
		if math.Abs(float64(got-want))/float64(want) > 0.02 {
			t.Errorf("p%v = %v, want %v ± 2%%", p, got, want)
		}
	}
	// Buckets are monotonic and every value lands in a bucket that holds it.
	prev := -1
	for ns := int64(0); ns < 1<<22; ns = ns*9/8 + 1 {
		i := histIndex(ns)
		if i < prev {
			t.Fatalf("index of %d ns (%d) below the previous (%d)", ns, i, prev)
		}
		prev = i
		if v := int64(histValue(i)); math.Abs(float64(v-ns)) > float64(ns)/64+1 {
			t.Fatalf("%d ns reported as %d", ns, v)
		}
	}
	o := Hist{}
	o.Add(5 * time.Second)
	h.Merge(o)
	if h.Count() != 1001 || h.Percentile(100) < 4900*time.Millisecond {
		t.Errorf("merge: count %d, max %v", h.Count(), h.Percentile(100))
	}
	if (Hist{}).Percentile(50) != 0 {
		t.Error("empty histogram has a percentile")
	}
}

// Consecutive transactions carry different bytes, so an answer that
// belongs to another transaction never passes the check.
func TestPayloadMoves(t *testing.T) {
	pool := PayloadPool(64 << 10)
	if !bytes.Equal(pool, PayloadPool(64<<10)) {
		t.Fatal("pool is not deterministic")
	}
	for k := uint64(0); k < 1000; k++ {
		a, b := RROffset(k), RROffset(k+1)
		if a == b || !bytes.Equal(pool[a:a+8], pool[a:a+8]) || bytes.Equal(pool[a:a+4096], pool[b:b+4096]) {
			t.Fatalf("transactions %d and %d carry the same bytes", k, k+1)
		}
		if a+64<<10 > len(pool) {
			t.Fatalf("offset %d out of the pool", a)
		}
	}
	if len(Hello("x")) != helloSize || bytes.Equal(Hello("a"), Hello("b")) {
		t.Error("hello")
	}
}

func TestSidecarTables(t *testing.T) {
	w, _ := ParseWorkload("rr1")
	mk := func(cfg, proxy string, rates ...float64) *SidecarCell {
		return &SidecarCell{Topology: 1, Workload: w, Config: cfg, Proxy: proxy, Rates: rates,
			P50: []time.Duration{time.Millisecond}, P99: []time.Duration{2 * time.Millisecond}, CPU: []float64{100}}
	}
	r := &SidecarReport{Cells: []*SidecarCell{
		mk(SCDirect, "", 30000, 30000), mk(SCIPTables, "go", 10000, 8000), mk(SCOff, "go", 11000, 8800),
		mk(SCAuto, "go", 11000, 9000), mk(SCOn, "go", 15000, 12000),
	}}
	if got := PairedRatio(r.Cell(1, "rr1", SCOn, "go"), r.Cell(1, "rr1", SCIPTables, "go")); got != 1.5 {
		t.Errorf("paired on/iptables = %v, want 1.5", got)
	}
	tab := r.ThroughputTable()
	for _, s := range []string{"| 1 | go | 1 B request/response | 30,000 | 9,000 | 9,900 | 10,000 | 13,500 | 1.10× | 1.11× | 1.50× | ≥ 1.5× | 1.01× |"} {
		if !strings.Contains(tab, s) {
			t.Errorf("throughput table lacks %q:\n%s", s, tab)
		}
	}
	lines := strings.Join(r.TargetLines(), "\n")
	if !strings.Contains(lines, "on/iptables 1.50 (≥ 1.5: met; by CPU per transaction 1.00)") || !strings.Contains(lines, "auto/off 1.011 (≥ 0.98: met") {
		t.Errorf("target lines:\n%s", lines)
	}
}
