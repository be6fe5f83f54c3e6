package datapath

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
)

// SidecarCfg is a pod's sidecar settings as the datapath stores them
// (struct sidecar_cfg).
type SidecarCfg = bpf.SockmeshSidecarCfg

// LocalIPKey is an enrolled pod's address (struct local_ip_key).
type LocalIPKey = bpf.SockmeshLocalIpKey

// Pod is an enrolled pod as the datapath stores it: its entry in pods, its
// sidecar settings (nil: no sidecar) and its addresses (local_ips).
type Pod struct {
	Info    PodInfo
	Sidecar *SidecarCfg
	IPs     []netip.Addr
}

// Pod flags and sockmap modes (enum pod_flags, enum sockmap_mode).
const (
	PodFlagSidecar = uint16(bpf.SockmeshPodFlagsPOD_F_SIDECAR)
	SockmapAuto    = uint8(bpf.SockmeshSockmapModeSOCKMAP_AUTO)
	SockmapOn      = uint8(bpf.SockmeshSockmapModeSOCKMAP_ON)
	SockmapOff     = uint8(bpf.SockmeshSockmapModeSOCKMAP_OFF)
)

// MakeSidecar converts the model's sidecar settings (defaults applied).
func MakeSidecar(s mesh.Sidecar) SidecarCfg {
	s = s.WithDefaults()
	c := SidecarCfg{Uid: s.UID, OutboundPort: s.OutboundPort, InboundPort: s.InboundPort}
	c.N_exclPorts = uint8(copy(c.ExclPorts[:], s.ExcludeOutboundPorts))
	c.N_exclInPorts = uint8(copy(c.ExclInPorts[:], s.ExcludeInboundPorts))
	for i, p := range s.ExcludeOutboundCIDRs {
		if i < len(c.ExclCidrs) {
			c.ExclCidrs[i] = makeCIDR(p)
			c.N_exclCidrs++
		}
	}
	for i, p := range s.IncludeOutboundCIDRs {
		if i < len(c.InclCidrs) {
			c.InclCidrs[i] = makeCIDR(p)
			c.N_inclCidrs++
		}
	}
	return c
}

func makeCIDR(p netip.Prefix) bpf.SockmeshShuntCidr {
	p = p.Masked()
	a := MakeAddr(netip.AddrPortFrom(p.Addr(), 0), mesh.TCP)
	bits := p.Bits()
	if p.Addr().Is4In6() {
		bits -= 96
	}
	return bpf.SockmeshShuntCidr{Ip: a.Ip, Family: a.Family, PrefixLen: uint8(bits)}
}

// MakeLocalIP converts an address to the local_ips key.
func MakeLocalIP(ip netip.Addr) LocalIPKey {
	a := MakeAddr(netip.AddrPortFrom(ip, 0), mesh.TCP)
	return LocalIPKey{Ip: a.Ip, Family: uint32(a.Family)}
}

// UpdatePods writes the pods in upsert (entry, sidecar settings, addresses),
// deletes the netns cookies in remove (and their sidecar settings) and the
// addresses in removeIPs; other entries are left alone.
func (d *Datapath) UpdatePods(upsert map[uint64]Pod, remove []uint64, removeIPs []netip.Addr) error {
	o := d.objs
	for _, ip := range removeIPs {
		k := MakeLocalIP(ip)
		if err := o.LocalIps.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return mapErr("local_ips", err)
		}
	}
	for _, c := range remove {
		if err := o.Pods.Delete(c); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return mapErr("pods", err)
		}
		if err := o.Sidecars.Delete(c); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return mapErr("sidecars", err)
		}
	}
	for c, p := range upsert {
		// Settings before the flag that makes the programs read them.
		if p.Sidecar != nil {
			if err := o.Sidecars.Put(c, p.Sidecar); err != nil {
				return mapErr("sidecars", err)
			}
		}
		for _, ip := range p.IPs {
			k := MakeLocalIP(ip)
			if err := o.LocalIps.Put(&k, &bpf.SockmeshLocalIp{NetnsCookie: c}); err != nil {
				return mapErr("local_ips", err)
			}
		}
		if err := o.Pods.Put(c, &p.Info); err != nil {
			return mapErr("pods", err)
		}
		if p.Sidecar == nil {
			if err := o.Sidecars.Delete(c); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return mapErr("sidecars", err)
			}
		}
	}
	return nil
}

// SyncPods makes the pods, sidecars and local_ips maps hold exactly desired.
func (d *Datapath) SyncPods(desired map[uint64]Pod) error {
	if uint32(len(desired)) > d.cfg.MaxPods {
		return fmt.Errorf("%w: %d pods, the pods map holds %d (datapath.maxPods)", ErrCapacity, len(desired), d.cfg.MaxPods)
	}
	o := d.objs
	var stale []uint64
	var k uint64
	var v PodInfo
	it := o.Pods.Iterate()
	for it.Next(&k, &v) {
		if _, ok := desired[k]; !ok {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read pods: %w", err)
	}
	var sc SidecarCfg
	it = o.Sidecars.Iterate()
	for it.Next(&k, &sc) {
		if p, ok := desired[k]; !ok || p.Sidecar == nil {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read sidecars: %w", err)
	}
	want := map[LocalIPKey]bool{}
	for _, p := range desired {
		for _, ip := range p.IPs {
			want[MakeLocalIP(ip)] = true
		}
	}
	var staleIPs []netip.Addr
	var ipk LocalIPKey
	var ipv bpf.SockmeshLocalIp
	it = o.LocalIps.Iterate()
	for it.Next(&ipk, &ipv) {
		if !want[ipk] {
			staleIPs = append(staleIPs, AddrPort(Addr{Ip: ipk.Ip, Family: uint8(ipk.Family)}).Addr())
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read local_ips: %w", err)
	}
	return d.UpdatePods(desired, stale, staleIPs)
}

// PodCounters sums the per-CPU counters of pod id, indexed by enum pod_stat.
func (d *Datapath) PodCounters(id uint32) ([]uint64, error) {
	var per []bpf.SockmeshPodStats
	if err := d.objs.PodCounters.Lookup(id, &per); err != nil {
		return nil, err
	}
	out := make([]uint64, bpf.SockmeshPodStatPOD_STAT_MAX)
	for _, s := range per {
		for i := range out {
			out[i] += s.V[i]
		}
	}
	return out, nil
}

// ResetPodCounters zeroes the counters of a newly allocated pod id.
func (d *Datapath) ResetPodCounters(id uint32) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	if err := d.objs.PodCounters.Put(id, make([]bpf.SockmeshPodStats, n)); err != nil {
		return mapErr("pod_counters", err)
	}
	return nil
}
