package bench

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/test/kube"
)

// K8sOptions configures RunK8s.
type K8sOptions struct {
	Services  int    // default 3000
	Endpoints int    // per service, default 30
	Updates   int    // EndpointSlice updates timed per repetition, default 40
	Reps      int    // repetitions, default 5
	Seed      uint64 // picks of services and endpoints (default 1)
	Shuntd    string // the shuntd binary (default: next to this executable, then $PATH)
	Markdown  bool
	Log       io.Writer
}

func (o K8sOptions) withDefaults() K8sOptions {
	o.Services = cmp.Or(o.Services, 3000)
	o.Endpoints = cmp.Or(o.Endpoints, 30)
	o.Updates = cmp.Or(o.Updates, 40)
	o.Reps = cmp.Or(o.Reps, 5)
	o.Seed = cmp.Or(o.Seed, 1)
	return o
}

// TargetK8sUpdateP99 is the goal for EndpointSlice update → map updated.
const TargetK8sUpdateP99 = 50 * time.Millisecond

// K8sResult is what RunK8s measured.
type K8sResult struct {
	Services, Endpoints int
	Populate            time.Duration // creating the objects in the API server
	InitialSync         time.Duration // shuntd start → synced, empty maps
	RSS, PeakRSS        int64         // shuntd after the initial sync, bytes
	// Per repetition.
	Relist    []time.Duration   // shuntd restart → synced, maps already populated
	Rewritten []int             // services whose map entry a relist rewrote
	Updates   [][]time.Duration // EndpointSlice update → services map entry switched
	Writes    []time.Duration   // the update's PUT round trip (API server + etcd)
	AfterPut  []time.Duration   // PUT answered → map switched (negative: before the answer)
	// AgentP99 is the p99 upper bound from shuntd's own
	// shunt_k8s_event_to_apply_seconds histogram (informer event →
	// applied), over the whole run.
	AgentP99 time.Duration
	RepRSS   []int64 // shuntd RSS at the end of each repetition
}

// endpoint address k of the benchmark (EndpointSlices refuse loopback).
func k8sEndpoint(k int) string { return addrAt(netip.MustParseAddr("10.200.0.0"), 1+k).String() }

// RunK8s measures the Kubernetes source against a real API server (etcd +
// kube-apiserver from scripts/build-k8s.sh) and the real shuntd binary:
// Services × Endpoints are created, shuntd starts with -kubeconfig and an
// empty datapath (initial sync time, RSS), then each repetition restarts
// shuntd against its populated pinned maps (a full relist: time to synced,
// entries rewritten) and times Updates EndpointSlice changes from the PUT
// to the services map entry switching to its new slots. The two halves of
// a repetition alternate their order. Everything is removed at the end.
func RunK8s(ctx context.Context, opts K8sOptions, out io.Writer) (err error) {
	opts = opts.withDefaults()
	if opts.Services < 1 || opts.Services > 60000 || opts.Endpoints < 1 || opts.Endpoints > 1000 || opts.Updates < 1 || opts.Reps < 1 {
		return fmt.Errorf("services 1..60000, endpoints 1..1000, updates and reps ≥ 1")
	}
	shuntd, err := findShuntd(opts.Shuntd)
	if err != nil {
		return err
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
	cg, err := e.subCgroup("k8s")
	if err != nil {
		return err
	}
	logf(opts.Log, "starting etcd and kube-apiserver")
	cp, err := kube.Launch(kube.Options{Dir: filepath.Join(e.tmp, "kube"), ServiceCIDRs: "10.96.0.0/16"})
	if cp != nil {
		defer cp.Close() // before e.close (deferred earlier)
	}
	if err != nil {
		return err
	}
	r := &k8sRun{e: e, opts: opts, cp: cp, c: cp.Admin(), shuntd: shuntd, cgroup: cg, res: K8sResult{Services: opts.Services, Endpoints: opts.Endpoints},
		rng: rand.New(rand.NewPCG(opts.Seed, opts.Seed^0x6b38)), hist: map[float64]float64{}}
	if err := r.populate(ctx); err != nil {
		return err
	}
	if err := r.writeConfig(); err != nil {
		return err
	}
	logf(opts.Log, "shuntd: initial sync of %d services × %d endpoints", opts.Services, opts.Endpoints)
	if r.res.InitialSync, err = r.startAgent(ctx); err != nil {
		return err
	}
	r.res.RSS, r.res.PeakRSS = procRSS(r.agent.Process.Pid)
	if err := r.openMaps(); err != nil {
		return err
	}
	defer r.svcMap.Close()
	if err := r.verify(); err != nil {
		return err
	}
	for rep := range opts.Reps {
		relistFirst := rep%2 == 0
		var lat []time.Duration
		for half := range 2 {
			if (half == 0) == relistFirst {
				d, rewritten, err := r.relist(ctx)
				if err != nil {
					return fmt.Errorf("repetition %d: relist: %w", rep+1, err)
				}
				r.res.Relist = append(r.res.Relist, d)
				r.res.Rewritten = append(r.res.Rewritten, rewritten)
			} else {
				if lat, err = r.updates(ctx); err != nil {
					return fmt.Errorf("repetition %d: updates: %w", rep+1, err)
				}
				r.res.Updates = append(r.res.Updates, lat)
			}
		}
		rss, _ := procRSS(r.agent.Process.Pid)
		r.res.RepRSS = append(r.res.RepRSS, rss)
		logf(opts.Log, "repetition %d/%d: relist %s, update p99 %s", rep+1, opts.Reps, FormatDuration(r.res.Relist[rep]), FormatDuration(Percentile(lat, 99)))
	}
	if err := r.verify(); err != nil {
		return err
	}
	r.stopAgent()
	r.res.AgentP99 = histQuantile(r.hist, 0.99)
	if !opts.Markdown {
		fmt.Fprintf(out, "Kubernetes source: real kube-apiserver %s + etcd, shuntd -kubeconfig; %s, kernel %s.\n\n", r.version(), shuntVersion(), kernelRelease())
	}
	fmt.Fprint(out, K8sTable(r.res))
	if !opts.Markdown {
		p99 := Percentile(pooled(r.res.Updates), 99)
		fmt.Fprintf(out, "\nEndpointSlice update → map p99 %s (target ≤ %s: %s)\n", FormatDuration(p99), FormatDuration(TargetK8sUpdateP99), verdict(p99 <= TargetK8sUpdateP99))
	}
	return nil
}

func findShuntd(p string) (string, error) {
	if p != "" {
		return p, nil
	}
	if exe, err := os.Executable(); err == nil {
		cand := filepath.Join(filepath.Dir(exe), "shuntd")
		if st, err := os.Stat(cand); err == nil && st.Mode()&0o111 != 0 {
			return cand, nil
		}
	}
	if p, err := exec.LookPath("shuntd"); err == nil {
		return p, nil
	}
	return "", errors.New("shuntd not found next to shuntctl nor on $PATH (make build, or --shuntd PATH)")
}

type k8sRun struct {
	e      *env
	opts   K8sOptions
	cp     *kube.ControlPlane
	c      *kube.Client
	shuntd string
	cgroup string
	res    K8sResult
	rng    *rand.Rand

	cfgPath, metricsAddr string
	agent                *exec.Cmd
	agentDone            chan struct{}
	svcMap               *ebpf.Map
	hist                 map[float64]float64 // shuntd's event → applied buckets, summed over its runs

	vips   []netip.AddrPort
	slices []*discoveryv1.EndpointSlice
	next   int // next unused endpoint address
}

func (r *k8sRun) version() string {
	v, err := kube.KubernetesVersion()
	if err != nil {
		return "?"
	}
	return v
}

// populate creates the namespace, Services and EndpointSlices (a few
// requests in flight at a time).
func (r *k8sRun) populate(ctx context.Context) error {
	n, per := r.opts.Services, r.opts.Endpoints
	logf(r.opts.Log, "creating %d Services and EndpointSlices (%d endpoints each)", n, per)
	start := time.Now()
	if err := r.c.Namespace(ctx, "bench", nil); err != nil {
		return err
	}
	r.vips = make([]netip.AddrPort, n)
	r.slices = make([]*discoveryv1.EndpointSlice, n)
	r.next = n * per
	work := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range 8 {
		wg.Go(func() {
			for i := range work {
				if err := r.createService(ctx, i); err != nil {
					mu.Lock()
					firstErr = cmpErr(firstErr, err)
					mu.Unlock()
				}
			}
		})
	}
	for i := range n {
		mu.Lock()
		failed := firstErr != nil
		mu.Unlock()
		if failed || ctx.Err() != nil {
			break
		}
		work <- i
		if (i+1)%1000 == 0 {
			logf(r.opts.Log, "  %d/%d", i+1, n)
		}
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	r.res.Populate = time.Since(start)
	return nil
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

func (r *k8sRun) createService(ctx context.Context, i int) error {
	name := fmt.Sprintf("svc-%05d", i)
	s := &corev1.Service{}
	s.Name, s.Namespace = name, "bench"
	s.Spec.Ports = []corev1.ServicePort{{Name: "http", Port: 80}}
	if err := r.c.Create(ctx, s); err != nil {
		return err
	}
	a, err := netip.ParseAddr(s.Spec.ClusterIP)
	if err != nil {
		return fmt.Errorf("service %s: clusterIP %q", name, s.Spec.ClusterIP)
	}
	r.vips[i] = netip.AddrPortFrom(a, 80)
	sl := &discoveryv1.EndpointSlice{AddressType: discoveryv1.AddressTypeIPv4}
	sl.Name, sl.Namespace = name, "bench"
	sl.Labels = map[string]string{discoveryv1.LabelServiceName: name}
	http, port := "http", int32(BackendPort)
	sl.Ports = []discoveryv1.EndpointPort{{Name: &http, Port: &port}}
	for j := range r.opts.Endpoints {
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{k8sEndpoint(i*r.opts.Endpoints + j)}})
	}
	if err := r.c.Create(ctx, sl); err != nil {
		return err
	}
	r.slices[i] = sl
	return nil
}

func (r *k8sRun) writeConfig() error {
	port, err := harness.FreePort()
	if err != nil {
		return err
	}
	r.metricsAddr = fmt.Sprintf("127.0.0.1:%d", port)
	r.cfgPath = filepath.Join(r.e.tmp, "shunt.yaml")
	cfg := fmt.Sprintf(`datapath:
  bpffsRoot: %s
  cgroup: %s
  maxServices: %d
  maxSlots: %d
socketLB:
  hostNamespaceOnly: true
kubernetes:
  kubeconfig: %s
  nodeName: bench-node
  nodeAddresses: [10.255.255.1]
  cgroupRoots: [%s]
`, r.e.bpffs, r.cgroup, max(datapath.DefaultMaxServices, 2*r.opts.Services), max(datapath.DefaultMaxSlots, 2*r.opts.Services*r.opts.Endpoints),
		r.cp.AdminKubeconfig, r.cgroup)
	return os.WriteFile(r.cfgPath, []byte(cfg), 0o600)
}

// startAgent starts shuntd and returns the time until its Kubernetes source
// reported synced (shunt_k8s_synced 1 on /metrics).
func (r *k8sRun) startAgent(ctx context.Context) (time.Duration, error) {
	logPath := filepath.Join(r.e.tmp, "shuntd.log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return 0, err
	}
	cmd := exec.Command(r.shuntd, "-config", r.cfgPath, "-api-socket", filepath.Join(r.e.tmp, "shuntd.sock"),
		"-state-file", filepath.Join(r.e.tmp, "state.json"), "-metrics-addr", r.metricsAddr, "-log-level", "info")
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := r.e.track(cmd); err != nil {
		f.Close()
		return 0, err
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		f.Close()
		r.e.untrack(cmd)
		return 0, err
	}
	f.Close()
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	r.agent, r.agentDone = cmd, done
	client := &http.Client{Timeout: time.Second}
	for {
		if v, ok := scrape(client, "http://"+r.metricsAddr+"/metrics", "shunt_k8s_synced"); ok && v == "1" {
			return time.Since(start), nil
		}
		select {
		case <-done:
			return 0, fmt.Errorf("shuntd exited:\n%s", tailFile(logPath, 20))
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		if time.Since(start) > 10*time.Minute {
			return 0, fmt.Errorf("shuntd did not sync within 10 minutes:\n%s", tailFile(logPath, 20))
		}
	}
}

// stopAgent stops shuntd by its PID (SIGTERM) and waits; the datapath stays
// pinned.
func (r *k8sRun) stopAgent() {
	if r.agent == nil {
		return
	}
	// Keep its latency histogram: the next shuntd starts from zero.
	scrapeHist(&http.Client{Timeout: 5 * time.Second}, "http://"+r.metricsAddr+"/metrics", "shunt_k8s_event_to_apply_seconds", r.hist)
	_ = r.agent.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.agentDone:
	case <-time.After(20 * time.Second):
		_ = r.agent.Process.Kill()
		<-r.agentDone
	}
	r.e.untrack(r.agent)
	r.agent = nil
}

func scrape(c *http.Client, url, name string) (string, bool) {
	resp, err := c.Get(url)
	if err != nil {
		return "", false
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return v, true
		}
	}
	return "", false
}

// scrapeHist adds the cumulative bucket counts of histogram name (by upper
// bound) to into.
func scrapeHist(c *http.Client, url, name string, into map[float64]float64) {
	resp, err := c.Get(url)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), name+`_bucket{le="`)
		if !ok {
			continue
		}
		le, val, ok := strings.Cut(rest, `"} `)
		if !ok {
			continue
		}
		l, err1 := strconv.ParseFloat(le, 64)
		v, err2 := strconv.ParseFloat(val, 64)
		if err1 == nil && err2 == nil {
			into[l] += v
		}
	}
}

// histQuantile returns the upper bound of the bucket holding quantile q of
// cumulative buckets (0 when empty).
func histQuantile(buckets map[float64]float64, q float64) time.Duration {
	les := slices.Sorted(maps.Keys(buckets))
	if len(les) == 0 || buckets[les[len(les)-1]] == 0 {
		return 0
	}
	total := buckets[les[len(les)-1]]
	for _, le := range les {
		if buckets[le] >= q*total {
			if math.IsInf(le, 1) {
				return 0
			}
			return time.Duration(le * float64(time.Second))
		}
	}
	return 0
}

func tailFile(path string, n int) string {
	data, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// procRSS returns VmRSS and VmHWM of pid in bytes.
func procRSS(pid int) (rss, peak int64) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = v << 10
		case "VmHWM:":
			peak = v << 10
		}
	}
	return rss, peak
}

func (r *k8sRun) openMaps() error {
	m, err := ebpf.LoadPinnedMap(filepath.Join(r.e.bpffs, "maps", bpf.SockmeshMapServices), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return fmt.Errorf("open the pinned services map: %w", err)
	}
	r.svcMap = m
	return nil
}

func (r *k8sRun) rev(i int) (uint8, error) {
	var v bpf.SockmeshSvcValue
	k := datapath.MakeAddr(r.vips[i], mesh.TCP)
	if err := r.svcMap.Lookup(&k, &v); err != nil {
		return 0, fmt.Errorf("service %d (%s) not in the services map: %w", i, r.vips[i], err)
	}
	return v.Rev, nil
}

// verify checks every service is in the map with one slot per endpoint.
func (r *k8sRun) verify() error {
	for i := range r.opts.Services {
		var v bpf.SockmeshSvcValue
		k := datapath.MakeAddr(r.vips[i], mesh.TCP)
		if err := r.svcMap.Lookup(&k, &v); err != nil {
			return fmt.Errorf("service %d (%s) not in the services map: %w", i, r.vips[i], err)
		}
		if int(v.Count) != r.opts.Endpoints {
			return fmt.Errorf("service %d (%s): %d slots, want %d", i, r.vips[i], v.Count, r.opts.Endpoints)
		}
	}
	logf(r.opts.Log, "services map holds all %d services with %d slots each", r.opts.Services, r.opts.Endpoints)
	return nil
}

// relist restarts shuntd against its populated pinned maps: a full list of
// everything and a Replace. It returns the time to synced and how many
// services' map entries were rewritten (their revision changed).
func (r *k8sRun) relist(ctx context.Context) (time.Duration, int, error) {
	before := make([]uint8, r.opts.Services)
	for i := range before {
		v, err := r.rev(i)
		if err != nil {
			return 0, 0, err
		}
		before[i] = v
	}
	r.stopAgent()
	d, err := r.startAgent(ctx)
	if err != nil {
		return 0, 0, err
	}
	rewritten := 0
	for i := range before {
		v, err := r.rev(i)
		if err != nil {
			return 0, 0, err
		}
		if v != before[i] {
			rewritten++
		}
	}
	return d, rewritten, nil
}

// updates replaces one endpoint of a random service's EndpointSlice per
// update and times PUT → services map entry switched (its revision
// changes once the new slots are in place).
func (r *k8sRun) updates(ctx context.Context) ([]time.Duration, error) {
	var out []time.Duration
	for range r.opts.Updates {
		i := r.rng.IntN(r.opts.Services)
		sl := r.slices[i]
		j := r.rng.IntN(len(sl.Endpoints))
		sl.Endpoints[j].Addresses = []string{k8sEndpoint(r.next)}
		r.next++
		before, err := r.rev(i)
		if err != nil {
			return nil, err
		}
		start := time.Now()
		var switched time.Time
		var written time.Duration
		putDone := make(chan error, 1)
		go func() {
			err := r.c.Update(ctx, sl)
			written = time.Since(start)
			putDone <- err
		}()
		for {
			v, err := r.rev(i)
			if err != nil {
				return nil, err
			}
			if v != before {
				switched = time.Now()
				out = append(out, switched.Sub(start))
				break
			}
			if time.Since(start) > 10*time.Second {
				return nil, fmt.Errorf("service %d: map not updated 10 s after the EndpointSlice", i)
			}
			time.Sleep(100 * time.Microsecond)
		}
		if err := <-putDone; err != nil {
			return nil, err
		}
		r.res.Writes = append(r.res.Writes, written)
		r.res.AfterPut = append(r.res.AfterPut, switched.Sub(start)-written)
		// Apart, so that updates are not coalesced with each other.
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return out, nil
}

func pooled(x [][]time.Duration) []time.Duration {
	var out []time.Duration
	for _, l := range x {
		out = append(out, l...)
	}
	return out
}

// K8sTable formats a result as Markdown.
func K8sTable(res K8sResult) string {
	var b strings.Builder
	mib := func(v int64) string { return fmt.Sprintf("%.0f MiB", float64(v)/(1<<20)) }
	all := pooled(res.Updates)
	var p99s, relists []float64
	for _, l := range res.Updates {
		p99s = append(p99s, float64(Percentile(l, 99)))
	}
	for _, d := range res.Relist {
		relists = append(relists, float64(d))
	}
	lo, hi := MinMax(p99s)
	rlo, rhi := MinMax(relists)
	rewritten := 0
	for _, n := range res.Rewritten {
		rewritten += n
	}
	var rss []float64
	for _, v := range res.RepRSS {
		rss = append(rss, float64(v))
	}
	rssMed := int64(Median(rss))
	fmt.Fprintf(&b, "%d Services × %d endpoints (%d EndpointSlices), %d repetitions (median [min–max]):\n\n", res.Services, res.Endpoints, res.Services, len(res.Relist))
	b.WriteString("| measure | value |\n|---|---|\n")
	fmt.Fprintf(&b, "| objects created in the API server | %s |\n", FormatDuration(res.Populate))
	fmt.Fprintf(&b, "| initial sync, shuntd start → all services in the maps (empty maps) | %s |\n", FormatDuration(res.InitialSync))
	fmt.Fprintf(&b, "| shuntd RSS after the initial sync (peak) | %s (%s) |\n", mib(res.RSS), mib(res.PeakRSS))
	fmt.Fprintf(&b, "| shuntd RSS after each repetition | %s |\n", mib(rssMed))
	fmt.Fprintf(&b, "| EndpointSlice update → map, p50 / p90 / p99 / max (%d updates) | %s / %s / %s / %s |\n", len(all),
		FormatDuration(Percentile(all, 50)), FormatDuration(Percentile(all, 90)), FormatDuration(Percentile(all, 99)), FormatDuration(Percentile(all, 100)))
	fmt.Fprintf(&b, "| of which: the PUT round trip (API server + etcd), p50 / p99 | %s / %s |\n", FormatDuration(Percentile(res.Writes, 50)), FormatDuration(Percentile(res.Writes, 99)))
	fmt.Fprintf(&b, "| of which: PUT answered → map, p50 / p99 | %s / %s |\n", FormatDuration(Percentile(res.AfterPut, 50)), FormatDuration(Percentile(res.AfterPut, 99)))
	fmt.Fprintf(&b, "| shuntd's own informer event → applied, p99 (histogram bucket bound, all events) | ≤ %s |\n", FormatDuration(res.AgentP99))
	fmt.Fprintf(&b, "| EndpointSlice update → map, p99 per repetition | %s [%s–%s] |\n", FormatDuration(time.Duration(Median(p99s))), FormatDuration(time.Duration(lo)), FormatDuration(time.Duration(hi)))
	fmt.Fprintf(&b, "| full relist: shuntd restart → synced (maps populated) | %s [%s–%s] |\n", FormatDuration(time.Duration(Median(relists))), FormatDuration(time.Duration(rlo)), FormatDuration(time.Duration(rhi)))
	fmt.Fprintf(&b, "| map entries rewritten by the relists | %d of %d |\n", rewritten, res.Services*len(res.Relist))
	fmt.Fprintf(&b, "| full relist ÷ one update (p99) | %.0f× |\n", Ratio(Median(relists), Median(p99s)))
	return b.String()
}
