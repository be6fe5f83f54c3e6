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
	// Realtime runs the measuring threads (test runs, generator, and with
	// the generator the packet processing it triggers, which runs in its
	// softirq on the same CPU) SCHED_FIFO for the seconds they run, so that
	// other load on the machine does not preempt them.
	Realtime bool
	Markdown bool
	Log      io.Writer
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

// runOnce runs prog on frame once and returns its verdict.
func runOnce(prog *ebpf.Program, frame []byte) (uint32, error) {
	ret, _, err := prog.Benchmark(frame, 1, nil)
	return ret, err
}

// pinCPU locks the calling goroutine to its thread (for good: the thread
// ends with the goroutine) and that thread to cpu, SCHED_FIFO if rt.
func pinCPU(cpu int, rt bool) error {
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return err
	}
	if rt {
		if err := unix.SchedSetAttr(0, &unix.SchedAttr{Policy: unix.SCHED_FIFO, Priority: 10}, 0); err != nil {
			return fmt.Errorf("SCHED_FIFO: %w", err)
		}
	}
	return nil
}

// Replayer runs a program under test with BPF_PROG_TEST_RUN's repeat
// through bpf/xdpbench.c's bench_replay, which gives every run the next
// frame of a list (the kernel does not restore the packet between runs
// and xdplb rewrites it). The time per run includes bench_replay and a
// tail call: measure an empty program the same way and subtract.
type Replayer struct {
	objs bpf.XdpbenchObjects
}

// NewReplayer loads bench_replay with room for frames frames.
func NewReplayer(frames int) (*Replayer, error) {
	spec, err := bpf.LoadXdpbench()
	if err != nil {
		return nil, err
	}
	spec.Maps[bpf.XdpbenchMapBenchFrames].MaxEntries = uint32(frames)
	r := &Replayer{}
	if err := spec.LoadAndAssign(&r.objs, nil); err != nil {
		return nil, fmt.Errorf("load xdpbench: %w", err)
	}
	return r, nil
}

// Close releases the replayer's programs and maps.
func (r *Replayer) Close() { r.objs.Close() }

// Load stores frames at [base, base+len(frames)).
func (r *Replayer) Load(base int, frames [][]byte) error {
	keys := make([]uint32, len(frames))
	vals := make([]bpf.XdpbenchBenchFrame, len(frames))
	for i, f := range frames {
		if len(f) != len(vals[i].Data) {
			return fmt.Errorf("frame of %d bytes, want %d", len(f), len(vals[i].Data))
		}
		keys[i] = uint32(base + i)
		copy(vals[i].Data[:], f)
	}
	_, err := r.objs.BenchFrames.BatchUpdate(keys, vals, nil)
	return err
}

// Position sets, per CPU, the first frame and the number of frames's replay starts.
func (r *Replayer) Position(per map[int][2]int) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	st := make([]bpf.XdpbenchBenchState, n)
	for cpu, bn := range per {
		st[cpu] = bpf.XdpbenchBenchState{Base: uint32(bn[0]), N: uint32(bn[1])}
	}
	return r.objs.BenchPos.Put(uint32(0), st)
}

// Run runs target repeat times on cpu, each run on the next frame of that
// CPU's list, and returns the kernel's mean time per run in ns.
func (r *Replayer) Run(target *ebpf.Program, cpu int, rt bool, repeat int) (float64, error) {
	if err := r.objs.BenchTarget.Put(uint32(0), target); err != nil {
		return 0, fmt.Errorf("bench_target: %w", err)
	}
	var ns float64
	errc := make(chan error, 1)
	go func() {
		if err := pinCPU(cpu, rt); err != nil {
			errc <- err
			return
		}
		in := make([]byte, len(bpf.XdpbenchBenchFrame{}.Data))
		ret, d, err := r.objs.BenchReplay.Benchmark(in, repeat, nil)
		if err == nil && ret == xdp.XDPAborted {
			err = errors.New("bench_replay aborted (tail call failed or frame list empty)")
		}
		ns = float64(d.Nanoseconds())
		errc <- err
	}()
	return ns, <-errc
}

// XDPResult holds every measurement of RunXDP (one value per repetition).
type XDPResult struct {
	Baseline, Hot, Miss, Many []float64 // ns per packet, per-CPU LRU
	// BaselineMany and BaselineFresh: the empty program cycling through
	// as many frames as Many and Miss (the frame copies miss the cache too).
	BaselineMany, BaselineFresh []float64
	MissShared, ManyShared      []float64 // shared LRU
	Miss2PerCPU, Miss2Shared    []float64 // new flows on 2 CPUs at once
	LBMpps, IPTMpps, ReflMpps   []float64
	ThroughputSkipped           bool
	Kernel                      string
	Flows, Calls, Reps, CPU     int
	ThroughputDur               time.Duration
	HotVerdict, IPTablesVersion string
	Realtime                    bool
	LoadBefore, LoadAfter       string
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
	res := XDPResult{Flows: o.Flows, Calls: o.Calls, Reps: o.Reps, CPU: o.CPU, ThroughputDur: o.Duration, Kernel: kernelRelease(),
		Realtime: o.Realtime, LoadBefore: loadAvg()}
	if err := measurePerPacket(ctx, o, &res); err != nil {
		return err
	}
	if o.SkipThroughput {
		res.ThroughputSkipped = true
	} else if err := measureThroughput(ctx, o, &res); err != nil {
		return err
	}
	res.LoadAfter = loadAvg()
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
	rp, err := NewReplayer(o.Flows + 2*o.Calls)
	if err != nil {
		return err
	}
	defer rp.Close()
	logf(o.Log, "building and establishing %d flows", o.Flows)
	many := make([][]byte, o.Flows)
	for i := range many {
		f, err := flowFrame(i, nil, nil)
		if err != nil {
			return err
		}
		many[i] = f
	}
	if err := rp.Load(0, many); err != nil {
		return err
	}
	for _, d := range lbs {
		for _, f := range many {
			if _, err := runOnce(d.Program(), f); err != nil {
				return err
			}
		}
	}
	next := 1 << 20 // fresh flows for the miss scenarios
	fresh := func(base int) error {
		fs := make([][]byte, o.Calls)
		for i := range fs {
			f, err := flowFrame(next, nil, nil)
			if err != nil {
				return err
			}
			next++
			fs[i] = f
		}
		return rp.Load(base, fs)
	}
	other := (o.CPU + 1) % runtime.NumCPU()
	hotRepeat := 200000
	for rep := 0; rep < o.Reps; rep++ {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		logf(o.Log, "per-packet repetition %d/%d", rep+1, o.Reps)
		type step struct {
			dst    *[]float64
			prog   *ebpf.Program
			base   int
			n      int
			repeat int
			fresh  bool
		}
		steps := []step{
			{&res.Baseline, lbs["percpu"].PassProgram(), 0, 1, hotRepeat, false},
			{&res.BaselineMany, lbs["percpu"].PassProgram(), 0, o.Flows, 2 * o.Flows, false},
			{&res.BaselineFresh, lbs["percpu"].PassProgram(), o.Flows, o.Calls, o.Calls, true},
			{&res.Hot, lbs["percpu"].Program(), 0, 1, hotRepeat, false},
			{&res.Miss, lbs["percpu"].Program(), o.Flows, o.Calls, o.Calls, true},
			{&res.MissShared, lbs["shared"].Program(), o.Flows, o.Calls, o.Calls, true},
			{&res.Many, lbs["percpu"].Program(), 0, o.Flows, 2 * o.Flows, false},
			{&res.ManyShared, lbs["shared"].Program(), 0, o.Flows, 2 * o.Flows, false},
		}
		for k := range steps {
			s := steps[(k+rep)%len(steps)]
			if s.fresh {
				if err := fresh(s.base); err != nil {
					return err
				}
			}
			if err := rp.Position(map[int][2]int{o.CPU: {s.base, s.n}}); err != nil {
				return err
			}
			v, err := rp.Run(s.prog, o.CPU, o.Realtime, s.repeat)
			if err != nil {
				return err
			}
			*s.dst = append(*s.dst, v)
		}
		// New flows on two CPUs at once: where a shared LRU list contends.
		for _, k := range rotateSlice([]string{"percpu", "shared"}, rep) {
			if err := fresh(o.Flows); err != nil {
				return err
			}
			if err := fresh(o.Flows + o.Calls); err != nil {
				return err
			}
			if err := rp.Position(map[int][2]int{o.CPU: {o.Flows, o.Calls}, other: {o.Flows + o.Calls, o.Calls}}); err != nil {
				return err
			}
			var wg sync.WaitGroup
			var va, vb float64
			var ea, eb error
			wg.Add(2)
			go func() {
				defer wg.Done()
				va, ea = rp.Run(lbs[k].Program(), o.CPU, o.Realtime, o.Calls)
			}()
			go func() {
				defer wg.Done()
				vb, eb = rp.Run(lbs[k].Program(), other, o.Realtime, o.Calls)
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
	// Every run must have been load-balanced.
	for k, d := range lbs {
		c, err := d.Counters()
		if err != nil {
			return err
		}
		for i, n := range xdp.StatNames {
			if c[i] != 0 && n != "tx_ipip" && n != "ct_hit" && n != "ct_new" {
				return fmt.Errorf("%s LRU load balancer counted %s %d times: the benchmark did not measure what it says", k, n, c[i])
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

// inNS runs fn on a thread in netns ns (pinned to cpu if >= 0, SCHED_FIFO
// if rt).
func inNS(ns string, cpu int, rt bool, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if cpu >= 0 {
			if err := pinCPU(cpu, rt); err != nil {
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
	err := inNS(ns, -1, false, func() (err error) {
		iface, err = net.InterfaceByName(name)
		return err
	})
	return iface, err
}

func attachXDPIn(ns, dev string, prog *ebpf.Program) (link.Link, error) {
	var l link.Link
	err := inNS(ns, -1, false, func() error {
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
func generate(ctx context.Context, gen *ebpf.Program, tmplMap *ebpf.Map, ns string, cpu int, rt bool, ifindex int, frames [][]byte, d time.Duration) error {
	const repeat = 2048
	return inNS(ns, cpu, rt, func() error {
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

// mppsOf generates for d and returns the packets that reached the sink and
// the generating time.
func mppsOf(ctx context.Context, gen *ebpf.Program, tmplMap, sink *ebpf.Map, ns string, cpu int, rt bool, ifindex int, frames [][]byte, d time.Duration) (uint64, time.Duration, error) {
	before, err := sinkCount(sink)
	if err != nil {
		return 0, 0, err
	}
	start := time.Now()
	if err := generate(ctx, gen, tmplMap, ns, cpu, rt, ifindex, frames, d); err != nil {
		return 0, 0, err
	}
	elapsed := time.Since(start)
	time.Sleep(20 * time.Millisecond) // let the last batches drain
	after, err := sinkCount(sink)
	if err != nil {
		return 0, 0, err
	}
	return after - before, elapsed, nil
}

func measureThroughput(ctx context.Context, o XDPOptions, res *XDPResult) (err error) {
	id := fmt.Sprintf("%04x", rand.Uint32()&0xffff)
	nss := &netnsSet{prefix: "shuntxdp-" + id + "-", log: o.Log}
	// Device names carry the id, like the namespaces.
	dev := map[string]string{}
	for _, d := range []string{"g0", "g1", "h0", "h1", "h2", "h3", "r0", "r1"} {
		dev[d] = "x" + id + d
	}
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
	if err := ipBatchNS(genA, "link set lo up", "link add "+dev["g0"]+" type veth peer name "+dev["g1"]+" netns "+lbNS, "link set "+dev["g0"]+" up"); err != nil {
		return err
	}
	if err := ipBatchNS(lbNS, "link set lo up", "link set "+dev["g1"]+" up"); err != nil {
		return err
	}
	lb, err := xdp.Open(xdp.Config{Devices: []string{dev["g1"]}, NetNS: nsPath(lbNS), Seed: benchSeedOK, NodeAddr: benchNode.String(),
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
	sinkA, err := attachXDPIn(genA, dev["g0"], objs.BenchSink)
	if err != nil {
		return fmt.Errorf("sink on g0: %w", err)
	}
	defer sinkA.Close()
	g0, err := ifaceIn(genA, dev["g0"])
	if err != nil {
		return err
	}
	g1, err := ifaceIn(lbNS, dev["g1"])
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
	if err := ipBatchNS(genB, "link set lo up", "link add "+dev["h0"]+" type veth peer name "+dev["h1"]+" netns "+rt, "link set "+dev["h0"]+" up"); err != nil {
		return err
	}
	if err := ipBatchNS(sinkNS, "link set lo up", "link add "+dev["h3"]+" type veth peer name "+dev["h2"]+" netns "+rt, "link set "+dev["h3"]+" up"); err != nil {
		return err
	}
	h3, err := ifaceIn(sinkNS, dev["h3"])
	if err != nil {
		return err
	}
	cmds := []string{"link set lo up", "link set " + dev["h1"] + " up", "link set " + dev["h2"] + " up", "addr add 10.98.0.1/24 dev " + dev["h1"] + "", "addr add 10.99.0.1/24 dev " + dev["h2"] + "",
		"route add 198.51.64.0/18 dev " + dev["h1"] + ""}
	for i := 2; i <= 11; i++ {
		cmds = append(cmds, fmt.Sprintf("neigh add 10.99.0.%d lladdr %s dev "+dev["h2"]+"", i, h3.HardwareAddr))
	}
	if err := ipBatchNS(rt, cmds...); err != nil {
		return err
	}
	if err := inNS(rt, -1, false, func() error {
		for k, v := range map[string]string{"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/rp_filter": "0", "net/ipv4/conf/default/rp_filter": "0", "net/ipv4/conf/" + dev["h1"] + "/rp_filter": "0"} {
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
	passH1, err := attachXDPIn(rt, dev["h1"], lb.PassProgram())
	if err != nil {
		return fmt.Errorf("xdp_pass on h1: %w", err)
	}
	defer passH1.Close()
	sinkB, err := attachXDPIn(sinkNS, dev["h3"], objs.BenchSink)
	if err != nil {
		return fmt.Errorf("sink on h3: %w", err)
	}
	defer sinkB.Close()
	h0, err := ifaceIn(genB, dev["h0"])
	if err != nil {
		return err
	}
	h1, err := ifaceIn(rt, dev["h1"])
	if err != nil {
		return err
	}

	// Reflector: gen3(r0) <-> refl(r1); r1 sends every frame back: the
	// generator, veth and sink without any work in between.
	genC, err := nss.add("gen3")
	if err != nil {
		return err
	}
	refl, err := nss.add("refl")
	if err != nil {
		return err
	}
	if err := ipBatchNS(genC, "link set lo up", "link add "+dev["r0"]+" type veth peer name "+dev["r1"]+" netns "+refl, "link set "+dev["r0"]+" up"); err != nil {
		return err
	}
	if err := ipBatchNS(refl, "link set lo up", "link set "+dev["r1"]+" up"); err != nil {
		return err
	}
	reflL, err := attachXDPIn(refl, dev["r1"], objs.BenchReflect)
	if err != nil {
		return fmt.Errorf("reflector on r1: %w", err)
	}
	defer reflL.Close()
	sinkC, err := attachXDPIn(genC, dev["r0"], objs.BenchSink)
	if err != nil {
		return fmt.Errorf("sink on r0: %w", err)
	}
	defer sinkC.Close()
	r0, err := ifaceIn(genC, dev["r0"])
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
	type path struct {
		name   string
		ns     string
		ifidx  int
		frames [][]byte
		dst    *[]float64
	}
	paths := []path{
		{"lb", genA, g0.Index, framesA, &res.LBMpps},
		{"ipt", genB, h0.Index, framesB, &res.IPTMpps},
		{"refl", genC, r0.Index, framesA, &res.ReflMpps},
	}
	// Warm up every path (conntrack entries, neighbours).
	for _, p := range paths {
		if _, _, err := mppsOf(ctx, objs.BenchTx, objs.BenchTmpl, objs.BenchCount, p.ns, o.CPU, o.Realtime, p.ifidx, p.frames, 200*time.Millisecond); err != nil {
			return err
		}
	}
	// Each repetition gives every path Duration in slices of 250 ms taken
	// in turn, so that bursts of other load hit all paths alike.
	const slice = 250 * time.Millisecond
	nslices := max(1, int(o.Duration/slice))
	for rep := 0; rep < o.Reps; rep++ {
		logf(o.Log, "throughput repetition %d/%d", rep+1, o.Reps)
		pkts := make([]uint64, len(paths))
		secs := make([]float64, len(paths))
		for sl := 0; sl < nslices; sl++ {
			for k := range paths {
				i := (k + rep + sl) % len(paths)
				p := paths[i]
				n, d, err := mppsOf(ctx, objs.BenchTx, objs.BenchTmpl, objs.BenchCount, p.ns, o.CPU, o.Realtime, p.ifidx, p.frames, slice)
				if err != nil {
					return err
				}
				pkts[i] += n
				secs[i] += d.Seconds()
			}
		}
		for i, p := range paths {
			*p.dst = append(*p.dst, float64(pkts[i])/secs[i]/1e6)
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
	net := func(xs, base []float64) string {
		if len(xs) == 0 || len(base) == 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.0f", Median(xs)-Median(base))
	}
	spread := func(xs []float64) string {
		lo, hi := MinMax(xs)
		return fmt.Sprintf("%.0f–%.0f", lo, hi)
	}
	if !markdown {
		fmt.Fprintf(&b, "XDP load balancer, kernel %s, CPU %d, %d reps, %d new flows per miss run, %d established flows, SCHED_FIFO %v\nload average before %s, after %s\n\n",
			r.Kernel, r.CPU, r.Reps, r.Calls, r.Flows, r.Realtime, r.LoadBefore, r.LoadAfter)
	}
	rows := [][]string{
		{"empty program, one frame (replay + tail call overhead)", f1(r.Baseline), "—", spread(r.Baseline)},
		{fmt.Sprintf("empty program, %d frames in turn", r.Calls), f1(r.BaselineFresh), "—", spread(r.BaselineFresh)},
		{fmt.Sprintf("empty program, %d frames in turn", r.Flows), f1(r.BaselineMany), "—", spread(r.BaselineMany)},
		{"hot flow (conntrack hit, IPIP)", f1(r.Hot), net(r.Hot, r.Baseline), spread(r.Hot)},
		{"new flow: conntrack miss + Maglev + insert (per-CPU LRU)", f1(r.Miss), net(r.Miss, r.BaselineFresh), spread(r.Miss)},
		{"new flow: conntrack miss + Maglev + insert (shared LRU)", f1(r.MissShared), net(r.MissShared, r.BaselineFresh), spread(r.MissShared)},
		{fmt.Sprintf("%d established flows in turn (per-CPU LRU)", r.Flows), f1(r.Many), net(r.Many, r.BaselineMany), spread(r.Many)},
		{fmt.Sprintf("%d established flows in turn (shared LRU)", r.Flows), f1(r.ManyShared), net(r.ManyShared, r.BaselineMany), spread(r.ManyShared)},
		{"new flows on 2 CPUs at once (per-CPU LRU)", f1(r.Miss2PerCPU), net(r.Miss2PerCPU, r.BaselineFresh), spread(r.Miss2PerCPU)},
		{"new flows on 2 CPUs at once (shared LRU)", f1(r.Miss2Shared), net(r.Miss2Shared, r.BaselineFresh), spread(r.Miss2Shared)},
	}
	mdTable(&b, []string{"ns per packet (BPF_PROG_TEST_RUN repeat, median of reps)", "kernel time", "minus overhead", "reps min–max"}, "lrrr", rows)
	if !r.ThroughputSkipped {
		b.WriteString("\n")
		lb, ipt, refl := Median(r.LBMpps), Median(r.IPTMpps), Median(r.ReflMpps)
		// Per-packet cost of the device under test: time per packet minus
		// the pipeline's (generator, two veth hops, sink) own.
		cost := func(mpps float64) float64 { return 1000/mpps - 1000/refl }
		mdTable(&b, []string{"through veth (live-frames generator, 1 CPU)", "Mpps (median)", "reps min–max", "Mpps ratio", "ns/packet beyond the reflector", "cost ratio"}, "lrrrrr", [][]string{
			{"reflector (XDP_TX only: generator + veth + sink)", fmt.Sprintf("%.2f", refl), fmtMpps(r.ReflMpps), "—", "0", "—"},
			{"xdplb (XDP native, IPIP, XDP_TX)", fmt.Sprintf("%.2f", lb), fmtMpps(r.LBMpps), FormatRatio(Ratio(lb, ipt)), fmt.Sprintf("%.0f", cost(lb)), FormatRatio(Ratio(cost(ipt), cost(lb)))},
			{"kernel forwarding + iptables DNAT (" + r.IPTablesVersion + ")", fmt.Sprintf("%.2f", ipt), fmtMpps(r.IPTMpps), "1.00×", fmt.Sprintf("%.0f", cost(ipt)), "1.00×"},
		})
		if !markdown {
			fmt.Fprintf(&b, "\nThe generator (BPF_PROG_TEST_RUN live frames, XDP_TX out of a veth), the device under test and the sink\n"+
				"(an XDP program counting and dropping on the last veth) all run on CPU %d, in the generator's softirq; the\n"+
				"reflector row is that pipeline with nothing in between, so \"beyond the reflector\" is each path's own cost.\n", r.CPU)
			fmt.Fprintf(&b, "xdplb forwarded %d packets in the throughput part; other verdicts: %v\n", r.LBPackets, r.LBOther)
		}
	}
	if !markdown {
		b.WriteString("\nTargets: hot flow ≤ 40 ns " + verdict(Median(r.Hot)-Median(r.Baseline) <= 40) +
			", miss + insert ≤ 120 ns " + verdict(Median(r.Miss)-Median(r.BaselineFresh) <= 120))
		if !r.ThroughputSkipped {
			refl := Median(r.ReflMpps)
			costRatio := Ratio(1000/Median(r.IPTMpps)-1000/refl, 1000/Median(r.LBMpps)-1000/refl)
			b.WriteString(", ≥ 6× iptables DNAT: end-to-end Mpps " + verdict(Ratio(Median(r.LBMpps), Median(r.IPTMpps)) >= 6) +
				", own cost " + verdict(costRatio >= 6))
		}
		b.WriteString("\n")
	}
	return b.String()
}

func fmtMpps(xs []float64) string {
	lo, hi := MinMax(xs)
	return fmt.Sprintf("%.2f–%.2f", lo, hi)
}
