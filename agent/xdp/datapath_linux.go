// Package xdp owns the lifecycle of Shunt's north-south load balancer in
// the kernel: xdplb (XDP on the node's NICs: Maglev, conntrack, DSR and SNAT
// dispatch) and dsr (tc on backends: decapsulation and reply rewriting),
// both built from bpf/xdplb.c and bpf/dsr.c.
//
// Kernel objects and how they outlive the agent:
//
//   - Maps are pinned under <root>/xdp/maps/<name> and adopted on start, so
//     services, Maglev tables, conntrack and SNAT state survive restarts and
//     kill -9. The layout is versioned (lb_meta/dsr_meta, from
//     XLB_LAYOUT_VERSION in bpf/lib/xdplb.h); pinned maps of another
//     version or shape are refused with an error that says what to do.
//   - xdplb is attached with an XDP bpf_link (BPF_LINK_CREATE, native mode;
//     generic with a warning when the driver refuses) per device, pinned as
//     <root>/xdp/links/xdp-<device>; dsr with tcx links (ingress and egress)
//     pinned as dsr-in-<device> and dsr-out-<device>. A pinned link keeps the
//     program attached while the agent is down; on start the new program
//     replaces the old one atomically with BPF_LINK_UPDATE.
//   - Each service's Maglev table is an inner map of lb_tables (an
//     array of maps): a changed table is written to a new map and swapped in
//     with one update, so packets see the old or the new table, never a mix.
//   - <root>/xdp is flock(2)ed while an agent runs.
//
// Device names are resolved (and programs attached) in the network namespace
// Config.NetNS, on a locked OS thread that joined it: the kernel resolves an
// ifindex in the calling thread's namespace.
package xdp

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/agent/internal/pins"
	"github.com/shuntmesh/shunt/bpf"
)

// LayoutVersion is the map layout this agent was built with.
const LayoutVersion = bpf.XDPLayoutVersion

// Datapath is the loaded load balancer and backend side.
type Datapath struct {
	cfg   Config
	p     Params
	root  string // <bpffs root>/xdp, "" = nothing pinned
	log   *slog.Logger
	lb    bpf.XdplbObjects
	dsr   bpf.DsrObjects
	inner *ebpf.MapSpec // template of a Maglev table

	mu    sync.Mutex
	links map[string]link.Link
	lock  *os.File
	st    *syncState
	// Adopted is true when pinned maps of an earlier agent were reused.
	Adopted bool
	// Generic lists the devices that fell back to generic XDP.
	Generic []string
}

// Spec returns the xdplb and dsr collection specs sized by p.
func Spec(p Params) (lb, dsr *ebpf.CollectionSpec, err error) {
	lb, err = bpf.LoadXdplb()
	if err != nil {
		return nil, nil, fmt.Errorf("load xdplb spec: %w", err)
	}
	dsr, err = bpf.LoadDsr()
	if err != nil {
		return nil, nil, fmt.Errorf("load dsr spec: %w", err)
	}
	sizes := []struct {
		spec *ebpf.CollectionSpec
		name string
		n    uint32
	}{
		{lb, bpf.XdplbMapLbServices, p.MaxServices},
		{lb, bpf.XdplbMapLbTables, p.MaxServices},
		{lb, bpf.XdplbMapLbSvcStats, p.MaxServices},
		{lb, bpf.XdplbMapLbSvcGen, p.MaxServices},
		{lb, bpf.XdplbMapLbBackends, p.MaxBackends},
		{lb, bpf.XdplbMapLbBeStats, p.MaxBackends},
		{lb, bpf.XdplbMapLbCt4, CTSets(p.MaxFlows)},
		{lb, bpf.XdplbMapLbCt6, CTSets(p.MaxFlows)},
		{lb, bpf.XdplbMapLbSnat, p.MaxFlows},
		{dsr, bpf.DsrMapDsrServices, p.MaxBackends},
		{dsr, bpf.DsrMapDsrRevnat, p.MaxFlows},
	}
	for _, s := range sizes {
		ms, ok := s.spec.Maps[s.name]
		if !ok {
			return nil, nil, fmt.Errorf("spec has no map %q", s.name)
		}
		ms.MaxEntries = s.n
	}
	if p.PerCPULRU {
		lb.Maps[bpf.XdplbMapLbSnat].Flags |= unix.BPF_F_NO_COMMON_LRU
		dsr.Maps[bpf.DsrMapDsrRevnat].Flags |= unix.BPF_F_NO_COMMON_LRU
	}
	if lb.Maps[bpf.XdplbMapLbTables].InnerMap == nil {
		return nil, nil, errors.New("lb_tables has no inner map template")
	}
	return lb, dsr, nil
}

// Open loads xdplb and dsr. With root set (the agent's bpffs folder), maps
// are pinned under root/xdp and adopted from an earlier agent, and the
// configured devices get their programs; with root "" nothing is pinned or
// attached (tests, benchmarks). Close releases the agent's handles and
// leaves everything attached.
func Open(cfg Config, root string, log *slog.Logger) (_ *Datapath, err error) {
	p, err := cfg.Parse()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Datapath{cfg: cfg, p: p, log: log, links: map[string]link.Link{}}
	if root != "" {
		d.root = filepath.Join(root, "xdp")
		for _, dir := range []string{d.root, d.mapsDir(), d.linksDir()} {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return nil, fmt.Errorf("create %s (is bpffs mounted at /sys/fs/bpf?): %w", dir, err)
			}
		}
		if err := d.flock(); err != nil {
			return nil, err
		}
	}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	lbSpec, dsrSpec, err := Spec(p)
	if err != nil {
		return nil, err
	}
	d.inner = lbSpec.Maps[bpf.XdplbMapLbTables].InnerMap.Copy()
	for _, c := range []struct {
		name string
		spec *ebpf.CollectionSpec
		meta string
		objs any
	}{
		{"xdplb", lbSpec, bpf.XdplbMapLbMeta, &d.lb},
		{"dsr", dsrSpec, bpf.DsrMapDsrMeta, &d.dsr},
	} {
		repl, err := d.adoptMaps(c.spec, c.meta)
		if err != nil {
			return nil, err
		}
		err = c.spec.LoadAndAssign(c.objs, &ebpf.CollectionOptions{MapReplacements: repl})
		for _, m := range repl {
			m.Close()
		}
		if err != nil {
			var ve *ebpf.VerifierError
			if errors.As(err, &ve) {
				return nil, fmt.Errorf("load %s: %+v", c.name, ve)
			}
			return nil, fmt.Errorf("load %s: %w", c.name, err)
		}
	}
	var meta bpf.XdplbXlbMeta
	if err := d.lb.LbMeta.Lookup(uint32(0), &meta); err != nil {
		return nil, fmt.Errorf("read lb_meta: %w", err)
	}
	meta.LayoutVersion = LayoutVersion // gen_seq carries over from an adopted map
	if err := d.lb.LbMeta.Put(uint32(0), meta); err != nil {
		return nil, fmt.Errorf("write lb_meta: %w", err)
	}
	if err := d.dsr.DsrMeta.Put(uint32(0), bpf.DsrXlbMeta{LayoutVersion: LayoutVersion}); err != nil {
		return nil, fmt.Errorf("write dsr_meta: %w", err)
	}
	if !d.Adopted {
		start := time.Now()
		if err := prefault[bpf.XdplbXlbCtSet4](d.lb.LbCt4); err != nil {
			return nil, err
		}
		if err := prefault[bpf.XdplbXlbCtSet6](d.lb.LbCt6); err != nil {
			return nil, err
		}
		d.log.Debug("conntrack tables read once", "took", time.Since(start))
	}
	if err := d.pinMaps(); err != nil {
		return nil, err
	}
	if err := d.writeConfig(); err != nil {
		return nil, err
	}
	if d.st, err = d.readState(); err != nil {
		return nil, err
	}
	if root != "" {
		if err := d.attachAll(); err != nil {
			return nil, err
		}
	}
	return d, nil
}

func (d *Datapath) mapsDir() string  { return filepath.Join(d.root, "maps") }
func (d *Datapath) linksDir() string { return filepath.Join(d.root, "links") }

func (d *Datapath) flock() error {
	f, err := os.Open(d.root)
	if err != nil {
		return fmt.Errorf("open %s: %w", d.root, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("%s is locked: another shuntd is running with this bpffs root", d.root)
		}
		return fmt.Errorf("lock %s: %w", d.root, err)
	}
	d.lock = f
	return nil
}

// adoptMaps opens the pinned maps of spec. The layout version (map meta)
// decides first; any other difference is refused.
func (d *Datapath) adoptMaps(spec *ebpf.CollectionSpec, meta string) (map[string]*ebpf.Map, error) {
	repl := map[string]*ebpf.Map{}
	if d.root == "" {
		return repl, nil
	}
	fail := func(err error) (map[string]*ebpf.Map, error) {
		for _, m := range repl {
			m.Close()
		}
		return nil, err
	}
	cleanup := fmt.Sprintf("shuntctl cleanup --bpffs-root %s", filepath.Dir(d.root))
	metaPath := filepath.Join(d.mapsDir(), meta)
	if m, err := ebpf.LoadPinnedMap(metaPath, nil); err == nil {
		var v bpf.XdplbXlbMeta
		lerr := m.Lookup(uint32(0), &v)
		m.Close()
		if lerr != nil {
			return fail(fmt.Errorf("read pinned layout version from %s: %w (refusing to adopt; run `%s`)", metaPath, lerr, cleanup))
		}
		if v.LayoutVersion != LayoutVersion {
			return fail(fmt.Errorf("pinned XDP maps under %s have layout version %d, this shuntd uses %d: "+
				"run a shuntd built for layout %d, or remove the old state with `%s` (load balancing stops until the new agent starts)",
				d.root, v.LayoutVersion, LayoutVersion, v.LayoutVersion, cleanup))
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fail(fmt.Errorf("open pinned %s: %w", metaPath, err))
	}
	names := make([]string, 0, len(spec.Maps))
	for name := range spec.Maps {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		ms := spec.Maps[name]
		if name == "" || name[0] == '.' {
			continue
		}
		path := filepath.Join(d.mapsDir(), name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fail(fmt.Errorf("open pinned map %s: %w", path, err))
		}
		if err := ms.Compatible(m); err != nil {
			m.Close()
			return fail(fmt.Errorf("pinned map %s does not match this configuration (%v): a changed capacity or conntrack kind needs `%s` first", path, err, cleanup))
		}
		repl[name] = m
		d.Adopted = true
	}
	return repl, nil
}

func (d *Datapath) mapsByName() map[string]*ebpf.Map {
	l, s := &d.lb.XdplbMaps, &d.dsr.DsrMaps
	return map[string]*ebpf.Map{
		bpf.XdplbMapLbServices: l.LbServices,
		bpf.XdplbMapLbSvcGen:   l.LbSvcGen,
		bpf.XdplbMapLbTables:   l.LbTables,
		bpf.XdplbMapLbBackends: l.LbBackends,
		bpf.XdplbMapLbCt4:      l.LbCt4,
		bpf.XdplbMapLbCt6:      l.LbCt6,
		bpf.XdplbMapLbSnat:     l.LbSnat,
		bpf.XdplbMapLbConfig:   l.LbConfig,
		bpf.XdplbMapLbMeta:     l.LbMeta,
		bpf.XdplbMapLbSvcStats: l.LbSvcStats,
		bpf.XdplbMapLbBeStats:  l.LbBeStats,
		bpf.XdplbMapLbStats:    l.LbStats,
		bpf.XdplbMapLbFrags:    l.LbFrags,
		bpf.DsrMapDsrServices:  s.DsrServices,
		bpf.DsrMapDsrRevnat:    s.DsrRevnat,
		bpf.DsrMapDsrMeta:      s.DsrMeta,
		bpf.DsrMapDsrStats:     s.DsrStats,
		bpf.DsrMapDsrFrags:     s.DsrFrags,
	}
}

func (d *Datapath) pinMaps() error {
	if d.root == "" {
		return nil
	}
	for name, m := range d.mapsByName() {
		path := filepath.Join(d.mapsDir(), name)
		if _, err := os.Stat(path); err == nil {
			continue // adopted
		}
		if err := m.Pin(path); err != nil {
			return fmt.Errorf("pin map %s: %w", path, err)
		}
	}
	return nil
}

// writeConfig stores the seed, node addresses and SNAT range in lb_config.
func (d *Datapath) writeConfig() error {
	c := bpf.XdplbXlbConfig{Seed: d.p.Seed.DatapathSeed(), SnatLo: d.p.SNATLo, SnatHi: d.p.SNATHi,
		CtSets: d.lb.LbCt4.MaxEntries()}
	if d.p.Node4.IsValid() {
		a := addrWords(d.p.Node4)
		c.Node4 = a[0]
	}
	if d.p.Node6.IsValid() {
		c.Node6 = addrWords(d.p.Node6)
	}
	if err := d.lb.LbConfig.Put(uint32(0), c); err != nil {
		return fmt.Errorf("write lb_config: %w", err)
	}
	return nil
}

// prefault reads every set of a new conntrack table once. The kernel
// allocates and zeroes its memory, but on a VM with shadow page tables
// (this project's CI) the first access to each page through the map's
// mapping traps to the hypervisor: measured, the first new flows into a
// fresh table cost 300 ns more each until it had been touched. Reading it
// here moves that to load time (~0.1 s at the default size; on bare metal
// it only warms the caches).
func prefault[V any](m *ebpf.Map) error {
	const chunk = 4096
	keys := make([]uint32, chunk)
	vals := make([]V, chunk)
	var cursor ebpf.MapBatchCursor
	for {
		_, err := m.BatchLookup(&cursor, keys, vals, nil)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", m.String(), err)
		}
	}
}

// inNetNS runs fn on a locked OS thread inside the network namespace at
// path ("" = the caller's).
func inNetNS(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer unix.Close(self)
		target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open netns %s: %w", path, err)
			return
		}
		defer unix.Close(target)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(self, unix.CLONE_NEWNET); err != nil {
			// The thread stays locked; Go discards it with this goroutine.
			errc <- errors.Join(ferr, fmt.Errorf("return from netns %s: %w", path, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// attachment is one link the agent keeps.
type attachment struct {
	name   string // pin name
	device string
	prog   *ebpf.Program
	kind   string // "xdp", "tcx-ingress", "tcx-egress"
}

func (d *Datapath) attachments() []attachment {
	var out []attachment
	for _, dev := range d.cfg.Devices {
		out = append(out, attachment{"xdp-" + dev, dev, d.lb.Xdplb, "xdp"})
	}
	for _, dev := range d.cfg.DSRDevices {
		out = append(out, attachment{"dsr-in-" + dev, dev, d.dsr.DsrIngress, "tcx-ingress"},
			attachment{"dsr-out-" + dev, dev, d.dsr.DsrEgress, "tcx-egress"})
	}
	return out
}

func (d *Datapath) attachAll() error {
	want := map[string]bool{}
	err := inNetNS(d.cfg.NetNS, func() error {
		for _, a := range d.attachments() {
			want[a.name] = true
			if err := d.attach(a); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	// Links of devices no longer configured are detached.
	entries, _ := os.ReadDir(d.linksDir())
	for _, e := range entries {
		if want[e.Name()] {
			continue
		}
		p := filepath.Join(d.linksDir(), e.Name())
		l, err := link.LoadPinnedLink(p, nil)
		if err != nil {
			return fmt.Errorf("open pinned link %s: %w", p, err)
		}
		d.log.Info("detaching program from a device no longer configured", "link", p)
		l.Unpin()
		l.Close()
	}
	return nil
}

// attach updates a pinned link in place or creates and pins a new one. It
// runs in the devices' network namespace.
func (d *Datapath) attach(a attachment) error {
	iface, err := net.InterfaceByName(a.device)
	if err != nil {
		return fmt.Errorf("device %s: %w", a.device, err)
	}
	path := filepath.Join(d.linksDir(), a.name)
	if l, err := link.LoadPinnedLink(path, nil); err == nil {
		if linkIfindex(l) == iface.Index {
			if err := l.Update(a.prog); err != nil {
				l.Close()
				return fmt.Errorf("update pinned link %s: %w", path, err)
			}
			d.links[a.name] = l
			return nil
		}
		d.log.Warn("re-attaching program: pinned link is detached or points to another interface", "link", path)
		l.Unpin()
		l.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open pinned link %s: %w", path, err)
	}
	var l link.Link
	switch a.kind {
	case "xdp":
		flags := link.XDPDriverMode
		if d.p.Generic {
			flags = link.XDPGenericMode
		}
		l, err = link.AttachXDP(link.XDPOptions{Program: a.prog, Interface: iface.Index, Flags: flags})
		if err != nil && flags == link.XDPDriverMode {
			d.log.Warn("native XDP refused, falling back to generic (slower)", "device", a.device, "err", err)
			l, err = link.AttachXDP(link.XDPOptions{Program: a.prog, Interface: iface.Index, Flags: link.XDPGenericMode})
			if err == nil {
				d.Generic = append(d.Generic, a.device)
			}
		}
	case "tcx-ingress":
		l, err = link.AttachTCX(link.TCXOptions{Program: a.prog, Interface: iface.Index, Attach: ebpf.AttachTCXIngress})
	case "tcx-egress":
		l, err = link.AttachTCX(link.TCXOptions{Program: a.prog, Interface: iface.Index, Attach: ebpf.AttachTCXEgress})
	}
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", a.kind, a.device, err)
	}
	if err := l.Pin(path); err != nil {
		l.Close()
		return fmt.Errorf("pin link %s: %w", path, err)
	}
	d.links[a.name] = l
	return nil
}

func linkIfindex(l link.Link) int {
	info, err := l.Info()
	if err != nil {
		return -1
	}
	if x := info.XDP(); x != nil {
		return int(x.Ifindex)
	}
	if t := info.TCX(); t != nil {
		return int(t.Ifindex)
	}
	return -1
}

// LinkInfo describes an attached program.
type LinkInfo struct {
	Name   string `json:"name"`
	Device string `json:"device"`
	Kind   string `json:"kind"`
	LinkID uint32 `json:"linkID"`
	ProgID uint32 `json:"progID"`
	Pinned string `json:"pinned"`
	// Attached: the link still runs its program on its device
	// (datapath.Attached).
	Attached bool `json:"attached"`
}

// Links describes the links this agent holds.
func (d *Datapath) Links() []LinkInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []LinkInfo
	for _, a := range d.attachments() {
		l, ok := d.links[a.name]
		if !ok {
			continue
		}
		li := LinkInfo{Name: a.name, Device: a.device, Kind: a.kind, Pinned: filepath.Join(d.linksDir(), a.name)}
		if info, err := l.Info(); err == nil {
			li.LinkID = uint32(info.ID)
			li.ProgID = uint32(info.Program)
		}
		li.Attached, _ = datapath.Attached(l)
		out = append(out, li)
	}
	slices.SortFunc(out, func(a, b LinkInfo) int { return cmpStr(a.Name, b.Name) })
	return out
}

func cmpStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Program is the load balancer program (for BPF_PROG_TEST_RUN).
func (d *Datapath) Program() *ebpf.Program { return d.lb.Xdplb }

// PassProgram is a program returning XDP_PASS: attach it to the peer of a
// veth the load balancer runs on, or XDP_TX frames are dropped there.
func (d *Datapath) PassProgram() *ebpf.Program { return d.lb.XdpPass }

// DSRPrograms are the backend side's ingress and egress programs.
func (d *Datapath) DSRPrograms() (ingress, egress *ebpf.Program) {
	return d.dsr.DsrIngress, d.dsr.DsrEgress
}

// LBMaps and DSRMaps give tests and tools access to the maps.
func (d *Datapath) LBMaps() *bpf.XdplbMaps { return &d.lb.XdplbMaps }

// DSRMaps gives access to the backend side's maps.
func (d *Datapath) DSRMaps() *bpf.DsrMaps { return &d.dsr.DsrMaps }

// Conntrack returns the conntrack maps (owned by d: do not close them).
func (d *Datapath) Conntrack() Conntrack {
	return Conntrack{V4: d.lb.LbCt4, V6: d.lb.LbCt6, Backends: d.lb.LbBackends, Config: d.lb.LbConfig}
}

// Params returns the parsed configuration.
func (d *Datapath) Params() Params { return d.p }

// Close releases the agent's handles; programs stay attached through their
// pinned links and maps stay pinned.
func (d *Datapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, l := range d.links {
		l.Close()
	}
	d.links = map[string]link.Link{}
	err := errors.Join(d.lb.Close(), d.dsr.Close())
	if d.lock != nil {
		d.lock.Close()
		d.lock = nil
	}
	return err
}

// Cleanup detaches every program linked under root/xdp and removes its pins.
// It refuses while an agent holds the folder.
func Cleanup(root string) error {
	return pins.RemoveDir(filepath.Join(root, "xdp"))
}
