package xdp

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/shuntmesh/shunt/bpf"
)

func sumPerCPU(m *ebpf.Map, n int) ([]uint64, error) {
	out := make([]uint64, n)
	var per []uint64
	for i := range n {
		if err := m.Lookup(uint32(i), &per); err != nil {
			return nil, fmt.Errorf("read %s[%d]: %w", m.String(), i, err)
		}
		for _, v := range per {
			out[i] += v
		}
	}
	return out, nil
}

// Counters returns the load balancer's verdict and event counters, aligned
// with StatNames.
func (d *Datapath) Counters() ([]uint64, error) { return sumPerCPU(d.lb.LbStats, len(StatNames)) }

// DSRCounters returns the backend side's counters, aligned with DSRStatNames.
func (d *Datapath) DSRCounters() ([]uint64, error) {
	return sumPerCPU(d.dsr.DsrStats, len(DSRStatNames))
}

// ServiceCounters returns the per-service counters by frontend
// (FrontendString).
func (d *Datapath) ServiceCounters() (map[string]bpf.XdplbXlbSvcStats, error) {
	d.mu.Lock()
	ids := map[string]uint32{}
	for k, s := range d.st.svcs {
		ids[frontendOf(k)] = s.id
	}
	d.mu.Unlock()
	out := map[string]bpf.XdplbXlbSvcStats{}
	for name, id := range ids {
		var per []bpf.XdplbXlbSvcStats
		if err := d.lb.LbSvcStats.Lookup(id, &per); err != nil {
			return nil, fmt.Errorf("read lb_svc_stats[%d]: %w", id, err)
		}
		var sum bpf.XdplbXlbSvcStats
		for _, s := range per {
			sum.Packets += s.Packets
			sum.Bytes += s.Bytes
			sum.Flows += s.Flows
			sum.NoBackend += s.NoBackend
		}
		out[name] = sum
	}
	return out, nil
}

// BackendCounters returns the per-backend counters by backend address:port.
func (d *Datapath) BackendCounters() (map[string]bpf.XdplbXlbBackendStats, error) {
	d.mu.Lock()
	ids := map[string]uint32{}
	for k, id := range d.st.beIDs {
		ids[k.addr.String()] = id
	}
	d.mu.Unlock()
	out := map[string]bpf.XdplbXlbBackendStats{}
	for name, id := range ids {
		var per []bpf.XdplbXlbBackendStats
		if err := d.lb.LbBeStats.Lookup(id, &per); err != nil {
			return nil, fmt.Errorf("read lb_be_stats[%d]: %w", id, err)
		}
		sum := out[name]
		for _, s := range per {
			sum.Packets += s.Packets
			sum.Bytes += s.Bytes
			sum.Flows += s.Flows
		}
		out[name] = sum
	}
	return out, nil
}

func frontendOf(k bpf.XdplbXlbVip) string {
	ap := netipAddrPort(k.Addr, k.Family, k.Port)
	if k.Proto == protoUDP {
		return ap.String() + "/udp"
	}
	return ap.String() + "/tcp"
}
