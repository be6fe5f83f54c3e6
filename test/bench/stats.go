package bench

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Median returns the median of xs (the mean of the two middle values for an
// even count), NaN for none.
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// MinMax returns the smallest and largest of xs (NaN, NaN for none).
func MinMax(xs []float64) (lo, hi float64) {
	if len(xs) == 0 {
		return math.NaN(), math.NaN()
	}
	return slices.Min(xs), slices.Max(xs)
}

// Ratio is a/b, NaN when b is zero or either is NaN.
func Ratio(a, b float64) float64 {
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return math.NaN()
	}
	return a / b
}

// Percentile returns the p-th percentile (0 < p ≤ 100) of ds by the
// nearest-rank method: the smallest value with at least p% of the values at
// or below it. ds need not be sorted; 0 for none.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	rank := int(math.Ceil(p / 100 * float64(len(s))))
	rank = min(max(rank, 1), len(s))
	return s[rank-1]
}

// FormatRate formats a rate in transactions per second as a whole number
// with comma digit grouping: "23,456".
func FormatRate(x float64) string {
	if math.IsNaN(x) {
		return "n/a"
	}
	s := strconv.FormatInt(int64(math.Round(x)), 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// FormatRatio formats a ratio as "0.97×".
func FormatRatio(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "n/a"
	}
	return fmt.Sprintf("%.2f×", x)
}

// FormatDuration formats d in milliseconds with microsecond precision.
func FormatDuration(d time.Duration) string {
	return fmt.Sprintf("%.3f ms", float64(d)/float64(time.Millisecond))
}

// Summary is the distribution of one configuration's repetitions.
type Summary struct {
	// Rates are the transactions/s of each repetition, in run order.
	Rates []float64
	// CPU is the client process's CPU time (user+system) per transaction of
	// each repetition, in microseconds.
	CPU []float64
}

// Median transactions/s.
func (s Summary) Median() float64 { return Median(s.Rates) }

// Spread formats "min–max".
func (s Summary) Spread() string {
	lo, hi := MinMax(s.Rates)
	return FormatRate(lo) + "–" + FormatRate(hi)
}

// ConnectRow is one service count's results.
type ConnectRow struct {
	N                        int
	Direct, Shunt, IPTables  Summary
	ShuntLoad, IPTablesLoad  time.Duration // time to install the N services
	Translations, ShuntConns uint64        // Shunt's counter vs the shunt client's connects
}

// Ratios returns shunt/direct and shunt/iptables of the medians.
func (r ConnectRow) Ratios() (vsDirect, vsIPTables float64) {
	s := r.Shunt.Median()
	return Ratio(s, r.Direct.Median()), Ratio(s, r.IPTables.Median())
}

// mdTable renders a Markdown table; align holds one of 'l' or 'r' per column.
func mdTable(b *strings.Builder, head []string, align string, rows [][]string) {
	b.WriteString("| " + strings.Join(head, " | ") + " |\n|")
	for i := range head {
		if i < len(align) && align[i] == 'r' {
			b.WriteString("---:|")
		} else {
			b.WriteString("---|")
		}
	}
	b.WriteString("\n")
	for _, r := range rows {
		b.WriteString("| " + strings.Join(r, " | ") + " |\n")
	}
}

// ConnectTable is the README table: medians and the two ratios per N.
func ConnectTable(rows []ConnectRow) string {
	var b strings.Builder
	var body [][]string
	for _, r := range rows {
		vd, vi := r.Ratios()
		body = append(body, []string{strconv.Itoa(r.N), FormatRate(r.Direct.Median()), FormatRate(r.Shunt.Median()),
			FormatRate(r.IPTables.Median()), FormatRatio(vd), FormatRatio(vi)})
	}
	mdTable(&b, []string{"N", "direct tx/s", "shunt tx/s", "iptables tx/s", "shunt/direct", "shunt/iptables"}, "rrrrrr", body)
	return b.String()
}

// PairedRatios returns the median over repetitions of shunt/direct and
// shunt/iptables taken within each repetition, whose configurations ran
// interleaved under the same conditions: less sensitive to load that comes
// and goes than the ratio of the medians.
func (r ConnectRow) PairedRatios() (vsDirect, vsIPTables float64) {
	var d, i []float64
	for k := range min(len(r.Shunt.Rates), len(r.Direct.Rates), len(r.IPTables.Rates)) {
		d = append(d, Ratio(r.Shunt.Rates[k], r.Direct.Rates[k]))
		i = append(i, Ratio(r.Shunt.Rates[k], r.IPTables.Rates[k]))
	}
	return Median(d), Median(i)
}

func formatCPU(s Summary) string {
	m := Median(s.CPU)
	if math.IsNaN(m) {
		return "n/a"
	}
	return fmt.Sprintf("%.1f", m)
}

// SpreadTable shows, per N, min–max of the repetitions, the paired ratios,
// the client's CPU time per transaction (median; direct / shunt / iptables)
// and the time each datapath took to install the N services.
func SpreadTable(rows []ConnectRow) string {
	var b strings.Builder
	var body [][]string
	for _, r := range rows {
		pd, pi := r.PairedRatios()
		body = append(body, []string{strconv.Itoa(r.N), r.Direct.Spread(), r.Shunt.Spread(), r.IPTables.Spread(),
			FormatRatio(pd), FormatRatio(pi),
			formatCPU(r.Direct) + " / " + formatCPU(r.Shunt) + " / " + formatCPU(r.IPTables),
			r.ShuntLoad.Round(time.Millisecond).String() + " / " + r.IPTablesLoad.Round(time.Millisecond).String()})
	}
	mdTable(&b, []string{"N", "direct min–max", "shunt min–max", "iptables min–max", "paired shunt/direct", "paired shunt/iptables",
		"client µs/tx (direct / shunt / iptables)", "install N (shunt / iptables)"}, "rrrrrrrr", body)
	return b.String()
}

// Targets are the goals the connect benchmark reports against.
const (
	TargetVsDirect   = 0.95 // shunt ≥ 0.95× direct at every N
	TargetVsIPTables = 2.0  // shunt ≥ 2× iptables at N = 10000
	TargetVsIPTN     = 10000
)

// TargetLines says, per row, whether the targets were met. They are
// reported, never asserted.
func TargetLines(rows []ConnectRow) []string {
	var out []string
	for _, r := range rows {
		vd, vi := r.Ratios()
		out = append(out, fmt.Sprintf("N=%d: shunt/direct %.3f (target ≥ %.2f: %s)", r.N, vd, TargetVsDirect, verdict(vd >= TargetVsDirect)))
		if r.N == TargetVsIPTN {
			out = append(out, fmt.Sprintf("N=%d: shunt/iptables %.3f (target ≥ %.2f: %s)", r.N, vi, TargetVsIPTables, verdict(vi >= TargetVsIPTables)))
		}
	}
	return out
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

// UpdateResult is the outcome of the update benchmark.
type UpdateResult struct {
	Services, Backends int
	Load               time.Duration
	Latencies          []time.Duration
}

// UpdateTable renders the update benchmark as Markdown.
func UpdateTable(r UpdateResult) string {
	var b strings.Builder
	var mean time.Duration
	for _, d := range r.Latencies {
		mean += d
	}
	if len(r.Latencies) > 0 {
		mean /= time.Duration(len(r.Latencies))
	}
	mdTable(&b, []string{"services × backends", "initial load", "updates", "p50", "p90", "p99", "max", "mean"}, "lrrrrrrr",
		[][]string{{fmt.Sprintf("%d × %d", r.Services, r.Backends), FormatDuration(r.Load), strconv.Itoa(len(r.Latencies)),
			FormatDuration(Percentile(r.Latencies, 50)), FormatDuration(Percentile(r.Latencies, 90)),
			FormatDuration(Percentile(r.Latencies, 99)), FormatDuration(Percentile(r.Latencies, 100)), FormatDuration(mean)}})
	return b.String()
}
