package xdplb

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/mesh/maglev"
)

// ctLB is a load balancer with a conntrack for maxFlows flows and the
// fixture services.
func ctLB(t *testing.T, maxFlows uint32) (*xdp.Datapath, uint32) {
	t.Helper()
	requireRoot(t)
	cfg := xdp.Config{Seed: testSeed, TableSize: testSize, NodeAddr: node4.String(), NodeAddr6: node6.String(),
		SNATPorts: "40000-40999", MaxFlows: maxFlows, MaxBackends: 1024, MaxServices: 64}
	d, err := xdp.Open(cfg, "", nil)
	if err != nil {
		t.Fatalf("load xdplb: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	if _, err := d.Sync(fixtureServices()); err != nil {
		t.Fatalf("sync: %v", err)
	}
	seed, err := maglev.ParseSeed(testSeed)
	if err != nil {
		t.Fatal(err)
	}
	return d, seed.DatapathSeed()
}

// send runs one UDP datagram of src -> dst through the program and
// returns the backend its entry names ("" when it has none).
func send(t *testing.T, d *xdp.Datapath, src, dst netip.AddrPort) string {
	t.Helper()
	f, err := xdp.BuildProbe(mesh.UDP, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	v, _, err := xdp.RunXDP(d.Program(), f)
	if err != nil {
		t.Fatal(err)
	}
	if v != xdp.XDPTx {
		t.Fatalf("%s -> %s: verdict %s", src, dst, xdp.VerdictName(v))
	}
	return entryBackend(t, d, src, dst)
}

func entryBackend(t *testing.T, d *xdp.Datapath, src, dst netip.AddrPort) string {
	t.Helper()
	var e bpf.XdplbXlbCt
	if err := d.Conntrack().Lookup(mesh.UDP, src, dst, &e); err != nil {
		return ""
	}
	return fmt.Sprint(e.BeId)
}

func counters(t *testing.T, d *xdp.Datapath) map[string]uint64 {
	t.Helper()
	c, err := d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]uint64{}
	for i, n := range xdp.StatNames {
		m[n] = c[i]
	}
	return m
}

// The conntrack is a table of sets of 4 flows, each flow in one of two
// sets. A new flow whose two sets are full replaces the flow of the eight
// seen least recently, and says so (ct_evict); the others stay.
func TestConntrackEvictsLeastRecent(t *testing.T) {
	d, seed := ctLB(t, 1024)
	sets := d.Conntrack().V4.MaxEntries()
	vip := ap("10.96.0.10:53")
	// Nine flows with the same two sets.
	r := rand.New(rand.NewPCG(1, 2))
	var flows []netip.AddrPort
	var pair [2]uint32
	for len(flows) < 9 {
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(r.IntN(256)), byte(r.IntN(256))}), uint16(1024+r.IntN(60000)))
		a, b := xdp.CTSetsOf(xdp.CTFlowHash(mesh.UDP, src, vip, seed), sets)
		if a == b {
			continue
		}
		if len(flows) == 0 {
			pair = [2]uint32{a, b}
		}
		if [2]uint32{a, b} == pair || [2]uint32{b, a} == pair {
			flows = append(flows, src)
		}
	}
	before := counters(t, d)
	for _, f := range flows[:8] {
		if send(t, d, f, vip) == "" {
			t.Fatalf("%s: no entry after its first packet", f)
		}
	}
	if c := counters(t, d); c["ct_evict"] != before["ct_evict"] || c["ct_new"]-before["ct_new"] != 8 {
		t.Fatalf("8 flows into 8 free ways: ct_new +%d, ct_evict +%d; want 8 and 0", c["ct_new"]-before["ct_new"], c["ct_evict"]-before["ct_evict"])
	}
	// Let the clock (jiffies) move, then see every flow but the fourth
	// again: it is the one seen least recently, neither the first inserted
	// nor in the first way.
	const idle = 3
	time.Sleep(50 * time.Millisecond)
	want := map[netip.AddrPort]string{}
	for i, f := range flows[:8] {
		if i != idle {
			want[f] = send(t, d, f, vip)
		}
	}
	mid := counters(t, d)
	if mid["ct_hit"]-before["ct_hit"] != 7 {
		t.Fatalf("7 established flows: ct_hit +%d", mid["ct_hit"]-before["ct_hit"])
	}
	send(t, d, flows[8], vip)
	after := counters(t, d)
	if after["ct_evict"]-mid["ct_evict"] != 1 || after["ct_new"]-mid["ct_new"] != 1 {
		t.Fatalf("a 9th flow into two full sets: ct_new +%d, ct_evict +%d; want 1 and 1", after["ct_new"]-mid["ct_new"], after["ct_evict"]-mid["ct_evict"])
	}
	if b := entryBackend(t, d, flows[idle], vip); b != "" {
		t.Errorf("flow seen least recently (%s) still has its entry (backend id %s)", flows[idle], b)
	}
	for f, b := range want {
		if got := entryBackend(t, d, f, vip); got != b {
			t.Errorf("%s: entry names backend id %q after the eviction, want %q", f, got, b)
		}
	}
}

// An entry mixed from two writes (two CPUs writing one way at once) fails
// its check: the packet is handled as a new flow, counted (ct_torn), and
// the entry is written again, whole.
func TestConntrackTornEntry(t *testing.T) {
	d, seed := ctLB(t, 1024)
	ct := d.Conntrack()
	vip := ap("10.96.0.10:53")
	src := ap("198.18.0.1:40000")
	want := send(t, d, src, vip)
	if want == "" {
		t.Fatal("no entry after the first packet")
	}
	// Put another backend's id in the entry, as a second writer's half
	// would, and leave the check as it was.
	a, b := xdp.CTSetsOf(xdp.CTFlowHash(mesh.UDP, src, vip, seed), ct.V4.MaxEntries())
	key := xdp.FlowKey(mesh.UDP, src, vip)
	var other bpf.XdplbXlbBackend
	tore := false
	for _, idx := range []uint32{a, b} {
		var set bpf.XdplbXlbCtSet4
		if err := ct.V4.Lookup(idx, &set); err != nil {
			t.Fatal(err)
		}
		for i, w := range set.Way {
			if w.Src != key.Src[0] || w.Dst != key.Dst[0] || w.T.Check == 0 || w.T.Sport != key.Sport {
				continue
			}
			forged := w.T.BeId + 1
			if err := ct.Backends.Lookup(uint32(forged), &other); err != nil || other.Family == 0 {
				t.Fatalf("backend id %d: %v", forged, err)
			}
			set.Way[i].T.BeId = forged
			if err := ct.V4.Put(idx, set); err != nil {
				t.Fatal(err)
			}
			tore = true
		}
	}
	if !tore {
		t.Fatal("the flow's entry is in neither of its sets")
	}
	if b := entryBackend(t, d, src, vip); b != "" {
		t.Fatalf("the mixed entry reads as valid (backend id %s)", b)
	}
	before := counters(t, d)
	got := send(t, d, src, vip)
	after := counters(t, d)
	if after["ct_torn"]-before["ct_torn"] != 1 || after["ct_new"]-before["ct_new"] != 1 || after["ct_hit"] != before["ct_hit"] {
		t.Errorf("packet of a flow with a mixed entry: ct_torn +%d, ct_new +%d, ct_hit +%d; want 1, 1, 0",
			after["ct_torn"]-before["ct_torn"], after["ct_new"]-before["ct_new"], after["ct_hit"]-before["ct_hit"])
	}
	if got != want {
		t.Errorf("entry written again names backend id %q, want %q (the Maglev pick)", got, want)
	}
}

// The table is shared by the CPUs: a flow seen first on one CPU is
// established on the other.
func TestConntrackSharedByCPUs(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Fatal("needs 2 CPUs")
	}
	d, _ := ctLB(t, 1024)
	vip := ap("10.96.0.10:53")
	onCPU := func(cpu int, fn func()) {
		done := make(chan struct{})
		go func() {
			defer close(done)
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				t.Error(err)
				return
			}
			fn()
		}()
		<-done
	}
	for i := range 20 {
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 1, byte(i)}), 50000)
		var first, second string
		before := counters(t, d)
		onCPU(0, func() { first = send(t, d, src, vip) })
		onCPU(1, func() { second = send(t, d, src, vip) })
		after := counters(t, d)
		if after["ct_new"]-before["ct_new"] != 1 || after["ct_hit"]-before["ct_hit"] != 1 || first != second || first == "" {
			t.Fatalf("%s: first packet on CPU 0 (backend id %q), second on CPU 1 (%q): ct_new +%d, ct_hit +%d; want 1 and 1",
				src, first, second, after["ct_new"]-before["ct_new"], after["ct_hit"]-before["ct_hit"])
		}
	}
}

// maxFlows flows of each family fit: each table has twice as many places,
// and a flow may go to either of two sets, so inserts that find both full
// are rare at half load (a simulation of the placement puts them near 1 in
// 100,000). Every flow's entry is found where the Go side computes it (same
// hash, same check).
func TestConntrackHoldsMaxFlows(t *testing.T) {
	const maxFlows = 4096
	d, _ := ctLB(t, maxFlows)
	r := rand.New(rand.NewPCG(3, 4))
	vip4, vip6 := ap("10.96.0.10:53"), ap("[fd00:96::10]:53")
	type flow struct{ src, dst netip.AddrPort }
	var flows []flow
	for i := range maxFlows {
		flows = append(flows, flow{netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), uint16(1024+r.IntN(60000))), vip4})
		var a [16]byte
		a[0], a[1] = 0x20, 0x01
		for j := 2; j < 16; j++ {
			a[j] = byte(r.IntN(256))
		}
		flows = append(flows, flow{netip.AddrPortFrom(netip.AddrFrom16(a), uint16(1024+r.IntN(60000))), vip6})
	}
	before := counters(t, d)
	for _, f := range flows {
		send(t, d, f.src, f.dst)
	}
	after := counters(t, d)
	if n := after["ct_new"] - before["ct_new"]; n != 2*maxFlows {
		t.Fatalf("%d new flows counted, want %d", n, 2*maxFlows)
	}
	evicted := after["ct_evict"] - before["ct_evict"]
	t.Logf("%d IPv4 and %d IPv6 flows into tables for %d each: %d evicted another", maxFlows, maxFlows, maxFlows, evicted)
	if evicted > 2*maxFlows/1000 {
		t.Errorf("%d of %d flows evicted another, want at most 0.1%%", evicted, 2*maxFlows)
	}
	missing := 0
	for _, f := range flows {
		if entryBackend(t, d, f.src, f.dst) == "" {
			missing++
		}
	}
	if missing != int(evicted) {
		t.Errorf("%d of %d flows have no entry the Go side can read, want %d (the evicted)", missing, 2*maxFlows, evicted)
	}
}

// An entry names its backend by id and generation. A flow on a removed
// backend keeps it while the id is unused; once the id goes to another
// backend (all never-used ids taken), the entry is stale and the flow is
// picked again, never sent to the id's new owner by its old entry.
func TestConntrackBackendIDReuse(t *testing.T) {
	requireRoot(t)
	cfg := xdp.Config{Seed: testSeed, TableSize: testSize, NodeAddr: node4.String(), MaxFlows: 1024, MaxBackends: 16, MaxServices: 4}
	d, err := xdp.Open(cfg, "", nil)
	if err != nil {
		t.Fatalf("load xdplb: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	vip := ap("10.96.0.10:53")
	svc := func(bs ...xdp.Backend) []xdp.Service {
		return []xdp.Service{{Frontend: vip, Proto: mesh.UDP, Mode: mesh.DSR, Dispatch: mesh.IPIP, Backends: bs}}
	}
	a, b := be("10.1.0.1:53", 1), be("10.1.0.2:53", 1)
	if _, err := d.Sync(svc(a, b)); err != nil {
		t.Fatal(err)
	}
	// A flow on a.
	var src netip.AddrPort
	for p := uint16(1024); ; p++ {
		if p == 1224 {
			t.Fatal("200 flows, none on the first backend")
		}
		src = netip.AddrPortFrom(ip("198.18.0.1"), p)
		res, err := xdp.Which(d.Program(), d.Conntrack(), mesh.UDP, src, vip)
		if err != nil {
			t.Fatal(err)
		}
		if res.Backend == a.Addr {
			break
		}
	}
	// a removed, 14 backends added: ids 2..15, a's id 0 released.
	rest := []xdp.Backend{b}
	for i := range 14 {
		rest = append(rest, be(fmt.Sprintf("10.1.1.%d:53", i+1), 1))
	}
	if _, err := d.Sync(svc(rest...)); err != nil {
		t.Fatal(err)
	}
	before := counters(t, d)
	send(t, d, src, vip)
	after := counters(t, d)
	if after["ct_hit"]-before["ct_hit"] != 1 {
		t.Fatalf("a flow on a removed backend whose id is unused: ct_hit +%d, want 1 (it keeps its backend)", after["ct_hit"]-before["ct_hit"])
	}
	// One more backend: the only free id is a's, under a new generation.
	if _, err := d.Sync(svc(append(rest, be("10.1.2.1:53", 1))...)); err != nil {
		t.Fatal(err)
	}
	var e bpf.XdplbXlbCt
	if err := d.Conntrack().Lookup(mesh.UDP, src, vip, &e); err == nil {
		t.Fatalf("the flow's entry still reads as valid after its backend's id went to another: %+v", e.Be)
	}
	before = counters(t, d)
	send(t, d, src, vip)
	after = counters(t, d)
	if after["ct_new"]-before["ct_new"] != 1 || after["ct_hit"] != before["ct_hit"] {
		t.Errorf("the flow's packet after its backend's id was reused: ct_new +%d, ct_hit +%d; want 1 and 0 (picked again)",
			after["ct_new"]-before["ct_new"], after["ct_hit"]-before["ct_hit"])
	}
}
