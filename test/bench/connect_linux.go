package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
)

// ConnectOptions configures RunConnect.
type ConnectOptions struct {
	// Services lists the service counts N to measure (default 1, 1000, 10000).
	Services []int
	// Reps is the number of repetitions per configuration (default 5).
	Reps int
	// Duration is each measured run's length (default 2s), Warmup the
	// unmeasured start of each run (default 250ms).
	Duration, Warmup time.Duration
	// Slice: each repetition gives every configuration Duration in total,
	// in slices of about Slice taken in turn (default 250ms), so that a
	// burst of unrelated load on the machine hits all configurations alike.
	// Slice ≥ Duration: one block per configuration and repetition.
	Slice time.Duration
	// Backends per service (default 3).
	Backends int
	// CPU is the CPU the client and the servers' threads run on: one CPU
	// for the whole transaction gives far steadier numbers than letting the
	// scheduler move them (cross-CPU wake-ups are costly and erratic in a
	// VM). -1: not pinned. The CLI defaults to the last CPU.
	CPU int
	// Markdown prints only the Markdown tables (for the README).
	Markdown bool
	// Log receives progress (nil: none).
	Log io.Writer
}

func (o ConnectOptions) withDefaults() ConnectOptions {
	if len(o.Services) == 0 {
		o.Services = []int{1, 1000, 10000}
	}
	if o.Reps == 0 {
		o.Reps = 5
	}
	if o.Duration == 0 {
		o.Duration = 2 * time.Second
	}
	if o.Warmup == 0 {
		o.Warmup = 250 * time.Millisecond
	}
	if o.Backends == 0 {
		o.Backends = 3
	}
	if o.Slice == 0 {
		o.Slice = 250 * time.Millisecond
	}
	return o
}

func (o ConnectOptions) validate() error {
	for _, n := range o.Services {
		if n < 1 || n > maxServices {
			return fmt.Errorf("services: %d out of range 1..%d", n, maxServices)
		}
		if n*o.Backends > maxTotalBackends {
			return fmt.Errorf("services: %d × %d backends is more than %d", n, o.Backends, maxTotalBackends)
		}
	}
	if o.Reps < 1 {
		return errors.New("reps: must be at least 1")
	}
	if o.Duration < 10*time.Millisecond {
		return errors.New("duration: must be at least 10ms")
	}
	if o.Slice < time.Millisecond {
		return errors.New("slice: must be at least 1ms")
	}
	if o.Warmup < 0 {
		return errors.New("warmup: must not be negative")
	}
	if o.Backends < 1 || o.Backends > 1000 {
		return errors.New("backends: must be 1..1000")
	}
	if o.CPU < -1 || o.CPU >= runtime.NumCPU() {
		return fmt.Errorf("cpu: %d out of range -1..%d", o.CPU, runtime.NumCPU()-1)
	}
	return nil
}

// maxTotalBackends bounds services × backends (map sizes, address plan).
const maxTotalBackends = 1 << 20

// The three configurations, in the order of the first repetition.
const (
	cfgDirect = iota
	cfgShunt
	cfgIPTables
	numConfigs
)

var configNames = [numConfigs]string{"direct", "shunt", "iptables"}

// Order returns the configurations' run order in repetition rep: the first
// order rotated by rep, so that each one runs first, second and third
// equally often.
func Order(rep int) [numConfigs]int {
	var o [numConfigs]int
	for i := range o {
		o[i] = (i + rep) % numConfigs
	}
	return o
}

// Slices splits a configuration's measured time d into n slices of about
// slice each (at least one).
func Slices(d, slice time.Duration) (n int, each time.Duration) {
	n = 1
	if slice > 0 && slice < d {
		n = int((d + slice/2) / slice)
	}
	return n, d / time.Duration(n)
}

// connectRun is one RunConnect's state.
type connectRun struct {
	opts   ConnectOptions
	e      *env
	ns     string // direct and shunt: no netfilter rules at all
	iptNS  string // iptables: the kube-proxy chains
	shunt  string // cgroup with Shunt's programs attached
	plain  string // sibling cgroup without them (direct and iptables clients)
	nsIno  map[string]uint64
	agentD string // temp folder for the agent's socket and state file

	loadBefore string
}

// RunConnect runs the connection-rate benchmark and writes the report to
// out. It needs root. Everything it creates is removed before it returns,
// also on error or when ctx is cancelled.
func RunConnect(ctx context.Context, opts ConnectOptions, out io.Writer) (err error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return err
	}
	for _, bin := range []string{"ip", "nsenter", "iptables-restore"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("%s is needed: %w", bin, err)
		}
	}
	e, err := newEnv(opts.Log)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := e.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleanup: %w", cerr))
		}
	}()
	r := &connectRun{opts: opts, e: e, nsIno: map[string]uint64{}, loadBefore: loadAvg()}
	if err := r.setup(); err != nil {
		return err
	}
	var rows []ConnectRow
	for _, n := range opts.Services {
		row, err := r.measure(ctx, n)
		if err != nil {
			return fmt.Errorf("N=%d: %w", n, err)
		}
		rows = append(rows, row)
	}
	r.report(out, rows)
	return nil
}

func (r *connectRun) setup() error {
	var err error
	e := r.e
	if r.ns, err = e.addNetNS("lb"); err != nil {
		return err
	}
	if r.iptNS, err = e.addNetNS("ipt"); err != nil {
		return err
	}
	if r.shunt, err = e.subCgroup("shunt"); err != nil {
		return err
	}
	if r.plain, err = e.subCgroup("plain"); err != nil {
		return err
	}
	srv, err := e.subCgroup("servers")
	if err != nil {
		return err
	}
	r.agentD = filepath.Join(e.tmp, "agent")
	for _, ns := range []string{r.ns, r.iptNS} {
		var st os.FileInfo
		if st, err = os.Stat(ns); err != nil {
			return err
		}
		r.nsIno[ns] = inode(st)
		if err := e.startServer(ns, srv, "server", "--port", fmt.Sprint(BackendPort), "--threads", "2", "--cpu", fmt.Sprint(r.opts.CPU)); err != nil {
			return err
		}
	}
	logf(r.opts.Log, "netns %s (direct, shunt) and %s (iptables); cgroups %s (Shunt attached) and %s; servers on 0.0.0.0:%d",
		filepath.Base(r.ns), filepath.Base(r.iptNS), r.shunt, r.plain, BackendPort)
	return nil
}

// measure installs N services in both datapaths, runs the interleaved
// repetitions and removes the services again.
func (r *connectRun) measure(ctx context.Context, n int) (row ConnectRow, err error) {
	row.N = n
	svcs := MakeServices(n, r.opts.Backends)
	target := svcs[n-1] // last: matched last by KUBE-SERVICES

	// Shunt: one agent.New with all N services = one reconcile.
	cfg := agent.Config{
		Datapath:    datapath.Config{Root: r.e.bpffs, Cgroup: r.shunt},
		HostNetNS:   r.ns,
		APISocket:   filepath.Join(r.agentD, "shuntd.sock"),
		StateFile:   filepath.Join(r.agentD, "state.json"),
		MetricsAddr: "",
	}
	if n > datapath.DefaultMaxServices {
		cfg.Datapath.MaxServices = uint32(n)
	}
	if slots := n * r.opts.Backends; slots > datapath.DefaultMaxSlots/2 {
		cfg.Datapath.MaxSlots = uint32(2 * slots)
	}
	for _, s := range svcs {
		cfg.Services = append(cfg.Services, s.Config())
	}
	runtime.GC()
	t0 := time.Now()
	a, err := agent.New(cfg, nil, nil)
	row.ShuntLoad = time.Since(t0)
	if err != nil {
		return row, fmt.Errorf("load Shunt: %w", err)
	}
	cfg.Services = nil // let the GC have it while we measure
	agentOpen := true
	defer func() {
		if agentOpen {
			a.Close()
		}
		if cerr := datapath.Cleanup(r.e.bpffs); cerr != nil {
			err = errors.Join(err, fmt.Errorf("remove Shunt: %w", cerr))
		}
		os.RemoveAll(r.agentD)
	}()
	// iptables: replace the nat table of the iptables namespace.
	rules := KubeProxyRules(svcs)
	t0 = time.Now()
	if err := run(strings.NewReader(rules), "nsenter", "--net="+r.iptNS, "iptables-restore"); err != nil {
		return row, fmt.Errorf("load iptables rules: %w", err)
	}
	row.IPTablesLoad = time.Since(t0)
	logf(r.opts.Log, "N=%d: Shunt loaded in %v, %d iptables rules in %v; measuring %s (backends %v)",
		n, row.ShuntLoad.Round(time.Millisecond), strings.Count(rules, "\n-A "), row.IPTablesLoad.Round(time.Millisecond),
		target.VIP, target.Backends)

	backends := make([]string, len(target.Backends))
	for i, b := range target.Backends {
		backends[i] = b.String()
	}
	type setup struct{ ns, cgroup, addrs string }
	setups := [numConfigs]setup{
		cfgDirect:   {r.ns, r.plain, strings.Join(backends, ",")},
		cfgShunt:    {r.ns, r.shunt, target.VIP.String()},
		cfgIPTables: {r.iptNS, r.plain, target.VIP.String()},
	}
	var clients [numConfigs]*clientProc
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.close()
			}
		}
	}()
	for c, s := range setups {
		if clients[c], err = r.e.startClient(configNames[c]+" client", s.ns, s.cgroup, "--addrs", s.addrs, "--cpu", fmt.Sprint(r.opts.CPU)); err != nil {
			return row, err
		}
		res, err := clients[c].run(ctx, r.opts.Warmup, 0)
		if err != nil {
			return row, err
		}
		if err := r.checkPlacement(res, s.ns, s.cgroup); err != nil {
			return row, fmt.Errorf("%s: %w", configNames[c], err)
		}
	}
	nSlices, sliceDur := Slices(r.opts.Duration, r.opts.Slice)
	sliceWarm := min(r.opts.Warmup, 10*time.Millisecond)
	sums := [numConfigs]*Summary{&row.Direct, &row.Shunt, &row.IPTables}
	for rep := range r.opts.Reps {
		var tx [numConfigs]uint64
		var elapsed, cpu [numConfigs]time.Duration
		order := Order(rep)
		for range nSlices {
			for _, c := range order {
				res, err := clients[c].run(ctx, sliceWarm, sliceDur)
				if err != nil {
					return row, err
				}
				tx[c] += res.Tx
				elapsed[c] += res.Elapsed
				cpu[c] += res.CPU
				if c == cfgShunt {
					row.ShuntConns = res.Connects
				}
			}
		}
		var line []string
		for _, c := range order {
			rate := float64(tx[c]) / elapsed[c].Seconds()
			sums[c].Rates = append(sums[c].Rates, rate)
			if tx[c] > 0 {
				sums[c].CPU = append(sums[c].CPU, float64(cpu[c].Nanoseconds())/1e3/float64(tx[c]))
			}
			line = append(line, fmt.Sprintf("%s %s", configNames[c], FormatRate(rate)))
		}
		logf(r.opts.Log, "N=%d rep %d/%d: %s", n, rep+1, r.opts.Reps, strings.Join(line, ", "))
	}
	for c := range clients {
		clients[c].close()
		clients[c] = nil
	}

	// Every connect of the shunt client, and nothing else, went through
	// Shunt's translation of the measured service.
	id := uint32(0)
	st, err := a.Services()
	if err != nil {
		return row, err
	}
	found := false
	for _, s := range st {
		if s.Name == target.Name {
			id, row.Translations, found = s.ID, s.Translations, true
		}
	}
	if !found {
		return row, fmt.Errorf("service %s missing from the agent", target.Name)
	}
	if row.Translations != row.ShuntConns {
		return row, fmt.Errorf("Shunt translated %d connections of service %s (id %d), the shunt client made %d: the configurations are not isolated",
			row.Translations, target.Name, id, row.ShuntConns)
	}
	agentOpen = false
	if err := a.Close(); err != nil {
		return row, err
	}
	if err := run(strings.NewReader(EmptyNAT), "nsenter", "--net="+r.iptNS, "iptables-restore"); err != nil {
		return row, fmt.Errorf("flush iptables rules: %w", err)
	}
	return row, nil
}

// checkPlacement verifies that the worker ran in the intended network
// namespace and cgroup.
func (r *connectRun) checkPlacement(res ClientResult, ns, cgroup string) error {
	if res.NetNS != r.nsIno[ns] {
		return fmt.Errorf("client ran in network namespace inode %d, want %s (%d)", res.NetNS, ns, r.nsIno[ns])
	}
	if !strings.HasSuffix(cgroup, res.Cgroup) || res.Cgroup == "" {
		return fmt.Errorf("client ran in cgroup %q, want %s", res.Cgroup, cgroup)
	}
	return nil
}

func (r *connectRun) report(out io.Writer, rows []ConnectRow) {
	o := r.opts
	_, sliceDur := Slices(o.Duration, o.Slice)
	pin := "client and server on any CPU"
	if o.CPU >= 0 {
		pin = fmt.Sprintf("client and server pinned to CPU %d", o.CPU)
	}
	load := fmt.Sprintf(" Load average (1 min) %s before, %s after: other work on the machine lowers and scatters the rates.", r.loadBefore, loadAvg())
	method := fmt.Sprintf("TCP_CRR-style new-connection rate (connect, 1 byte each way, close; one client loop, %s), "+
		"median of %d repetition(s) × %v per configuration, interleaved in %v slices (after %v warm-up), %d backends per service, measured VIP last in KUBE-SERVICES; %s, %s, kernel %s, %d CPUs.",
		pin, o.Reps, o.Duration, sliceDur, o.Warmup, o.Backends, iptablesVersion(), shuntVersion(), kernelRelease(), runtime.NumCPU()) + load
	if o.Markdown {
		fmt.Fprintln(out, ConnectTable(rows))
		fmt.Fprintln(out, method)
		fmt.Fprintln(out)
		fmt.Fprintln(out, SpreadTable(rows))
		return
	}
	fmt.Fprintln(out, method)
	fmt.Fprintln(out)
	fmt.Fprintln(out, ConnectTable(rows))
	fmt.Fprintln(out, "Spread of the repetitions, ratios paired within each repetition, the client process's CPU time (user+system) per transaction, time to install the N services:")
	fmt.Fprintln(out)
	fmt.Fprintln(out, SpreadTable(rows))
	for _, l := range TargetLines(rows) {
		fmt.Fprintln(out, l)
	}
}

func iptablesVersion() string {
	out, err := exec.Command("iptables", "--version").Output()
	if err != nil {
		return "iptables ?"
	}
	return strings.TrimSpace(string(out))
}

func shuntVersion() string { return "shunt " + agent.Version }

// loadAvg is the 1-minute load average.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) > 0 {
		return f[0]
	}
	return "?"
}

func kernelRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}
