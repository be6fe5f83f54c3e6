package bench

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

// The XDP benchmark, small, end to end: every scenario ran every
// repetition, each new-flow run created one conntrack entry per packet and
// each hit run used one (MeasureXDP checks both and fails otherwise), the
// full conntracks stayed full, and every path delivered packets with xdplb
// forwarding all of its own by IPIP. Nothing about timing is asserted.
func TestXDPBenchQuick(t *testing.T) {
	if os.Geteuid() != 0 {
		// As every privileged test here: skipped without root, except in
		// CI, where it must run.
		if os.Getenv("CI") != "" {
			t.Fatal("needs root (network namespaces, eBPF)")
		}
		t.Skip("needs root (network namespaces, eBPF)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	o := XDPOptions{Reps: 2, Calls: 500, Flows: 1000, Capacity: 8192, Duration: 250 * time.Millisecond, Log: logWriter{t}}
	res, err := MeasureXDP(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{ppEmpty1, ppGrow1, ppEmptyFresh, ppEmptyMany, ppHot, ppMiss, ppEvict, ppMany, ppMiss2,
		ppCTHit, ppCTMiss, ppCTEvict, ppLRUHit, ppLRUMiss, ppLRUEvict, ppMemTable, ppMemLRU} {
		if xs := res.PerPacket[key]; len(xs) != o.Reps || xs[0] <= 0 {
			t.Errorf("%s: %v, want %d positive values", key, xs, o.Reps)
		}
	}
	// Full before the runs (the conntrack tables: every way; the per-CPU
	// LRU filled from one CPU: that CPU's share), and still full after.
	for name, full := range map[string]int{ppEvict: res.Capacity, ppCTEvict: res.Capacity, ppLRUEvict: res.PerCPUCapacity} {
		before, ok := res.FullBefore[name]
		after, ok2 := res.FullAfter[name]
		if !ok || !ok2 || before < full*9/10 || after < before*9/10 {
			t.Errorf("full conntrack %s: %d entries before the runs, %d after (%v %v), want both near %d", name, before, after, ok, ok2, full)
		}
	}
	v := res.Veth
	for name, p := range map[string]VethPath{"one CPU lb": v.OneCPU.LB, "one CPU ipt": v.OneCPU.IPT, "one CPU refl": v.OneCPU.Refl,
		"split lb": v.Split.LB, "split ipt": v.Split.IPT, "split refl": v.Split.Refl} {
		if len(p.Mpps) != o.Reps || p.Mpps[0] <= 0 {
			t.Errorf("%s: delivered %v Mpps", name, p.Mpps)
		}
	}
	if len(v.Split.LB.DUTns) != o.Reps || v.Split.LB.DUTns[0] <= 0 {
		t.Errorf("split lb: DUT CPU time per packet %v", v.Split.LB.DUTns)
	}
	if v.LBPackets == 0 || len(v.LBOther) > 0 {
		t.Errorf("xdplb forwarded %d packets by IPIP; other verdicts: %v", v.LBPackets, v.LBOther)
	}
	report := XDPReport(res, false)
	for _, want := range []string{"hot flow", "full conntrack (eviction)", "conntrack alone", "the kernel's LRU hash alone", "through veth, one CPU", "through veth, DUT on its own CPU", "Targets:"} {
		if !strings.Contains(report, want) {
			t.Errorf("report lacks %q:\n%s", want, report)
		}
	}
	t.Log("\n" + report)
}
