package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/bpf"
)

// The throughput part: packets per second through veth, three paths run
// in turn, each from a BPF_PROG_TEST_RUN live-frames generator to an XDP
// program on the last veth that counts and drops (the sink):
//
//	lb:   gen (g0) -> g1: xdplb, IPIP, XDP_TX -> g0: sink
//	ipt:  gen2 (h0) -> h1: kernel forwarding + kube-proxy-style iptables DNAT -> h2 -> h3: sink
//	refl: gen3 (r0) -> r1: XDP_TX only -> r0: sink (the pipeline without a device under test)
//
// The device under test (DUT) is the NAPI poll of the first veth after the
// generator (g1, h1, r1). Two arrangements, interleaved:
//
//   - one CPU: the generator's test run sends a batch, and the veths' NAPI
//     polls (DUT, then sink) run in its softirq on the same CPU. What a path
//     costs beyond the reflector is its DUT's own cost.
//   - DUT on its own CPU: the DUT veth runs threaded NAPI
//     (/sys/class/net/DEV/threaded), its thread pinned to the DUT CPU; the
//     sink's NAPI, scheduled by the DUT, runs there too, in its softirq; the
//     generator runs alone on the other CPU. The DUT thread's CPU time
//     (/proc/PID/schedstat) per delivered packet is what the DUT (and sink)
//     cost, and each thread's CPU time over the wall time tells which one
//     bounds the rate.

// VethPath holds one path's measurements, one value per repetition.
type VethPath struct {
	Mpps    []float64 // delivered to the sink
	GenMpps []float64 // generated
	DUTns   []float64 // DUT on its own CPU: its thread's CPU time per delivered packet
	DUTBusy []float64 // ... its CPU time / wall time
	GenBusy []float64 // generator thread, CPU time / wall time
}

// VethPaths are the three paths of one arrangement.
type VethPaths struct {
	LB, IPT, Refl VethPath
}

// VethResult is the throughput part of RunXDP.
type VethResult struct {
	// OneCPU: generator, DUT and sink on DUTCPU. Split: the DUT (and the
	// sink) on DUTCPU, the generator on GenCPU.
	OneCPU, Split  VethPaths
	DUTCPU, GenCPU int
	Batch          int
	// CrossCPU is the round trip of a cache line between the two CPUs (ns,
	// one value per repetition): what every hand-over of a packet between
	// them pays at least once.
	CrossCPU []float64
	// LBPackets is what xdplb forwarded; LBOther lists any other verdict it
	// gave (should be none).
	LBPackets uint64
	LBOther   []string
}

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

// sysctlsIn writes sysctls (paths under /proc/sys) in netns ns.
func sysctlsIn(ns string, kv map[string]string) error {
	return inNS(ns, -1, false, func() error {
		for k, v := range kv {
			if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0); err != nil {
				return err
			}
		}
		return nil
	})
}

// napiThread turns on threaded NAPI for dev in ns (it has an XDP program,
// so veth has NAPI instances) and pins its thread to cpu, SCHED_FIFO prio
// if rt. It returns the thread's pid.
func napiThread(ns, dev string, cpu int, rt bool, prio int) (int, error) {
	if err := run(nil, "ip", "netns", "exec", ns, "sh", "-c", "echo 1 > /sys/class/net/"+dev+"/threaded"); err != nil {
		return 0, fmt.Errorf("threaded NAPI on %s: %w", dev, err)
	}
	prefix := "napi/" + dev + "-"
	var pid int
	for try := 0; pid == 0 && try < 100; try++ {
		ents, err := os.ReadDir("/proc")
		if err != nil {
			return 0, err
		}
		for _, e := range ents {
			p, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			comm, err := os.ReadFile("/proc/" + e.Name() + "/comm")
			if err == nil && strings.HasPrefix(strings.TrimSpace(string(comm)), prefix[:min(len(prefix), 15)]) {
				if pid != 0 {
					return 0, fmt.Errorf("more than one NAPI thread for %s (veth with several queues?)", dev)
				}
				pid = p
			}
		}
		if pid == 0 {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if pid == 0 {
		return 0, fmt.Errorf("no NAPI thread %s* after turning threaded NAPI on", prefix)
	}
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(pid, &set); err != nil {
		return 0, fmt.Errorf("pin %s: %w", prefix, err)
	}
	if rt {
		if err := unix.SchedSetAttr(pid, &unix.SchedAttr{Policy: unix.SCHED_FIFO, Priority: uint32(prio)}, 0); err != nil {
			return 0, fmt.Errorf("SCHED_FIFO for %s: %w", prefix, err)
		}
	}
	return pid, nil
}

// napiUnthreaded turns threaded NAPI off for dev in ns again.
func napiUnthreaded(ns, dev string) error {
	return run(nil, "ip", "netns", "exec", ns, "sh", "-c", "echo 0 > /sys/class/net/"+dev+"/threaded")
}

// schedRun is the CPU time a thread has run (/proc/.../schedstat, ns).
func schedRun(path string) (time.Duration, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, fmt.Errorf("%s: empty", path)
	}
	ns, err := strconv.ParseInt(f[0], 10, 64)
	return time.Duration(ns), err
}

func pidSchedstat(pid int) string { return "/proc/" + strconv.Itoa(pid) + "/schedstat" }

// xdpMd is struct xdp_md, the context of an XDP test run.
type xdpMd struct {
	Data, DataEnd, DataMeta, IngressIfindex, RxQueueIndex, EgressIfindex uint32
}

// vethPath is one path of the throughput part, ready to run.
type vethPath struct {
	name     string
	genNS    string
	ifindex  int    // generator's device
	base     int    // its frames in bench_frames
	dutNS    string // the DUT veth
	dutDev   string
	frameLen int
	one      *VethPath
	split    *VethPath
}

// vethSlice is what one slice of generating measured.
type vethSlice struct {
	generated, delivered uint64
	wall                 time.Duration
	gen, dut             time.Duration // CPU time
}

func (s *vethSlice) add(o vethSlice) {
	s.generated += o.generated
	s.delivered += o.delivered
	s.wall += o.wall
	s.gen += o.gen
	s.dut += o.dut
}

type vethBench struct {
	objs  bpf.XdpbenchObjects
	rt    bool
	batch int
}

// slice generates on p from genCPU for d and returns what it measured;
// dutPID is the DUT's NAPI thread (0: none, NAPI runs in softirq).
func (b *vethBench) slice(ctx context.Context, p *vethPath, genCPU, dutPID int, d time.Duration) (vethSlice, error) {
	var s vethSlice
	if err := positionFrames(b.objs.BenchPos, map[int][2]int{genCPU: {p.base, vethFlows}}); err != nil {
		return s, err
	}
	sink0, err := perCPUSum(b.objs.BenchCount)
	if err != nil {
		return s, err
	}
	var dut0, dut1 time.Duration
	if dutPID != 0 {
		if dut0, err = schedRun(pidSchedstat(dutPID)); err != nil {
			return s, err
		}
	}
	const repeat = 1 << 15
	err = inNS(p.genNS, genCPU, b.rt, func() error {
		self := "/proc/thread-self/schedstat"
		g0, err := schedRun(self)
		if err != nil {
			return err
		}
		in := make([]byte, p.frameLen)
		start := time.Now()
		end := start.Add(d)
		for time.Now().Before(end) && ctx.Err() == nil {
			opts := &ebpf.RunOptions{Data: in, Repeat: repeat, Flags: unix.BPF_F_TEST_XDP_LIVE_FRAMES, BatchSize: uint32(b.batch),
				Context: xdpMd{DataEnd: uint32(len(in)), IngressIfindex: uint32(p.ifindex)}}
			if _, err := b.objs.BenchTx.Run(opts); err != nil {
				return fmt.Errorf("live-frames test run: %w", err)
			}
			s.generated += repeat
		}
		s.wall = time.Since(start)
		g1, err := schedRun(self)
		s.gen = g1 - g0
		return err
	})
	if err != nil {
		return s, err
	}
	time.Sleep(20 * time.Millisecond) // let the last batches drain
	sink1, err := perCPUSum(b.objs.BenchCount)
	if err != nil {
		return s, err
	}
	if dutPID != 0 {
		if dut1, err = schedRun(pidSchedstat(dutPID)); err != nil {
			return s, err
		}
	}
	s.delivered, s.dut = sink1-sink0, dut1-dut0
	return s, nil
}

// crossCPURoundTrip bounces a cache line between CPUs a and b n times and
// returns the time of one round trip in ns.
func crossCPURoundTrip(a, b int, rt bool, n int) (float64, error) {
	var flag atomic.Int64
	errc := make(chan error, 1)
	go func() {
		errc <- onCPU(b, rt, func() error {
			for i := int64(0); i < int64(n); i++ {
				for flag.Load() != 2*i+1 {
				}
				flag.Store(2*i + 2)
			}
			return nil
		})
	}()
	var ns float64
	err := onCPU(a, rt, func() error {
		start := time.Now()
		for i := int64(0); i < int64(n); i++ {
			flag.Store(2*i + 1)
			for flag.Load() != 2*i+2 {
			}
		}
		ns = float64(time.Since(start).Nanoseconds()) / float64(n)
		return nil
	})
	return ns, errors.Join(err, <-errc)
}

// vethFlows is the number of flows (frames) each generator cycles through.
const vethFlows = 64

func measureVeth(ctx context.Context, o XDPOptions) (res *VethResult, err error) {
	if runtime.NumCPU() < 2 {
		return nil, errors.New("the throughput part needs 2 CPUs (generator and device under test apart); use --no-throughput")
	}
	res = &VethResult{DUTCPU: o.CPU, GenCPU: otherCPU(o.CPU), Batch: o.Batch}
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
	spec, err := bpf.LoadXdpbench()
	if err != nil {
		return nil, err
	}
	spec.Maps[bpf.XdpbenchMapBenchFrames].MaxEntries = 2 * vethFlows
	b := &vethBench{rt: o.Realtime, batch: o.Batch}
	if err := spec.LoadAndAssign(&b.objs, nil); err != nil {
		return nil, fmt.Errorf("load xdpbench: %w", err)
	}
	defer b.objs.Close()
	noV6 := map[string]string{"net/ipv6/conf/all/disable_ipv6": "1", "net/ipv6/conf/default/disable_ipv6": "1"}

	// Load balancer: gen(g0) <-> lb(g1); xdplb on g1 sends its output back to g0.
	genA, err := nss.add("gen")
	if err != nil {
		return nil, err
	}
	lbNS, err := nss.add("lb")
	if err != nil {
		return nil, err
	}
	for _, ns := range []string{genA, lbNS} {
		if err := sysctlsIn(ns, noV6); err != nil {
			return nil, err
		}
	}
	if err := ipBatchNS(genA, "link set lo up", "link add "+dev["g0"]+" type veth peer name "+dev["g1"]+" netns "+lbNS, "link set "+dev["g0"]+" up"); err != nil {
		return nil, err
	}
	if err := ipBatchNS(lbNS, "link set lo up", "link set "+dev["g1"]+" up"); err != nil {
		return nil, err
	}
	lb, err := xdp.Open(xdp.Config{Devices: []string{dev["g1"]}, NetNS: nsPath(lbNS), Seed: benchSeedOK, NodeAddr: benchNode.String(),
		MaxFlows: 65536, MaxServices: 16, MaxBackends: 64}, bpffs, nil)
	if err != nil {
		return nil, fmt.Errorf("xdplb on veth: %w", err)
	}
	defer lb.Close()
	if len(lb.Generic) > 0 {
		return nil, errors.New("native XDP refused on veth")
	}
	if _, err := lb.Sync(benchServices()); err != nil {
		return nil, err
	}
	sinkA, err := attachXDPIn(genA, dev["g0"], b.objs.BenchSink)
	if err != nil {
		return nil, fmt.Errorf("sink on g0: %w", err)
	}
	defer sinkA.Close()
	g0, err := ifaceIn(genA, dev["g0"])
	if err != nil {
		return nil, err
	}
	g1, err := ifaceIn(lbNS, dev["g1"])
	if err != nil {
		return nil, err
	}

	// Kernel: gen2(h0) <-> rt(h1) ... rt(h2) <-> sink(h3); forwarding with
	// kube-proxy-style DNAT to three endpoints in rt.
	genB, err := nss.add("gen2")
	if err != nil {
		return nil, err
	}
	rt, err := nss.add("rt")
	if err != nil {
		return nil, err
	}
	sinkNS, err := nss.add("sink")
	if err != nil {
		return nil, err
	}
	for _, ns := range []string{genB, rt, sinkNS} {
		if err := sysctlsIn(ns, noV6); err != nil {
			return nil, err
		}
	}
	if err := ipBatchNS(genB, "link set lo up", "link add "+dev["h0"]+" type veth peer name "+dev["h1"]+" netns "+rt, "link set "+dev["h0"]+" up"); err != nil {
		return nil, err
	}
	if err := ipBatchNS(sinkNS, "link set lo up", "link add "+dev["h3"]+" type veth peer name "+dev["h2"]+" netns "+rt, "link set "+dev["h3"]+" up"); err != nil {
		return nil, err
	}
	h3, err := ifaceIn(sinkNS, dev["h3"])
	if err != nil {
		return nil, err
	}
	cmds := []string{"link set lo up", "link set " + dev["h1"] + " up", "link set " + dev["h2"] + " up", "addr add 10.98.0.1/24 dev " + dev["h1"], "addr add 10.99.0.1/24 dev " + dev["h2"],
		"route add 198.51.64.0/18 dev " + dev["h1"]}
	for i := 2; i <= 11; i++ {
		cmds = append(cmds, fmt.Sprintf("neigh add 10.99.0.%d lladdr %s dev %s", i, h3.HardwareAddr, dev["h2"]))
	}
	if err := ipBatchNS(rt, cmds...); err != nil {
		return nil, err
	}
	if err := sysctlsIn(rt, map[string]string{"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/rp_filter": "0", "net/ipv4/conf/default/rp_filter": "0",
		"net/ipv4/conf/" + dev["h1"] + "/rp_filter": "0"}); err != nil {
		return nil, err
	}
	if err := run(strings.NewReader(kubeProxyDNAT()), "ip", "netns", "exec", rt, "iptables-restore"); err != nil {
		return nil, fmt.Errorf("iptables-restore: %w", err)
	}
	passH1, err := attachXDPIn(rt, dev["h1"], lb.PassProgram())
	if err != nil {
		return nil, fmt.Errorf("xdp_pass on h1: %w", err)
	}
	defer passH1.Close()
	sinkB, err := attachXDPIn(sinkNS, dev["h3"], b.objs.BenchSink)
	if err != nil {
		return nil, fmt.Errorf("sink on h3: %w", err)
	}
	defer sinkB.Close()
	h0, err := ifaceIn(genB, dev["h0"])
	if err != nil {
		return nil, err
	}
	h1, err := ifaceIn(rt, dev["h1"])
	if err != nil {
		return nil, err
	}

	// Reflector: gen3(r0) <-> refl(r1); r1 sends every frame back: the
	// generator, veth and sink without any work in between.
	genC, err := nss.add("gen3")
	if err != nil {
		return nil, err
	}
	refl, err := nss.add("refl")
	if err != nil {
		return nil, err
	}
	for _, ns := range []string{genC, refl} {
		if err := sysctlsIn(ns, noV6); err != nil {
			return nil, err
		}
	}
	if err := ipBatchNS(genC, "link set lo up", "link add "+dev["r0"]+" type veth peer name "+dev["r1"]+" netns "+refl, "link set "+dev["r0"]+" up"); err != nil {
		return nil, err
	}
	if err := ipBatchNS(refl, "link set lo up", "link set "+dev["r1"]+" up"); err != nil {
		return nil, err
	}
	reflL, err := attachXDPIn(refl, dev["r1"], b.objs.BenchReflect)
	if err != nil {
		return nil, fmt.Errorf("reflector on r1: %w", err)
	}
	defer reflL.Close()
	sinkC, err := attachXDPIn(genC, dev["r0"], b.objs.BenchSink)
	if err != nil {
		return nil, fmt.Errorf("sink on r0: %w", err)
	}
	defer sinkC.Close()
	r0, err := ifaceIn(genC, dev["r0"])
	if err != nil {
		return nil, err
	}

	framesA := make([][]byte, vethFlows)
	framesB := make([][]byte, vethFlows)
	for i := range vethFlows {
		if framesA[i], err = flowFrame(i, g0.HardwareAddr, g1.HardwareAddr); err != nil {
			return nil, err
		}
		if framesB[i], err = flowFrame(i, h0.HardwareAddr, h1.HardwareAddr); err != nil {
			return nil, err
		}
	}
	if err := loadFrames(b.objs.BenchFrames, 0, framesA); err != nil {
		return nil, err
	}
	if err := loadFrames(b.objs.BenchFrames, vethFlows, framesB); err != nil {
		return nil, err
	}
	flen := len(framesA[0])
	paths := []*vethPath{
		{"lb", genA, g0.Index, 0, lbNS, dev["g1"], flen, &res.OneCPU.LB, &res.Split.LB},
		{"ipt", genB, h0.Index, vethFlows, rt, dev["h1"], flen, &res.OneCPU.IPT, &res.Split.IPT},
		{"refl", genC, r0.Index, 0, refl, dev["r1"], flen, &res.OneCPU.Refl, &res.Split.Refl},
	}
	// arrange switches the DUT veths' NAPI to threads on the DUT CPU
	// (split) or back to softirq (one CPU); it returns the threads.
	arrange := func(split bool) (map[string]int, error) {
		pids := map[string]int{}
		for _, p := range paths {
			if !split {
				if err := napiUnthreaded(p.dutNS, p.dutDev); err != nil {
					return nil, err
				}
				continue
			}
			pid, err := napiThread(p.dutNS, p.dutDev, res.DUTCPU, o.Realtime, 10)
			if err != nil {
				return nil, err
			}
			pids[p.name] = pid
		}
		return pids, nil
	}
	// Warm up every path (conntrack entries, neighbours).
	for _, p := range paths {
		if _, err := b.slice(ctx, p, res.DUTCPU, 0, 200*time.Millisecond); err != nil {
			return nil, err
		}
	}
	// Each repetition gives every path and arrangement Duration in slices
	// of 250 ms taken in turn, so that bursts of other load hit all alike.
	const sliceDur = 250 * time.Millisecond
	nslices := max(1, int(o.Duration/sliceDur))
	for rep := 0; rep < o.Reps; rep++ {
		logf(o.Log, "throughput repetition %d/%d", rep+1, o.Reps)
		rtt, err := crossCPURoundTrip(res.DUTCPU, res.GenCPU, o.Realtime, 100000)
		if err != nil {
			return nil, err
		}
		res.CrossCPU = append(res.CrossCPU, rtt)
		for _, split := range rotateSlice([]bool{false, true}, rep) {
			pids, err := arrange(split)
			if err != nil {
				return nil, err
			}
			genCPU := res.DUTCPU
			if split {
				genCPU = res.GenCPU
			}
			sums := make([]vethSlice, len(paths))
			for sl := 0; sl < nslices; sl++ {
				for k := range paths {
					i := (k + rep + sl) % len(paths)
					s, err := b.slice(ctx, paths[i], genCPU, pids[paths[i].name], sliceDur)
					if err != nil {
						return nil, err
					}
					sums[i].add(s)
				}
			}
			for i, p := range paths {
				s := sums[i]
				wall := s.wall.Seconds()
				r := p.one
				if split {
					r = p.split
					r.DUTns = append(r.DUTns, float64(s.dut.Nanoseconds())/float64(max(s.delivered, 1)))
					r.DUTBusy = append(r.DUTBusy, s.dut.Seconds()/wall)
				}
				r.Mpps = append(r.Mpps, float64(s.delivered)/wall/1e6)
				r.GenMpps = append(r.GenMpps, float64(s.generated)/wall/1e6)
				r.GenBusy = append(r.GenBusy, s.gen.Seconds()/wall)
			}
		}
	}
	if _, err := arrange(false); err != nil {
		return nil, err
	}
	c, err := lb.Counters()
	if err != nil {
		return nil, err
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
	return res, nil
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
