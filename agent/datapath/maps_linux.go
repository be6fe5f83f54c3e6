package datapath

import (
	"errors"
	"fmt"
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
}

// LoadedService is a service read back from the maps.
type LoadedService struct {
	ID    uint32
	Rev   uint8
	Slots []Addr
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
		ls := LoadedService{ID: v.Id, Rev: v.Rev, Slots: make([]Addr, 0, v.Count)}
		for i := uint16(0); i < v.Count; i++ {
			var be Addr
			sk := bpf.SockmeshSlotKey{SvcId: v.Id, Rev: uint16(v.Rev), Slot: i}
			if err := d.objs.Slots.Lookup(&sk, &be); err != nil {
				return nil, fmt.Errorf("service %v slot %d: %w", k, i, err)
			}
			ls.Slots = append(ls.Slots, be)
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

// SyncResult tells what a sync changed.
type SyncResult struct {
	// IDs maps every desired frontend to its service id (counter index).
	IDs                       map[Addr]uint32
	Added, Updated, Deleted   int
	Unchanged                 int
	SlotEntries, ServiceCount int
}

// SyncServices makes the maps hold exactly desired. Unchanged services are
// not rewritten; the comparison is against an in-memory copy of what the
// maps hold (read once, kept in step with every write, dropped by Refresh),
// so a change costs in proportion to what changed, not to the map size. Capacity is checked before the first write: a refused sync
// leaves the maps as they were. Each changed service switches atomically to
// its new slots.
func (d *Datapath) SyncServices(desired []Service) (SyncResult, error) {
	res := SyncResult{IDs: map[Addr]uint32{}}
	if d.svcCache == nil {
		loaded, err := d.ReadServices()
		if err != nil {
			return res, err
		}
		d.svcCache = loaded
	}
	loaded := d.svcCache
	var err error
	want := make(map[Addr][]Addr, len(desired))
	for _, s := range desired {
		if _, dup := want[s.Frontend]; dup {
			return res, fmt.Errorf("duplicate frontend %v", s.Frontend)
		}
		if len(s.Slots) > MaxSlotsPerService {
			return res, fmt.Errorf("frontend %v: %d slots, at most %d", s.Frontend, len(s.Slots), MaxSlotsPerService)
		}
		want[s.Frontend] = s.Slots
	}
	if uint32(len(want)) > d.cfg.MaxServices {
		return res, fmt.Errorf("%w: %d services, the services map holds %d (datapath.maxServices)", ErrCapacity, len(want), d.cfg.MaxServices)
	}

	// Simulate slot usage in write order (deletions first) to find the peak.
	used := 0
	for _, ls := range loaded {
		used += len(ls.Slots)
	}
	peak := used
	for k, ls := range loaded {
		if _, ok := want[k]; !ok {
			used -= len(ls.Slots)
		}
	}
	for _, s := range desired {
		old, ok := loaded[s.Frontend]
		if ok && slices.Equal(old.Slots, s.Slots) {
			continue
		}
		peak = max(peak, used+len(s.Slots))
		used += len(s.Slots) - len(old.Slots)
	}
	if peak > int(d.cfg.MaxSlots) {
		return res, fmt.Errorf("%w: needs %d backend slots, the slots map holds %d (datapath.maxSlots)", ErrCapacity, peak, d.cfg.MaxSlots)
	}

	// Free ids.
	usedIDs := map[uint32]bool{}
	for _, ls := range loaded {
		usedIDs[ls.ID] = true
	}
	for k, ls := range loaded {
		if _, ok := want[k]; ok {
			continue
		}
		if err := d.deleteService(k, ls); err != nil {
			d.svcCache = nil // unknown state: read the maps again next time
			return res, err
		}
		delete(loaded, k)
		delete(usedIDs, ls.ID)
		res.Deleted++
	}
	next := uint32(0)
	allocID := func() (uint32, error) {
		for ; next < d.cfg.MaxServices; next++ {
			if !usedIDs[next] {
				usedIDs[next] = true
				return next, nil
			}
		}
		return 0, fmt.Errorf("%w: no free service id", ErrCapacity)
	}
	for _, s := range desired {
		old, ok := loaded[s.Frontend]
		if ok && slices.Equal(old.Slots, s.Slots) {
			res.IDs[s.Frontend] = old.ID
			res.Unchanged++
			continue
		}
		id := old.ID
		if !ok {
			if id, err = allocID(); err != nil {
				return res, err
			}
			if err := d.resetCounters(id); err != nil {
				return res, err
			}
		}
		if err := d.writeService(s.Frontend, id, old, ok, s.Slots); err != nil {
			d.svcCache = nil
			return res, err
		}
		rev := uint8(0)
		if ok {
			rev = 1 - old.Rev
		}
		loaded[s.Frontend] = LoadedService{ID: id, Rev: rev, Slots: slices.Clone(s.Slots)}
		res.IDs[s.Frontend] = id
		if ok {
			res.Updated++
		} else {
			res.Added++
		}
	}
	res.SlotEntries = used
	res.ServiceCount = len(want)
	return res, nil
}

func (d *Datapath) writeService(front Addr, id uint32, old LoadedService, existed bool, slots []Addr) error {
	rev := uint8(0)
	if existed {
		rev = 1 - old.Rev
	}
	for i, be := range slots {
		sk := bpf.SockmeshSlotKey{SvcId: id, Rev: uint16(rev), Slot: uint16(i)}
		if err := d.objs.Slots.Put(&sk, &be); err != nil {
			return mapErr("slots", err)
		}
	}
	v := bpf.SockmeshSvcValue{Id: id, Count: uint16(len(slots)), Rev: rev}
	if err := d.objs.Services.Put(&front, &v); err != nil {
		return mapErr("services", err)
	}
	if existed {
		d.deleteSlots(id, old.Rev, len(old.Slots))
	}
	return nil
}

func (d *Datapath) deleteService(front Addr, ls LoadedService) error {
	if err := d.objs.Services.Delete(&front); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return mapErr("services", err)
	}
	d.deleteSlots(ls.ID, ls.Rev, len(ls.Slots))
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

// SetConfig writes the agent-wide datapath settings.
func (d *Datapath) SetConfig(hostNetNSCookie uint64, hostNSOnly bool) error {
	c := bpf.SockmeshShuntConfig{HostNetnsCookie: hostNetNSCookie}
	if hostNSOnly {
		c.HostNsOnly = 1
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

// SyncPods makes the pods map hold exactly desired; unchanged entries are
// not rewritten.
func (d *Datapath) SyncPods(desired map[uint64]PodInfo) error {
	if uint32(len(desired)) > d.cfg.MaxPods {
		return fmt.Errorf("%w: %d pods, the pods map holds %d (datapath.maxPods)", ErrCapacity, len(desired), d.cfg.MaxPods)
	}
	cur, err := d.ReadPods()
	if err != nil {
		return fmt.Errorf("read pods: %w", err)
	}
	for k := range cur {
		if _, ok := desired[k]; !ok {
			if err := d.objs.Pods.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return mapErr("pods", err)
			}
		}
	}
	for k, v := range desired {
		if c, ok := cur[k]; ok && c == v {
			continue
		}
		if err := d.objs.Pods.Put(k, &v); err != nil {
			return mapErr("pods", err)
		}
	}
	return nil
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
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer unix.Close(target)
	runtime.LockOSThread()
	self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return 0, err
	}
	defer unix.Close(self)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return 0, fmt.Errorf("enter netns %s: %w", path, err)
	}
	cookie, cerr := socketNetNSCookie()
	if err := unix.Setns(self, unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: Go discards it when this goroutine ends.
		return 0, fmt.Errorf("return from netns %s: %w", path, err)
	}
	runtime.UnlockOSThread()
	if cerr != nil {
		return 0, fmt.Errorf("netns %s: %w", path, cerr)
	}
	return cookie, nil
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
