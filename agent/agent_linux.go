// Package agent is shuntd: it owns the desired state (configuration file,
// run-time changes from shuntctl, Kubernetes), reconciles the kernel maps to
// it through agent/datapath, serves the local API and the metrics.
//
// One desired state, one reconcile path. Producers of desired state are
// sources ("config" = file + shuntctl; "kubernetes"); each change is a Delta
// of one source, applied by Agent.Apply: the changed services and pods are
// validated, uniqueness is checked against indexes, pods' namespaces are
// resolved and map capacity is checked, and only then are the maps written —
// a refused change leaves the running state as it was. A change costs in
// proportion to its size: each service's datapath form is computed once per
// content change and unchanged entries are never rewritten. A periodic
// resync rewrites the maps from the desired state to repair drift.
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
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
	state   *desired
	subs    []func(Delta)
	started time.Time
	// selfTest is the sockmap self-test's result on this kernel; auto
	// accelerates nothing unless it passed.
	selfTest datapath.SelfTestResult
	xds      *xdsRun   // StartXDS (agent/xds_linux.go)
	xdp      *xdpState // north-south load balancer (xdp_linux.go); nil until used
	// pending are the sources expected (Kubernetes when configured) that
	// have not yet delivered their whole state (a Replace delta). Until
	// they have, resyncs leave map entries nobody asked for alone: they
	// may be the pending source's, pinned by an earlier run.
	pending map[string]bool
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
	a := &Agent{cfg: cfg, log: log, hostCookie: host, base: base, state: newDesired(), started: time.Now(), pending: map[string]bool{}}
	if cfg.Kubernetes != nil {
		a.pending[SourceKubernetes] = true
	}
	if err := a.loadOverlay(); err != nil {
		return nil, err
	}
	dp, err := datapath.Open(cfg.Datapath, log)
	if err != nil {
		return nil, err
	}
	a.dp = dp
	a.selfTest = dp.SelfTest()
	if a.selfTest.Passed {
		log.Info("sockmap self-test passed: sockmap auto accelerates sidecar-to-sidecar connections")
	} else {
		log.Warn("sockmap self-test failed: sockmap auto accelerates nothing on this kernel", "checks", a.selfTest.Checks)
	}
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
	// Take the configured state, then rewrite the maps from it: whatever
	// an earlier run left that is no longer wanted goes — once every
	// expected source has delivered its state (see pending).
	a.mu.Lock()
	err = a.applyLocked(SourceConfig, a.configDelta())
	if err == nil {
		err = a.resyncLocked()
	}
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
	data, err := json.Marshal(o)
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

func socklbMode(m mesh.HostNSOnly) uint8 {
	switch m {
	case mesh.Bypass:
		return uint8(bpf.SockmeshSocklbModeSOCKLB_BYPASS)
	case mesh.Translate:
		return uint8(bpf.SockmeshSocklbModeSOCKLB_TRANSLATE)
	}
	return uint8(bpf.SockmeshSocklbModeSOCKLB_INHERIT)
}

func (a *Agent) sockmapSafe() bool { return a.selfTest.Passed }

// configDelta is the configuration source's whole desired state: the file
// plus the run-time changes.
func (a *Agent) configDelta() Delta {
	st := merge(a.base, a.overlay)
	return Delta{Services: st.Services, Pods: st.Pods, Replace: true}
}

// change applies an overlay edit: the new desired state is reconciled first
// and the overlay is persisted only when that succeeded.
func (a *Agent) change(d Delta, edit func(o *Overlay)) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	o := cloneOverlay(a.overlay)
	edit(&o)
	if err := a.applyLocked(SourceConfig, d); err != nil {
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
	svc, err := sc.Service("service")
	if err != nil {
		return err
	}
	return a.change(Delta{Services: []mesh.Service{svc}}, func(o *Overlay) {
		o.Services = slices.DeleteFunc(o.Services, func(x ServiceConfig) bool { return x.Name == sc.Name })
		o.Services = append(o.Services, sc)
		o.DeletedServices = removeName(o.DeletedServices, sc.Name)
	})
}

// ErrNotFound is returned for names that do not exist.
var ErrNotFound = errors.New("not found")

// DeleteService removes a service by name.
func (a *Agent) DeleteService(name string) error {
	if err := a.owned(name, false); err != nil {
		return err
	}
	return a.change(Delta{DeleteServices: []string{name}}, func(o *Overlay) {
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
	return a.change(Delta{Pods: []mesh.Pod{p}}, func(o *Overlay) {
		o.Pods = slices.DeleteFunc(o.Pods, func(x mesh.Pod) bool { return x.Name == p.Name })
		o.Pods = append(o.Pods, p)
		o.DeletedPods = removeName(o.DeletedPods, p.Name)
	})
}

// DeletePod removes a pod's enrollment.
func (a *Agent) DeletePod(name string) error {
	if err := a.owned(name, true); err != nil {
		return err
	}
	return a.change(Delta{DeletePods: []string{name}}, func(o *Overlay) {
		o.Pods = slices.DeleteFunc(o.Pods, func(x mesh.Pod) bool { return x.Name == name })
		o.DeletedPods = append(removeName(o.DeletedPods, name), name)
	})
}

// Resync reconciles the datapath to the current desired state again; it
// repairs drift (entries changed behind the agent's back).
func (a *Agent) Resync() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.applyLocked(SourceConfig, a.configDelta()); err != nil {
		return err
	}
	return a.resyncLocked()
}

// owned checks that a service (or pod) exists and belongs to the
// configuration source, the only one shuntctl may change.
func (a *Agent) owned(name string, pod bool) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	kind, src, ok := "service", "", false
	if pod {
		kind = "pod"
		if e := a.state.pods[name]; e != nil {
			src, ok = e.src, true
		}
	} else if e := a.state.svcs[name]; e != nil {
		src, ok = e.src, true
	}
	if !ok {
		return fmt.Errorf("%s %q: %w", kind, name, ErrNotFound)
	}
	if src != SourceConfig {
		return fmt.Errorf("%s %q is managed by %s; change it there", kind, name, src)
	}
	return nil
}

// Desired returns a copy of the desired state (all sources), sorted by name.
func (a *Agent) Desired() *mesh.State {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.state.state()
}

// ServiceStatus is a service with its datapath id and counters.
type ServiceStatus struct {
	ServiceConfig
	Source       string `json:"source"`
	ID           uint32 `json:"id"`
	Slots        int    `json:"slots"`
	Translations uint64 `json:"translations"`
	NoBackend    uint64 `json:"noBackend"`
}

// Services lists the applied services with their counters.
func (a *Agent) Services() ([]ServiceStatus, error) {
	a.mu.Lock()
	out := make([]ServiceStatus, 0, len(a.state.svcs))
	for _, e := range a.state.svcs {
		out = append(out, ServiceStatus{ServiceConfig: ServiceConfigOf(e.svc), Source: e.src, ID: e.id, Slots: len(e.dp.Slots)})
	}
	a.mu.Unlock()
	for i := range out {
		ss := &out[i]
		if c, err := a.dp.ServiceCounters(ss.ID); err == nil {
			ss.Translations, ss.NoBackend = c.Translations, c.NoBackend
		}
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
	Version           string                  `json:"version"`
	LayoutVersion     uint32                  `json:"layoutVersion"`
	Cgroup            string                  `json:"cgroup"`
	BPFFS             string                  `json:"bpffs"`
	Adopted           bool                    `json:"adopted"`
	HostNamespaceOnly bool                    `json:"hostNamespaceOnly"`
	HostNetNSCookie   uint64                  `json:"hostNetNSCookie"`
	Uptime            string                  `json:"uptime"`
	Services          int                     `json:"services"`
	PendingSources    []string                `json:"pendingSources,omitempty"`
	Pods              []PodStatus             `json:"pods"`
	Links             []datapath.LinkInfo     `json:"links"`
	Maps              []datapath.MapFill      `json:"maps"`
	Counters          map[string]uint64       `json:"counters"`
	SockmapSelfTest   datapath.SelfTestResult `json:"sockmapSelfTest"`
}

// PodStatus is an enrolled pod.
type PodStatus struct {
	mesh.Pod
	Source string `json:"source"`
	ID     uint32 `json:"id"`
	Cookie uint64 `json:"netnsCookie"`
	// IPs are the addresses in use (given or read from the namespace).
	Addrs []netip.Addr `json:"addrs,omitempty"`
	// Counters are the pod's datapath counters by name (steering,
	// original-destination answers, sockmap).
	Counters map[string]uint64 `json:"counters,omitempty"`
}

// Version is set by the linker.
var Version = "dev"

// Status reports programs, links, maps and their fill.
func (a *Agent) Status() (Status, error) {
	a.mu.Lock()
	st := Status{Version: Version, LayoutVersion: datapath.LayoutVersion, Cgroup: a.cfg.Datapath.Cgroup, BPFFS: a.cfg.Datapath.Root,
		Adopted: a.dp.Adopted, HostNamespaceOnly: a.cfg.SocketLB.HostNamespaceOnly, HostNetNSCookie: a.hostCookie,
		Uptime: time.Since(a.started).Round(time.Second).String(), Services: len(a.state.svcs),
		PendingSources: slices.Sorted(maps.Keys(a.pending)), SockmapSelfTest: a.selfTest}
	for _, n := range slices.Sorted(maps.Keys(a.state.pods)) {
		e := a.state.pods[n]
		st.Pods = append(st.Pods, PodStatus{Pod: e.pod, Source: e.src, ID: e.id, Cookie: e.cookie, Addrs: e.ips})
	}
	a.mu.Unlock()
	for i := range st.Pods {
		if c, err := a.dp.PodCounters(st.Pods[i].ID); err == nil {
			st.Pods[i].Counters = map[string]uint64{}
			for j, v := range c {
				st.Pods[i].Counters[PodStatNames[j]] = v
			}
		}
	}
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
