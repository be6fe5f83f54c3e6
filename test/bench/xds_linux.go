package bench

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/xds"
)

// XDSOptions configures RunXDS.
type XDSOptions struct {
	Services int           // default 3000
	Backends int           // endpoints per service, default 30
	Clients  int           // connected sidecars, default 100
	Changes  int           // endpoint changes timed, default 100 (at least 50 for the report's p99)
	Reps     int           // full translations timed, default 5
	Interval time.Duration // pause after every client ACKed a change, default 20ms
	Delta    bool          // clients use delta ADS instead of state of the world
	Seed     uint64        // which service each change picks (default 1)
	Markdown bool
	Log      io.Writer
}

func (o XDSOptions) withDefaults() XDSOptions {
	o.Services = cmp.Or(o.Services, 3000)
	o.Backends = cmp.Or(o.Backends, 30)
	o.Clients = cmp.Or(o.Clients, 100)
	o.Changes = cmp.Or(o.Changes, 100)
	o.Reps = cmp.Or(o.Reps, 5)
	o.Interval = cmp.Or(o.Interval, 20*time.Millisecond)
	o.Seed = cmp.Or(o.Seed, 1)
	return o
}

// TargetXDSPushP99 is the goal for the time until every client has an
// endpoint change.
const TargetXDSPushP99 = 100 * time.Millisecond

// changePortBase: change i gives the changed service's first endpoint the
// port changePortBase+i, which tells the clients' reports apart.
const changePortBase = 10000

// XDSResult is the outcome of the xDS benchmark.
type XDSResult struct {
	Services, Backends, Clients int
	Delta                       bool // delta ADS clients
	// Translate is each full translation (build and validate every
	// resource of the state).
	Translate []time.Duration
	// Load is Server.Update of the whole state into an empty server:
	// translation, content hashes, the Consistent() check, the caches.
	Load time.Duration
	// Connect is the time until every client had ACKed its first CDS and
	// EDS responses.
	Connect time.Duration
	// Apply is the server's work per change (Server.Apply, which also
	// computes the responses for the woken watches).
	Apply []time.Duration
	// Receipts holds, for every change and client, the time from the
	// change entering the server (Feed.Enqueue) until the client had the
	// response; AllReceived, per change, until the last client had it.
	Receipts, AllReceived []time.Duration
	// HeapPerClient is the server's live heap growth per connected client
	// (runtime.ReadMemStats after GC, before and after the clients
	// connected and ACKed); GoroutinesPerClient likewise.
	HeapPerClient       float64
	GoroutinesPerClient float64
	// CPUPerChange is the server process's CPU time (user + system) per
	// change: pushes, ACK handling, the benchmark's own status polling.
	CPUPerChange time.Duration
	// Unexpected counts responses other than the one EDS response per
	// client and change (must be 0).
	Unexpected int
}

// RunXDS measures Shunt's xDS server: full translation of Services ×
// Backends, then Clients sidecar-like ADS clients (another process, see
// the xds-clients worker) connected over a unix socket, and Changes changes
// of one random service's endpoints: the time until each client received
// the new EDS version, and the server's memory per client. Needs no root.
func RunXDS(ctx context.Context, opts XDSOptions, out io.Writer) (err error) {
	opts = opts.withDefaults()
	switch {
	case opts.Services < 1 || opts.Services > maxServices:
		return fmt.Errorf("services: %d out of range 1..%d", opts.Services, maxServices)
	case opts.Backends < 1 || opts.Backends > mesh.MaxBackendsPerService:
		return fmt.Errorf("backends: %d out of range 1..%d", opts.Backends, mesh.MaxBackendsPerService)
	case opts.Clients < 1 || opts.Clients > 4000:
		return fmt.Errorf("clients: %d out of range 1..4000", opts.Clients)
	case opts.Changes < 1 || opts.Changes > 65535-changePortBase:
		return fmt.Errorf("changes: %d out of range 1..%d", opts.Changes, 65535-changePortBase)
	case opts.Reps < 1:
		return errors.New("reps: must be at least 1")
	}
	res := XDSResult{Services: opts.Services, Backends: opts.Backends, Clients: opts.Clients, Delta: opts.Delta}
	st := &mesh.State{}
	for _, s := range MakeServices(opts.Services, opts.Backends) {
		svc, err := s.Config().Service(s.Name)
		if err != nil {
			return err
		}
		st.Services = append(st.Services, svc)
	}

	logf(opts.Log, "full translation of %d services × %d endpoints, %d times", opts.Services, opts.Backends, opts.Reps)
	for range opts.Reps {
		if err := ctx.Err(); err != nil {
			return err
		}
		runtime.GC()
		t := time.Now()
		if _, err := xds.Translate(st, xds.Options{}); err != nil {
			return err
		}
		res.Translate = append(res.Translate, time.Since(t))
	}

	tmp, err := os.MkdirTemp("", "shunt-bench-xds-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	gid := os.Getegid()
	srv, err := xds.New(xds.Config{UnixSocket: filepath.Join(tmp, "xds.sock"), UnixSocketGID: &gid}, nil, nil)
	if err != nil {
		return err
	}
	runtime.GC()
	t := time.Now()
	if err := srv.Update(st); err != nil {
		return err
	}
	res.Load = time.Since(t)
	ls, err := srv.Listen()
	if err != nil {
		return err
	}
	served := make(chan error, 1)
	go func() { served <- srv.ServeAll(ls) }()
	defer func() {
		srv.Stop()
		if serr := <-served; serr != nil {
			err = errors.Join(err, serr)
		}
	}()
	feed := srv.NewFeed()
	var applyMu sync.Mutex
	feed.OnApply = func(took time.Duration, aerr error) {
		applyMu.Lock()
		res.Apply = append(res.Apply, took)
		applyMu.Unlock()
		if aerr != nil {
			logf(opts.Log, "apply: %v", aerr)
		}
	}
	fctx, stopFeed := context.WithCancel(ctx)
	defer stopFeed()
	go feed.Run(fctx)

	heapBefore, gBefore := liveHeap()
	logf(opts.Log, "connecting %d clients (each watching every cluster and its %d endpoint assignments)", opts.Clients, opts.Services)
	t = time.Now()
	w, err := startXDSClients(filepath.Join(tmp, "xds.sock"), opts.Clients, opts.Delta)
	if err != nil {
		return err
	}
	defer w.stop()
	if err := w.waitReady(ctx, 10*time.Minute); err != nil {
		return err
	}
	// The last ACKs re-create the clients' watches: wait for all of them.
	if err := waitAllAcked(ctx, srv, opts.Clients); err != nil {
		return err
	}
	res.Connect = time.Since(t)
	heapAfter, gAfter := liveHeap()
	res.HeapPerClient = (float64(heapAfter) - float64(heapBefore)) / float64(opts.Clients)
	res.GoroutinesPerClient = float64(gAfter-gBefore) / float64(opts.Clients)
	logf(opts.Log, "connected in %s; server heap %.1f → %.1f MiB", res.Connect.Round(time.Millisecond), mib(heapBefore), mib(heapAfter))

	rng := rand.New(rand.NewPCG(opts.Seed, opts.Seed^0x5eed))
	cpu0 := cpuTime()
	for i := range opts.Changes {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(opts.Interval):
		}
		k := rng.IntN(len(st.Services))
		svc := st.Services[k]
		svc.Backends = slices.Clone(svc.Backends)
		svc.Backends[0].Addr = netip.AddrPortFrom(svc.Backends[0].Addr.Addr(), uint16(changePortBase+i))
		st.Services[k] = svc
		cluster := xds.ClusterName(&svc, "")
		t0 := time.Now()
		feed.Enqueue(xds.Change{Services: []mesh.Service{svc}})
		lat, unexpected, err := w.collect(ctx, opts.Clients, cluster, changePortBase+i, t0)
		if err != nil {
			return fmt.Errorf("change %d (%s): %w", i+1, svc.Name, err)
		}
		res.Receipts = append(res.Receipts, lat...)
		res.AllReceived = append(res.AllReceived, slices.Max(lat))
		res.Unexpected += unexpected
		// One change at a time: the next one comes once every client has
		// ACKed this one (and the server processed the ACKs).
		if err := waitAllAcked(ctx, srv, opts.Clients); err != nil {
			return err
		}
		if (i+1)%25 == 0 {
			logf(opts.Log, "%d/%d changes", i+1, opts.Changes)
		}
	}
	res.CPUPerChange = (cpuTime() - cpu0) / time.Duration(opts.Changes)
	// Anything arriving after the last change is unexpected too.
	res.Unexpected += w.drain(opts.Interval + 200*time.Millisecond)

	if !opts.Markdown {
		fmt.Fprintf(out, "xDS server: %d services × %d endpoints; %d %s ADS clients on their own connections over a unix socket, each watching every cluster and every endpoint assignment (as an Envoy sidecar does); %d changes, one at a time (the next %s after every client ACKed the last), each replacing one endpoint of a random service (seed %d). %s, kernel %s, %d CPUs, load %s.\n\n",
			opts.Services, opts.Backends, opts.Clients, protoName(opts.Delta), opts.Changes, opts.Interval, opts.Seed, shuntVersion(), kernelRelease(), runtime.NumCPU(), loadAvg())
	}
	fmt.Fprint(out, XDSTable(res))
	if !opts.Markdown {
		p99 := Percentile(res.AllReceived, 99)
		fmt.Fprintf(out, "\npush p99 until all %d clients had the change: %s (target ≤ %s: %s); unexpected responses: %d\n",
			opts.Clients, FormatDuration(p99), FormatDuration(TargetXDSPushP99), verdict(p99 <= TargetXDSPushP99), res.Unexpected)
	}
	if res.Unexpected > 0 {
		return fmt.Errorf("%d responses besides the one EDS response per client and change", res.Unexpected)
	}
	return nil
}

func protoName(delta bool) string {
	if delta {
		return "delta"
	}
	return "state-of-the-world"
}

// liveHeap returns the live heap after two collections, and the number of
// goroutines.
func liveHeap() (uint64, int) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc, runtime.NumGoroutine()
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func waitAllAcked(ctx context.Context, srv *xds.Server, clients int) error {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st := srv.Status()
		n := 0
		for _, node := range st.Nodes {
			e := node.Types[resource.EndpointType]
			if e.SentVersion != "" && e.AckedVersion == e.SentVersion && !e.Pending {
				n++
			}
		}
		if n == clients {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("only %d of %d clients ACKed their endpoints", n, clients)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// XDSTable renders the xDS benchmark as two Markdown tables: the builds,
// then the pushes and memory.
func XDSTable(r XDSResult) string {
	var b strings.Builder
	med := func(ds []time.Duration) string { return FormatDuration(Percentile(ds, 50)) }
	lo, hi := slices.Min(r.Translate), slices.Max(r.Translate)
	mdTable(&b, []string{"services × endpoints", "full translation (median; min–max)", "initial load (Server.Update)", "Apply per change p50 / p99"}, "lrrr",
		[][]string{{fmt.Sprintf("%d × %d", r.Services, r.Backends),
			fmt.Sprintf("%s (%s–%s, %d runs)", med(r.Translate), FormatDuration(lo), FormatDuration(hi), len(r.Translate)),
			FormatDuration(r.Load),
			med(r.Apply) + " / " + FormatDuration(Percentile(r.Apply, 99))}})
	b.WriteString("\n")
	mdTable(&b, []string{"clients", "changes", "each client p50", "p99", "max", "all clients p50", "p99", "max", "server CPU / change", "server heap / client"}, "rrrrrrrrrr",
		[][]string{{strconv.Itoa(r.Clients) + " " + map[bool]string{false: "sotw", true: "delta"}[r.Delta], strconv.Itoa(len(r.AllReceived)),
			med(r.Receipts), FormatDuration(Percentile(r.Receipts, 99)), FormatDuration(Percentile(r.Receipts, 100)),
			med(r.AllReceived), FormatDuration(Percentile(r.AllReceived, 99)), FormatDuration(Percentile(r.AllReceived, 100)),
			FormatDuration(r.CPUPerChange), fmt.Sprintf("%.0f KiB", r.HeapPerClient/1024)}})
	return b.String()
}

// xdsClients is the running xds-clients worker.
type xdsClients struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	events  chan xdsEvent
	exited  chan struct{} // closed once the worker was waited for
	exitErr error
}

type xdsEvent struct {
	kind    string // ready, eds, cds, err
	client  int
	at      time.Time
	n       int
	cluster string
	port    int
	text    string
}

func startXDSClients(sock string, n int, delta bool) (*xdsClients, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "bench", "worker", "xds-clients", "--socket", sock, "--clients", strconv.Itoa(n), "--delta="+strconv.FormatBool(delta))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start xds clients: %w", err)
	}
	w := &xdsClients{cmd: cmd, stdin: stdin, events: make(chan xdsEvent, 4*n+16), exited: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if ev, ok := parseXDSEvent(sc.Text()); ok {
				w.events <- ev
			}
		}
		close(w.events)
		w.exitErr = cmd.Wait()
		close(w.exited)
	}()
	return w, nil
}

func parseXDSEvent(line string) (xdsEvent, bool) {
	f := strings.Fields(line)
	if len(f) == 0 {
		return xdsEvent{}, false
	}
	ev := xdsEvent{kind: f[0], text: line}
	switch f[0] {
	case "eds", "cds":
		if len(f) < 4 {
			return ev, false
		}
		ev.client, _ = strconv.Atoi(f[1])
		ns, _ := strconv.ParseInt(f[2], 10, 64)
		ev.at = time.Unix(0, ns)
		ev.n, _ = strconv.Atoi(f[3])
		if f[0] == "eds" && len(f) >= 6 {
			ev.cluster = f[4]
			ev.port, _ = strconv.Atoi(f[5])
		}
	}
	return ev, true
}

func (w *xdsClients) waitReady(ctx context.Context, timeout time.Duration) error {
	tm := time.NewTimer(timeout)
	defer tm.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tm.C:
			return errors.New("xds clients: not ready in time")
		case ev, ok := <-w.events:
			if !ok {
				return w.exitError()
			}
			switch ev.kind {
			case "ready":
				return nil
			case "err":
				return errors.New(ev.text)
			}
		}
	}
}

// collect waits for every client's EDS response carrying the change
// (cluster, port) and returns each client's latency from t0; other
// responses are counted as unexpected.
func (w *xdsClients) collect(ctx context.Context, clients int, cluster string, port int, t0 time.Time) ([]time.Duration, int, error) {
	got := make(map[int]time.Duration, clients)
	unexpected := 0
	tm := time.NewTimer(30 * time.Second)
	defer tm.Stop()
	for len(got) < clients {
		select {
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-tm.C:
			return nil, 0, fmt.Errorf("%d of %d clients received it within 30s", len(got), clients)
		case ev, ok := <-w.events:
			if !ok {
				return nil, 0, w.exitError()
			}
			switch {
			case ev.kind == "err":
				return nil, 0, errors.New(ev.text)
			case ev.kind == "eds" && ev.n == 1 && ev.cluster == cluster && ev.port == port:
				if _, dup := got[ev.client]; dup {
					unexpected++
				} else {
					got[ev.client] = ev.at.Sub(t0)
				}
			default:
				unexpected++
			}
		}
	}
	out := make([]time.Duration, 0, clients)
	for _, d := range got {
		out = append(out, d)
	}
	return out, unexpected, nil
}

// drain counts the responses arriving within d.
func (w *xdsClients) drain(d time.Duration) int {
	n := 0
	tm := time.NewTimer(d)
	defer tm.Stop()
	for {
		select {
		case <-tm.C:
			return n
		case ev, ok := <-w.events:
			if !ok {
				return n
			}
			if ev.kind == "eds" || ev.kind == "cds" {
				n++
			}
		}
	}
}

// stop ends the worker: its stdin closes (it exits by itself), then it is
// killed by PID if it did not.
func (w *xdsClients) stop() {
	go func() {
		for range w.events { // keep the reader going until the worker exits
		}
	}()
	w.stdin.Close()
	select {
	case <-w.exited:
		return
	case <-time.After(5 * time.Second):
	}
	w.cmd.Process.Kill()
	<-w.exited
}

func (w *xdsClients) exitError() error {
	<-w.exited
	return fmt.Errorf("xds clients exited: %v", w.exitErr)
}
