package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
)

// XDPOptions configures RunXDP.
type XDPOptions struct {
	// Reps: interleaved repetitions of every measurement (default 5).
	Reps int
	// Calls: BPF_PROG_TEST_RUN calls per scenario and repetition (default
	// 20000); each call runs the program once on one packet and the kernel
	// reports the time of that run.
	Calls int
	// Flows in the "many flows" scenario (default 100000).
	Flows int
	// Duration of each throughput measurement (default 2s).
	Duration time.Duration
	// CPU runs the single-threaded measurements and the generator (default
	// the last CPU).
	CPU int
	// SkipThroughput leaves out the veth throughput part.
	SkipThroughput bool
	Markdown       bool
	Log            io.Writer
}

func (o XDPOptions) withDefaults() XDPOptions {
	if o.Reps == 0 {
		o.Reps = 5
	}
	if o.Calls == 0 {
		o.Calls = 20000
	}
	if o.Flows == 0 {
		o.Flows = 100000
	}
	if o.Duration == 0 {
		o.Duration = 2 * time.Second
	}
	return o
}

// benchSeedOK is the benchmark's Maglev seed ("bench-xdp-lb").
const benchSeedOK = "YmVuY2gteGRwLWxi"

var (
	benchVIP  = netip.MustParseAddrPort("10.96.0.1:53")
	benchNode = netip.MustParseAddr("10.98.0.2")
)

func benchServices() []xdp.Service {
	var bs []xdp.Backend
	for i := 1; i <= 10; i++ {
		bs = append(bs, xdp.Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 99, 0, byte(i + 1)}), 5353), Weight: 1})
	}
	return []xdp.Service{{Frontend: benchVIP, Proto: mesh.UDP, Mode: mesh.DSR, Dispatch: mesh.IPIP, Backends: bs}}
}

// flowFrame is a UDP packet of flow i (distinct client address and port).
func flowFrame(i int, srcMAC, dstMAC net.HardwareAddr) ([]byte, error) {
	src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, byte(100 + i>>16&0x3f), byte(i >> 8)}), uint16(10000+i&0xff))
	f, err := xdp.BuildProbe(mesh.UDP, src, benchVIP)
	if err != nil {
		return nil, err
	}
	if srcMAC != nil {
		copy(f[0:6], dstMAC)
		copy(f[6:12], srcMAC)
	}
	return f, nil
}

func loadBenchLB(conntrack string, flows int) (*xdp.Datapath, error) {
	cfg := xdp.Config{Seed: benchSeedOK, NodeAddr: benchNode.String(), Conntrack: conntrack, MaxFlows: uint32(flows), MaxServices: 16, MaxBackends: 64}
	d, err := xdp.Open(cfg, "", nil)
	if err != nil {
		return nil, err
	}
	if _, err := d.Sync(benchServices()); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// runOnce runs prog on frame once and returns the kernel's time for the run.
func runOnce(prog *ebpf.Program, frame []byte) (time.Duration, uint32, error) {
	ret, d, err := prog.Benchmark(frame, 1, nil)
	return d, ret, err
}

// pinCPU locks the calling goroutine to its thread and that thread to cpu.
func pinCPU(cpu int) error {
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	return unix.SchedSetaffinity(0, &set)
}

// perPacket measures calls runs on frames chosen by pick, on cpu, and
// returns the median kernel time per run in ns.
func perPacket(prog *ebpf.Program, cpu, calls int, pick func(i int) []byte) (float64, error) {
	errc := make(chan error, 1)
	ds := make([]float64, 0, calls)
	go func() {
		defer runtime.UnlockOSThread()
		if err := pinCPU(cpu); err != nil {
			errc <- err
			return
		}
		for i := 0; i < calls; i++ {
			d, ret, err := runOnce(prog, pick(i))
			if err != nil {
				errc <- err
				return
			}
			if ret != xdp.XDPTx && ret != xdp.XDPPass {
				errc <- fmt.Errorf("unexpected verdict %s", xdp.VerdictName(ret))
				return
			}
			ds = append(ds, float64(d.Nanoseconds()))
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		return 0, err
	}
	return Median(ds), nil
}

// XDPResult holds every measurement of RunXDP (medians per repetition).
type XDPResult struct {
	Baseline, Hot, Miss, Many   []float64 // ns per packet, raw kernel time, per-CPU LRU
	MissShared, ManyShared      []float64 // shared LRU
	Miss2PerCPU, Miss2Shared    []float64 // new flows on 2 CPUs at once
	LBMpps, IPTMpps             []float64
	ThroughputSkipped           bool
	Kernel, Generated           string
	Flows, Calls, Reps, CPU     int
	ThroughputDur               time.Duration
	HotVerdict, IPTablesVersion string
	// LBPackets is what xdplb forwarded in the throughput part; LBOther
	// lists any other verdict it gave (should be none).
	LBPackets uint64
	LBOther   []string
}

// RunXDP measures the XDP load balancer: ns per packet via
// BPF_PROG_TEST_RUN, and packets per second through veth against kernel
// forwarding with iptables DNAT.
func RunXDP(ctx context.Context, opts XDPOptions, out io.Writer) error {
	o := opts.withDefaults()
	if o.CPU < 0 || o.CPU >= runtime.NumCPU() {
		o.CPU = runtime.NumCPU() - 1
	}
	res := XDPResult{Flows: o.Flows, Calls: o.Calls, Reps: o.Reps, CPU: o.CPU, ThroughputDur: o.Duration, Kernel: kernelRelease()}
	if err := measurePerPacket(ctx, o, &res); err != nil {
		return err
	}
	if o.SkipThroughput {
		res.ThroughputSkipped = true
	} else if err := measureThroughput(ctx, o, &res); err != nil {
		return err
	}
	fmt.Fprint(out, XDPReport(res, o.Markdown))
	return nil
}

func measurePerPacket(ctx context.Context, o XDPOptions, res *XDPResult) error {
	capacity := 1 << 21 // room for every flow inserted by all repetitions: no eviction
	lbs := map[string]*xdp.Datapath{}
	for _, k := range []string{"percpu", "shared"} {
		d, err := loadBenchLB(k, capacity)
		if err != nil {
			return fmt.Errorf("load xdplb (%s LRU): %w", k, err)
		}
		defer d.Close()
		lbs[k] = d
	}
	logf(o.Log, "building %d flows", o.Flows)
	many := make([][]byte, o.Flows)
	for i := range many {
		f, err := flowFrame(i, nil, nil)
		if err != nil {
			return err
		}
		many[i] = f
	}
	// Flows are established once in each load balancer.
	for _, d := range lbs {
		for _, f := range many {
			if _, _, err := runOnce(d.Program(), f); err != nil {
				return err
			}
		}
	}
	hot := many[0]
	next := 1 << 20 // fresh flows for the miss scenarios
	fresh := func(n int) ([][]byte, error) {
		fs := make([][]byte, n)
		for i := range fs {
			f, err := flowFrame(next, nil, nil)
			if err != nil {
				return nil, err
			}
			next++
			fs[i] = f
		}
		return fs, nil
	}
	r := rand.New(rand.NewPCG(1, 2))
	other := (o.CPU + 1) % runtime.NumCPU()
	for rep := 0; rep < o.Reps; rep++ {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		logf(o.Log, "per-packet repetition %d/%d", rep+1, o.Reps)
		type m struct {
			dst  *[]float64
			prog *ebpf.Program
			pick func(i int) []byte
			prep func() error
		}
		var missP, missS [][]byte
		steps := []m{
			{&res.Baseline, lbs["percpu"].PassProgram(), func(int) []byte { return hot }, nil},
			{&res.Hot, lbs["percpu"].Program(), func(int) []byte { return hot }, nil},
			{&res.Miss, lbs["percpu"].Program(), func(i int) []byte { return missP[i] }, func() (err error) { missP, err = fresh(o.Calls); return }},
			{&res.MissShared, lbs["shared"].Program(), func(i int) []byte { return missS[i] }, func() (err error) { missS, err = fresh(o.Calls); return }},
			{&res.Many, lbs["percpu"].Program(), func(int) []byte { return many[r.IntN(len(many))] }, nil},
			{&res.ManyShared, lbs["shared"].Program(), func(int) []byte { return many[r.IntN(len(many))] }, nil},
		}
		// Rotate the order by repetition.
		for k := range steps {
			s := steps[(k+rep)%len(steps)]
			if s.prep != nil {
				if err := s.prep(); err != nil {
					return err
				}
			}
			v, err := perPacket(s.prog, o.CPU, o.Calls, s.pick)
			if err != nil {
				return err
			}
			*s.dst = append(*s.dst, v)
		}
		// New flows on two CPUs at once: where a shared LRU list contends.
		for _, k := range rotateSlice([]string{"percpu", "shared"}, rep) {
			a, err := fresh(o.Calls)
			if err != nil {
				return err
			}
			b, err := fresh(o.Calls)
			if err != nil {
				return err
			}
			var wg sync.WaitGroup
			var va, vb float64
			var ea, eb error
			wg.Add(2)
			go func() {
				defer wg.Done()
				va, ea = perPacket(lbs[k].Program(), o.CPU, o.Calls, func(i int) []byte { return a[i] })
			}()
			go func() {
				defer wg.Done()
				vb, eb = perPacket(lbs[k].Program(), other, o.Calls, func(i int) []byte { return b[i] })
			}()
			wg.Wait()
			if err := errors.Join(ea, eb); err != nil {
				return err
			}
			if k == "percpu" {
				res.Miss2PerCPU = append(res.Miss2PerCPU, (va+vb)/2)
			} else {
				res.Miss2Shared = append(res.Miss2Shared, (va+vb)/2)
			}
		}
	}
	return nil
}

func rotateSlice[T any](s []T, n int) []T {
	n %= len(s)
	return append(slices.Clone(s[n:]), s[:n]...)
}

// ---- throughput through veth ----

type netnsSet struct {
	prefix string
	names  []string
	log    io.Writer
}

func (n *netnsSet) add(name string) (string, error) {
	full := n.prefix + name
	if err := run(nil, "ip", "netns", "add", full); err != nil {
		return "", err
	}
	n.names = append(n.names, full)
	return full, nil
}

func (n *netnsSet) close() {
	for _, ns := range n.names {
		if err := run(nil, "ip", "netns", "del", ns); err != nil {
			logf(n.log, "cleanup: %v", err)
		}
	}
}

func ipBatchNS(ns string, cmds ...string) error {
	return run(strings.NewReader(strings.Join(cmds, "\n")+"\n"), "ip", "-n", ns, "-batch", "-")
}

func nsPath(ns string) string { return filepath.Join("/run/netns", ns) }

// inNS runs fn on a thread in netns ns (pinned to cpu if >= 0).
func inNS(ns string, cpu int, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if cpu >= 0 {
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				errc <- err
				return
			}
		}
		fd, err := unix.Open(nsPath(ns), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func ifaceIn(ns, name string) (*net.Interface, error) {
	var iface *net.Interface
	err := inNS(ns, -1, func() (err error) {
		iface, err = net.InterfaceByName(name)
		return err
	})
	return iface, err
}

func attachXDPIn(ns, dev string, prog *ebpf.Program) (link.Link, error) {
	var l link.Link
	err := inNS(ns, -1, func() error {
		iface, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		l, err = link.AttachXDP(link.XDPOptions{Program: prog, Interface: iface.Index, Flags: link.XDPDriverMode})
		return err
	})
	return l, err
}

// xdpMd is struct xdp_md, the context of an XDP test run.
type xdpMd struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// generate transmits frames out of ifindex (in netns ns) from cpu with
// BPF_PROG_TEST_RUN live frames for d, taking the frames in turn in
// batches of repeat packets.
func generate(ctx context.Context, gen *ebpf.Program, tmplMap *ebpf.Map, ns string, cpu, ifindex int, frames [][]byte, d time.Duration) error {
	const repeat = 2048
	return inNS(ns, cpu, func() error {
		end := time.Now().Add(d)
		for i := 0; time.Now().Before(end) && ctx.Err() == nil; i++ {
			f := frames[i%len(frames)]
			var tmpl bpf.XdpbenchBenchFrame
			if len(f) != len(tmpl.Data) {
				return fmt.Errorf("generator frames must be %d bytes, not %d", len(tmpl.Data), len(f))
			}
			copy(tmpl.Data[:], f)
			if err := tmplMap.Put(uint32(0), tmpl); err != nil {
				return err
			}
			opts := &ebpf.RunOptions{Data: f, Repeat: repeat, Flags: unix.BPF_F_TEST_XDP_LIVE_FRAMES,
				Context: xdpMd{DataEnd: uint32(len(f)), IngressIfindex: uint32(ifindex)}}
			if _, err := gen.Run(opts); err != nil {
				return fmt.Errorf("live-frames test run: %w", err)
			}
		}
		return nil
	})
}

func sinkCount(m *ebpf.Map) (uint64, error) {
	var per []uint64
	if err := m.Lookup(uint32(0), &per); err != nil {
		return 0, err
	}
	var s uint64
	for _, v := range per {
		s += v
	}
	return s, nil
}

// mppsOf generates for d and returns packets per second arriving at the sink.
func mppsOf(ctx context.Context, gen *ebpf.Program, tmplMap, sink *ebpf.Map, ns string, cpu, ifindex int, frames [][]byte, d time.Duration) (float64, error) {
	before, err := sinkCount(sink)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := generate(ctx, gen, tmplMap, ns, cpu, ifindex, frames, d); err != nil {
		return 0, err
	}
	time.Sleep(50 * time.Millisecond) // let the last batches drain
	after, err := sinkCount(sink)
	if err != nil {
		return 0, err
	}
	return float64(after-before) / time.Since(start).Seconds() / 1e6, nil
}

func measureThroughput(ctx context.Context, o XDPOptions, res *XDPResult) (err error) {
	id := fmt.Sprintf("%04x", rand.Uint32()&0xffff)
	nss := &netnsSet{prefix: "shuntxdp-" + id + "-", log: o.Log}
	defer nss.close()
	bpffs := "/sys/fs/bpf/shuntxdp-bench-" + id
	defer os.RemoveAll(bpffs)
	var objs bpf.XdpbenchObjects
	if err := bpf.LoadXdpbenchObjects(&objs, nil); err != nil {
		return fmt.Errorf("load xdpbench: %w", err)
	}
	defer objs.Close()
	res.IPTablesVersion = iptablesVersion()

	// Load balancer: gen(g0) <-> lb(g1); xdplb on g1 sends its output back to g0.
	genA, err := nss.add("gen")
	if err != nil {
		return err
	}
	lbNS, err := nss.add("lb")
	if err != nil {
		return err
	}
	if err := ipBatchNS(genA, "link set lo up", "link add g0 type veth peer name g1 netns "+lbNS, "link set g0 up"); err != nil {
		return err
	}
	if err := ipBatchNS(lbNS, "link set lo up", "link set g1 up"); err != nil {
		return err
	}
	lb, err := xdp.Open(xdp.Config{Devices: []string{"g1"}, NetNS: nsPath(lbNS), Seed: benchSeedOK, NodeAddr: benchNode.String(),
		MaxFlows: 65536, MaxServices: 16, MaxBackends: 64}, bpffs, nil)
	if err != nil {
		return fmt.Errorf("xdplb on veth: %w", err)
	}
	defer lb.Close()
	if len(lb.Generic) > 0 {
		return errors.New("native XDP refused on veth")
	}
	if _, err := lb.Sync(benchServices()); err != nil {
		return err
	}
	sinkA, err := attachXDPIn(genA, "g0", objs.BenchSink)
	if err != nil {
		return fmt.Errorf("sink on g0: %w", err)
	}
	defer sinkA.Close()
	g0, err := ifaceIn(genA, "g0")
	if err != nil {
		return err
	}
	g1, err := ifaceIn(lbNS, "g1")
	if err != nil {
		return err
	}

	// Kernel: gen2(h0) <-> rt(h1) ... rt(h2) <-> sink(h3); forwarding with
	// kube-proxy-style DNAT to three endpoints in rt.
	genB, err := nss.add("gen2")
	if err != nil {
		return err
	}
	rt, err := nss.add("rt")
	if err != nil {
		return err
	}
	sinkNS, err := nss.add("sink")
	if err != nil {
		return err
	}
	if err := ipBatchNS(genB, "link set lo up", "link add h0 type veth peer name h1 netns "+rt, "link set h0 up"); err != nil {
		return err
	}
	if err := ipBatchNS(sinkNS, "link set lo up", "link add h3 type veth peer name h2 netns "+rt, "link set h3 up"); err != nil {
		return err
	}
	h3, err := ifaceIn(sinkNS, "h3")
	if err != nil {
		return err
	}
	cmds := []string{"link set lo up", "link set h1 up", "link set h2 up", "addr add 10.98.0.1/24 dev h1", "addr add 10.99.0.1/24 dev h2",
		"route add 198.51.64.0/18 dev h1"}
	for i := 2; i <= 11; i++ {
		cmds = append(cmds, fmt.Sprintf("neigh add 10.99.0.%d lladdr %s dev h2", i, h3.HardwareAddr))
	}
	if err := ipBatchNS(rt, cmds...); err != nil {
		return err
	}
	if err := inNS(rt, -1, func() error {
		for k, v := range map[string]string{"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/rp_filter": "0", "net/ipv4/conf/default/rp_filter": "0", "net/ipv4/conf/h1/rp_filter": "0"} {
			if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return err
	}
	if err := run(strings.NewReader(kubeProxyDNAT()), "ip", "netns", "exec", rt, "iptables-restore"); err != nil {
		return fmt.Errorf("iptables-restore: %w", err)
	}
	passH1, err := attachXDPIn(rt, "h1", lb.PassProgram())
	if err != nil {
		return fmt.Errorf("xdp_pass on h1: %w", err)
	}
	defer passH1.Close()
	sinkB, err := attachXDPIn(sinkNS, "h3", objs.BenchSink)
	if err != nil {
		return fmt.Errorf("sink on h3: %w", err)
	}
	defer sinkB.Close()
	h0, err := ifaceIn(genB, "h0")
	if err != nil {
		return err
	}
	h1, err := ifaceIn(rt, "h1")
	if err != nil {
		return err
	}

	const nflows = 64
	framesA := make([][]byte, nflows)
	framesB := make([][]byte, nflows)
	for i := range nflows {
		if framesA[i], err = flowFrame(i, g0.HardwareAddr, g1.HardwareAddr); err != nil {
			return err
		}
		if framesB[i], err = flowFrame(i, h0.HardwareAddr, h1.HardwareAddr); err != nil {
			return err
		}
	}
	// Warm up both paths (conntrack entries, neighbours).
	if _, err := mppsOf(ctx, objs.BenchTx, objs.BenchTmpl, objs.BenchCount, genA, o.CPU, g0.Index, framesA, 200*time.Millisecond); err != nil {
		return err
	}
	if _, err := mppsOf(ctx, objs.BenchTx, objs.BenchTmpl, objs.BenchCount, genB, o.CPU, h0.Index, framesB, 200*time.Millisecond); err != nil {
		return err
	}
	for rep := 0; rep < o.Reps; rep++ {
		logf(o.Log, "throughput repetition %d/%d", rep+1, o.Reps)
		for _, which := range rotateSlice([]string{"lb", "ipt"}, rep) {
			if which == "lb" {
				v, err := mppsOf(ctx, objs.BenchTx, objs.BenchTmpl, objs.BenchCount, genA, o.CPU, g0.Index, framesA, o.Duration)
				if err != nil {
					return err
				}
				res.LBMpps = append(res.LBMpps, v)
			} else {
				v, err := mppsOf(ctx, objs.BenchTx, objs.BenchTmpl, objs.BenchCount, genB, o.CPU, h0.Index, framesB, o.Duration)
				if err != nil {
					return err
				}
				res.IPTMpps = append(res.IPTMpps, v)
			}
		}
	}
	c, err := lb.Counters()
	if err != nil {
		return err
	}
	// Every generated frame must have been load-balanced.
	for i, n := range xdp.StatNames {
		switch n {
		case "tx_ipip":
			res.LBPackets = c[i]
		case "ct_hit", "ct_new":
		default:
			if c[i] != 0 {
				res.LBOther = append(res.LBOther, fmt.Sprintf("%s %d", n, c[i]))
			}
		}
	}
	return nil
}

// kubeProxyDNAT is a kube-proxy style ruleset: the VIP's chain picks one of
// three endpoints at random and DNATs to it.
func kubeProxyDNAT() string {
	vip := benchVIP.Addr().String()
	return fmt.Sprintf(`*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-BENCH - [0:0]
:KUBE-SEP-1 - [0:0]
:KUBE-SEP-2 - [0:0]
:KUBE-SEP-3 - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A KUBE-SERVICES -d %s/32 -p udp -m udp --dport %d -j KUBE-SVC-BENCH
-A KUBE-SVC-BENCH -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-1
-A KUBE-SVC-BENCH -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-2
-A KUBE-SVC-BENCH -j KUBE-SEP-3
-A KUBE-SEP-1 -p udp -j DNAT --to-destination 10.99.0.2:5353
-A KUBE-SEP-2 -p udp -j DNAT --to-destination 10.99.0.3:5353
-A KUBE-SEP-3 -p udp -j DNAT --to-destination 10.99.0.4:5353
COMMIT
`, vip, benchVIP.Port())
}

// XDPReport formats a result.
func XDPReport(r XDPResult, markdown bool) string {
	var b strings.Builder
	f1 := func(xs []float64) string {
		if len(xs) == 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.0f", Median(xs))
	}
	net := func(xs []float64) string {
		if len(xs) == 0 || len(r.Baseline) == 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.0f", Median(xs)-Median(r.Baseline))
	}
	spread := func(xs []float64) string {
		lo, hi := MinMax(xs)
		return fmt.Sprintf("%.0f–%.0f", lo, hi)
	}
	if !markdown {
		fmt.Fprintf(&b, "XDP load balancer, kernel %s, CPU %d, %d reps × %d test runs, %d established flows\n\n", r.Kernel, r.CPU, r.Reps, r.Calls, r.Flows)
	}
	rows := [][]string{
		{"empty XDP program (test-run overhead)", f1(r.Baseline), "—", spread(r.Baseline)},
		{"hot flow (conntrack hit, IPIP)", f1(r.Hot), net(r.Hot), spread(r.Hot)},
		{"new flow: conntrack miss + Maglev + insert (per-CPU LRU)", f1(r.Miss), net(r.Miss), spread(r.Miss)},
		{"new flow: conntrack miss + Maglev + insert (shared LRU)", f1(r.MissShared), net(r.MissShared), spread(r.MissShared)},
		{fmt.Sprintf("%d flows, random (per-CPU LRU)", r.Flows), f1(r.Many), net(r.Many), spread(r.Many)},
		{fmt.Sprintf("%d flows, random (shared LRU)", r.Flows), f1(r.ManyShared), net(r.ManyShared), spread(r.ManyShared)},
		{"new flows on 2 CPUs at once (per-CPU LRU)", f1(r.Miss2PerCPU), net(r.Miss2PerCPU), spread(r.Miss2PerCPU)},
		{"new flows on 2 CPUs at once (shared LRU)", f1(r.Miss2Shared), net(r.Miss2Shared), spread(r.Miss2Shared)},
	}
	mdTable(&b, []string{"ns per packet (BPF_PROG_TEST_RUN, median)", "kernel time", "minus overhead", "reps min–max"}, "lrrr", rows)
	if !r.ThroughputSkipped {
		b.WriteString("\n")
		lb, ipt := Median(r.LBMpps), Median(r.IPTMpps)
		mdTable(&b, []string{"through veth (live-frames generator, 1 CPU)", "Mpps (median)", "reps min–max", "ratio"}, "lrrr", [][]string{
			{"xdplb (XDP native, IPIP, XDP_TX)", fmt.Sprintf("%.2f", lb), fmtMpps(r.LBMpps), FormatRatio(Ratio(lb, ipt))},
			{"kernel forwarding + iptables DNAT (" + r.IPTablesVersion + ")", fmt.Sprintf("%.2f", ipt), fmtMpps(r.IPTMpps), "1.00×"},
		})
		if !markdown {
			fmt.Fprintf(&b, "\nxdplb forwarded %d packets in the throughput part; other verdicts: %v\n", r.LBPackets, r.LBOther)
		}
	}
	if !markdown {
		b.WriteString("\nTargets: hot flow ≤ 40 ns " + verdict(net(r.Hot) != "n/a" && Median(r.Hot)-Median(r.Baseline) <= 40) +
			", miss + insert ≤ 120 ns " + verdict(Median(r.Miss)-Median(r.Baseline) <= 120))
		if !r.ThroughputSkipped {
			b.WriteString(", ≥ 6× iptables DNAT " + verdict(Ratio(Median(r.LBMpps), Median(r.IPTMpps)) >= 6))
		}
		b.WriteString("\n")
	}
	return b.String()
}

func fmtMpps(xs []float64) string {
	lo, hi := MinMax(xs)
	return fmt.Sprintf("%.2f–%.2f", lo, hi)
}
