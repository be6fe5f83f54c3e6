package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
)

// XDPOptions configures RunXDP.
type XDPOptions struct {
	// Reps: interleaved repetitions of every measurement (default 5).
	Reps int
	// Calls: new flows per "new flow" run (default 20000); each is run once.
	Calls int
	// Flows in the "many flows" scenario (default 100000).
	Flows int
	// Capacity of every conntrack measured (default xdp.DefaultMaxFlows,
	// what the agent uses).
	Capacity int
	// Duration of each throughput measurement (default 2s).
	Duration time.Duration
	// CPU runs the single-threaded measurements and, in the throughput
	// part, the device under test (default the last CPU). The generator and
	// the sink run on another CPU.
	CPU int
	// Batch is the live-frames batch size of the generator (default 64, a
	// NAPI budget; at most 256). Measured here, 64 delivered more than 16
	// and than 256, which fills the 256-frame veth ring in one go.
	Batch int
	// SkipThroughput leaves out the veth throughput part.
	SkipThroughput bool
	// Realtime runs the measuring threads (test runs, generator, and the
	// NAPI threads of the veth devices) SCHED_FIFO for the seconds they
	// run, so that other load on the machine does not preempt them.
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
	if o.Batch == 0 {
		o.Batch = 64
	}
	if o.Capacity == 0 {
		o.Capacity = xdp.DefaultMaxFlows
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

// maxFlowFrames bounds the flows flowFrame tells apart.
const maxFlowFrames = 1 << 22

// flowFrame is a UDP packet of flow i (distinct client address and port
// for every i < maxFlowFrames).
func flowFrame(i int, srcMAC, dstMAC net.HardwareAddr) ([]byte, error) {
	if i >= maxFlowFrames {
		return nil, fmt.Errorf("flow %d: the benchmark tells only %d flows apart", i, maxFlowFrames)
	}
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

// onCPU runs fn on a fresh thread pinned to cpu (SCHED_FIFO if rt).
func onCPU(cpu int, rt bool, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		if err := pinCPU(cpu, rt); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Replayer runs a program under test with BPF_PROG_TEST_RUN's repeat
// through bpf/xdpbench.c's bench_replay, which gives every run the next
// frame of a list (the kernel does not restore the packet between runs
// and xdplb rewrites it) and puts a grown frame back first. The time per
// run includes bench_replay and a tail call: measure an empty program the
// same way and subtract; for a program that grows the frame, also what
// putting it back costs (see RunXDP's report).
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

// Grow is the empty program that grows the frame by an IPv4 header, as
// xdplb's IPIP does.
func (r *Replayer) Grow() *ebpf.Program { return r.objs.BenchGrow }

// Load stores frames at [base, base+len(frames)).
func (r *Replayer) Load(base int, frames [][]byte) error {
	return loadFrames(r.objs.BenchFrames, base, frames)
}

func loadFrames(m *ebpf.Map, base int, frames [][]byte) error {
	keys := make([]uint32, len(frames))
	vals := make([]bpf.XdpbenchBenchFrame, len(frames))
	for i, f := range frames {
		if len(f) != len(vals[i].Data) {
			return fmt.Errorf("frame of %d bytes, want %d", len(f), len(vals[i].Data))
		}
		keys[i] = uint32(base + i)
		copy(vals[i].Data[:], f)
	}
	_, err := m.BatchUpdate(keys, vals, nil)
	return err
}

// Position sets, per CPU, the first frame and the number of frames's replay starts.
func (r *Replayer) Position(per map[int][2]int) error { return positionFrames(r.objs.BenchPos, per) }

func positionFrames(m *ebpf.Map, per map[int][2]int) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	st := make([]bpf.XdpbenchBenchState, n)
	for cpu, bn := range per {
		st[cpu] = bpf.XdpbenchBenchState{Base: uint32(bn[0]), N: uint32(bn[1])}
	}
	return m.Put(uint32(0), st)
}

// Run runs target repeat times on cpu, each run on the next frame of that
// CPU's list, and returns the kernel's mean time per run in ns.
func (r *Replayer) Run(target *ebpf.Program, cpu int, rt bool, repeat int) (float64, error) {
	if err := r.objs.BenchTarget.Put(uint32(0), target); err != nil {
		return 0, fmt.Errorf("bench_target: %w", err)
	}
	var ns float64
	err := onCPU(cpu, rt, func() error {
		in := make([]byte, len(bpf.XdpbenchBenchFrame{}.Data))
		ret, d, err := r.objs.BenchReplay.Benchmark(in, repeat, nil)
		if err == nil && ret == xdp.XDPAborted {
			err = errors.New("bench_replay aborted (tail call failed or frame list empty)")
		}
		ns = float64(d.Nanoseconds())
		return err
	})
	return ns, err
}

// ctFloor is bpf/xdpbench.c's conntrack alone: bench_ct_flow with its own
// bench_ct table (xdplb's conntrack code and layout), or bench_lru_flow with
// its own bench_lru map (the kernel's per-CPU LRU hash, xdplb's conntrack
// before map layout 4).
type ctFloor struct {
	objs bpf.XdpbenchObjects
	lru  bool
	sets uint32
}

func loadCTFloor(lru bool, flows int) (*ctFloor, error) {
	spec, err := bpf.LoadXdpbench()
	if err != nil {
		return nil, err
	}
	f := &ctFloor{lru: lru, sets: xdp.CTSets(uint32(flows))}
	spec.Maps[bpf.XdpbenchMapBenchCt].MaxEntries = f.sets
	if err := spec.Variables[bpf.XdpbenchVarBenchCtSets].Set(f.sets); err != nil {
		return nil, err
	}
	m := spec.Maps[bpf.XdpbenchMapBenchLru]
	m.MaxEntries = uint32(flows)
	m.Flags |= unix.BPF_F_NO_COMMON_LRU
	if err := spec.LoadAndAssign(&f.objs, nil); err != nil {
		return nil, fmt.Errorf("load the conntrack-alone programs: %w", err)
	}
	return f, nil
}

func (f *ctFloor) Close() { f.objs.Close() }

// prog is the floor's program; m its map.
func (f *ctFloor) prog() *ebpf.Program {
	if f.lru {
		return f.objs.BenchLruFlow
	}
	return f.objs.BenchCtFlow
}

func (f *ctFloor) m() *ebpf.Map {
	if f.lru {
		return f.objs.BenchLru
	}
	return f.objs.BenchCt
}

// Scenario keys of the per-packet part (XDPResult.PerPacket).
const (
	ppEmpty1     = "empty-1"     // empty program, one frame
	ppGrow1      = "grow-1"      // bench_grow, one frame
	ppEmptyFresh = "empty-fresh" // empty program, Calls frames in turn
	ppEmptyMany  = "empty-many"  // empty program, Flows frames in turn
	ppHot        = "hot"         // xdplb, conntrack hit
	ppMiss       = "miss"        // xdplb, new flow, conntrack filling (no eviction)
	ppEvict      = "evict"       // xdplb, new flow into a full conntrack
	ppMany       = "many"        // xdplb, Flows established flows in turn
	ppMiss2      = "miss2"       // xdplb, new flows on 2 CPUs at once
	ppCTHit      = "ct-hit"      // conntrack alone (bench_ct_flow), established flow
	ppCTMiss     = "ct-miss"     // ... new flow, table filling
	ppCTEvict    = "ct-evict"    // ... new flow, full table
	ppLRUHit     = "lru-hit"     // the kernel's LRU hash alone (bench_lru_flow), established flow
	ppLRUMiss    = "lru-miss"    // ... new flow, no eviction
	ppLRUEvict   = "lru-evict"   // ... new flow, full map
	ppMemTable   = "mem-table"   // dependent random load, area of the conntrack table
	ppMemLRU     = "mem-lru"     // ... area of an LRU hash of the same capacity (buckets + entries)
)

// XDPResult holds every measurement of RunXDP (one value per repetition).
type XDPResult struct {
	// PerPacket: ns per packet by scenario key (pp*), one value per
	// repetition.
	PerPacket map[string][]float64
	// Conntrack capacity of every load balancer measured, and what the
	// full maps held before and after the runs with eviction.
	Capacity                   int
	FullBefore, FullAfter      map[string]int
	PerCPUCapacity             int // of the kernel LRU hash (per-CPU LRU lists)
	MemTableBytes, MemLRUBytes int
	// Evicted: conntrack entries replaced by new flows (ct_evict) in the
	// xdplb runs meant not to evict (ppMiss, ppMiss2), and inserts.
	Evicted, Inserted            map[string]uint64
	Veth                         *VethResult
	ThroughputSkipped            bool
	Kernel, IPTablesVersion      string
	Flows, Calls, Reps, CPU, Gen int
	Batch                        int
	ThroughputDur                time.Duration
	Realtime                     bool
	LoadBefore, LoadAfter        string
}

// RunXDP measures the XDP load balancer (MeasureXDP) and prints the
// report.
func RunXDP(ctx context.Context, opts XDPOptions, out io.Writer) error {
	res, err := MeasureXDP(ctx, opts)
	if err != nil {
		return err
	}
	fmt.Fprint(out, XDPReport(res, opts.Markdown))
	return nil
}

// MeasureXDP measures the XDP load balancer: ns per packet via
// BPF_PROG_TEST_RUN, and packets per second through veth against kernel
// forwarding with iptables DNAT. It fails when a run did not do what it
// is meant to measure (a new-flow run that hit the conntrack, a verdict
// other than IPIP).
func MeasureXDP(ctx context.Context, opts XDPOptions) (XDPResult, error) {
	o := opts.withDefaults()
	if o.CPU < 0 || o.CPU >= runtime.NumCPU() {
		o.CPU = runtime.NumCPU() - 1
	}
	res := XDPResult{Flows: o.Flows, Calls: o.Calls, Reps: o.Reps, CPU: o.CPU, ThroughputDur: o.Duration, Kernel: kernelRelease(),
		Realtime: o.Realtime, LoadBefore: loadAvg(), Batch: o.Batch, Gen: otherCPU(o.CPU)}
	if err := measurePerPacket(ctx, o, &res); err != nil {
		return res, err
	}
	if o.SkipThroughput {
		res.ThroughputSkipped = true
	} else {
		v, err := measureVeth(ctx, o)
		if err != nil {
			return res, err
		}
		res.Veth = v
		res.IPTablesVersion = iptablesVersion()
	}
	res.LoadAfter = loadAvg()
	return res, nil
}

// otherCPU is a CPU other than cpu (cpu itself on a 1-CPU machine).
func otherCPU(cpu int) int {
	if runtime.NumCPU() < 2 {
		return cpu
	}
	return (cpu + 1) % runtime.NumCPU()
}

// frameSource hands out frames of flows never used before.
type frameSource struct{ next int }

func (s *frameSource) frames(n int) ([][]byte, error) {
	fs := make([][]byte, n)
	for i := range fs {
		f, err := flowFrame(s.next, nil, nil)
		if err != nil {
			return nil, err
		}
		s.next++
		fs[i] = f
	}
	return fs, nil
}

// fillLRU fills the LRU hash m (key struct xlb_flow4) from cpu with n
// entries of flows no frame uses, so that it is full: from then on every
// insert on cpu evicts.
func fillLRU(m *ebpf.Map, cpu, n int) error {
	return onCPU(cpu, false, func() error {
		const chunk = 8192
		for done := 0; done < n; done += chunk {
			k := min(chunk, n-done)
			keys := make([]bpf.XdpbenchXlbFlow4, k)
			vals := make([]bpf.XdpbenchXlbCt, k)
			for i := range keys {
				a := uint32(100<<24|64<<16) + uint32(done+i) // 100.64.0.0/10, host order
				keys[i] = bpf.XdpbenchXlbFlow4{Src: hostToNet32(a), Dst: hostToNet32(0x0a600001), Sport: hostToNet16(1), Dport: hostToNet16(53), Proto: 17}
			}
			if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
				return fmt.Errorf("fill %s: %w", m.String(), err)
			}
		}
		return nil
	})
}

// fillTable fills every way of the IPv4 conntrack table m (sets sets)
// with valid entries of flows no frame uses (100.64.0.0/10 -> benchVIP),
// each in one of its own two sets for the flow hash with seed: from then on
// every insert evicts.
func fillTable(m *ebpf.Map, sets, seed uint32) error {
	table := make([]bpf.XdplbXlbCtSet4, sets)
	free := int(sets) * xdp.CTWays
	ct := bpf.XdplbXlbCt{Gen: 1}
	dst := benchVIP
	for i := 0; free > 0; i++ {
		if i >= 64*int(sets)*xdp.CTWays {
			return fmt.Errorf("fill %s: %d ways still empty after %d flows", m.String(), free, i)
		}
		a := uint32(100<<24|64<<16) + uint32(i&(1<<22-1))
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}), uint16(1+i>>22))
		hash := xdp.CTFlowHash(mesh.UDP, src, dst, seed)
		i1, i2 := xdp.CTSetsOf(hash, sets)
	place:
		for _, si := range []uint32{i1, i2} {
			for w := range table[si].Way {
				if table[si].Way[w].T.Check != 0 {
					continue
				}
				ct.Hash = hash
				table[si].Way[w] = bpf.XdplbXlbCtWay4{Src: xdp.FlowKey(mesh.UDP, src, dst).Src[0], Dst: xdp.FlowKey(mesh.UDP, src, dst).Dst[0],
					T: xdp.CTTail(mesh.UDP, src, dst, hash, &ct, 0)}
				free--
				break place
			}
		}
	}
	keys := make([]uint32, sets)
	for i := range keys {
		keys[i] = uint32(i)
	}
	if _, err := m.BatchUpdate(keys, table, nil); err != nil {
		return fmt.Errorf("fill %s: %w", m.String(), err)
	}
	return nil
}

// hostToNet32 and hostToNet16 give the value whose bytes in memory are v
// in network order.
func hostToNet32(v uint32) uint32 {
	return binary.NativeEndian.Uint32(binary.BigEndian.AppendUint32(nil, v))
}

func hostToNet16(v uint16) uint16 {
	return binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, v))
}

// countEntries counts the keys of the LRU hash m (struct xlb_flow4).
func countEntries(m *ebpf.Map) (int, error) {
	var k bpf.XdpbenchXlbFlow4
	var v []byte
	n := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// countTable counts the valid-looking (nonzero check) ways of the IPv4
// conntrack table m.
func countTable(m *ebpf.Map) (int, error) {
	var k uint32
	var set bpf.XdplbXlbCtSet4
	n := 0
	it := m.Iterate()
	for it.Next(&k, &set) {
		for _, w := range set.Way {
			if w.T.Check != 0 {
				n++
			}
		}
	}
	return n, it.Err()
}

func perCPUSum(m *ebpf.Map) (uint64, error) {
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

// ctCounters returns the load balancer's ct_new, ct_hit and ct_evict
// counters.
func ctCounters(d *xdp.Datapath) (created, hit, evicted uint64, err error) {
	c, err := d.Counters()
	if err != nil {
		return 0, 0, 0, err
	}
	for i, n := range xdp.StatNames {
		switch n {
		case "ct_new":
			created = c[i]
		case "ct_hit":
			hit = c[i]
		case "ct_evict":
			evicted = c[i]
		}
	}
	return created, hit, evicted, nil
}

func measurePerPacket(ctx context.Context, o XDPOptions, res *XDPResult) error {
	capacity := o.Capacity
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	res.Capacity, res.PerCPUCapacity = capacity, capacity/ncpu
	res.PerPacket = map[string][]float64{}
	res.FullBefore, res.FullAfter = map[string]int{}, map[string]int{}
	res.Evicted, res.Inserted = map[string]uint64{}, map[string]uint64{}
	other := otherCPU(o.CPU)

	// Every load balancer has the default capacity; each kind of run has
	// its own, so that those meant to insert into a filling conntrack
	// never fill theirs and those meant to evict start full.
	lbs := map[string]*xdp.Datapath{}
	for _, name := range []string{"est", ppMiss, ppEvict, ppMiss2} {
		logf(o.Log, "loading xdplb (%s, %d flows)", name, capacity)
		d, err := loadBenchLB("percpu", capacity)
		if err != nil {
			return fmt.Errorf("load xdplb: %w", err)
		}
		defer d.Close()
		lbs[name] = d
	}
	floors := map[string]*ctFloor{}
	for _, name := range []string{ppCTMiss, ppCTEvict, ppLRUMiss, ppLRUEvict} {
		f, err := loadCTFloor(name == ppLRUMiss || name == ppLRUEvict, capacity)
		if err != nil {
			return err
		}
		defer f.Close()
		floors[name] = f
	}
	// The kernel's per-CPU LRU evicts once a CPU holds its share; the
	// conntrack table is shared, and these stay under 40% of it.
	if need := res.PerCPUCapacity; o.Reps*o.Calls > need || o.Flows > need {
		return fmt.Errorf("%d reps × %d new flows or %d established flows do not fit the %d flows a CPU holds without eviction: lower --calls, --reps or --flows",
			o.Reps, o.Calls, o.Flows, need)
	}
	// Full maps: every way of the tables, more entries than the LRU hash
	// holds, inserted from the measuring CPU (which fills that CPU's part).
	if err := fillTable(lbs[ppEvict].Conntrack().V4, lbs[ppEvict].Conntrack().V4.MaxEntries(),
		lbs[ppEvict].Params().Seed.DatapathSeed()); err != nil {
		return err
	}
	if err := fillTable(floors[ppCTEvict].m(), floors[ppCTEvict].sets, 0); err != nil {
		return err
	}
	if err := fillLRU(floors[ppLRUEvict].m(), o.CPU, capacity+capacity/8); err != nil {
		return err
	}
	full := func() (map[string]int, error) {
		out := map[string]int{}
		for name, m := range map[string]*ebpf.Map{ppEvict: lbs[ppEvict].Conntrack().V4, ppCTEvict: floors[ppCTEvict].m(), ppLRUEvict: floors[ppLRUEvict].m()} {
			count := countTable
			if name == ppLRUEvict {
				count = countEntries
			}
			n, err := count(m)
			if err != nil {
				return nil, err
			}
			out[name] = n
		}
		return out, nil
	}
	if res.FullBefore, err = full(); err != nil {
		return err
	}

	rp, err := NewReplayer(o.Flows + 2*o.Calls)
	if err != nil {
		return err
	}
	defer rp.Close()
	logf(o.Log, "building and establishing %d flows", o.Flows)
	src := &frameSource{}
	many, err := src.frames(o.Flows)
	if err != nil {
		return err
	}
	if err := rp.Load(0, many); err != nil {
		return err
	}
	if err := rp.Position(map[int][2]int{o.CPU: {0, o.Flows}}); err != nil {
		return err
	}
	if _, err := rp.Run(lbs["est"].Program(), o.CPU, false, o.Flows); err != nil {
		return err
	}
	// Their packets come back in another order than they started in: an
	// LRU hash's entries are handed out in insert order, and visiting them
	// in that order would read its memory in sequence, which no traffic
	// does.
	shuffled := slices.Clone(many)
	rand.New(rand.NewPCG(uint64(o.Flows), 1)).Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	if err := rp.Load(0, shuffled); err != nil {
		return err
	}
	// The conntrack-alone programs' established flow: frame 0.
	if err := rp.Position(map[int][2]int{o.CPU: {0, 1}}); err != nil {
		return err
	}
	for _, name := range []string{ppCTMiss, ppLRUMiss} {
		if _, err := rp.Run(floors[name].prog(), o.CPU, false, 1); err != nil {
			return err
		}
	}

	type step struct {
		key    string
		prog   *ebpf.Program
		lb     *xdp.Datapath // counters checked: every run a new flow (fresh) or a hit
		floor  *ctFloor
		base   int
		n      int
		repeat int
		fresh  bool
		evicts bool // every new flow evicts (checked for xdplb)
	}
	const hotRepeat = 200000
	fresh := o.Flows // frames [fresh, fresh+Calls) are the new flows of a run
	steps := []step{
		{key: ppEmpty1, prog: lbs["est"].PassProgram(), n: 1, repeat: hotRepeat},
		{key: ppGrow1, prog: rp.Grow(), n: 1, repeat: hotRepeat},
		{key: ppEmptyFresh, prog: lbs["est"].PassProgram(), base: fresh, n: o.Calls, repeat: o.Calls, fresh: true},
		{key: ppEmptyMany, prog: lbs["est"].PassProgram(), n: o.Flows, repeat: 2 * o.Flows},
		{key: ppHot, prog: lbs["est"].Program(), lb: lbs["est"], n: 1, repeat: hotRepeat},
		{key: ppMiss, prog: lbs[ppMiss].Program(), lb: lbs[ppMiss], base: fresh, n: o.Calls, repeat: o.Calls, fresh: true},
		{key: ppEvict, prog: lbs[ppEvict].Program(), lb: lbs[ppEvict], base: fresh, n: o.Calls, repeat: o.Calls, fresh: true, evicts: true},
		{key: ppMany, prog: lbs["est"].Program(), lb: lbs["est"], n: o.Flows, repeat: 2 * o.Flows},
		{key: ppCTHit, prog: floors[ppCTMiss].prog(), n: 1, repeat: hotRepeat},
		{key: ppCTMiss, prog: floors[ppCTMiss].prog(), floor: floors[ppCTMiss], base: fresh, n: o.Calls, repeat: o.Calls, fresh: true},
		{key: ppCTEvict, prog: floors[ppCTEvict].prog(), floor: floors[ppCTEvict], base: fresh, n: o.Calls, repeat: o.Calls, fresh: true},
		{key: ppLRUHit, prog: floors[ppLRUMiss].prog(), n: 1, repeat: hotRepeat},
		{key: ppLRUMiss, prog: floors[ppLRUMiss].prog(), floor: floors[ppLRUMiss], base: fresh, n: o.Calls, repeat: o.Calls, fresh: true},
		{key: ppLRUEvict, prog: floors[ppLRUEvict].prog(), floor: floors[ppLRUEvict], base: fresh, n: o.Calls, repeat: o.Calls, fresh: true},
		{key: ppMemTable},
		{key: ppMemLRU},
	}
	// The memory latency references: areas the size of the IPv4 conntrack
	// table and of a kernel LRU hash of the same capacity (buckets +
	// preallocated entries).
	res.MemTableBytes = int(xdp.CTSets(uint32(capacity))) * int(unsafe.Sizeof(bpf.XdplbXlbCtSet4{}))
	res.MemLRUBytes = capacity*16 + capacity*htabEntryBytes
	mem := map[string]*chase{}
	for key, size := range map[string]int{ppMemTable: res.MemTableBytes, ppMemLRU: res.MemLRUBytes} {
		c, err := newChase(size)
		if err != nil {
			return err
		}
		defer c.close()
		mem[key] = c
	}
	for rep := 0; rep < o.Reps; rep++ {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		logf(o.Log, "per-packet repetition %d/%d", rep+1, o.Reps)
		for k := range steps {
			s := steps[(k+rep)%len(steps)]
			if c := mem[s.key]; c != nil {
				var ns float64
				if err := onCPU(o.CPU, o.Realtime, func() error { ns = c.run(200000); return nil }); err != nil {
					return err
				}
				res.PerPacket[s.key] = append(res.PerPacket[s.key], ns)
				continue
			}
			if s.fresh {
				fs, err := src.frames(o.Calls)
				if err != nil {
					return err
				}
				if err := rp.Load(fresh, fs); err != nil {
					return err
				}
			}
			if err := rp.Position(map[int][2]int{o.CPU: {s.base, s.n}}); err != nil {
				return err
			}
			created0, hit0, evict0, err := stepCounters(s.lb, s.floor)
			if err != nil {
				return err
			}
			v, err := rp.Run(s.prog, o.CPU, o.Realtime, s.repeat)
			if err != nil {
				return err
			}
			created1, hit1, evict1, err := stepCounters(s.lb, s.floor)
			if err != nil {
				return err
			}
			if s.lb != nil || s.floor != nil {
				// A new-flow run must have created an entry for every
				// frame and used none; any other run only hits.
				wantNew, wantHit := uint64(0), uint64(s.repeat)
				if s.fresh {
					wantNew, wantHit = uint64(s.repeat), 0
				}
				if s.floor != nil {
					wantHit = 0 // the conntrack-alone programs count inserts only
				}
				if created1-created0 != wantNew || hit1-hit0 != wantHit {
					return fmt.Errorf("%s: %d conntrack entries created and %d used in %d runs (want %d and %d): the benchmark did not measure what it says",
						s.key, created1-created0, hit1-hit0, s.repeat, wantNew, wantHit)
				}
			}
			if s.evicts && evict1-evict0 != uint64(s.repeat) {
				return fmt.Errorf("%s: %d of %d new flows evicted an entry (want all): the benchmark did not measure what it says", s.key, evict1-evict0, s.repeat)
			}
			if s.lb != nil && s.fresh {
				res.Evicted[s.key] += evict1 - evict0
				res.Inserted[s.key] += created1 - created0
			}
			res.PerPacket[s.key] = append(res.PerPacket[s.key], v)
		}
		// New flows on two CPUs at once: where writers of one table meet.
		fa, err := src.frames(o.Calls)
		if err != nil {
			return err
		}
		fb, err := src.frames(o.Calls)
		if err != nil {
			return err
		}
		if err := rp.Load(fresh, fa); err != nil {
			return err
		}
		if err := rp.Load(fresh+o.Calls, fb); err != nil {
			return err
		}
		if err := rp.Position(map[int][2]int{o.CPU: {fresh, o.Calls}, other: {fresh + o.Calls, o.Calls}}); err != nil {
			return err
		}
		d2 := lbs[ppMiss2]
		created0, _, evict0, err := ctCounters(d2)
		if err != nil {
			return err
		}
		var wg sync.WaitGroup
		var va, vb float64
		var ea, eb error
		wg.Add(2)
		go func() {
			defer wg.Done()
			va, ea = rp.Run(d2.Program(), o.CPU, o.Realtime, o.Calls)
		}()
		go func() {
			defer wg.Done()
			vb, eb = rp.Run(d2.Program(), other, o.Realtime, o.Calls)
		}()
		wg.Wait()
		if err := errors.Join(ea, eb); err != nil {
			return err
		}
		created1, _, evict1, err := ctCounters(d2)
		if err != nil {
			return err
		}
		if created1-created0 != uint64(2*o.Calls) {
			return fmt.Errorf("%s: %d conntrack entries created for %d new flows", ppMiss2, created1-created0, 2*o.Calls)
		}
		res.Evicted[ppMiss2] += evict1 - evict0
		res.Inserted[ppMiss2] += created1 - created0
		res.PerPacket[ppMiss2] = append(res.PerPacket[ppMiss2], (va+vb)/2)
	}
	if res.FullAfter, err = full(); err != nil {
		return err
	}
	// Every run must have been load-balanced.
	for k, d := range lbs {
		c, err := d.Counters()
		if err != nil {
			return err
		}
		for i, n := range xdp.StatNames {
			if c[i] != 0 && n != "tx_ipip" && n != "ct_hit" && n != "ct_new" && n != "ct_evict" {
				return fmt.Errorf("load balancer %s counted %s %d times: the benchmark did not measure what it says", k, n, c[i])
			}
		}
	}
	return nil
}

// stepCounters reads what tells a run's flows apart: ct_new, ct_hit and
// ct_evict of a load balancer, the inserts of a conntrack-alone program.
func stepCounters(d *xdp.Datapath, f *ctFloor) (created, hit, evicted uint64, err error) {
	switch {
	case d != nil:
		return ctCounters(d)
	case f != nil:
		created, err = perCPUSum(f.objs.BenchCount)
		return created, 0, 0, err
	}
	return 0, 0, 0, nil
}

func rotateSlice[T any](s []T, n int) []T {
	n %= len(s)
	return append(slices.Clone(s[n:]), s[:n]...)
}

// htabEntryBytes is the size of one preallocated entry of bench_lru (the
// former lb_ct4) in the kernel: struct htab_elem (48 bytes on 64-bit) +
// key (16) + value (56, struct xlb_ct), each rounded up to 8.
var htabEntryBytes = 48 + roundUp8(int(unsafe.Sizeof(bpf.XdpbenchXlbFlow4{}))) + roundUp8(int(unsafe.Sizeof(bpf.XdpbenchXlbCt{})))

func roundUp8(n int) int { return (n + 7) &^ 7 }

// chase is a reference for the cost of one random memory access: a
// pointer chase (each load's address comes from the previous load) through
// the cache lines of an area of 4 KiB pages (no transparent huge pages,
// like the kernel's vmalloc'ed map memory) in random order.
type chase struct {
	mem  []byte
	next []uint32 // view of mem: next[line*16] is the following line
	pos  uint32
}

func newChase(size int) (*chase, error) {
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes: %w", size, err)
	}
	if err := unix.Madvise(mem, unix.MADV_NOHUGEPAGE); err != nil {
		unix.Munmap(mem)
		return nil, fmt.Errorf("madvise: %w", err)
	}
	lines := size / 64
	c := &chase{mem: mem, next: unsafe.Slice((*uint32)(unsafe.Pointer(&mem[0])), size/4)}
	order := rand.Perm(lines)
	for i, l := range order {
		c.next[l*16] = uint32(order[(i+1)%lines] * 16)
	}
	c.pos = uint32(order[0] * 16)
	return c, nil
}

// run follows n links and returns the time per link in ns.
func (c *chase) run(n int) float64 {
	p := c.pos
	start := time.Now()
	for range n {
		p = c.next[p]
	}
	d := time.Since(start)
	c.pos = p
	return float64(d.Nanoseconds()) / float64(n)
}

func (c *chase) close() { unix.Munmap(c.mem) }

// restoreNs is what putting a frame grown by an IPv4 header back costs
// the replay: half the extra time of the empty program that grows it (the
// growing and the putting back are the same helper call), per repetition.
func restoreNs(r XDPResult) float64 {
	return (Median(r.PerPacket[ppGrow1]) - Median(r.PerPacket[ppEmpty1])) / 2
}

// NetNs is a scenario's cost of its own: its median minus the replay's
// (the empty program over the same frames) and, for xdplb, which grows
// every frame, minus putting the frame back.
func (r XDPResult) NetNs(key string) float64 {
	base, grows := "", false
	switch key {
	case ppHot:
		base, grows = ppEmpty1, true
	case ppCTHit, ppLRUHit:
		base = ppEmpty1
	case ppMiss, ppEvict, ppMiss2:
		base, grows = ppEmptyFresh, true
	case ppCTMiss, ppCTEvict, ppLRUMiss, ppLRUEvict:
		base = ppEmptyFresh
	case ppMany:
		base, grows = ppEmptyMany, true
	default:
		return Median(r.PerPacket[key])
	}
	v := Median(r.PerPacket[key]) - Median(r.PerPacket[base])
	if grows {
		v -= restoreNs(r)
	}
	return v
}

// Per-packet targets of the issue.
const (
	TargetHotNs  = 40
	TargetMissNs = 120
	TargetVeth   = 6
)

// XDPReport formats a result.
func XDPReport(r XDPResult, markdown bool) string {
	var b strings.Builder
	med := func(key string) string {
		xs := r.PerPacket[key]
		if len(xs) == 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.0f", Median(xs))
	}
	spread := func(xs []float64) string {
		lo, hi := MinMax(xs)
		return fmt.Sprintf("%.0f–%.0f", lo, hi)
	}
	if !markdown {
		fmt.Fprintf(&b, "XDP load balancer, kernel %s, CPU %d, %d reps, %d new flows per new-flow run, %d established flows, SCHED_FIFO %v\n",
			r.Kernel, r.CPU, r.Reps, r.Calls, r.Flows, r.Realtime)
		fmt.Fprintf(&b, "load average before %s, after %s\n", r.LoadBefore, r.LoadAfter)
		fmt.Fprintf(&b, "conntrack of every load balancer: %d flows (the kernel LRU's per-CPU lists: %d per CPU); full maps held %v before, %v after;\n"+
			"new flows that evicted an entry in the runs meant not to (of inserted): %v of %v\n\n",
			r.Capacity, r.PerCPUCapacity, r.FullBefore, r.FullAfter, r.Evicted, r.Inserted)
	}
	type row struct{ key, label string }
	rows := []row{
		{ppEmpty1, "empty program, one frame (replay + tail call)"},
		{ppGrow1, "empty program growing the frame by 20 bytes, one frame"},
		{ppEmptyFresh, fmt.Sprintf("empty program, %d frames in turn", r.Calls)},
		{ppEmptyMany, fmt.Sprintf("empty program, %d frames in turn", r.Flows)},
		{ppHot, "hot flow (conntrack hit, IPIP)"},
		{ppMiss, "new flow: conntrack miss + Maglev + insert, conntrack filling"},
		{ppEvict, "new flow into a full conntrack (eviction)"},
		{ppMany, fmt.Sprintf("%d established flows in turn", r.Flows)},
		{ppMiss2, "new flows on 2 CPUs at once, conntrack filling"},
		{ppCTHit, "conntrack alone (Shunt's table): lookup, hit"},
		{ppCTMiss, "conntrack alone (Shunt's table): lookup miss + insert, filling"},
		{ppCTEvict, "conntrack alone (Shunt's table): lookup miss + insert, full (eviction)"},
		{ppLRUHit, "the kernel's LRU hash alone (per-CPU lists): lookup, hit"},
		{ppLRUMiss, "the kernel's LRU hash alone: lookup miss + insert, no eviction"},
		{ppLRUEvict, "the kernel's LRU hash alone: lookup miss + insert, full (eviction)"},
		{ppMemTable, fmt.Sprintf("reference: one random memory access in %.0f MiB (the IPv4 conntrack table)", float64(r.MemTableBytes)/(1<<20))},
		{ppMemLRU, fmt.Sprintf("reference: one random memory access in %.0f MiB (an LRU hash as large: buckets + entries)", float64(r.MemLRUBytes)/(1<<20))},
	}
	var body [][]string
	for _, rw := range rows {
		net := "—"
		switch rw.key {
		case ppEmpty1, ppGrow1, ppEmptyFresh, ppEmptyMany, ppMemTable, ppMemLRU:
		default:
			net = fmt.Sprintf("**%.0f**", r.NetNs(rw.key))
		}
		body = append(body, []string{rw.label, med(rw.key), net, spread(r.PerPacket[rw.key])})
	}
	mdTable(&b, []string{"ns per packet (BPF_PROG_TEST_RUN, median of reps)", "measured", "own cost", "reps min–max"}, "lrrr", body)
	if !markdown {
		fmt.Fprintf(&b, "\nown cost = measured − the empty program over the same frames − %.1f ns for putting a grown frame back\n"+
			"(half of what growing adds to the empty program; xdplb rows only). Every new-flow run was checked to create one\n"+
			"conntrack entry per packet and use none; every hit run to use one per packet and create none.\n", restoreNs(r))
	}
	if v := r.Veth; v != nil {
		b.WriteString("\n")
		pct := func(xs []float64) string { return fmt.Sprintf("%.0f%%", 100*Median(xs)) }
		// One CPU: a packet's whole pipeline runs on the CPU, so 1/rate is
		// its cost; beyond the reflector is the DUT's own.
		one := v.OneCPU
		nsOf := func(p VethPath) float64 { return 1000 / Median(p.Mpps) }
		oneRow := func(name string, p VethPath, vs, costVs string) []string {
			return []string{name, fmt.Sprintf("%.2f", Median(p.Mpps)), fmtMpps(p.Mpps), vs, fmt.Sprintf("%.0f", nsOf(p)),
				fmt.Sprintf("%.0f", nsOf(p)-nsOf(one.Refl)), costVs}
		}
		mdTable(&b, []string{"through veth, one CPU", "Mpps", "reps min–max", "Mpps vs iptables", "ns/packet (whole pipeline)",
			"beyond the reflector", "vs iptables"}, "lrrrrrr", [][]string{
			oneRow("reflector (XDP_TX only)", one.Refl, "—", "—"),
			oneRow("xdplb (XDP native, IPIP, XDP_TX)", one.LB, "**"+FormatRatio(Ratio(Median(one.LB.Mpps), Median(one.IPT.Mpps)))+"**",
				"**"+FormatRatio(Ratio(nsOf(one.IPT)-nsOf(one.Refl), nsOf(one.LB)-nsOf(one.Refl)))+"**"),
			oneRow("kernel forwarding + iptables DNAT", one.IPT, "1.00×", "1.00×"),
		})
		b.WriteString("\n")
		sp := v.Split
		refl := Median(sp.Refl.DUTns)
		splitRow := func(name string, p VethPath, vs, costVs string) []string {
			return []string{name, fmt.Sprintf("%.2f", Median(p.Mpps)), fmtMpps(p.Mpps), vs, fmt.Sprintf("%.2f", Median(p.GenMpps)),
				fmt.Sprintf("%.0f", Median(p.DUTns)), pct(p.DUTBusy), pct(p.GenBusy), fmt.Sprintf("%.0f", Median(p.DUTns)-refl), costVs}
		}
		mdTable(&b, []string{"through veth, DUT on its own CPU", "Mpps", "reps min–max", "Mpps vs iptables", "generated Mpps",
			"DUT CPU ns/packet", "DUT CPU busy", "generator busy", "beyond the reflector", "vs iptables"}, "lrrrrrrrrr", [][]string{
			splitRow("reflector (XDP_TX only)", sp.Refl, "—", "—"),
			splitRow("xdplb (XDP native, IPIP, XDP_TX)", sp.LB, "**"+FormatRatio(Ratio(Median(sp.LB.Mpps), Median(sp.IPT.Mpps)))+"**",
				"**"+FormatRatio(Ratio(Median(sp.IPT.DUTns)-refl, Median(sp.LB.DUTns)-refl))+"**"),
			splitRow("kernel forwarding + iptables DNAT", sp.IPT, "1.00×", "1.00×"),
		})
		if !markdown {
			fmt.Fprintf(&b, "\nOne CPU: generator (live frames, batch %d), DUT and sink all on CPU %d, in the generator's softirq.\n"+
				"DUT on its own CPU: the DUT veth's NAPI thread (and the sink's NAPI, which it schedules) on CPU %d, the generator\n"+
				"on CPU %d; DUT CPU ns/packet is the thread's CPU time over the packets delivered. A cache line's round trip\n"+
				"between the two CPUs: %.0f ns (median; %s). iptables: %s.\n",
				v.Batch, v.DUTCPU, v.DUTCPU, v.GenCPU, Median(v.CrossCPU), spread(v.CrossCPU), r.IPTablesVersion)
			fmt.Fprintf(&b, "xdplb forwarded %d packets in the throughput part; other verdicts: %v\n", v.LBPackets, v.LBOther)
		}
	}
	if !markdown {
		b.WriteString("\nTargets: hot flow ≤ 40 ns " + verdict(r.NetNs(ppHot) <= TargetHotNs) +
			", new flow ≤ 120 ns " + verdict(r.NetNs(ppMiss) <= TargetMissNs) + " (conntrack filling; full, with eviction " +
			verdict(r.NetNs(ppEvict) <= TargetMissNs) + ")")
		if v := r.Veth; v != nil {
			one := v.OneCPU
			nsOf := func(p VethPath) float64 { return 1000 / Median(p.Mpps) }
			b.WriteString(", ≥ 6× iptables DNAT: end-to-end Mpps " + verdict(Ratio(Median(one.LB.Mpps), Median(one.IPT.Mpps)) >= TargetVeth) +
				" (one CPU; DUT on its own CPU " + verdict(Ratio(Median(v.Split.LB.Mpps), Median(v.Split.IPT.Mpps)) >= TargetVeth) +
				"), own cost " + verdict(Ratio(nsOf(one.IPT)-nsOf(one.Refl), nsOf(one.LB)-nsOf(one.Refl)) >= TargetVeth))
		}
		b.WriteString("\n")
	}
	return b.String()
}

func fmtMpps(xs []float64) string {
	lo, hi := MinMax(xs)
	return fmt.Sprintf("%.2f–%.2f", lo, hi)
}
