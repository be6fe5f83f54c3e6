package xdp

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/mesh/maglev"
)

// ErrCapacity wraps every refusal caused by a full map or id space.
var ErrCapacity = errors.New("xdp map capacity exceeded")

// Service is a service as the load balancer sees it.
type Service struct {
	Frontend netip.AddrPort
	Proto    mesh.Protocol
	// Mode: snat (the default), dsr, or hybrid (TCP dsr, UDP snat).
	Mode mesh.ForwardingMode
	// Dispatch of DSR packets: ipip (the default), geneve or opt.
	Dispatch mesh.Dispatch
	// ClientIPAffinity sends every new flow of one client address to the
	// same backend: the Maglev slot is picked from the flow's hash with
	// the client's port zeroed (maglev.Tuple.ClientOnly). It holds on
	// every load balancer with the same seed and backends, for as long
	// as the table keeps that slot's owner; there is no timeout (see the
	// README). Changing it keeps established flows on their backends.
	ClientIPAffinity bool
	// Backends with weight > 0 share the Maglev table in proportion to
	// their weight; weight 0 drains (no new flows, established ones stay).
	// Every backend listed is known to the backend side (dsr_services).
	Backends []Backend
}

// Backend is one backend of a Service.
type Backend struct {
	Addr netip.AddrPort
	// Tunnel is the outer destination of IPIP/Geneve; zero: Addr's address.
	Tunnel netip.Addr
	Weight uint32
}

// Key is the backend's Maglev key: its address and port. It is part of the
// contract between nodes (see mesh/maglev): never change the format.
func (b Backend) Key() string { return b.Addr.String() }

func (b Backend) tunnel() netip.Addr {
	if b.Tunnel.IsValid() {
		return b.Tunnel
	}
	return b.Addr.Addr()
}

type beKey struct {
	addr   netip.AddrPort
	tunnel netip.Addr
}

type svcState struct {
	id    uint32
	value bpf.XdplbXlbService
	fp    string // table fingerprint; "" = unknown: compare with kernel, or rewrite
	beIDs []uint32
	// Read back from the maps (readState): the table's slots (backend
	// ids) and whether lb_svc_gen holds the service's generation. A sync
	// keeps a table whose slots are already right.
	kernel []uint32
	genOK  bool
}

// syncState mirrors what the maps hold, so a sync writes only what changed.
type syncState struct {
	svcs    map[bpf.XdplbXlbVip]*svcState
	svcUsed map[uint32]bool
	beIDs   map[beKey]uint32
	beRef   map[uint32]int
	free    []uint32 // released backend ids, reused oldest first
	next    uint32   // first never-used backend id
	dsr     map[bpf.DsrDsrSvcKey]bpf.DsrDsrLocal
}

// readState rebuilds the mirror from the maps (after adopting pinned maps).
func (d *Datapath) readState() (*syncState, error) {
	st := &syncState{svcs: map[bpf.XdplbXlbVip]*svcState{}, svcUsed: map[uint32]bool{}, beIDs: map[beKey]uint32{},
		beRef: map[uint32]int{}, dsr: map[bpf.DsrDsrSvcKey]bpf.DsrDsrLocal{}}
	var k bpf.XdplbXlbVip
	var v bpf.XdplbXlbService
	it := d.lb.LbServices.Iterate()
	for it.Next(&k, &v) {
		st.svcs[k] = &svcState{id: v.Id, value: v}
		st.svcUsed[v.Id] = true
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read lb_services: %w", err)
	}
	for _, s := range st.svcs {
		var gen uint32
		s.genOK = d.lb.LbSvcGen.Lookup(s.id, &gen) == nil && gen == s.value.Gen && gen != 0
		if s.value.Size > 0 {
			s.kernel = d.readTable(s.id, s.value.Size)
		}
	}
	var id uint32
	var be bpf.XdplbXlbBackend
	bit := d.lb.LbBackends.Iterate()
	for bit.Next(&id, &be) {
		if be.Family == 0 {
			continue
		}
		key := beKey{netip.AddrPortFrom(wordsAddr(be.Addr, be.Family), portH(be.Port)), wordsAddr(be.Tunnel, be.TunnelFamily)}
		st.next = max(st.next, id+1)
		if _, dup := st.beIDs[key]; dup {
			st.free = append(st.free, id) // a stale copy of a released id
			continue
		}
		st.beIDs[key] = id
	}
	if err := bit.Err(); err != nil {
		return nil, fmt.Errorf("read lb_backends: %w", err)
	}
	for _, id := range st.beIDs {
		st.beRef[id] = 0 // held by no service until the first sync says otherwise
	}
	var dk bpf.DsrDsrSvcKey
	var dv bpf.DsrDsrLocal
	dit := d.dsr.DsrServices.Iterate()
	for dit.Next(&dk, &dv) {
		st.dsr[dk] = dv
	}
	if err := dit.Err(); err != nil {
		return nil, fmt.Errorf("read dsr_services: %w", err)
	}
	return st, nil
}

// SyncResult tells what a sync changed.
type SyncResult struct {
	Added, Updated, Deleted, Unchanged int
	// Fingerprints of the Maglev tables by frontend ("" = empty table).
	Fingerprints map[string]string
}

func vipKey(s Service) bpf.XdplbXlbVip {
	return bpf.XdplbXlbVip{Addr: addrWords(s.Frontend.Addr()), Port: portN(s.Frontend.Port()), Proto: protoNum(s.Proto), Family: family(s.Frontend.Addr())}
}

// FrontendString names a service in results and metrics: "VIP:port/proto".
func FrontendString(front netip.AddrPort, proto mesh.Protocol) string {
	if proto == mesh.UDP {
		return front.String() + "/udp"
	}
	return front.String() + "/tcp"
}

func modeOf(m mesh.ForwardingMode) uint8 {
	switch m {
	case mesh.DSR:
		return uint8(bpf.XdplbXlbModeXLB_MODE_DSR)
	case mesh.Hybrid:
		return uint8(bpf.XdplbXlbModeXLB_MODE_HYBRID)
	}
	return uint8(bpf.XdplbXlbModeXLB_MODE_SNAT)
}

func dispatchOf(d mesh.Dispatch) uint8 {
	switch d {
	case mesh.Geneve:
		return uint8(bpf.XdplbXlbDispatchXLB_DISPATCH_GENEVE)
	case mesh.IPOption:
		return uint8(bpf.XdplbXlbDispatchXLB_DISPATCH_OPT)
	}
	return uint8(bpf.XdplbXlbDispatchXLB_DISPATCH_IPIP)
}

// usesDSR reports whether some of the service's packets go by DSR.
func usesDSR(s Service) bool {
	return s.Mode == mesh.DSR || (s.Mode == mesh.Hybrid && s.Proto == mesh.TCP)
}

func mapErr(name string, err error) error {
	if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("%w: map %s: %v", ErrCapacity, name, err)
	}
	return fmt.Errorf("write map %s: %w", name, err)
}

// check validates desired before anything is written.
func (d *Datapath) check(desired []Service) error {
	seen := map[bpf.XdplbXlbVip]bool{}
	for _, s := range desired {
		k := vipKey(s)
		if seen[k] {
			return fmt.Errorf("duplicate frontend %s", FrontendString(s.Frontend, s.Proto))
		}
		seen[k] = true
		fam := family(s.Frontend.Addr())
		tunnels := map[netip.Addr]netip.AddrPort{}
		for _, b := range s.Backends {
			if family(b.Addr.Addr()) != fam {
				return fmt.Errorf("%s: backend %s: address family differs from the frontend", FrontendString(s.Frontend, s.Proto), b.Addr)
			}
			// The backend side finds an IPIP packet's backend by VIP and
			// tunnel address: two backends of a service cannot share one.
			if usesDSR(s) && (s.Dispatch == "" || s.Dispatch == mesh.IPIP) {
				if other, dup := tunnels[b.tunnel()]; dup {
					return fmt.Errorf("%s: backends %s and %s share the tunnel address %s: with IPIP the backend side cannot tell them apart (give each its own tunnel address, or use geneve or opt)",
						FrontendString(s.Frontend, s.Proto), other, b.Addr, b.tunnel())
				}
				tunnels[b.tunnel()] = b.Addr
			}
		}
	}
	if uint32(len(seen)) > d.p.MaxServices {
		return fmt.Errorf("%w: %d load-balanced services, the maps hold %d (xdp.maxServices)", ErrCapacity, len(seen), d.p.MaxServices)
	}
	return nil
}

// Sync makes the load balancer's maps hold exactly desired. Unchanged
// services are not rewritten (an in-memory mirror of the maps is kept);
// a changed service gets a new Maglev table swapped in atomically. Maglev
// tables are built with the configured seed and size: every node with the
// same configuration builds the same tables (see Fingerprints).
func (d *Datapath) Sync(desired []Service) (res SyncResult, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	defer func() {
		if err != nil {
			// Partly written: read back what the maps hold.
			if st, rerr := d.readState(); rerr == nil {
				d.st = st
			}
		}
	}()
	res = SyncResult{Fingerprints: map[string]string{}}
	if err := d.check(desired); err != nil {
		return res, err
	}
	st := d.st
	want := map[bpf.XdplbXlbVip]bool{}
	refs := map[uint32]int{}
	var resetSvc, resetBe []uint32
	type plan struct {
		key   bpf.XdplbXlbVip
		st    *svcState
		value bpf.XdplbXlbService
		table *maglev.Table
		ids   []uint32 // backend id per table backend index
		isNew bool
	}
	var plans []plan
	nextSvc := uint32(0)
	allocSvc := func() (uint32, error) {
		for ; nextSvc < d.p.MaxServices; nextSvc++ {
			if !st.svcUsed[nextSvc] {
				st.svcUsed[nextSvc] = true
				return nextSvc, nil
			}
		}
		return 0, fmt.Errorf("%w: no free service id (xdp.maxServices %d)", ErrCapacity, d.p.MaxServices)
	}
	allocBe := func(k beKey) (uint32, error) {
		if id, ok := st.beIDs[k]; ok {
			return id, nil
		}
		// Never-used ids first, then released ones oldest first: the
		// conntrack names a flow's backend by id, so an established flow
		// to a removed backend keeps it until its id is handed out again,
		// which is as late as maxBackends allows.
		// A released id gets the next generation: conntrack entries
		// naming the backend that had it are stale from then on.
		var id, gen uint32
		switch {
		case st.next < d.p.MaxBackends:
			id = st.next
			st.next++
		case len(st.free) > 0:
			id, st.free = st.free[0], st.free[1:]
			var old bpf.XdplbXlbBackend
			if err := d.lb.LbBackends.Lookup(id, &old); err != nil {
				return 0, mapErr("lb_backends", err)
			}
			gen = old.Gen + 1
		default:
			return 0, fmt.Errorf("%w: no free backend id (xdp.maxBackends %d)", ErrCapacity, d.p.MaxBackends)
		}
		st.beIDs[k] = id
		st.beRef[id] = 0
		resetBe = append(resetBe, id)
		be := bpf.XdplbXlbBackend{Addr: addrWords(k.addr.Addr()), Tunnel: addrWords(k.tunnel), Port: portN(k.addr.Port()),
			Family: family(k.addr.Addr()), TunnelFamily: family(k.tunnel), Gen: gen}
		if err := d.lb.LbBackends.Put(id, be); err != nil {
			return 0, mapErr("lb_backends", err)
		}
		return id, nil
	}

	for _, s := range desired {
		key := vipKey(s)
		want[key] = true
		mb := make([]maglev.Backend, len(s.Backends))
		byKey := map[string]Backend{}
		for i, b := range s.Backends {
			mb[i] = maglev.Backend{Key: b.Key(), Weight: b.Weight}
			byKey[b.Key()] = b
		}
		table, err := maglev.Build(mb, d.p.TableSize, d.p.Seed)
		if err != nil {
			return res, fmt.Errorf("%s: %w", FrontendString(s.Frontend, s.Proto), err)
		}
		sorted := table.Backends()
		ids := make([]uint32, len(sorted))
		for i, mbk := range sorted {
			b := byKey[mbk.Key]
			id, err := allocBe(beKey{b.Addr, b.tunnel()})
			if err != nil {
				return res, err
			}
			ids[i] = id
			refs[id]++
		}
		fp := ""
		size := uint32(0)
		if !table.Empty() {
			fp = table.Fingerprint()
			size = table.Size()
		}
		res.Fingerprints[FrontendString(s.Frontend, s.Proto)] = fp
		old := st.svcs[key]
		value := bpf.XdplbXlbService{Size: size, Mode: modeOf(s.Mode), Dispatch: dispatchOf(s.Dispatch)}
		if s.ClientIPAffinity {
			value.Flags |= uint16(bpf.XdplbXlbSvcFlagXLB_SVC_CLIENT_IP)
		}
		if old != nil {
			value.Id = old.id
			value.Gen = old.value.Gen
			if old.value == value && old.fp == fp && slices.Equal(old.beIDs, ids) && (fp != "" || size == 0) {
				res.Unchanged++
				continue
			}
			// Read back from the maps: kept if the kernel's table and
			// generation are what this sync would write.
			if old.value == value && old.fp == "" && fp != "" && old.genOK && slotsEqual(old.kernel, table, ids) {
				old.fp, old.beIDs, old.kernel = fp, ids, nil
				res.Unchanged++
				continue
			}
			plans = append(plans, plan{key: key, st: old, value: value, table: table, ids: ids})
			continue
		}
		id, err := allocSvc()
		if err != nil {
			return res, err
		}
		value.Id = id
		if value.Gen, err = d.nextGen(); err != nil {
			return res, err
		}
		resetSvc = append(resetSvc, id)
		plans = append(plans, plan{key: key, st: &svcState{id: id}, value: value, table: table, ids: ids, isNew: true})
	}

	if err := d.resetCounters(resetSvc, resetBe); err != nil {
		return res, err
	}
	for _, p := range plans {
		value := p.value
		// The generation goes live before the frontend can be found.
		if err := d.lb.LbSvcGen.Put(p.st.id, value.Gen); err != nil {
			return res, mapErr("lb_svc_gen", err)
		}
		if !p.table.Empty() {
			if err := d.writeTable(p.st.id, p.table, p.ids); err != nil {
				return res, err
			}
		}
		if err := d.lb.LbServices.Put(p.key, value); err != nil {
			return res, mapErr("lb_services", err)
		}
		if p.table.Empty() {
			d.lb.LbTables.Delete(p.st.id) // a table no packet reads any more
		}
		p.st.value = value
		p.st.fp = ""
		if !p.table.Empty() {
			p.st.fp = p.table.Fingerprint()
		}
		p.st.beIDs = p.ids
		p.st.kernel, p.st.genOK = nil, true
		st.svcs[p.key] = p.st
		if p.isNew {
			res.Added++
		} else {
			res.Updated++
		}
	}
	for key, s := range st.svcs {
		if want[key] {
			continue
		}
		if err := d.lb.LbServices.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return res, mapErr("lb_services", err)
		}
		d.lb.LbTables.Delete(s.id)
		// Conntrack entries of the service are stale from now on.
		if err := d.lb.LbSvcGen.Put(s.id, uint32(0)); err != nil {
			return res, mapErr("lb_svc_gen", err)
		}
		delete(st.svcs, key)
		delete(st.svcUsed, s.id)
		res.Deleted++
	}
	// Backends no service refers to any more: their ids are reused later
	// (see allocBe); the lb_backends entry stays until then, for the
	// conntrack entries that still name it.
	var released []uint32
	for k, id := range st.beIDs {
		if refs[id] == 0 {
			delete(st.beIDs, k)
			delete(st.beRef, id)
			released = append(released, id)
		} else {
			st.beRef[id] = refs[id]
		}
	}
	slices.Sort(released) // one order, whatever the map's
	st.free = append(st.free, released...)
	if err := d.syncDSR(desired); err != nil {
		return res, err
	}
	return res, nil
}

// nextGen hands out a service generation, never reused (lb_meta.gen_seq
// is pinned with the maps).
func (d *Datapath) nextGen() (uint32, error) {
	var meta bpf.XdplbXlbMeta
	if err := d.lb.LbMeta.Lookup(uint32(0), &meta); err != nil {
		return 0, fmt.Errorf("read lb_meta: %w", err)
	}
	// Conntrack entries hold a generation's low 24 bits, 0 meaning none.
	meta.GenSeq++
	if meta.GenSeq&(1<<24-1) == 0 {
		meta.GenSeq++
	}
	if err := d.lb.LbMeta.Put(uint32(0), meta); err != nil {
		return 0, mapErr("lb_meta", err)
	}
	return meta.GenSeq, nil
}

// readTable returns the slots (backend ids) of service id's Maglev table in
// lb_tables, or nil when there is none of size m or it cannot be read.
func (d *Datapath) readTable(id, m uint32) []uint32 {
	var inner *ebpf.Map
	if err := d.lb.LbTables.Lookup(id, &inner); err != nil {
		return nil
	}
	defer inner.Close()
	if inner.MaxEntries() != m {
		return nil
	}
	keys, vals := make([]uint32, m), make([]uint32, m)
	var cursor ebpf.MapBatchCursor
	n, err := inner.BatchLookup(&cursor, keys, vals, nil)
	if n != int(m) || (err != nil && !errors.Is(err, ebpf.ErrKeyNotExist)) {
		return nil
	}
	out := make([]uint32, m)
	for i := range n {
		if keys[i] >= m {
			return nil
		}
		out[keys[i]] = vals[i]
	}
	return out
}

// slotsEqual reports whether kernel holds table t with backend ids ids.
func slotsEqual(kernel []uint32, t *maglev.Table, ids []uint32) bool {
	slots := t.Slots()
	if len(kernel) != len(slots) {
		return false
	}
	for i, s := range slots {
		if kernel[i] != ids[s] {
			return false
		}
	}
	return true
}

// writeTable builds the service's Maglev table in a new inner map and swaps
// it into lb_tables.
func (d *Datapath) writeTable(svcID uint32, t *maglev.Table, ids []uint32) error {
	spec := d.inner.Copy()
	spec.MaxEntries = t.Size()
	spec.Name = "maglev"
	m, err := ebpf.NewMap(spec)
	if err != nil {
		return mapErr("maglev table", err)
	}
	defer m.Close()
	slots := t.Slots()
	keys := make([]uint32, len(slots))
	vals := make([]uint32, len(slots))
	for i, s := range slots {
		keys[i] = uint32(i)
		vals[i] = ids[s]
	}
	if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
		return mapErr("maglev table", err)
	}
	if err := d.lb.LbTables.Put(svcID, m); err != nil {
		return mapErr("lb_tables", err)
	}
	return nil
}

func (d *Datapath) resetCounters(svcs, bes []uint32) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	zs := make([]bpf.XdplbXlbSvcStats, n)
	for _, id := range svcs {
		if err := d.lb.LbSvcStats.Put(id, zs); err != nil {
			return mapErr("lb_svc_stats", err)
		}
	}
	zb := make([]bpf.XdplbXlbBackendStats, n)
	for _, id := range bes {
		if err := d.lb.LbBeStats.Put(id, zb); err != nil {
			return mapErr("lb_be_stats", err)
		}
	}
	return nil
}

// syncDSR writes the backend side's map: for every service some of whose
// packets go by DSR, each backend's (VIP, port, proto, tunnel address) ->
// backend address and port. A node only matches the entries of its own
// tunnel addresses. Entries are added and updated, never deleted (see
// below).
func (d *Datapath) syncDSR(desired []Service) error {
	want := map[bpf.DsrDsrSvcKey]bpf.DsrDsrLocal{}
	for _, s := range desired {
		if !usesDSR(s) {
			continue
		}
		vip := vipKey(s)
		for _, b := range s.Backends {
			t := b.tunnel()
			k := bpf.DsrDsrSvcKey{Vip: bpf.DsrXlbVip{Addr: vip.Addr, Port: vip.Port, Proto: vip.Proto, Family: vip.Family},
				Tunnel: addrWords(t), TunnelFamily: family(t)}
			want[k] = bpf.DsrDsrLocal{Addr: addrWords(b.Addr.Addr()), Port: portN(b.Addr.Port()), Family: family(b.Addr.Addr())}
		}
	}
	if uint32(len(want)) > d.dsr.DsrServices.MaxEntries() {
		return fmt.Errorf("%w: %d DSR backends, dsr_services holds %d (xdp.maxBackends)", ErrCapacity, len(want), d.dsr.DsrServices.MaxEntries())
	}
	for k, v := range want {
		if old, ok := d.st.dsr[k]; ok && old == v {
			continue
		}
		if err := d.dsr.DsrServices.Put(k, v); err != nil {
			return mapErr("dsr_services", err)
		}
		d.st.dsr[k] = v
	}
	// Entries no service needs any more stay: the load balancer may still
	// send established flows to a removed backend (its conntrack keeps
	// them there), and the backend must keep decapsulating them.
	// dsr_services is an LRU, so they are the first evicted.
	return nil
}

// Refresh rebuilds the mirror from the maps, so the next Sync repairs what
// was changed behind the agent's back: services, generations, Maglev tables
// (compared slot by slot; a table already right is kept), backends and
// dsr_services. lb_config is written again at once.
func (d *Datapath) Refresh() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	st, err := d.readState()
	if err != nil {
		return err
	}
	d.st = st
	return d.writeConfig()
}
