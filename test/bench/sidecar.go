package bench

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Workload is one traffic pattern of the sidecar benchmark.
type Workload struct {
	// Name as given: rr1, rr4k, rr64k, rr1x4, stream, stream16k, ...
	Name string
	// Stream: one connection writes Size-byte chunks as fast as it can;
	// otherwise request/response: Size bytes out, the same Size bytes back.
	Stream bool
	Size   int
	// Conns is the number of parallel connections (request/response only).
	Conns int
}

// MaxWorkloadSize bounds a request or a stream write.
const MaxWorkloadSize = 1 << 20

// DefaultWorkloads are the workloads of a full run.
var DefaultWorkloads = []string{"rr1", "rr4k", "rr64k", "stream", "rr1x4"}

// ParseWorkload parses rr<size>[x<conns>] or stream[<size>] (default
// 64k); sizes take a k suffix (KiB).
func ParseWorkload(s string) (Workload, error) {
	w := Workload{Name: s, Conns: 1}
	var rest string
	switch {
	case strings.HasPrefix(s, "rr"):
		rest = s[2:]
		if r, c, ok := strings.Cut(rest, "x"); ok {
			n, err := strconv.Atoi(c)
			if err != nil || n < 1 || n > 64 {
				return w, fmt.Errorf("workload %q: connections must be 1..64", s)
			}
			rest, w.Conns = r, n
		}
	case strings.HasPrefix(s, "stream"):
		w.Stream = true
		rest = s[len("stream"):]
		if rest == "" {
			rest = "64k"
		}
	default:
		return w, fmt.Errorf("workload %q: want rr<size>[x<conns>] or stream[<size>]", s)
	}
	mult := 1
	if r, ok := strings.CutSuffix(rest, "k"); ok {
		rest, mult = r, 1024
	}
	n, err := strconv.Atoi(rest)
	if err != nil || n < 1 || n*mult > MaxWorkloadSize {
		return w, fmt.Errorf("workload %q: size must be 1..%d bytes (k suffix: KiB)", s, MaxWorkloadSize)
	}
	w.Size = n * mult
	if w.Stream && w.Size < streamHeader {
		return w, fmt.Errorf("workload %q: stream writes must be at least %d bytes", s, streamHeader)
	}
	return w, nil
}

// Describe says what the workload does, for the report.
func (w Workload) Describe() string {
	if w.Stream {
		return fmt.Sprintf("stream of %s writes", FormatSize(w.Size))
	}
	s := fmt.Sprintf("%s request/response", FormatSize(w.Size))
	if w.Conns > 1 {
		s += fmt.Sprintf(", %d connections", w.Conns)
	}
	return s
}

// FormatSize formats a byte count as "1 B", "4 KiB", "1.5 KiB".
func FormatSize(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1024 && n%1024 == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	case n >= 1024:
		return fmt.Sprintf("%.1f KiB", float64(n)/1024)
	}
	return fmt.Sprintf("%d B", n)
}

// ---- the bytes on the wire ----
//
// Every byte either end receives is checked, so a configuration that loses,
// duplicates, reorders or misroutes data fails the run instead of winning it.
//
//   - On accept the server sends a helloSize-byte hello naming itself; the
//     client checks it is the server it meant to reach (through the proxy,
//     which must have found the original destination).
//   - The client then sends one mode byte: 'R' or 'S'.
//   - R (request/response): transaction k sends Size bytes of the payload
//     pool from RROffset(k); the server echoes every byte back; the client
//     compares the answer with what it sent.
//   - S (stream): chunks of Size bytes; chunk i carries i (bit 63: marker)
//     in its first 8 bytes and the pool's bytes after them. The server
//     checks every chunk and answers each marker with the number of chunks
//     it verified (8 bytes, little endian; StreamCorrupt on a mismatch).

const (
	helloSize    = 64
	streamHeader = 8
	modeRR       = 'R'
	modeStream   = 'S'
	streamMarker = 1 << 63
	// StreamCorrupt is the server's answer to a marker after a bad chunk.
	StreamCorrupt = ^uint64(0)
	// poolSpan is how far transactions' start offsets range in the pool.
	poolSpan = 64 << 10
)

// Hello is the greeting of the echo server named id.
func Hello(id string) []byte {
	b := make([]byte, helloSize)
	copy(b, "shunt-bench-echo "+id)
	return b
}

// PayloadPool returns the deterministic pseudo-random bytes both ends
// derive payloads from: enough for requests of up to size bytes.
func PayloadPool(size int) []byte {
	b := make([]byte, size+poolSpan)
	r := rand.New(rand.NewPCG(0x5a1dec, 0xca7))
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b
}

// RROffset is where transaction k's request starts in the pool: it moves
// with k, so a stale or misplaced answer never matches.
func RROffset(k uint64) int { return int(k * 4099 % poolSpan) }

// ---- latency histogram ----

// Hist is a latency histogram in nanoseconds with 64 linear buckets per
// power of two (about 1.6% resolution), sparse so it travels as JSON.
type Hist map[int]uint64

const histSub = 64

func histIndex(ns int64) int {
	if ns < histSub {
		return int(max(ns, 0))
	}
	e := bits.Len64(uint64(ns)) - 1 // ≥ 6
	return (e-5)*histSub + int((ns>>(e-6))&(histSub-1))
}

// histValue is the middle of bucket i.
func histValue(i int) time.Duration {
	if i < histSub {
		return time.Duration(i)
	}
	e := i/histSub + 5
	lo := int64(histSub+i%histSub) << (e - 6)
	return time.Duration(lo + int64(1)<<(e-6)/2)
}

// Add records one latency.
func (h Hist) Add(d time.Duration) { h[histIndex(int64(d))]++ }

// Merge adds o's counts to h.
func (h Hist) Merge(o Hist) {
	for k, v := range o {
		h[k] += v
	}
}

// Count is the number of recorded latencies.
func (h Hist) Count() uint64 {
	var n uint64
	for _, v := range h {
		n += v
	}
	return n
}

// Percentile returns the p-th percentile (nearest rank; 0 for an empty
// histogram), to the bucket's resolution.
func (h Hist) Percentile(p float64) time.Duration {
	n := h.Count()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(p / 100 * float64(n)))
	rank = min(max(rank, 1), n)
	keys := make([]int, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var c uint64
	for _, k := range keys {
		if c += h[k]; c >= rank {
			return histValue(k)
		}
	}
	return histValue(keys[len(keys)-1])
}

// ---- results ----

// Sidecar configurations, in the order of the first repetition.
const (
	SCDirect   = "direct"
	SCIPTables = "iptables"
	SCOff      = "shunt-off"
	SCAuto     = "shunt-auto"
	SCOn       = "shunt-on"
)

// SidecarConfigs lists the configurations with a proxy.
var SidecarConfigs = []string{SCIPTables, SCOff, SCAuto, SCOn}

// SidecarCell is one configuration's results for one workload.
type SidecarCell struct {
	Topology int // 1: client → proxy → server; 2: client → proxy → proxy → server
	Workload Workload
	Config   string // SCDirect, SCIPTables, ...
	Proxy    string // "" (direct), "haproxy" or "go"

	// Per repetition: transactions/s (request/response) or bit/s
	// (stream); latency percentiles; CPU time of every process on the path
	// per transaction (µs); the proxies' voluntary context switches
	// (wake-ups) per transaction; the Go proxy's reads+writes per
	// transaction.
	Rates     []float64
	P50, P99  []time.Duration
	CPU       []float64
	ProxyCPU  []float64 // the proxies' share of CPU
	ProxyUser []float64 // of which in user space
	Wakeups   []float64
	ProxyOps  []float64
	// ProxySyscalls: the proxies' system calls per transaction, counted
	// with perf in one extra slice (0: perf unavailable).
	ProxySyscalls float64

	// Whole phase (warm-up included): bytes the client sent and received,
	// bytes verified, connections, spurious EAGAINs on blocking sockets.
	Sent, Recv, Verified uint64
	Conns                uint64
	EAGAIN               uint64
	// Evidence of the path taken: Shunt pod counter deltas by pod role
	// (client, server, server-sidecar), iptables REDIRECT hits, bytes the
	// proxies forwarded.
	Counters map[string]map[string]uint64
	Redirect map[string]uint64 // pod role → REDIRECT rule hits (iptables)
	Proxied  map[string]uint64 // proxy → bytes forwarded (both ways)
	Proof    string            // one line: what the counters show
}

// Key names the cell.
func (c *SidecarCell) Key() string {
	if c.Proxy == "" {
		return c.Config
	}
	return c.Config + "/" + c.Proxy
}

// Stream reports whether rates are bit/s.
func (c *SidecarCell) Stream() bool { return c.Workload.Stream }

// Median rate.
func (c *SidecarCell) Median() float64 { return Median(c.Rates) }

func durMedian(ds []time.Duration) time.Duration {
	f := make([]float64, len(ds))
	for i, d := range ds {
		f[i] = float64(d)
	}
	return time.Duration(Median(f))
}

// PairedRatio is the median over repetitions of a's rate / b's rate in the
// same repetition (they ran interleaved under the same conditions).
func PairedRatio(a, b *SidecarCell) float64 {
	if a == nil || b == nil {
		return math.NaN()
	}
	var r []float64
	for k := range min(len(a.Rates), len(b.Rates)) {
		r = append(r, Ratio(a.Rates[k], b.Rates[k]))
	}
	return Median(r)
}

// CPURatio is a's median CPU time per transaction over b's: the speed-up of
// b over a when the CPU is the bottleneck (every process of the benchmark
// shares one CPU by default), and far less sensitive than rates to other
// work on the machine, which steals time but adds no CPU time to the path.
func CPURatio(a, b *SidecarCell) float64 {
	if a == nil || b == nil {
		return math.NaN()
	}
	return Ratio(Median(a.CPU), Median(b.CPU))
}

// SidecarReport is a whole run.
type SidecarReport struct {
	Cells []*SidecarCell
	// Method describes how it was measured (one paragraph).
	Method string
	// SelfTest tells whether the kernel passed Shunt's sockmap self-test
	// (auto accelerates nothing otherwise).
	SelfTest bool
}

// Cell finds a cell (nil if absent).
func (r *SidecarReport) Cell(topo int, workload, config, proxy string) *SidecarCell {
	for _, c := range r.Cells {
		if c.Topology == topo && c.Workload.Name == workload && c.Config == config && (config == SCDirect || c.Proxy == proxy) {
			return c
		}
	}
	return nil
}

// rowKeys lists topology × proxy × workload in run order.
func (r *SidecarReport) rowKeys() (rows []rowKey) {
	seen := map[rowKey]bool{}
	for _, c := range r.Cells {
		if c.Proxy == "" {
			continue
		}
		k := rowKey{c.Topology, c.Proxy, c.Workload.Name}
		if !seen[k] {
			seen[k] = true
			rows = append(rows, k)
		}
	}
	return rows
}

type rowKey struct {
	topo     int
	proxy    string
	workload string
}

// TopologyName describes a topology.
func TopologyName(t int) string {
	if t == 2 {
		return "client → sidecar → sidecar → server"
	}
	return "client → sidecar → server"
}

// FormatBits formats bit/s as "12.3 Gbit/s".
func FormatBits(x float64) string {
	if math.IsNaN(x) {
		return "n/a"
	}
	return fmt.Sprintf("%.2f Gbit/s", x/1e9)
}

func formatRateOf(c *SidecarCell) string {
	if c == nil {
		return "n/a"
	}
	if c.Stream() {
		return FormatBits(c.Median())
	}
	return FormatRate(c.Median())
}

func formatLat(d time.Duration) string {
	if d <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f", float64(d)/float64(time.Microsecond))
}

func medianOr(xs []float64, format string) string {
	m := Median(xs)
	if math.IsNaN(m) {
		return "–"
	}
	return fmt.Sprintf(format, m)
}

// Sidecar targets (reported, never asserted).
const (
	TargetSmall  = 1.5  // request/response ≤ 4 KiB, vs iptables, same proxy
	TargetLarge  = 2.5  // request/response 64 KiB
	TargetStream = 2.0  // stream
	TargetAuto   = 0.98 // auto vs off, every cell
)

// Target returns the goal vs iptables for a workload.
func Target(w Workload) float64 {
	switch {
	case w.Stream:
		return TargetStream
	case w.Size >= 64<<10:
		return TargetLarge
	}
	return TargetSmall
}

// ThroughputTable is the main table: per topology, proxy and workload the
// median rate of each configuration and the paired ratios.
func (r *SidecarReport) ThroughputTable() string {
	var b strings.Builder
	var body [][]string
	for _, k := range r.rowKeys() {
		cell := func(cfg string) *SidecarCell { return r.Cell(k.topo, k.workload, cfg, k.proxy) }
		ipt, off, auto, on := cell(SCIPTables), cell(SCOff), cell(SCAuto), cell(SCOn)
		w := ipt
		if w == nil {
			continue
		}
		body = append(body, []string{
			strconv.Itoa(k.topo), k.proxy, w.Workload.Describe(),
			formatRateOf(cell(SCDirect)), formatRateOf(ipt), formatRateOf(off), formatRateOf(auto), formatRateOf(on),
			FormatRatio(PairedRatio(off, ipt)), FormatRatio(PairedRatio(auto, ipt)), FormatRatio(PairedRatio(on, ipt)),
			fmt.Sprintf("≥ %.1f×", Target(w.Workload)), FormatRatio(PairedRatio(auto, off)),
		})
	}
	mdTable(&b, []string{"sidecars", "proxy", "workload", "direct (no proxy)", "iptables REDIRECT", "shunt off", "shunt auto", "shunt on",
		"off/iptables", "auto/iptables", "on/iptables", "target", "auto/off"}, "lllrrrrrrrrrr", body)
	return b.String()
}

// LatencyTable shows p50 and p99 (µs, median over repetitions) of the
// request/response cells.
func (r *SidecarReport) LatencyTable() string {
	var b strings.Builder
	var body [][]string
	for _, k := range r.rowKeys() {
		cell := func(cfg string) *SidecarCell { return r.Cell(k.topo, k.workload, cfg, k.proxy) }
		ipt := cell(SCIPTables)
		if ipt == nil || ipt.Stream() {
			continue
		}
		row := []string{strconv.Itoa(k.topo), k.proxy, ipt.Workload.Describe()}
		for _, q := range []func(*SidecarCell) []time.Duration{
			func(c *SidecarCell) []time.Duration { return c.P50 },
			func(c *SidecarCell) []time.Duration { return c.P99 },
		} {
			var parts []string
			for _, cfg := range []string{SCDirect, SCIPTables, SCOff, SCAuto, SCOn} {
				if c := cell(cfg); c != nil {
					parts = append(parts, formatLat(durMedian(q(c))))
				} else {
					parts = append(parts, "–")
				}
			}
			row = append(row, strings.Join(parts, " / "))
		}
		on := cell(SCOn)
		if on != nil {
			row = append(row, FormatRatio(Ratio(float64(durMedian(on.P99)), float64(durMedian(ipt.P99)))))
		} else {
			row = append(row, "n/a")
		}
		body = append(body, row)
	}
	mdTable(&b, []string{"sidecars", "proxy", "workload", "p50 µs: direct / iptables / off / auto / on", "p99 µs: direct / iptables / off / auto / on", "p99 on/iptables"}, "lllrrr", body)
	return b.String()
}

// CostTable shows what each transaction costs: CPU time of all processes
// on the path and of the proxies alone, the proxies' wake-ups and system
// calls, per configuration.
func (r *SidecarReport) CostTable() string {
	var b strings.Builder
	var body [][]string
	for _, k := range r.rowKeys() {
		cell := func(cfg string) *SidecarCell { return r.Cell(k.topo, k.workload, cfg, k.proxy) }
		ipt := cell(SCIPTables)
		if ipt == nil {
			continue
		}
		var cpu, pcpu, wake, sys []string
		for _, cfg := range []string{SCDirect, SCIPTables, SCOff, SCAuto, SCOn} {
			c := cell(cfg)
			if c == nil {
				cpu = append(cpu, "–")
				if cfg != SCDirect {
					pcpu, wake, sys = append(pcpu, "–"), append(wake, "–"), append(sys, "–")
				}
				continue
			}
			cpu = append(cpu, medianOr(c.CPU, "%.0f"))
			if cfg == SCDirect {
				continue
			}
			pcpu = append(pcpu, medianOr(c.ProxyCPU, "%.0f")+" ("+medianOr(c.ProxyUser, "%.0f")+")")
			wake = append(wake, medianOr(c.Wakeups, "%.1f"))
			if c.ProxySyscalls > 0 {
				sys = append(sys, fmt.Sprintf("%.1f", c.ProxySyscalls))
			} else {
				sys = append(sys, "–")
			}
		}
		body = append(body, []string{strconv.Itoa(k.topo), k.proxy, ipt.Workload.Describe(), strings.Join(cpu, " / "),
			FormatRatio(CPURatio(ipt, cell(SCOn))) + " / " + FormatRatio(CPURatio(ipt, cell(SCAuto))) + " / " + FormatRatio(CPURatio(cell(SCOff), cell(SCAuto))),
			strings.Join(pcpu, " / "), strings.Join(wake, " / "), strings.Join(sys, " / ")})
	}
	mdTable(&b, []string{"sidecars", "proxy", "workload", "CPU µs, whole path: direct / iptables / off / auto / on",
		"CPU-bound speed-up: on vs iptables / auto vs iptables / auto vs off",
		"CPU µs, proxies (user space): iptables / off / auto / on", "proxy wake-ups: iptables / off / auto / on",
		"proxy syscalls: iptables / off / auto / on"}, "lllrrrrr", body)
	return b.String()
}

// ProofTable shows, per topology, proxy and configuration, the evidence
// of the path taken, summed over the workloads.
func (r *SidecarReport) ProofTable() string {
	type key struct {
		topo  int
		proxy string
		cfg   string
	}
	var order []key
	sums := map[key]*SidecarCell{}
	for _, c := range r.Cells {
		k := key{c.Topology, c.Proxy, c.Config}
		s := sums[k]
		if s == nil {
			s = &SidecarCell{Topology: c.Topology, Proxy: c.Proxy, Config: c.Config,
				Counters: map[string]map[string]uint64{}, Redirect: map[string]uint64{}, Proxied: map[string]uint64{}}
			sums[k] = s
			order = append(order, k)
		}
		s.Sent += c.Sent
		s.Recv += c.Recv
		s.Verified += c.Verified
		s.Conns += c.Conns
		s.EAGAIN += c.EAGAIN
		for pod, m := range c.Counters {
			if s.Counters[pod] == nil {
				s.Counters[pod] = map[string]uint64{}
			}
			for n, v := range m {
				s.Counters[pod][n] += v
			}
		}
		for n, v := range c.Redirect {
			s.Redirect[n] += v
		}
		for n, v := range c.Proxied {
			s.Proxied[n] += v
		}
	}
	var b strings.Builder
	var body [][]string
	for _, k := range order {
		s := sums[k]
		proxy := k.proxy
		if proxy == "" {
			proxy = "–"
		}
		body = append(body, []string{strconv.Itoa(k.topo), proxy, k.cfg, strconv.FormatUint(s.Conns, 10),
			FormatCount(s.Sent + s.Recv), FormatCount(s.Verified), evidence(s), strconv.FormatUint(s.EAGAIN, 10)})
	}
	mdTable(&b, []string{"sidecars", "proxy", "configuration", "connections", "bytes moved (client)", "bytes verified", "path evidence", "spurious EAGAIN"}, "lllrrrlr", body)
	return b.String()
}

// evidence summarizes a cell's counters in one cell of the proof table.
func evidence(s *SidecarCell) string {
	var parts []string
	for _, role := range sortedKeys(s.Redirect) {
		parts = append(parts, fmt.Sprintf("%s REDIRECT hits %d", role, s.Redirect[role]))
	}
	for _, role := range sortedKeys(s.Counters) {
		m := s.Counters[role]
		var p []string
		for _, n := range []string{"steer_outbound", "steer_inbound", "origdst_answer", "sock_insert", "msg_redirect", "bytes_redirect", "msg_miss", "sock_fallback"} {
			if v := m[n]; v != 0 || n == "sock_insert" || n == "bytes_redirect" {
				v := m[n]
				if n == "bytes_redirect" {
					p = append(p, n+" "+FormatCount(v))
				} else {
					p = append(p, fmt.Sprintf("%s %d", n, v))
				}
			}
		}
		parts = append(parts, role+": "+strings.Join(p, ", "))
	}
	for _, n := range sortedKeys(s.Proxied) {
		parts = append(parts, fmt.Sprintf("%s forwarded %s", n, FormatCount(s.Proxied[n])))
	}
	if len(parts) == 0 {
		return "no proxy, no rules, not enrolled"
	}
	return strings.Join(parts, "; ")
}

func sortedKeys[V any](m map[string]V) []string {
	k := make([]string, 0, len(m))
	for n := range m {
		k = append(k, n)
	}
	slices.Sort(k)
	return k
}

// FormatCount formats a byte count with binary units: "3.2 GiB".
func FormatCount(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// TargetLines states, per topology, proxy and workload, whether the
// targets were met (reported, never asserted).
func (r *SidecarReport) TargetLines() []string {
	var out []string
	for _, k := range r.rowKeys() {
		cell := func(cfg string) *SidecarCell { return r.Cell(k.topo, k.workload, cfg, k.proxy) }
		ipt, off, auto, on := cell(SCIPTables), cell(SCOff), cell(SCAuto), cell(SCOn)
		if ipt == nil {
			continue
		}
		t := Target(ipt.Workload)
		pre := fmt.Sprintf("%d sidecar(s), %s, %s:", k.topo, k.proxy, k.workload)
		var parts []string
		for _, c := range []*SidecarCell{on, auto} {
			if c == nil {
				continue
			}
			x := PairedRatio(c, ipt)
			parts = append(parts, fmt.Sprintf("%s/iptables %.2f (≥ %.1f: %s; by CPU per transaction %.2f)", strings.TrimPrefix(c.Config, "shunt-"), x, t, verdict(x >= t), CPURatio(ipt, c)))
			if !c.Stream() {
				p, q := durMedian(c.P99), durMedian(ipt.P99)
				parts = append(parts, fmt.Sprintf("%s p99 %s vs %s (no worse: %s)", strings.TrimPrefix(c.Config, "shunt-"), formatLat(p), formatLat(q), verdict(p <= q)))
			}
		}
		if auto != nil && off != nil {
			x := PairedRatio(auto, off)
			parts = append(parts, fmt.Sprintf("auto/off %.3f (≥ %.2f: %s; by CPU per transaction %.3f)", x, TargetAuto, verdict(x >= TargetAuto), CPURatio(off, auto)))
		}
		out = append(out, pre+" "+strings.Join(parts, "; "))
	}
	return out
}

// Write prints the report: the method, then the tables and the targets.
// markdown: only the tables and the method (for the README).
func (r *SidecarReport) Write(w io.Writer, markdown bool) {
	if !markdown {
		fmt.Fprintln(w, r.Method)
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, "Transactions/s (request/response) or Gbit/s (stream), median; ratios are paired within each repetition:")
	fmt.Fprintln(w)
	fmt.Fprintln(w, r.ThroughputTable())
	fmt.Fprintln(w, "Latency of one transaction, median of the repetitions' percentiles:")
	fmt.Fprintln(w)
	fmt.Fprintln(w, r.LatencyTable())
	fmt.Fprintln(w, "Cost per transaction (stream: per write), medians: CPU time of the processes on the path (apps and proxies, with the kernel work done in their context) "+
		"and of the proxies alone; the speed-up that CPU time implies when the one CPU is the bottleneck (robust to other work on the machine); "+
		"the proxies' wake-ups (voluntary context switches) and system calls (perf, one extra slice; – without perf):")
	fmt.Fprintln(w)
	fmt.Fprintln(w, r.CostTable())
	fmt.Fprintln(w, "Evidence of the path each configuration took (all workloads; Shunt counters are per pod, the proxies' forwarded bytes equal what the client moved):")
	fmt.Fprintln(w)
	fmt.Fprintln(w, r.ProofTable())
	if markdown {
		fmt.Fprintln(w, r.Method)
		return
	}
	for _, l := range r.TargetLines() {
		fmt.Fprintln(w, l)
	}
}
