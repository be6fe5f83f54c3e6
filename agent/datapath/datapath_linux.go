// Package datapath owns the lifecycle of Shunt's sockmesh programs in the
// kernel: load, attach, pin, adopt after a restart, upgrade and remove.
//
// Kernel objects and how they outlive the agent:
//
//   - Maps are pinned under <root>/maps/<name>. On start the agent opens the
//     pinned maps and loads the new programs against them, so service
//     entries, reverse-NAT entries and enrolled pods survive restarts and
//     kill -9. The map layout is versioned (meta[0].layout_version, from
//     SHUNT_LAYOUT_VERSION in bpf/lib/shunt.h): a pinned layout of another
//     version is refused with an error that says how to proceed; a map whose
//     only difference is its capacity is migrated (entries copied into a map
//     of the new size, pin replaced with rename(2)).
//   - Programs are attached to one cgroup v2 with bpf_link (BPF_LINK_CREATE),
//     and each link is pinned under <root>/links/<program>. A pinned link keeps
//     the program attached while no process holds it, so translation goes on
//     while the agent is down. On start the agent replaces the program of a
//     pinned link atomically with BPF_LINK_UPDATE: there is no instant with
//     no program attached. A pinned link to another cgroup than the
//     configured one is detached and re-created.
//   - The root folder is flock(2)ed while an agent runs, so two agents never
//     write the same maps.
//
// Cleanup removes the links (detaching the programs) and every pin.
package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/agent/internal/pins"
	"github.com/shuntmesh/shunt/bpf"
)

// LayoutVersion is the map layout this agent was built with.
const LayoutVersion = bpf.LayoutVersion

// Datapath is the loaded and attached sockmesh.
type Datapath struct {
	cfg   Config
	log   *slog.Logger
	objs  bpf.SockmeshObjects
	links map[string]link.Link
	lock  *os.File
	// svcCache mirrors the services and slots maps; nil = read them.
	svcCache *svcState
	// Adopted is true when pinned maps from an earlier agent were reused.
	Adopted bool
}

// attachments maps each program to its cgroup attach type. Every program of
// the object must appear here (checked by a test).
var attachments = map[string]ebpf.AttachType{
	bpf.SockmeshProgShuntConnect4:     ebpf.AttachCGroupInet4Connect,
	bpf.SockmeshProgShuntConnect6:     ebpf.AttachCGroupInet6Connect,
	bpf.SockmeshProgShuntSendmsg4:     ebpf.AttachCGroupUDP4Sendmsg,
	bpf.SockmeshProgShuntSendmsg6:     ebpf.AttachCGroupUDP6Sendmsg,
	bpf.SockmeshProgShuntRecvmsg4:     ebpf.AttachCGroupUDP4Recvmsg,
	bpf.SockmeshProgShuntRecvmsg6:     ebpf.AttachCGroupUDP6Recvmsg,
	bpf.SockmeshProgShuntGetpeername4: ebpf.AttachCgroupInet4GetPeername,
	bpf.SockmeshProgShuntGetpeername6: ebpf.AttachCgroupInet6GetPeername,
	bpf.SockmeshProgShuntGetsockopt:   ebpf.AttachCGroupGetsockopt,
	bpf.SockmeshProgShuntSockRelease:  ebpf.AttachCgroupInetSockRelease,
	bpf.SockmeshProgShuntSockops:      ebpf.AttachCGroupSockOps,
	bpf.SockmeshProgShuntSkMsg:        ebpf.AttachSkMsgVerdict, // to the sock_hash map, not the cgroup
}

// CgroupAttachTypes lists the cgroup hooks sockmesh attaches to, in attach
// order (sk_msg, attached to the sockhash, is not one of them).
func CgroupAttachTypes() []ebpf.AttachType {
	var out []ebpf.AttachType
	for _, name := range attachOrder {
		if at := attachments[name]; at != ebpf.AttachSkMsgVerdict {
			out = append(out, at)
		}
	}
	return out
}

// attachOrder: sk_msg is attached to the sockhash before sockops can put
// sockets in it (a socket inserted first would never be redirected).
var attachOrder = []string{
	bpf.SockmeshProgShuntSkMsg,
	bpf.SockmeshProgShuntGetsockopt,
	bpf.SockmeshProgShuntConnect4,
	bpf.SockmeshProgShuntConnect6,
	bpf.SockmeshProgShuntSendmsg4,
	bpf.SockmeshProgShuntSendmsg6,
	bpf.SockmeshProgShuntRecvmsg4,
	bpf.SockmeshProgShuntRecvmsg6,
	bpf.SockmeshProgShuntGetpeername4,
	bpf.SockmeshProgShuntGetpeername6,
	bpf.SockmeshProgShuntSockRelease,
	bpf.SockmeshProgShuntSockops,
}

// Spec returns the sockmesh collection spec sized by cfg.
func Spec(cfg Config) (*ebpf.CollectionSpec, error) {
	spec, err := bpf.LoadSockmesh()
	if err != nil {
		return nil, fmt.Errorf("load sockmesh spec: %w", err)
	}
	sizes := map[string]uint32{
		bpf.SockmeshMapServices:    cfg.MaxServices,
		bpf.SockmeshMapSvcCounters: cfg.MaxServices,
		bpf.SockmeshMapSlots:       cfg.MaxSlots,
		bpf.SockmeshMapRevnat:      cfg.MaxRevNAT,
		bpf.SockmeshMapPods:        cfg.MaxPods,
		bpf.SockmeshMapSidecars:    cfg.MaxPods,
		bpf.SockmeshMapLocalIps:    2 * cfg.MaxPods,
		bpf.SockmeshMapPodCounters: cfg.MaxPods + 1, // ids 1..MaxPods
		bpf.SockmeshMapSockHash:    cfg.MaxSockets,
		bpf.SockmeshMapOrigdst:     cfg.MaxSockets,
		bpf.SockmeshMapAccelSocks:  cfg.MaxSockets,
		bpf.SockmeshMapSvcBackends: cfg.MaxSlots, // distinct backends <= slots
		bpf.SockmeshMapAffinity:    cfg.MaxRevNAT,
	}
	for name, n := range sizes {
		ms, ok := spec.Maps[name]
		if !ok {
			return nil, fmt.Errorf("sockmesh spec has no map %q", name)
		}
		ms.MaxEntries = n
	}
	return spec, nil
}

func (d *Datapath) mapsDir() string  { return filepath.Join(d.cfg.Root, "maps") }
func (d *Datapath) linksDir() string { return filepath.Join(d.cfg.Root, "links") }

// Open loads sockmesh, adopting pinned maps and links under cfg.Root, and
// attaches it to cfg.Cgroup. Close releases the agent's handles and leaves
// everything attached.
func Open(cfg Config, log *slog.Logger) (_ *Datapath, err error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Datapath{cfg: cfg, log: log, links: map[string]link.Link{}}
	for _, dir := range []string{cfg.Root, d.mapsDir(), d.linksDir()} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("create %s (is bpffs mounted at /sys/fs/bpf?): %w", dir, err)
		}
	}
	if err := d.flock(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()

	spec, err := Spec(cfg)
	if err != nil {
		return nil, err
	}
	replacements, migrated, err := d.adoptMaps(spec)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, m := range replacements {
			m.Close()
		}
		if err != nil {
			for _, mg := range migrated {
				os.Remove(mg.tmp)
			}
		}
	}()
	if err := spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{MapReplacements: replacements}); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load sockmesh: %+v", ve)
		}
		return nil, fmt.Errorf("load sockmesh: %w", err)
	}
	if err := d.pinMaps(); err != nil {
		return nil, err
	}
	var zero uint32
	if err := d.objs.Meta.Put(zero, bpf.SockmeshShuntMeta{LayoutVersion: LayoutVersion}); err != nil {
		return nil, fmt.Errorf("write layout version: %w", err)
	}
	if err := d.attach(); err != nil {
		return nil, err
	}
	// Only now that the new programs use the migrated maps do their pins
	// replace the old ones.
	for _, mg := range migrated {
		if err := os.Rename(mg.tmp, mg.path); err != nil {
			return nil, fmt.Errorf("replace pin %s: %w", mg.path, err)
		}
		log.Info("migrated map to new capacity", "map", mg.name, "from", mg.from, "to", mg.to)
	}
	return d, nil
}

func (d *Datapath) flock() error {
	f, err := os.Open(d.cfg.Root)
	if err != nil {
		return fmt.Errorf("open %s: %w", d.cfg.Root, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("%s is locked: another shuntd is running with this bpffs root", d.cfg.Root)
		}
		return fmt.Errorf("lock %s: %w", d.cfg.Root, err)
	}
	d.lock = f
	return nil
}

type migration struct {
	name, path, tmp string
	from, to        uint32
}

// adoptMaps opens the pinned maps compatible with spec. A map differing only
// in capacity is copied into a new map pinned at a temporary path.
func (d *Datapath) adoptMaps(spec *ebpf.CollectionSpec) (map[string]*ebpf.Map, []migration, error) {
	repl := map[string]*ebpf.Map{}
	var migs []migration
	fail := func(err error) (map[string]*ebpf.Map, []migration, error) {
		for _, m := range repl {
			m.Close()
		}
		for _, mg := range migs {
			os.Remove(mg.tmp)
		}
		return nil, nil, err
	}
	// The layout version decides first: a foreign layout is never touched.
	metaPath := filepath.Join(d.mapsDir(), bpf.SockmeshMapMeta)
	if m, err := ebpf.LoadPinnedMap(metaPath, nil); err == nil {
		var meta bpf.SockmeshShuntMeta
		lerr := m.Lookup(uint32(0), &meta)
		m.Close()
		if lerr != nil {
			return fail(fmt.Errorf("read pinned layout version from %s: %w (refusing to adopt; run `shuntctl cleanup --bpffs-root %s`)", metaPath, lerr, d.cfg.Root))
		}
		if meta.LayoutVersion != LayoutVersion {
			return fail(fmt.Errorf("pinned maps under %s have layout version %d, this shuntd uses %d: "+
				"run a shuntd built for layout %d, or remove the old state with `shuntctl cleanup --bpffs-root %s` "+
				"(translation stops until the new agent starts)",
				d.cfg.Root, meta.LayoutVersion, LayoutVersion, meta.LayoutVersion, d.cfg.Root))
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
		if ms.Name == "" || name[0] == '.' { // .rodata and friends are per load
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
		cerr := ms.Compatible(m)
		if cerr == nil {
			repl[name] = m
			d.Adopted = true
			continue
		}
		if m.Type() != ms.Type || m.KeySize() != ms.KeySize || m.ValueSize() != ms.ValueSize || m.Flags() != ms.Flags {
			m.Close()
			return fail(fmt.Errorf("pinned map %s is incompatible with layout version %d (%v): remove it with `shuntctl cleanup --bpffs-root %s`", path, LayoutVersion, cerr, d.cfg.Root))
		}
		nm, err := migrateMap(m, ms)
		from := m.MaxEntries()
		m.Close()
		if err != nil {
			return fail(fmt.Errorf("migrate map %s from %d to %d entries: %w", name, from, ms.MaxEntries, err))
		}
		tmp := path + "_migrating" // bpffs refuses names with a dot
		os.Remove(tmp)
		if err := nm.Pin(tmp); err != nil {
			nm.Close()
			return fail(fmt.Errorf("pin migrated map %s: %w", tmp, err))
		}
		repl[name] = nm
		d.Adopted = true
		migs = append(migs, migration{name: name, path: path, tmp: tmp, from: from, to: ms.MaxEntries})
	}
	return repl, migs, nil
}

// migrateMap creates a map from ms and copies old's entries into it.
func migrateMap(old *ebpf.Map, ms *ebpf.MapSpec) (*ebpf.Map, error) {
	nm, err := ebpf.NewMap(ms)
	if err != nil {
		return nil, err
	}
	key := make([]byte, old.KeySize())
	val := make([]byte, old.ValueSize()*uint32(possibleCPUsFor(old)))
	it := old.Iterate()
	for it.Next(&key, &val) {
		if err := nm.Put(key, val); err != nil {
			nm.Close()
			return nil, fmt.Errorf("copy entry: %w (new capacity %d too small?)", err, ms.MaxEntries)
		}
	}
	if err := it.Err(); err != nil {
		nm.Close()
		return nil, err
	}
	return nm, nil
}

func possibleCPUsFor(m *ebpf.Map) int {
	switch m.Type() {
	case ebpf.PerCPUArray, ebpf.PerCPUHash, ebpf.LRUCPUHash:
		n, err := ebpf.PossibleCPU()
		if err == nil {
			return n
		}
	}
	return 1
}

func (d *Datapath) pinMaps() error {
	for name, m := range d.mapsByName() {
		path := filepath.Join(d.mapsDir(), name)
		if _, err := os.Stat(path); err == nil {
			continue // adopted (or migrated: renamed into place later)
		}
		if err := m.Pin(path); err != nil {
			return fmt.Errorf("pin map %s: %w", path, err)
		}
	}
	return nil
}

// mapsByName lists the object's maps under their ELF names.
func (d *Datapath) mapsByName() map[string]*ebpf.Map {
	o := &d.objs.SockmeshMaps
	return map[string]*ebpf.Map{
		bpf.SockmeshMapServices:     o.Services,
		bpf.SockmeshMapSlots:        o.Slots,
		bpf.SockmeshMapRevnat:       o.Revnat,
		bpf.SockmeshMapPods:         o.Pods,
		bpf.SockmeshMapConfig:       o.Config,
		bpf.SockmeshMapMeta:         o.Meta,
		bpf.SockmeshMapSvcCounters:  o.SvcCounters,
		bpf.SockmeshMapStats:        o.Stats,
		bpf.SockmeshMapSidecars:     o.Sidecars,
		bpf.SockmeshMapLocalIps:     o.LocalIps,
		bpf.SockmeshMapSteerPending: o.SteerPending,
		bpf.SockmeshMapOrigdst:      o.Origdst,
		bpf.SockmeshMapSockHash:     o.SockHash,
		bpf.SockmeshMapPodCounters:  o.PodCounters,
		bpf.SockmeshMapAccelSocks:   o.AccelSocks,
		bpf.SockmeshMapRedirState:   o.RedirState,
		bpf.SockmeshMapAffinity:     o.Affinity,
		bpf.SockmeshMapSvcBackends:  o.SvcBackends,
	}
}

func (d *Datapath) programsByName() map[string]*ebpf.Program {
	p := &d.objs.SockmeshPrograms
	return map[string]*ebpf.Program{
		bpf.SockmeshProgShuntConnect4:     p.ShuntConnect4,
		bpf.SockmeshProgShuntConnect6:     p.ShuntConnect6,
		bpf.SockmeshProgShuntSendmsg4:     p.ShuntSendmsg4,
		bpf.SockmeshProgShuntSendmsg6:     p.ShuntSendmsg6,
		bpf.SockmeshProgShuntRecvmsg4:     p.ShuntRecvmsg4,
		bpf.SockmeshProgShuntRecvmsg6:     p.ShuntRecvmsg6,
		bpf.SockmeshProgShuntGetpeername4: p.ShuntGetpeername4,
		bpf.SockmeshProgShuntGetpeername6: p.ShuntGetpeername6,
		bpf.SockmeshProgShuntGetsockopt:   p.ShuntGetsockopt,
		bpf.SockmeshProgShuntSockRelease:  p.ShuntSockRelease,
		bpf.SockmeshProgShuntSockops:      p.ShuntSockops,
		bpf.SockmeshProgShuntSkMsg:        p.ShuntSkMsg,
	}
}

func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("statfs cgroup %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("%s is not a cgroup v2 folder", path)
	}
	return st.Ino, nil
}

// attach updates pinned links in place or creates and pins new ones.
func (d *Datapath) attach() error {
	want, err := cgroupID(d.cfg.Cgroup)
	if err != nil {
		return err
	}
	progs := d.programsByName()
	if len(attachOrder) != len(progs) {
		return fmt.Errorf("attach order lists %d programs, the object has %d", len(attachOrder), len(progs))
	}
	for _, name := range attachOrder {
		prog, at := progs[name], attachments[name]
		if prog == nil {
			return fmt.Errorf("program %s not loaded", name)
		}
		path := filepath.Join(d.linksDir(), name)
		if l, err := link.LoadPinnedLink(path, nil); err == nil {
			info, ierr := l.Info()
			same := false
			if ierr == nil && at == ebpf.AttachSkMsgVerdict {
				// The pinned link holds the (adopted, pinned) sockhash,
				// unless it was detached.
				attached, _ := Attached(l)
				same = info.Type == linkTypeSockmap && attached
			} else if ierr == nil && info.Cgroup() != nil {
				same = info.Cgroup().CgroupId == want
			}
			if same {
				if err := l.Update(prog); err != nil {
					l.Close()
					return fmt.Errorf("update pinned link %s: %w", path, err)
				}
				d.links[name] = l
				continue
			}
			// Attached elsewhere (config changed) or unreadable: detach.
			d.log.Warn("re-attaching program: pinned link points elsewhere", "link", path)
			l.Unpin()
			l.Close()
		} else if !errors.Is(err, os.ErrNotExist) {
			// A stale pin of something else: refuse to guess.
			return fmt.Errorf("open pinned link %s: %w", path, err)
		}
		var l link.Link
		if at == ebpf.AttachSkMsgVerdict {
			l, err = link.AttachRawLink(link.RawLinkOptions{Target: d.objs.SockHash.FD(), Program: prog, Attach: at})
			if err != nil {
				err = fmt.Errorf("attach %s to map %s: %w", name, bpf.SockmeshMapSockHash, err)
			}
		} else {
			l, err = link.AttachCgroup(link.CgroupOptions{Path: d.cfg.Cgroup, Attach: at, Program: prog})
			if err != nil {
				err = fmt.Errorf("attach %s to cgroup %s: %w", name, d.cfg.Cgroup, err)
			}
		}
		if err != nil {
			return err
		}
		if err := l.Pin(path); err != nil {
			l.Close()
			return fmt.Errorf("pin link %s: %w", path, err)
		}
		d.links[name] = l
	}
	return nil
}

// Maps gives the map writers access to the loaded maps.
func (d *Datapath) Maps() *bpf.SockmeshMaps { return &d.objs.SockmeshMaps }

// Config returns the effective configuration.
func (d *Datapath) Config() Config { return d.cfg }

// Close releases the agent's handles. Programs stay attached through their
// pinned links and maps stay pinned.
func (d *Datapath) Close() error {
	for _, l := range d.links {
		l.Close()
	}
	d.links = map[string]link.Link{}
	err := d.objs.Close()
	if d.lock != nil {
		d.lock.Close()
		d.lock = nil
	}
	return err
}

// Cleanup detaches every program linked under root and removes all pins and
// the folder itself. It refuses while an agent holds the folder's lock.
func Cleanup(root string) error {
	if root == "" {
		root = DefaultRoot
	}
	return pins.RemoveDir(root)
}

// linkTypeSockmap is BPF_LINK_TYPE_SOCKMAP (uapi bpf.h), which cilium/ebpf
// does not name.
const linkTypeSockmap link.Type = 14
