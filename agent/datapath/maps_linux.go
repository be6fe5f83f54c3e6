package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/bpf"
)

// Addr is the datapath's address layout (struct shunt_addr).
type Addr = bpf.SockmeshShuntAddr

// PodInfo is the datapath's pod entry (struct pod_info).
type PodInfo = bpf.SockmeshPodInfo

// Service is a service as the datapath stores it: the frontend and the
// expanded backend slots (a backend repeated in proportion to its weight).
type Service struct {
	Frontend Addr
	Slots    []Addr
	// Affinity is the client affinity timeout in seconds (0: none).
	Affinity uint32
}

// LoadedService is a service read back from the maps.
type LoadedService struct {
	ID       uint32
	Rev      uint8
	Slots    []Addr
	Affinity uint32
}

func (ls *LoadedService) same(s *Service) bool {
	return ls.Affinity == s.Affinity && slices.Equal(ls.Slots, s.Slots)
}

// members returns the distinct backends of slots.
func members(slots []Addr) []Addr {
	seen := make(map[Addr]bool, len(slots))
	out := make([]Addr, 0, len(slots))
	for _, a := range slots {
		if !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	return out
}

// ErrCapacity wraps every refusal caused by a full map.
var ErrCapacity = errors.New("map capacity exceeded")

// MaxSlotsPerService bounds the slots of one service (a uint16 count).
const MaxSlotsPerService = 16384

// ReadServices returns the services currently in the maps, keyed by frontend.
func (d *Datapath) ReadServices() (map[Addr]LoadedService, error) {
	m := d.objs.Services
	out := map[Addr]LoadedService{}
	var k Addr
	var v bpf.SockmeshSvcValue
	it := m.Iterate()
	for it.Next(&k, &v) {
		ls := LoadedService{ID: v.Id, Rev: v.Rev, Slots: make([]Addr, 0, v.Count), Affinity: v.Affinity}
		for i := uint16(0); i < v.Count; i++ {
			var be Addr
			sk := bpf.SockmeshSlotKey{SvcId: v.Id, Rev: uint16(v.Rev), Slot: i}
			if err := d.objs.Slots.Lookup(&sk, &be); err != nil {
				return nil, fmt.Errorf("service %v slot %d: %w", k, i, err)
			}
			ls.Slots = append(ls.Slots, be)
		}
		if ls.Affinity != 0 {
			for _, be := range members(ls.Slots) {
				var one uint8
				if err := d.objs.SvcBackends.Lookup(&bpf.SockmeshMemberKey{SvcId: v.Id, Backend: be}, &one); err != nil {
					ls.Affinity = 0 // a member is missing: differs from any desired state, rewritten
					break
				}
			}
		}
		out[k] = ls
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate services: %w", err)
	}
	return out, nil
}

// Refresh drops the in-memory copy of the services map: the next sync reads
// the kernel maps again, repairing any drift.
func (d *Datapath) Refresh() { d.svcCache = nil }

// Consistent tells whether the in-memory copy of the services maps is known
// to match them: false after a write failed half way (the next update reads
// the maps again).
func (d *Datapath) Consistent() bool { return d.svcCache != nil }

// SyncResult tells what a sync changed.
type SyncResult struct {
	// IDs maps every written or unchanged frontend of the request to its
	// service id (counter index).
	IDs                       map[Addr]uint32
	Added, Updated, Deleted   int
	Unchanged                 int
	SlotEntries, ServiceCount int
}

// svcState mirrors what the services and slots maps hold: read once, kept in
// step with every write, dropped by Refresh (or after a failed write).
type svcState struct {
	loaded map[Addr]LoadedService
	ids    map[uint32]bool
	slots  int    // slot entries in use
	nextID uint32 // allocation hint
}

func (d *Datapath) services() (*svcState, error) {
	if d.svcCache != nil {
		return d.svcCache, nil
	}
	loaded, err := d.ReadServices()
	if err != nil {
		return nil, err
	}
	st := &svcState{loaded: loaded, ids: make(map[uint32]bool, len(loaded))}
	for _, ls := range loaded {
		st.ids[ls.ID] = true
		st.slots += len(ls.Slots)
	}
	d.svcCache = st
	return st, nil
}

// SyncServices makes the maps hold exactly desired: what is not in desired is
// deleted. It costs in proportion to the number of services; use
// UpdateServices to change a few.
func (d *Datapath) SyncServices(desired []Service) (SyncResult, error) {
	st, err := d.services()
	if err != nil {
		return SyncResult{IDs: map[Addr]uint32{}}, err
	}
	want := make(map[Addr]bool, len(desired))
	for _, s := range desired {
		want[s.Frontend] = true
	}
	var remove []Addr
	for k := range st.loaded {
		if !want[k] {
			remove = append(remove, k)
		}
	}
	return d.UpdateServices(desired, remove)
}

// UpdateServices writes upsert (services that are new or whose slots may have
// changed) and deletes the frontends in remove; everything else is left
// alone, so a change costs in proportion to its size, not to the map's.
// Unchanged services are not rewritten (the comparison is against an
// in-memory copy of the maps). Capacity is checked before the first write: a
// refused update leaves the maps as they were. Each changed service switches
// atomically to its new slots.
func (d *Datapath) UpdateServices(upsert []Service, remove []Addr) (SyncResult, error) {
	res := SyncResult{IDs: make(map[Addr]uint32, len(upsert))}
	st, err := d.services()
	if err != nil {
		return res, err
	}
	loaded := st.loaded
	seen := make(map[Addr]bool, len(upsert))
	for _, s := range upsert {
		if seen[s.Frontend] {
			return res, fmt.Errorf("duplicate frontend %v", s.Frontend)
		}
		seen[s.Frontend] = true
		if len(s.Slots) > MaxSlotsPerService {
			return res, fmt.Errorf("frontend %v: %d slots, at most %d", s.Frontend, len(s.Slots), MaxSlotsPerService)
		}
	}
	gone := make(map[Addr]bool, len(remove))
	for _, k := range remove {
		if seen[k] {
			return res, fmt.Errorf("frontend %v both updated and removed", k)
		}
		if _, ok := loaded[k]; ok {
			gone[k] = true
		}
	}

	// Capacity: count services after the change, and simulate slot usage in
	// write order (deletions first, then each new slot set is written before
	// the old one is freed) to find the peak.
	count := len(loaded) - len(gone)
	used := st.slots
	for k := range gone {
		used -= len(loaded[k].Slots)
	}
	peak := st.slots
	for _, s := range upsert {
		old, ok := loaded[s.Frontend]
		if !ok {
			count++
		} else if old.same(&s) {
			continue
		}
		peak = max(peak, used+len(s.Slots))
		used += len(s.Slots) - len(old.Slots)
	}
	if count > int(d.cfg.MaxServices) {
		return res, fmt.Errorf("%w: %d services, the services map holds %d (datapath.maxServices)", ErrCapacity, count, d.cfg.MaxServices)
	}
	if peak > int(d.cfg.MaxSlots) {
		return res, fmt.Errorf("%w: needs %d backend slots, the slots map holds %d (datapath.maxSlots)", ErrCapacity, peak, d.cfg.MaxSlots)
	}

	for k := range gone {
		ls := loaded[k]
		if err := d.deleteService(k, ls); err != nil {
			d.svcCache = nil // unknown state: read the maps again next time
			return res, err
		}
		delete(loaded, k)
		delete(st.ids, ls.ID)
		st.slots -= len(ls.Slots)
		res.Deleted++
	}
	for _, s := range upsert {
		old, ok := loaded[s.Frontend]
		if ok && old.same(&s) {
			res.IDs[s.Frontend] = old.ID
			res.Unchanged++
			continue
		}
		id := old.ID
		if !ok {
			if id, err = d.allocID(st); err != nil {
				return res, err
			}
			if err := d.resetCounters(id); err != nil {
				return res, err
			}
		}
		if err := d.writeService(s.Frontend, id, old, ok, s); err != nil {
			d.svcCache = nil
			return res, err
		}
		rev := uint8(0)
		if ok {
			rev = 1 - old.Rev
		}
		loaded[s.Frontend] = LoadedService{ID: id, Rev: rev, Slots: slices.Clone(s.Slots), Affinity: s.Affinity}
		st.ids[id] = true
		st.slots += len(s.Slots) - len(old.Slots)
		res.IDs[s.Frontend] = id
		if ok {
			res.Updated++
		} else {
			res.Added++
		}
	}
	res.SlotEntries = st.slots
	res.ServiceCount = len(loaded)
	return res, nil
}

// allocID returns a free service id (the counter index).
func (d *Datapath) allocID(st *svcState) (uint32, error) {
	for range d.cfg.MaxServices {
		id := st.nextID
		st.nextID = (st.nextID + 1) % d.cfg.MaxServices
		if !st.ids[id] {
			st.ids[id] = true
			return id, nil
		}
	}
	return 0, fmt.Errorf("%w: no free service id", ErrCapacity)
}

// writeService writes s's slots under the inactive revision (and, with
// affinity, its members), switches the service to them, then deletes the old
// revision's slots and the members that left.
func (d *Datapath) writeService(front Addr, id uint32, old LoadedService, existed bool, s Service) error {
	rev := uint8(0)
	if existed {
		rev = 1 - old.Rev
	}
	for i, be := range s.Slots {
		sk := bpf.SockmeshSlotKey{SvcId: id, Rev: uint16(rev), Slot: uint16(i)}
		if err := d.objs.Slots.Put(&sk, &be); err != nil {
			return mapErr("slots", err)
		}
	}
	var keep map[Addr]bool
	if s.Affinity != 0 {
		ms := members(s.Slots)
		keep = make(map[Addr]bool, len(ms))
		for _, be := range ms {
			keep[be] = true
			if err := d.objs.SvcBackends.Put(&bpf.SockmeshMemberKey{SvcId: id, Backend: be}, uint8(1)); err != nil {
				return mapErr("svc_backends", err)
			}
		}
	}
	v := bpf.SockmeshSvcValue{Id: id, Count: uint16(len(s.Slots)), Rev: rev, Affinity: s.Affinity}
	if err := d.objs.Services.Put(&front, &v); err != nil {
		return mapErr("services", err)
	}
	if existed {
		d.deleteSlots(id, old.Rev, len(old.Slots))
		d.deleteMembers(id, old.Slots, keep)
	}
	return nil
}

// deleteMembers deletes the members of service id among slots that keep
// does not hold. Without affinity there are none; deleting is harmless.
func (d *Datapath) deleteMembers(id uint32, slots []Addr, keep map[Addr]bool) {
	for _, be := range members(slots) {
		if !keep[be] {
			d.objs.SvcBackends.Delete(&bpf.SockmeshMemberKey{SvcId: id, Backend: be})
		}
	}
}

func (d *Datapath) deleteService(front Addr, ls LoadedService) error {
	if err := d.objs.Services.Delete(&front); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return mapErr("services", err)
	}
	d.deleteSlots(ls.ID, ls.Rev, len(ls.Slots))
	d.deleteMembers(ls.ID, ls.Slots, nil)
	return nil
}

func (d *Datapath) deleteSlots(id uint32, rev uint8, n int) {
	for i := 0; i < n; i++ {
		sk := bpf.SockmeshSlotKey{SvcId: id, Rev: uint16(rev), Slot: uint16(i)}
		d.objs.Slots.Delete(&sk) // a missing slot is what we want anyway
	}
}

func (d *Datapath) resetCounters(id uint32) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	zero := make([]bpf.SockmeshSvcStats, n)
	if err := d.objs.SvcCounters.Put(id, zero); err != nil {
		return mapErr("svc_counters", err)
	}
	return nil
}

func mapErr(name string, err error) error {
	if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("%w: map %s: %v", ErrCapacity, name, err)
	}
	return fmt.Errorf("write map %s: %w", name, err)
}

// ServiceCounters sums the per-CPU counters of service id.
func (d *Datapath) ServiceCounters(id uint32) (bpf.SockmeshSvcStats, error) {
	var per []bpf.SockmeshSvcStats
	var sum bpf.SockmeshSvcStats
	if err := d.objs.SvcCounters.Lookup(id, &per); err != nil {
		return sum, err
	}
	for _, s := range per {
		sum.Translations += s.Translations
		sum.NoBackend += s.NoBackend
	}
	return sum, nil
}

// GlobalCounters sums the per-CPU global counters, indexed by enum shunt_stat.
func (d *Datapath) GlobalCounters() ([]uint64, error) {
	out := make([]uint64, bpf.SockmeshShuntStatSTAT_MAX)
	for i := range out {
		var per []uint64
		if err := d.objs.Stats.Lookup(uint32(i), &per); err != nil {
			return nil, err
		}
		for _, v := range per {
			out[i] += v
		}
	}
	return out, nil
}

// SetConfig writes the agent-wide datapath settings. sockmapSafe tells the
// programs that the sockmap self-test passed on this kernel.
func (d *Datapath) SetConfig(hostNetNSCookie uint64, hostNSOnly, sockmapSafe bool) error {
	c := bpf.SockmeshShuntConfig{HostNetnsCookie: hostNetNSCookie, RedirectQueue: d.cfg.RedirectQueueBytes}
	if hostNSOnly {
		c.HostNsOnly = 1
	}
	if sockmapSafe {
		c.Flags |= uint32(bpf.SockmeshConfigFlagsCONFIG_F_SOCKMAP_SAFE)
	}
	if err := d.objs.Config.Put(uint32(0), &c); err != nil {
		return mapErr("config", err)
	}
	return nil
}

// ReadConfig returns the settings in the config map.
func (d *Datapath) ReadConfig() (bpf.SockmeshShuntConfig, error) {
	var c bpf.SockmeshShuntConfig
	err := d.objs.Config.Lookup(uint32(0), &c)
	return c, err
}

// ReadPods returns the enrolled pods keyed by netns cookie.
func (d *Datapath) ReadPods() (map[uint64]PodInfo, error) {
	out := map[uint64]PodInfo{}
	var k uint64
	var v PodInfo
	it := d.objs.Pods.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	return out, it.Err()
}

// MapFill reports entries and capacity of each map.
type MapFill struct {
	Name     string `json:"name"`
	Entries  int    `json:"entries"`
	Capacity uint32 `json:"capacity"`
	Pinned   string `json:"pinned"`
}

// Fill counts the entries of every hash map; arrays, being fixed, are left out.
func (d *Datapath) Fill() ([]MapFill, error) {
	var out []MapFill
	names := make([]string, 0)
	maps := d.mapsByName()
	for n := range maps {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		m := maps[n]
		f := MapFill{Name: n, Capacity: m.MaxEntries(), Pinned: d.mapsDir() + "/" + n}
		switch m.Type() {
		case ebpf.Array, ebpf.PerCPUArray:
			continue // fixed size: no fill to report
		case ebpf.SkStorage:
			continue // per socket, no capacity
		default:
			k := make([]byte, m.KeySize())
			var next []byte = make([]byte, m.KeySize())
			var cur any
			for {
				if err := m.NextKey(cur, &next); err != nil {
					if errors.Is(err, ebpf.ErrKeyNotExist) {
						break
					}
					return nil, fmt.Errorf("count %s: %w", n, err)
				}
				f.Entries++
				copy(k, next)
				cur = k
			}
		}
		out = append(out, f)
	}
	return out, nil
}

// LinkInfo describes an attached program.
type LinkInfo struct {
	Program string `json:"program"`
	Attach  string `json:"attach"`
	LinkID  uint32 `json:"linkID"`
	ProgID  uint32 `json:"progID"`
	Pinned  string `json:"pinned"`
	// Attached: the link still runs its program on its target (see
	// Attached).
	Attached bool `json:"attached"`
}

// Links describes the links this agent holds.
func (d *Datapath) Links() []LinkInfo {
	var out []LinkInfo
	for name, l := range d.links {
		li := LinkInfo{Program: name, Attach: attachments[name].String(), Pinned: d.linksDir() + "/" + name}
		if info, err := l.Info(); err == nil {
			li.LinkID = uint32(info.ID)
			li.ProgID = uint32(info.Program)
		}
		li.Attached, _ = Attached(l)
		out = append(out, li)
	}
	slices.SortFunc(out, func(a, b LinkInfo) int {
		if a.Program < b.Program {
			return -1
		}
		if a.Program > b.Program {
			return 1
		}
		return 0
	})
	return out
}

// NetNSCookie returns the cookie of the network namespace at path
// (/run/netns/x, /proc/PID/ns/net): the key pods are enrolled under.
func NetNSCookie(path string) (uint64, error) {
	var cookie uint64
	err := inNetNS(path, func() (err error) {
		cookie, err = socketNetNSCookie()
		return err
	})
	return cookie, err
}

// NetNSAddrs returns the global unicast addresses of the network namespace
// at path (a pod's addresses), sorted.
func NetNSAddrs(path string) ([]netip.Addr, error) {
	var out []netip.Addr
	err := inNetNS(path, func() error {
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			return fmt.Errorf("list addresses: %w", err)
		}
		for _, a := range addrs {
			pfx, err := netip.ParsePrefix(a.String())
			if err != nil {
				continue
			}
			ip := pfx.Addr().Unmap()
			if ip.IsGlobalUnicast() && !ip.IsLinkLocalUnicast() {
				out = append(out, ip)
			}
		}
		return nil
	})
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out), err
}

// inNetNS runs fn on a thread that joined the network namespace at path.
func inNetNS(path string, fn func() error) error {
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer unix.Close(target)
	runtime.LockOSThread()
	self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer unix.Close(self)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", path, err)
	}
	ferr := fn()
	if err := unix.Setns(self, unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: Go discards it when this goroutine ends.
		return fmt.Errorf("return from netns %s: %w", path, err)
	}
	runtime.UnlockOSThread()
	if ferr != nil {
		return fmt.Errorf("netns %s: %w", path, ferr)
	}
	return nil
}

func socketNetNSCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("SO_NETNS_COOKIE: %w", err)
	}
	return v, nil
}
