package compat

import (
	"bytes"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shuntmesh/shunt/test/harness"
)

// Proxy is a sidecar in a topology's path; Run checks with it that the
// connections really went through the sidecars. *harness.Sidecar and
// *harness.HAProxy implement it.
type Proxy interface {
	// Connections returns the connections accepted so far by the outbound
	// and inbound listeners.
	Connections() (outbound, inbound uint64, err error)
}

// Topology is where the suite runs: applications in Client connect to
// Server's address; whatever sits in between (sidecars, iptables, Shunt) is
// the configuration under test.
type Topology struct {
	// Name is the configuration's column in the matrix.
	Name           string
	Client, Server *harness.Pod
	// Family 4 or 6 selects the server address the client connects to.
	Family int
	// Port the server listens on (0.0.0.0 and [::]); default 8080.
	Port uint16
	// ClientProxy, if set, must accept every connection as outbound
	// (the client pod's sidecar); ServerProxy as inbound.
	ClientProxy, ServerProxy Proxy
	// Parallel scenarios at once (default 8: most of a scenario's time is
	// spent waiting).
	Parallel int
	// Seed varies sizes and bytes (each scenario derives its own).
	Seed uint64
	// Stall, if set, replaces DefaultStall for scenarios that do not set
	// their own (never below twice BackpressureSleep).
	Stall time.Duration
}

// ProxyKind selects a sidecar for NewTopology.
type ProxyKind string

const (
	NoProxy ProxyKind = ""
	// GoProxy is the harness's sidecar app (Go netpoller relay).
	GoProxy ProxyKind = "go"
	// GoBlockingProxy is the sidecar app relaying with blocking syscalls.
	GoBlockingProxy ProxyKind = "go-blocking"
	// HAProxy is Debian's haproxy with harness.HAProxySidecarConfig
	// (IPv4 only).
	HAProxy ProxyKind = "haproxy"
)

// Setup describes a topology for NewTopology.
type Setup struct {
	Name   string
	Family int // 4 (default) or 6
	// ClientProxy runs in the client pod, ServerProxy in the server pod,
	// each as uid/gid 1337 with outbound 15001 and inbound 15006 listeners.
	ClientProxy, ServerProxy ProxyKind
	// IPTables installs Istio's REDIRECT rules in each pod with a proxy.
	// Without it something else must steer the traffic (Shunt).
	IPTables bool
	// TCPBufMax caps net.ipv4.tcp_rmem and tcp_wmem (their max) in both
	// pods: what the path may legitimately buffer (BackpressureLimit) stays
	// small, so a path without back-pressure shows even on a slow machine.
	// 0: DefaultTCPBufMax; < 0: the kernel's defaults (32 MiB rmem here).
	TCPBufMax int
}

// DefaultTCPBufMax is Setup.TCPBufMax's default (the kernel's tcp_wmem max,
// and tcp_rmem's before kernel 6.9).
const DefaultTCPBufMax = 4 << 20

var podSeq atomic.Int64

// NewTopology creates a client and a server pod in env and starts the
// proxies of s in them.
func NewTopology(t testing.TB, env *harness.Env, s Setup) *Topology {
	t.Helper()
	if s.Family == 0 {
		s.Family = 4
	}
	if s.Family != 4 && s.Family != 6 {
		t.Fatalf("compat: family %d", s.Family)
	}
	n := podSeq.Add(1)
	topo := &Topology{Name: s.Name, Family: s.Family,
		Client: env.NewPod(fmt.Sprintf("cc%d", n)), Server: env.NewPod(fmt.Sprintf("cs%d", n))}
	start := func(p *harness.Pod, k ProxyKind) Proxy {
		var px Proxy
		var err error
		switch k {
		case NoProxy:
			return nil
		case GoProxy, GoBlockingProxy:
			mode := "epoll"
			if k == GoBlockingProxy {
				mode = "blocking"
			}
			px, err = p.StartSidecar(harness.SidecarOpts{Mode: mode})
		case HAProxy:
			if s.Family != 4 {
				t.Fatalf("compat: the haproxy sidecar is IPv4 only (haproxy 2.6 reads SO_ORIGINAL_DST for IPv4 sockets only)")
			}
			px, err = p.StartHAProxySidecar(harness.HAProxyOpts{})
		default:
			t.Fatalf("compat: unknown proxy %q", k)
		}
		if err != nil {
			t.Fatal(err)
		}
		if s.IPTables {
			if err := p.RedirectToSidecar(harness.RedirectOpts{}); err != nil {
				t.Fatal(err)
			}
		}
		return px
	}
	if s.TCPBufMax == 0 {
		s.TCPBufMax = DefaultTCPBufMax
	}
	if s.TCPBufMax > 0 {
		for _, p := range []*harness.Pod{topo.Client, topo.Server} {
			if err := capTCPBuffers(p, s.TCPBufMax); err != nil {
				t.Fatal(err)
			}
		}
	}
	topo.ClientProxy = start(topo.Client, s.ClientProxy)
	topo.ServerProxy = start(topo.Server, s.ServerProxy)
	return topo
}

// capTCPBuffers sets the max of tcp_rmem and tcp_wmem in the pod's network
// namespace (the namespace goes away with the pod).
func capTCPBuffers(p *harness.Pod, max int) error {
	return p.InNetNS(func() error {
		for _, f := range []string{"tcp_rmem", "tcp_wmem"} {
			path := "/proc/sys/net/ipv4/" + f
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			v := strings.Fields(string(b))
			if len(v) != 3 {
				return fmt.Errorf("%s: %q", path, b)
			}
			if err := os.WriteFile(path, []byte(v[0]+" "+v[1]+" "+strconv.Itoa(max)), 0); err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
		}
		return nil
	})
}

// Target is the address the client applications connect to.
func (t *Topology) Target() netip.AddrPort {
	a := t.Server.IPv4()
	if t.Family == 6 {
		a = t.Server.IPv6()
	}
	return netip.AddrPortFrom(a, t.port())
}

func (t *Topology) port() uint16 {
	if t.Port == 0 {
		return 8080
	}
	return t.Port
}

// Result is one cell of the matrix.
type Result struct {
	Scenario string
	Config   string
	Pass     bool
	// Reason says why it failed; on a pass, an optional note (e.g. how many
	// bytes a back-pressure writer had accepted before EAGAIN).
	Reason string
	// Conns run, and how many of them failed.
	Conns, Failed int
	Elapsed       time.Duration
}

func (r Result) String() string {
	s := "pass"
	if !r.Pass {
		s = "FAIL"
	}
	if r.Reason != "" {
		s += ": " + r.Reason
	}
	return fmt.Sprintf("%s × %s: %s", r.Scenario, r.Config, s)
}

// Results is one configuration's column.
type Results struct {
	Config string
	Rows   []Result
}

// Failed returns the rows that did not pass.
func (rs *Results) Failed() []Result {
	var out []Result
	for _, r := range rs.Rows {
		if !r.Pass {
			out = append(out, r)
		}
	}
	return out
}

// Get returns the row of a scenario.
func (rs *Results) Get(scenario string) (Result, bool) {
	for _, r := range rs.Rows {
		if r.Scenario == scenario {
			return r, true
		}
	}
	return Result{}, false
}

// PathRow is the extra row Run adds when the topology has proxies: whether
// every connection went through them.
const PathRow = "(through the sidecars)"

// Run runs the scenarios in topo, at most topo.Parallel at once, and
// returns one Result per scenario (plus PathRow when topo has proxies). It
// starts a compat-server in the server pod for the duration and one
// compat-client per scenario in the client pod (both as root, so that
// sidecar steering applies to them). A stall is bounded by each Spec's
// Stall (10 s without progress); Run itself fails the test only when the
// harness does.
func Run(t testing.TB, env *harness.Env, topo *Topology, scenarios []Scenario) *Results {
	t.Helper()
	if topo.Client.Env() != env || topo.Server.Env() != env {
		t.Fatalf("compat: topology %q is not in this environment", topo.Name)
	}
	port := strconv.Itoa(int(topo.port()))
	srv := topo.Server.Start(harness.ProcOpts{}, "compat-server", "--listen", "0.0.0.0:"+port, "--listen", "[::]:"+port)
	if err := srv.WaitReady(); err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	col := newCollector(srv)
	before := proxyCounts(topo)

	res := &Results{Config: topo.Name, Rows: make([]Result, len(scenarios))}
	par := topo.Parallel
	if par <= 0 {
		par = 8
	}
	sem := make(chan struct{}, par)
	var wg sync.WaitGroup
	total := 0
	for i, sc := range scenarios {
		total += sc.conns()
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			res.Rows[i] = runScenario(topo, col, sc)
		}()
	}
	wg.Wait()
	if topo.ClientProxy != nil || topo.ServerProxy != nil {
		res.Rows = append(res.Rows, checkPath(topo, before, total))
	}
	return res
}

type counts struct {
	clientOut, serverIn uint64
	err                 error
}

func proxyCounts(topo *Topology) counts {
	var c counts
	if topo.ClientProxy != nil {
		var err error
		c.clientOut, _, err = topo.ClientProxy.Connections()
		c.err = err
	}
	if topo.ServerProxy != nil && c.err == nil {
		_, c.serverIn, c.err = topo.ServerProxy.Connections()
	}
	return c
}

func checkPath(topo *Topology, before counts, total int) Result {
	r := Result{Scenario: PathRow, Config: topo.Name, Pass: true, Conns: total}
	after := proxyCounts(topo)
	if err := after.err; err != nil || before.err != nil {
		r.Pass, r.Reason = false, fmt.Sprintf("proxy counters: %v %v", before.err, err)
		return r
	}
	var notes []string
	if topo.ClientProxy != nil {
		if d := after.clientOut - before.clientOut; d < uint64(total) {
			r.Pass = false
			notes = append(notes, fmt.Sprintf("client sidecar accepted %d of %d outbound connections", d, total))
		}
	}
	if topo.ServerProxy != nil {
		if d := after.serverIn - before.serverIn; d < uint64(total) {
			r.Pass = false
			notes = append(notes, fmt.Sprintf("server sidecar accepted %d of %d inbound connections", d, total))
		}
	}
	if !r.Pass {
		r.Reason = fmt.Sprint(notes) + ": not steered through the sidecar"
	}
	return r
}

// collector gathers the compat-server's RESULT lines by connection id.
type collector struct {
	srv  *harness.Proc
	mu   sync.Mutex
	off  int
	byID map[string]ConnResult
}

func newCollector(srv *harness.Proc) *collector {
	return &collector{srv: srv, byID: map[string]ConnResult{}}
}

func (c *collector) poll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.srv.Stdout()
	for {
		i := bytes.IndexByte(out[c.off:], '\n')
		if i < 0 {
			return
		}
		line := out[c.off : c.off+i]
		c.off += i + 1
		if r, ok := parseResult(line); ok {
			c.byID[r.ID] = r
		}
	}
}

// wait returns the results of ids that arrived before the deadline.
func (c *collector) wait(ids []string, deadline time.Time) map[string]ConnResult {
	for {
		c.poll()
		c.mu.Lock()
		got := map[string]ConnResult{}
		for _, id := range ids {
			if r, ok := c.byID[id]; ok {
				got[id] = r
			}
		}
		c.mu.Unlock()
		if len(got) == len(ids) || time.Now().After(deadline) {
			return got
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func parseResult(line []byte) (ConnResult, bool) {
	var r ConnResult
	rest, ok := bytes.CutPrefix(line, []byte("RESULT "))
	if !ok || json.Unmarshal(rest, &r) != nil {
		return r, false
	}
	return r, true
}

func seedFor(topo *Topology, name string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(name))
	return h.Sum64() ^ topo.Seed
}

var runSeq atomic.Int64

func runScenario(topo *Topology, col *collector, sc Scenario) Result {
	start := time.Now()
	r := Result{Scenario: sc.Name, Config: topo.Name, Conns: sc.conns()}
	spec := sc.Spec
	var limit int64
	if sc.Backpressure {
		var err error
		if limit, err = BackpressureLimit(topo); err != nil {
			return Result{Scenario: sc.Name, Config: topo.Name, Reason: err.Error(), Conns: 1, Failed: 1}
		}
		size := Sizes{int(limit + BackpressureSlack), int(limit + BackpressureSlack)}
		if spec.Client.IO == IONonblock {
			spec.Req = size
		} else {
			spec.Resp = size
		}
	}
	if spec.Stall == 0 && topo.Stall > 0 {
		spec.Stall = max(topo.Stall, 2*BackpressureSleep)
	}
	spec.ID = fmt.Sprintf("%s|%s|%d", topo.Name, sc.Name, runSeq.Add(1))
	spec.Seed = seedFor(topo, sc.Name)
	specJSON, _ := json.Marshal(spec)
	n := sc.conns()
	ids := make([]string, n)
	specs := make([]Spec, n)
	for i := range n {
		specs[i] = spec
		if n > 1 {
			specs[i].ID = spec.ID + "#" + strconv.Itoa(i)
			specs[i].Seed = spec.Seed + uint64(i)
		}
		ids[i] = specs[i].ID
	}
	out, runErr := topo.Client.Run(harness.ProcOpts{Timeout: 3 * time.Minute}, "compat-client",
		"--target", topo.Target().String(), "--spec", string(specJSON), "--conns", strconv.Itoa(n))
	clients := map[string]ConnResult{}
	for _, line := range bytes.Split(out, []byte("\n")) {
		if cr, ok := parseResult(line); ok {
			clients[cr.ID] = cr
		}
	}
	servers := col.wait(ids, time.Now().Add(spec.stall()+5*time.Second))

	var first string
	var notes []string
	for i, id := range ids {
		cl, cok := clients[id]
		sv, sok := servers[id]
		var why, note string
		switch {
		case !cok:
			why = fmt.Sprintf("client: no result (%v)", runErr)
		default:
			why, note = judge(sc, &specs[i], limit, cl, sv, sok)
		}
		if note != "" && len(notes) < 1 {
			notes = append(notes, note)
		}
		if why != "" {
			r.Failed++
			if first == "" {
				first = why
			}
		}
	}
	r.Pass = r.Failed == 0
	switch {
	case !r.Pass && n > 1:
		r.Reason = fmt.Sprintf("%d of %d connections failed; first: %s", r.Failed, n, first)
	case !r.Pass:
		r.Reason = first
	case len(notes) > 0:
		r.Reason = notes[0]
	}
	r.Elapsed = time.Since(start)
	return r
}

// judge checks one connection's two reports against its Spec. It returns
// why it failed ("" if it passed) and an optional note.
func judge(sc Scenario, s *Spec, limit int64, cl, sv ConnResult, haveServer bool) (why, note string) {
	switch {
	case !cl.OK && haveServer && !sv.OK:
		return "client: " + cl.Error + "; server: " + sv.Error, ""
	case !cl.OK:
		return "client: " + cl.Error, ""
	case !haveServer:
		return "server: no result", ""
	case !sv.OK:
		return "server: " + sv.Error, ""
	}
	c2s, s2c := s.Totals()
	if s.Abort != "" {
		// Full rounds before the reset, then a prefix of the aborted
		// message (each end checked the bytes against the stream).
		p := s.Plan()
		var c2sFull, s2cFull int64
		for i := range s.AbortRound {
			c2sFull += int64(p.Req[i])
			s2cFull += int64(p.Resp[i])
		}
		aborter, reader := cl, sv
		if s.Abort == "server" {
			aborter, reader = sv, cl
		}
		if aborter.EndedBy != "ABORT" || (reader.EndedBy != "ECONNRESET" && reader.EndedBy != "EOF") {
			return fmt.Sprintf("reset not seen as ECONNRESET/EOF: %s ended %q, %s ended %q", aborter.Role, aborter.EndedBy, reader.Role, reader.EndedBy), ""
		}
		counts := fmt.Sprintf("byte counts after the reset: client sent %d received %d, server sent %d received %d",
			cl.Sent, cl.Received, sv.Sent, sv.Received)
		if s.Abort == "client" {
			// The client reset during request AbortRound.
			c2s, s2c = c2sFull+int64(s.AbortBytes), s2cFull
			if sv.Received < c2sFull || sv.Received > c2s || cl.Sent != c2s || sv.Sent != s2c || cl.Received != s2c ||
				sv.SHA256Sent != cl.SHA256Received {
				return counts, ""
			}
		} else {
			// The server reset during response AbortRound.
			c2s, s2c = c2sFull+int64(p.Req[s.AbortRound]), s2cFull+int64(s.AbortBytes)
			if cl.Received < s2cFull || cl.Received > s2c || sv.Sent != s2c || cl.Sent != c2s || sv.Received != c2s ||
				cl.SHA256Sent != sv.SHA256Received {
				return counts, ""
			}
		}
		return "", reader.Role + " saw " + reader.EndedBy
	}
	if cl.Sent != c2s || sv.Received != c2s || cl.SHA256Sent != sv.SHA256Received {
		return fmt.Sprintf("client→server: %d bytes due, client sent %d, server received %d (sha256 equal: %v)",
			c2s, cl.Sent, sv.Received, cl.SHA256Sent == sv.SHA256Received), ""
	}
	if sv.Sent != s2c || cl.Received != s2c || sv.SHA256Sent != cl.SHA256Received {
		return fmt.Sprintf("server→client: %d bytes due, server sent %d, client received %d (sha256 equal: %v)",
			s2c, sv.Sent, cl.Received, sv.SHA256Sent == cl.SHA256Received), ""
	}
	for _, r := range []ConnResult{cl, sv} {
		if r.RcvlowatTimeouts > 0 {
			return "", fmt.Sprintf("%s: %d SO_RCVLOWAT reads woken only by their 1 s receive timeout, data queued", r.Role, r.RcvlowatTimeouts)
		}
	}
	for _, end := range []struct {
		r    ConnResult
		side Side
	}{{cl, s.Client}, {sv, s.Server}} {
		if end.side.Signals == "" {
			continue
		}
		// Without SA_RESTART, some calls should have returned EINTR; if
		// none did, no signal hit a blocked call (a loaded machine): the
		// run proves less, which the note says.
		note := fmt.Sprintf("%s: %d signals, %d EINTR", end.r.Role, end.r.Signals, end.r.EINTR)
		if end.r.Signals == 0 || end.side.Signals == SigNoRestart && end.r.EINTR == 0 {
			note += " (no signal interrupted a blocked call: ineffective run)"
		}
		return "", note
	}
	if sc.Backpressure {
		w := cl
		if s.Server.IO == IONonblock {
			w = sv
		}
		if w.BlockedAfter < 0 || w.Buffered > limit {
			first := "never got EAGAIN"
			if w.BlockedAfter >= 0 {
				first = "first EAGAIN after " + mib(w.BlockedAfter)
			}
			return fmt.Sprintf("no back-pressure: the %s had %s accepted while its reader slept (limit %s; %s)",
				w.Role, mib(w.Buffered), mib(limit), first), ""
		}
		return "", fmt.Sprintf("%s had %s accepted while the reader slept", w.Role, mib(w.Buffered))
	}
	return "", ""
}

// BackpressureLimit is the most a back-pressure writer may get accepted
// while its reader sleeps: what the TCP connections on the path can hold —
// one per hop (client → [client sidecar →] [server sidecar →] server), each
// up to tcp_wmem[2] in its sender and tcp_rmem[2] in its receiver (read in
// the pods' network namespaces: 4 MiB + 4 MiB in NewTopology's pods, 32 MiB
// + 4 MiB by default on this kernel) — plus BackpressureSlack for the
// proxies' own buffers.
func BackpressureLimit(topo *Topology) (int64, error) {
	var rmem, wmem int64
	for _, p := range []*harness.Pod{topo.Client, topo.Server} {
		err := p.InNetNS(func() error {
			for _, x := range []struct {
				file string
				v    *int64
			}{{"tcp_rmem", &rmem}, {"tcp_wmem", &wmem}} {
				b, err := os.ReadFile("/proc/sys/net/ipv4/" + x.file)
				if err != nil {
					return err
				}
				f := strings.Fields(string(b))
				if len(f) != 3 {
					return fmt.Errorf("%s: %q", x.file, b)
				}
				v, err := strconv.ParseInt(f[2], 10, 64)
				if err != nil {
					return err
				}
				*x.v = max(*x.v, v)
			}
			return nil
		})
		if err != nil {
			return 0, fmt.Errorf("back-pressure limit: %w", err)
		}
	}
	hops := int64(1)
	if topo.ClientProxy != nil {
		hops++
	}
	if topo.ServerProxy != nil {
		hops++
	}
	return hops*(rmem+wmem) + BackpressureSlack, nil
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
