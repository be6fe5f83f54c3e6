// Package agent is shuntd: it owns the desired state (configuration file,
// run-time changes from shuntctl, later Kubernetes), reconciles the kernel
// maps to it through agent/datapath, serves the local API and the metrics.
//
// One desired state, one reconcile path: every change (start-up, shuntctl,
// periodic resync) computes the complete desired state, validates it, checks
// capacity, and only then writes; a refused change leaves the running state
// as it was.
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
)

// Overlay is the run-time changes made with shuntctl, kept in StateFile so
// they survive restarts. Entries override configured ones by name.
type Overlay struct {
	Services        []ServiceConfig `json:"services,omitempty"`
	DeletedServices []string        `json:"deletedServices,omitempty"`
	Pods            []mesh.Pod      `json:"pods,omitempty"`
	DeletedPods     []string        `json:"deletedPods,omitempty"`
}

// Agent is a running shuntd.
type Agent struct {
	cfg        Config
	log        *slog.Logger
	dp         *datapath.Datapath
	hostCookie uint64
	metrics    *metrics

	mu      sync.Mutex
	base    *mesh.State
	overlay Overlay
	applied *mesh.State
	ids     map[string]uint32 // service name -> datapath id
	cookies map[string]podCookie
	started time.Time
	xdp     *xdpState // north-south load balancer (xdp_linux.go); nil until used
}

type podCookie struct {
	netns  string
	cookie uint64
}

// New loads the datapath (adopting pinned state), and reconciles it to the
// configured state plus the persisted run-time changes.
func New(cfg Config, log *slog.Logger, reg prometheus.Registerer) (*Agent, error) {
	cfg = cfg.WithDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Datapath.Cgroup == "" {
		root, err := CgroupV2Root()
		if err != nil {
			return nil, err
		}
		cfg.Datapath.Cgroup = root
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	base, err := cfg.State()
	if err != nil {
		return nil, err
	}
	host, err := datapath.NetNSCookie(cfg.HostNetNS)
	if err != nil {
		return nil, fmt.Errorf("hostNetNS: %w", err)
	}
	a := &Agent{cfg: cfg, log: log, hostCookie: host, base: base, ids: map[string]uint32{},
		cookies: map[string]podCookie{}, applied: &mesh.State{}, started: time.Now()}
	if err := a.loadOverlay(); err != nil {
		return nil, err
	}
	dp, err := datapath.Open(cfg.Datapath, log)
	if err != nil {
		return nil, err
	}
	a.dp = dp
	a.metrics = newMetrics(a)
	if reg != nil {
		if err := reg.Register(a.metrics); err != nil {
			dp.Close()
			return nil, fmt.Errorf("register metrics: %w", err)
		}
		if err := reg.Register(newXDPCollector(a)); err != nil {
			dp.Close()
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	log.Info("datapath loaded", "cgroup", cfg.Datapath.Cgroup, "bpffs", cfg.Datapath.Root, "adopted", dp.Adopted, "layout", datapath.LayoutVersion)
	a.mu.Lock()
	err = a.applyLocked(merge(base, a.overlay))
	a.mu.Unlock()
	if err != nil {
		a.closeXDP()
		dp.Close()
		return nil, fmt.Errorf("initial reconcile: %w", err)
	}
	return a, nil
}

// Close releases the agent's handles; the datapath stays attached and keeps
// translating with the last written state.
func (a *Agent) Close() error {
	a.closeXDP()
	return a.dp.Close()
}

// Datapath exposes the loaded datapath (status, tests).
func (a *Agent) Datapath() *datapath.Datapath { return a.dp }

// Config returns the effective configuration.
func (a *Agent) Config() Config { return a.cfg }

func (a *Agent) loadOverlay() error {
	data, err := os.ReadFile(a.cfg.StateFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read state file: %w", err)
	}
	if err := json.Unmarshal(data, &a.overlay); err != nil {
		return fmt.Errorf("state file %s is corrupt: %w (move it away to start from the configuration only)", a.cfg.StateFile, err)
	}
	return nil
}

// saveOverlay writes o atomically (temp file + rename).
func (a *Agent) saveOverlay(o Overlay) error {
	if err := os.MkdirAll(filepath.Dir(a.cfg.StateFile), 0o700); err != nil {
		return fmt.Errorf("state file: %w", err)
	}
	data, err := json.MarshalIndent(o, "", "  ")
	if err != nil {
		return err
	}
	tmp := a.cfg.StateFile + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("state file: %w", err)
	}
	if err := os.Rename(tmp, a.cfg.StateFile); err != nil {
		return fmt.Errorf("state file: %w", err)
	}
	return nil
}

// merge applies overlay o on top of base.
func merge(base *mesh.State, o Overlay) *mesh.State {
	out := &mesh.State{}
	over := map[string]bool{}
	for _, n := range o.DeletedServices {
		over[n] = true
	}
	var extra []mesh.Service
	for i, sc := range o.Services {
		over[sc.Name] = true
		// Overlay entries were validated when they were accepted.
		s, err := sc.Service(fmt.Sprintf("overlay.services[%d]", i))
		if err == nil {
			extra = append(extra, s)
		}
	}
	for _, s := range base.Services {
		if !over[s.Name] {
			out.Services = append(out.Services, s)
		}
	}
	out.Services = append(out.Services, extra...)
	overPods := map[string]bool{}
	for _, n := range o.DeletedPods {
		overPods[n] = true
	}
	for _, p := range o.Pods {
		overPods[p.Name] = true
	}
	for _, p := range base.Pods {
		if !overPods[p.Name] {
			out.Pods = append(out.Pods, p)
		}
	}
	out.Pods = append(out.Pods, o.Pods...)
	return out
}

// DatapathServices translates the model into the datapath's services.
func DatapathServices(st *mesh.State) []datapath.Service {
	out := make([]datapath.Service, 0, len(st.Services))
	for i := range st.Services {
		s := &st.Services[i]
		set := s.ActiveSet()
		idx := ExpandSlots(set, datapath.MaxSlotsPerService)
		ds := datapath.Service{Frontend: datapath.MakeAddr(s.Frontend.Addr, s.Frontend.Proto), Slots: make([]datapath.Addr, len(idx))}
		for j, k := range idx {
			ds.Slots[j] = datapath.MakeAddr(set[k].Addr, s.Frontend.Proto)
		}
		out = append(out, ds)
	}
	return out
}

func socklbMode(m mesh.HostNSOnly) uint8 {
	switch m {
	case mesh.Bypass:
		return uint8(bpf.SockmeshSocklbModeSOCKLB_BYPASS)
	case mesh.Translate:
		return uint8(bpf.SockmeshSocklbModeSOCKLB_TRANSLATE)
	}
	return uint8(bpf.SockmeshSocklbModeSOCKLB_INHERIT)
}

// applyLocked reconciles the datapath to st. Nothing is written unless st is
// valid, every pod's netns resolves and the maps have room.
func (a *Agent) applyLocked(st *mesh.State) error {
	err := a.applyInner(st)
	a.metrics.reconcile(err)
	if err != nil {
		a.log.Warn("reconcile refused", "err", err)
	}
	return err
}

func (a *Agent) applyInner(st *mesh.State) error {
	if err := st.Validate(); err != nil {
		return err
	}
	cookies := map[string]podCookie{}
	pods := map[uint64]datapath.PodInfo{}
	for i, p := range st.Pods {
		pc, ok := a.cookies[p.Name]
		if !ok || pc.netns != p.NetNS {
			c, err := datapath.NetNSCookie(p.NetNS)
			if err != nil {
				return &mesh.FieldError{Field: fmt.Sprintf("pods[%d].netns", i), Msg: err.Error()}
			}
			pc = podCookie{netns: p.NetNS, cookie: c}
		}
		if other, dup := pods[pc.cookie]; dup {
			return &mesh.FieldError{Field: fmt.Sprintf("pods[%d].netns", i), Msg: fmt.Sprintf("network namespace already enrolled as pod id %d", other.Id)}
		}
		cookies[p.Name] = pc
		pods[pc.cookie] = datapath.PodInfo{Id: uint32(i + 1), Socklb: socklbMode(p.SocketLB)}
	}
	res, err := a.dp.SyncServices(DatapathServices(st))
	if err != nil {
		return err
	}
	if err := a.dp.SyncPods(pods); err != nil {
		return err
	}
	if err := a.dp.SetConfig(a.hostCookie, a.cfg.SocketLB.HostNamespaceOnly); err != nil {
		return err
	}
	if err := a.syncXDP(st); err != nil { // agent/xdp_linux.go: services with algorithm maglev
		return err
	}
	ids := map[string]uint32{}
	for _, s := range st.Services {
		ids[s.Name] = res.IDs[datapath.MakeAddr(s.Frontend.Addr, s.Frontend.Proto)]
	}
	a.ids = ids
	a.cookies = cookies
	a.applied = st.Clone()
	if res.Added+res.Updated+res.Deleted > 0 {
		a.log.Info("reconciled", "added", res.Added, "updated", res.Updated, "deleted", res.Deleted, "unchanged", res.Unchanged, "pods", len(pods))
	}
	return nil
}

// change applies an overlay edit: the new desired state is reconciled first
// and the overlay is persisted only when that succeeded.
func (a *Agent) change(edit func(o *Overlay)) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	o := cloneOverlay(a.overlay)
	edit(&o)
	if err := a.applyLocked(merge(a.base, o)); err != nil {
		return err
	}
	if err := a.saveOverlay(o); err != nil {
		// The datapath already runs the new state; say so.
		return fmt.Errorf("applied, but not persisted (lost on restart): %w", err)
	}
	a.overlay = o
	return nil
}

func cloneOverlay(o Overlay) Overlay {
	return Overlay{
		Services:        slices.Clone(o.Services),
		DeletedServices: slices.Clone(o.DeletedServices),
		Pods:            slices.Clone(o.Pods),
		DeletedPods:     slices.Clone(o.DeletedPods),
	}
}

func removeName(list []string, name string) []string {
	return slices.DeleteFunc(list, func(s string) bool { return s == name })
}

// UpdateService creates or replaces a service by name.
func (a *Agent) UpdateService(sc ServiceConfig) error {
	if _, err := sc.Service("service"); err != nil {
		return err
	}
	return a.change(func(o *Overlay) {
		o.Services = slices.DeleteFunc(o.Services, func(x ServiceConfig) bool { return x.Name == sc.Name })
		o.Services = append(o.Services, sc)
		o.DeletedServices = removeName(o.DeletedServices, sc.Name)
	})
}

// ErrNotFound is returned for names that do not exist.
var ErrNotFound = errors.New("not found")

// DeleteService removes a service by name.
func (a *Agent) DeleteService(name string) error {
	a.mu.Lock()
	found := slices.ContainsFunc(a.applied.Services, func(s mesh.Service) bool { return s.Name == name })
	a.mu.Unlock()
	if !found {
		return fmt.Errorf("service %q: %w", name, ErrNotFound)
	}
	return a.change(func(o *Overlay) {
		o.Services = slices.DeleteFunc(o.Services, func(x ServiceConfig) bool { return x.Name == name })
		o.DeletedServices = append(removeName(o.DeletedServices, name), name)
	})
}

// UpdatePod enrolls or re-configures a pod by name.
func (a *Agent) UpdatePod(p mesh.Pod) error {
	st := mesh.State{Pods: []mesh.Pod{p}}
	if err := st.Validate(); err != nil {
		return err
	}
	return a.change(func(o *Overlay) {
		o.Pods = slices.DeleteFunc(o.Pods, func(x mesh.Pod) bool { return x.Name == p.Name })
		o.Pods = append(o.Pods, p)
		o.DeletedPods = removeName(o.DeletedPods, p.Name)
	})
}

// DeletePod removes a pod's enrollment.
func (a *Agent) DeletePod(name string) error {
	a.mu.Lock()
	found := slices.ContainsFunc(a.applied.Pods, func(p mesh.Pod) bool { return p.Name == name })
	a.mu.Unlock()
	if !found {
		return fmt.Errorf("pod %q: %w", name, ErrNotFound)
	}
	return a.change(func(o *Overlay) {
		o.Pods = slices.DeleteFunc(o.Pods, func(x mesh.Pod) bool { return x.Name == name })
		o.DeletedPods = append(removeName(o.DeletedPods, name), name)
	})
}

// Resync reconciles the datapath to the current desired state again; it
// repairs drift (entries changed behind the agent's back).
func (a *Agent) Resync() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.dp.Refresh()
	return a.applyLocked(merge(a.base, a.overlay))
}

// Desired returns a copy of the state last applied.
func (a *Agent) Desired() *mesh.State {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.applied.Clone()
}

// ServiceStatus is a service with its datapath id and counters.
type ServiceStatus struct {
	ServiceConfig
	ID           uint32 `json:"id"`
	Slots        int    `json:"slots"`
	Translations uint64 `json:"translations"`
	NoBackend    uint64 `json:"noBackend"`
}

// Services lists the applied services with their counters.
func (a *Agent) Services() ([]ServiceStatus, error) {
	a.mu.Lock()
	st := a.applied.Clone()
	ids := maps.Clone(a.ids)
	a.mu.Unlock()
	out := make([]ServiceStatus, 0, len(st.Services))
	for _, s := range st.Services {
		ss := ServiceStatus{ServiceConfig: ServiceConfigOf(s), ID: ids[s.Name], Slots: len(ExpandSlots(s.ActiveSet(), datapath.MaxSlotsPerService))}
		if c, err := a.dp.ServiceCounters(ss.ID); err == nil {
			ss.Translations, ss.NoBackend = c.Translations, c.NoBackend
		}
		out = append(out, ss)
	}
	slices.SortFunc(out, func(x, y ServiceStatus) int { return cmpString(x.Name, y.Name) })
	return out, nil
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Status is what `shuntctl status` shows.
type Status struct {
	Version           string              `json:"version"`
	LayoutVersion     uint32              `json:"layoutVersion"`
	Cgroup            string              `json:"cgroup"`
	BPFFS             string              `json:"bpffs"`
	Adopted           bool                `json:"adopted"`
	HostNamespaceOnly bool                `json:"hostNamespaceOnly"`
	HostNetNSCookie   uint64              `json:"hostNetNSCookie"`
	Uptime            string              `json:"uptime"`
	Services          int                 `json:"services"`
	Pods              []PodStatus         `json:"pods"`
	Links             []datapath.LinkInfo `json:"links"`
	Maps              []datapath.MapFill  `json:"maps"`
	Counters          map[string]uint64   `json:"counters"`
}

// PodStatus is an enrolled pod.
type PodStatus struct {
	mesh.Pod
	Cookie uint64 `json:"netnsCookie"`
}

// Version is set by the linker.
var Version = "dev"

// Status reports programs, links, maps and their fill.
func (a *Agent) Status() (Status, error) {
	a.mu.Lock()
	st := Status{Version: Version, LayoutVersion: datapath.LayoutVersion, Cgroup: a.cfg.Datapath.Cgroup, BPFFS: a.cfg.Datapath.Root,
		Adopted: a.dp.Adopted, HostNamespaceOnly: a.cfg.SocketLB.HostNamespaceOnly, HostNetNSCookie: a.hostCookie,
		Uptime: time.Since(a.started).Round(time.Second).String(), Services: len(a.applied.Services)}
	for _, p := range a.applied.Pods {
		st.Pods = append(st.Pods, PodStatus{Pod: p, Cookie: a.cookies[p.Name].cookie})
	}
	a.mu.Unlock()
	st.Links = a.dp.Links()
	fill, err := a.dp.Fill()
	if err != nil {
		return st, err
	}
	st.Maps = fill
	g, err := a.dp.GlobalCounters()
	if err != nil {
		return st, err
	}
	st.Counters = map[string]uint64{}
	for i, v := range g {
		st.Counters[StatNames[i]] = v
	}
	return st, nil
}

// Run serves the API and metrics and resyncs periodically until ctx ends.
func (a *Agent) Run(ctx context.Context, reg *prometheus.Registry) error {
	srv, err := a.serve(reg)
	if err != nil {
		return err
	}
	defer srv.close()
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-srv.errs:
			return err
		case <-t.C:
			a.Resync() // errors are logged and counted
		}
	}
}
