package bench

import (
	"math"
	"strings"
	"testing"
	"time"
)

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{10, 10, 1, 10, 1}, 10},
	} {
		in := append([]float64(nil), c.in...)
		if got := Median(c.in); got != c.want {
			t.Errorf("Median(%v) = %v, want %v", c.in, got, c.want)
		}
		for i := range in {
			if in[i] != c.in[i] {
				t.Errorf("Median reordered its input: %v", c.in)
			}
		}
	}
	if !math.IsNaN(Median(nil)) {
		t.Error("Median(nil) is not NaN")
	}
	if lo, hi := MinMax([]float64{3, 1, 2}); lo != 1 || hi != 3 {
		t.Errorf("MinMax = %v, %v", lo, hi)
	}
}

func TestRatio(t *testing.T) {
	if got := Ratio(3, 2); got != 1.5 {
		t.Errorf("Ratio(3, 2) = %v", got)
	}
	if !math.IsNaN(Ratio(1, 0)) || !math.IsNaN(Ratio(math.NaN(), 1)) {
		t.Error("Ratio by zero or of NaN is not NaN")
	}
	if got := FormatRatio(0.9649); got != "0.96×" {
		t.Errorf("FormatRatio = %q", got)
	}
	if got := FormatRatio(math.NaN()); got != "n/a" {
		t.Errorf("FormatRatio(NaN) = %q", got)
	}
}

func TestPercentile(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- { // unsorted on purpose
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	for p, want := range map[float64]time.Duration{50: 50 * time.Millisecond, 90: 90 * time.Millisecond,
		99: 99 * time.Millisecond, 100: 100 * time.Millisecond, 0.1: time.Millisecond} {
		if got := Percentile(ds, p); got != want {
			t.Errorf("p%v = %v, want %v", p, got, want)
		}
	}
	if got := Percentile([]time.Duration{7}, 99); got != 7 {
		t.Errorf("p99 of one = %v", got)
	}
	if got := Percentile(nil, 50); got != 0 {
		t.Errorf("p50 of none = %v", got)
	}
	// 200 samples: p99 is the 198th smallest, not the maximum.
	ds = ds[:0]
	for i := 1; i <= 200; i++ {
		ds = append(ds, time.Duration(i))
	}
	if got := Percentile(ds, 99); got != 198 {
		t.Errorf("p99 of 1..200 = %v, want 198", got)
	}
}

func TestFormatRate(t *testing.T) {
	for in, want := range map[float64]string{0: "0", 999.4: "999", 1000: "1,000", 23456.7: "23,457", 1234567: "1,234,567", -1500: "-1,500"} {
		if got := FormatRate(in); got != want {
			t.Errorf("FormatRate(%v) = %q, want %q", in, got, want)
		}
	}
	if got := FormatRate(math.NaN()); got != "n/a" {
		t.Errorf("FormatRate(NaN) = %q", got)
	}
}

func TestOrder(t *testing.T) {
	seen := map[[numConfigs]int]bool{}
	first := [numConfigs]int{}
	for rep := range numConfigs {
		o := Order(rep)
		seen[o] = true
		first[o[0]]++
	}
	if Order(0) != [numConfigs]int{cfgDirect, cfgShunt, cfgIPTables} {
		t.Errorf("Order(0) = %v", Order(0))
	}
	if len(seen) != numConfigs || first != [numConfigs]int{1, 1, 1} {
		t.Errorf("orders %v do not put each configuration first once", seen)
	}
	if Order(numConfigs) != Order(0) {
		t.Error("Order does not cycle")
	}
}

func TestSlices(t *testing.T) {
	for _, c := range []struct {
		d, slice time.Duration
		n        int
		each     time.Duration
	}{
		{2 * time.Second, 250 * time.Millisecond, 8, 250 * time.Millisecond},
		{2 * time.Second, 300 * time.Millisecond, 7, 2 * time.Second / 7},
		{2 * time.Second, 2 * time.Second, 1, 2 * time.Second},
		{time.Second, 5 * time.Second, 1, time.Second},
	} {
		n, each := Slices(c.d, c.slice)
		if n != c.n || each != c.each {
			t.Errorf("Slices(%v, %v) = %d, %v; want %d, %v", c.d, c.slice, n, each, c.n, c.each)
		}
	}
}

func TestConnectTable(t *testing.T) {
	rows := []ConnectRow{
		{N: 1, Direct: Summary{Rates: []float64{10000, 9000, 11000}}, Shunt: Summary{Rates: []float64{9800, 9900, 9700}},
			IPTables: Summary{Rates: []float64{8000, 8200, 8100}}},
		{N: 10000, Direct: Summary{Rates: []float64{10000, 10000, 10000}}, Shunt: Summary{Rates: []float64{9000, 9400, 9200}},
			IPTables: Summary{Rates: []float64{4000, 4600, 4500}}},
	}
	want := `| N | direct tx/s | shunt tx/s | iptables tx/s | shunt/direct | shunt/iptables |
|---:|---:|---:|---:|---:|---:|
| 1 | 10,000 | 9,800 | 8,100 | 0.98× | 1.21× |
| 10000 | 10,000 | 9,200 | 4,500 | 0.92× | 2.04× |
`
	if got := ConnectTable(rows); got != want {
		t.Errorf("ConnectTable:\n%s\nwant:\n%s", got, want)
	}
	pd, pi := rows[0].PairedRatios()
	if math.Abs(pd-0.98) > 1e-9 || math.Abs(pi-9900.0/8200) > 1e-9 {
		t.Errorf("PairedRatios = %v, %v", pd, pi)
	}
	lines := TargetLines(rows)
	if len(lines) != 3 || !strings.Contains(lines[0], ": met") || !strings.Contains(lines[1], "NOT met") || !strings.Contains(lines[2], "shunt/iptables 2.044") {
		t.Errorf("TargetLines = %q", lines)
	}
	spread := SpreadTable(rows)
	if !strings.Contains(spread, "| 1 | 9,000–11,000 | 9,700–9,900 | 8,000–8,200 |") {
		t.Errorf("SpreadTable:\n%s", spread)
	}
}

func TestUpdateTable(t *testing.T) {
	var ds []time.Duration
	for i := 1; i <= 100; i++ {
		ds = append(ds, time.Duration(i)*100*time.Microsecond)
	}
	got := UpdateTable(UpdateResult{Services: 3000, Backends: 30, Load: 1500 * time.Millisecond, Latencies: ds})
	want := `| services × backends | initial load | updates | p50 | p90 | p99 | max | mean |
|---|---:|---:|---:|---:|---:|---:|---:|
| 3000 × 30 | 1500.000 ms | 100 | 5.000 ms | 9.000 ms | 9.900 ms | 10.000 ms | 5.050 ms |
`
	if got != want {
		t.Errorf("UpdateTable:\n%s\nwant:\n%s", got, want)
	}
}
