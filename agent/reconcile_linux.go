package agent

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/mesh"
)

// SourceConfig is the source of the configuration file plus the run-time
// changes made with shuntctl. Other producers of desired state (Kubernetes)
// use their own source name; a service or pod name belongs to one source.
const SourceConfig = "config"

// Delta is one change to a source's desired state.
type Delta struct {
	Services       []mesh.Service `json:"services,omitempty"`
	DeleteServices []string       `json:"deleteServices,omitempty"`
	Pods           []mesh.Pod     `json:"pods,omitempty"`
	DeletePods     []string       `json:"deletePods,omitempty"`
	// Replace makes Services and Pods the source's whole desired state:
	// whatever else the source had is deleted.
	Replace bool `json:"replace,omitempty"`
}

// Empty tells whether d changes nothing.
func (d *Delta) Empty() bool {
	return !d.Replace && len(d.Services)+len(d.DeleteServices)+len(d.Pods)+len(d.DeletePods) == 0
}

// svcEntry is a desired service with its datapath translation, computed once
// per content change.
type svcEntry struct {
	src string
	svc mesh.Service
	dp  datapath.Service
	id  uint32 // datapath service id (counter index)
}

type podEntry struct {
	src    string
	pod    mesh.Pod
	cookie uint64
	ips    []netip.Addr // pod.IPs, or read from the namespace
	id     uint32
}

// datapathPod is the pod's datapath form.
func (pe *podEntry) datapathPod() datapath.Pod {
	p := datapath.Pod{Info: datapath.PodInfo{Id: pe.id, Socklb: socklbMode(pe.pod.SocketLB), Sockmap: sockmapMode(pe.pod.Sockmap)}, IPs: pe.ips}
	if pe.pod.Sidecar != nil {
		sc := datapath.MakeSidecar(*pe.pod.Sidecar)
		p.Sidecar = &sc
		p.Info.Flags |= datapath.PodFlagSidecar
	}
	return p
}

func sockmapMode(m mesh.SockmapMode) uint8 {
	switch m {
	case mesh.SockmapOn:
		return datapath.SockmapOn
	case mesh.SockmapOff:
		return datapath.SockmapOff
	}
	return datapath.SockmapAuto
}

// desired is the agent's desired state, indexed so that a change costs in
// proportion to its size: services and pods by name, frontends and netns
// cookies for uniqueness.
type desired struct {
	svcs    map[string]*svcEntry
	fronts  map[mesh.Frontend]string
	pods    map[string]*podEntry
	cookies map[uint64]string
	podIPs  map[netip.Addr]string
	podIDs  map[uint32]bool
}

func newDesired() *desired {
	return &desired{svcs: map[string]*svcEntry{}, fronts: map[mesh.Frontend]string{},
		pods: map[string]*podEntry{}, cookies: map[uint64]string{}, podIPs: map[netip.Addr]string{}, podIDs: map[uint32]bool{}}
}

// state returns the desired state as a mesh.State sorted by name.
func (d *desired) state() *mesh.State {
	st := &mesh.State{Services: make([]mesh.Service, 0, len(d.svcs)), Pods: make([]mesh.Pod, 0, len(d.pods))}
	for _, n := range slices.Sorted(maps.Keys(d.svcs)) {
		st.Services = append(st.Services, d.svcs[n].svc)
	}
	for _, n := range slices.Sorted(maps.Keys(d.pods)) {
		st.Pods = append(st.Pods, d.pods[n].pod)
	}
	return st.Clone()
}

// translate computes a service's datapath form: the frontend and the backend
// slots (weights expanded).
func translate(s *mesh.Service) datapath.Service {
	set := s.ActiveSet()
	idx := ExpandSlots(set, datapath.MaxSlotsPerService)
	ds := datapath.Service{Frontend: datapath.MakeAddr(s.Frontend.Addr, s.Frontend.Proto), Slots: make([]datapath.Addr, len(idx)),
		Affinity: s.AffinityTimeout}
	for j, k := range idx {
		ds.Slots[j] = datapath.MakeAddr(set[k].Addr, s.Frontend.Proto)
	}
	return ds
}

// normalized returns d with Replace turned into explicit deletions, and
// entries that change nothing dropped.
func (ds *desired) normalize(src string, d Delta) (Delta, error) {
	out := Delta{}
	upSvc := make(map[string]bool, len(d.Services))
	for i := range d.Services {
		s := &d.Services[i]
		if upSvc[s.Name] {
			return out, &mesh.FieldError{Field: svcField(s.Name, "name"), Msg: "duplicate service name"}
		}
		upSvc[s.Name] = true
		if cur, ok := ds.svcs[s.Name]; ok {
			if cur.src != src {
				return out, &mesh.FieldError{Field: svcField(s.Name, "name"), Msg: fmt.Sprintf("service name already defined by source %q", cur.src)}
			}
			if cur.svc.Equal(s) {
				continue
			}
		}
		out.Services = append(out.Services, *s)
	}
	del := func(name string) error {
		cur, ok := ds.svcs[name]
		if !ok {
			return nil
		}
		if cur.src != src {
			return &mesh.FieldError{Field: svcField(name, "name"), Msg: fmt.Sprintf("service belongs to source %q", cur.src)}
		}
		out.DeleteServices = append(out.DeleteServices, name)
		return nil
	}
	if d.Replace {
		for name, e := range ds.svcs {
			if e.src == src && !upSvc[name] {
				out.DeleteServices = append(out.DeleteServices, name)
			}
		}
	} else {
		for _, name := range d.DeleteServices {
			if upSvc[name] {
				return out, &mesh.FieldError{Field: svcField(name, "name"), Msg: "both updated and deleted"}
			}
			if err := del(name); err != nil {
				return out, err
			}
		}
	}

	upPod := make(map[string]bool, len(d.Pods))
	for _, p := range d.Pods {
		if upPod[p.Name] {
			return out, &mesh.FieldError{Field: podField(p.Name, "name"), Msg: "duplicate pod name"}
		}
		upPod[p.Name] = true
		if cur, ok := ds.pods[p.Name]; ok {
			if cur.src != src {
				return out, &mesh.FieldError{Field: podField(p.Name, "name"), Msg: fmt.Sprintf("pod name already defined by source %q", cur.src)}
			}
			if cur.pod.Equal(&p) {
				continue
			}
		}
		out.Pods = append(out.Pods, p)
	}
	if d.Replace {
		for name, e := range ds.pods {
			if e.src == src && !upPod[name] {
				out.DeletePods = append(out.DeletePods, name)
			}
		}
	} else {
		for _, name := range d.DeletePods {
			if upPod[name] {
				return out, &mesh.FieldError{Field: podField(name, "name"), Msg: "both updated and deleted"}
			}
			cur, ok := ds.pods[name]
			if !ok {
				continue
			}
			if cur.src != src {
				return out, &mesh.FieldError{Field: podField(name, "name"), Msg: fmt.Sprintf("pod belongs to source %q", cur.src)}
			}
			out.DeletePods = append(out.DeletePods, name)
		}
	}
	return out, nil
}

func svcField(name, f string) string { return fmt.Sprintf("services[%s].%s", name, f) }
func podField(name, f string) string { return fmt.Sprintf("pods[%s].%s", name, f) }

// Apply changes the desired state of source src and reconciles the datapath
// to it. The change is all or nothing: it is validated (every changed
// service and pod, unique names across sources, unique frontends and network
// namespaces), pods' namespaces are resolved and map capacity is checked
// before the first write; a refused change leaves the running state as it
// was. It costs in proportion to the change, not to the number of services.
func (a *Agent) Apply(src string, d Delta) error {
	if src == "" {
		return fmt.Errorf("source name must not be empty")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.applyLocked(src, d)
}

func (a *Agent) applyLocked(src string, d Delta) error {
	changed, err := a.applyDelta(src, d)
	a.metrics.reconcile(err)
	var partial *partialError
	if err != nil && !errors.As(err, &partial) {
		a.log.Warn("change refused", "source", src, "err", err)
		return err
	}
	if !changed.Empty() {
		a.notify(changed)
	}
	if err != nil {
		a.log.Warn("change applied to the socket datapath, not (yet) to the XDP load balancer", "source", src, "err", err)
	}
	if d.Replace && a.pending[src] {
		delete(a.pending, src)
		a.log.Info("source synced", "source", src, "services", len(d.Services), "pods", len(d.Pods))
		if len(a.pending) == 0 {
			// Every source is in: entries left by an earlier run that no
			// source wants go now.
			if rerr := a.resyncLocked(); rerr != nil {
				return rerr
			}
		}
	}
	return err
}

// partialError: the change is in the desired state and the socket datapath,
// but a later stage (the XDP load balancer) failed; resync retries it.
type partialError struct{ err error }

func (e *partialError) Error() string { return "applied partially: " + e.err.Error() }
func (e *partialError) Unwrap() error { return e.err }

func (a *Agent) applyDelta(src string, in Delta) (Delta, error) {
	ds := a.state
	d, err := ds.normalize(src, in)
	if err != nil || d.Empty() {
		return d, err
	}

	// Validate the changed services and claim their frontends.
	for i := range d.Services {
		s := &d.Services[i]
		if err := s.Validate(fmt.Sprintf("services[%s]", s.Name)); err != nil {
			return d, err
		}
	}
	released := map[mesh.Frontend]bool{}
	for _, n := range d.DeleteServices {
		released[ds.svcs[n].svc.Frontend] = true
	}
	for i := range d.Services {
		if cur, ok := ds.svcs[d.Services[i].Name]; ok {
			released[cur.svc.Frontend] = true
		}
	}
	claimed := map[mesh.Frontend]string{}
	for i := range d.Services {
		s := &d.Services[i]
		if other, ok := claimed[s.Frontend]; ok {
			return d, &mesh.FieldError{Field: svcField(s.Name, "frontend"), Msg: fmt.Sprintf("frontend %s already used by service %q", s.Frontend.Addr, other)}
		}
		if other, ok := ds.fronts[s.Frontend]; ok && !released[s.Frontend] {
			return d, &mesh.FieldError{Field: svcField(s.Name, "frontend"), Msg: fmt.Sprintf("frontend %s already used by service %q", s.Frontend.Addr, other)}
		}
		claimed[s.Frontend] = s.Name
	}

	// Pods: validate, resolve network namespaces, keep cookies unique.
	podCheck := mesh.State{Pods: d.Pods}
	if err := podCheck.Validate(); err != nil {
		return d, err
	}
	freedCookies := map[uint64]bool{}
	freedIPs := map[netip.Addr]bool{}
	for _, n := range d.DeletePods {
		freedCookies[ds.pods[n].cookie] = true
		for _, ip := range ds.pods[n].ips {
			freedIPs[ip] = true
		}
	}
	newPods := make([]*podEntry, len(d.Pods))
	claimedCookies := map[uint64]string{}
	claimedIPs := map[netip.Addr]string{}
	for i, p := range d.Pods {
		cur := ds.pods[p.Name]
		var cookie uint64
		ips := slices.Clone(p.IPs)
		if cur != nil && cur.pod.NetNS == p.NetNS {
			cookie = cur.cookie
			if len(ips) == 0 {
				ips = cur.ips
			}
		} else {
			c, err := datapath.NetNSCookie(p.NetNS)
			if err != nil {
				return d, &mesh.FieldError{Field: podField(p.Name, "netns"), Msg: err.Error()}
			}
			cookie = c
			if len(ips) == 0 {
				if ips, err = datapath.NetNSAddrs(p.NetNS); err != nil {
					return d, &mesh.FieldError{Field: podField(p.Name, "netns"), Msg: err.Error()}
				}
			}
		}
		if cur != nil {
			freedCookies[cur.cookie] = true
			for _, ip := range cur.ips {
				freedIPs[ip] = true
			}
		}
		for _, ip := range ips {
			if other, ok := claimedIPs[ip]; ok {
				return d, &mesh.FieldError{Field: podField(p.Name, "ips"), Msg: fmt.Sprintf("address %s already belongs to pod %q", ip, other)}
			}
			claimedIPs[ip] = p.Name
		}
		if other, ok := claimedCookies[cookie]; ok {
			return d, &mesh.FieldError{Field: podField(p.Name, "netns"), Msg: fmt.Sprintf("network namespace already enrolled as pod %q", other)}
		}
		claimedCookies[cookie] = p.Name
		p.Sidecar = p.Sidecar.Clone()
		newPods[i] = &podEntry{src: src, pod: p, cookie: cookie, ips: ips}
		if cur != nil {
			newPods[i].id = cur.id
		}
	}
	for c, name := range claimedCookies {
		if other, ok := ds.cookies[c]; ok && other != name && !freedCookies[c] {
			return d, &mesh.FieldError{Field: podField(name, "netns"), Msg: fmt.Sprintf("network namespace already enrolled as pod %q", other)}
		}
	}
	for ip, name := range claimedIPs {
		if other, ok := ds.podIPs[ip]; ok && other != name && !freedIPs[ip] {
			return d, &mesh.FieldError{Field: podField(name, "ips"), Msg: fmt.Sprintf("address %s already belongs to pod %q", ip, other)}
		}
	}
	if n := len(ds.pods) - len(d.DeletePods) + countNew(d.Pods, ds.pods); n > int(a.cfg.Datapath.MaxPods) {
		return d, fmt.Errorf("%w: %d pods, the pods map holds %d (datapath.maxPods)", datapath.ErrCapacity, n, a.cfg.Datapath.MaxPods)
	}

	// Services to the datapath: translate only what changed.
	upsert := make([]datapath.Service, len(d.Services))
	for i := range d.Services {
		upsert[i] = translate(&d.Services[i])
	}
	// Frontends of deleted services, and old frontends of services that
	// moved, go unless another service of this change takes them over.
	remove := make([]datapath.Addr, 0, len(d.DeleteServices))
	for f := range released {
		if _, reused := claimed[f]; !reused {
			remove = append(remove, datapath.MakeAddr(f.Addr, f.Proto))
		}
	}
	res, err := a.dp.UpdateServices(upsert, remove)
	if err != nil {
		if !a.dp.Consistent() {
			a.repairAfter()
		}
		return d, err
	}

	// Pods to the datapath.
	rmCookies := make([]uint64, 0, len(d.DeletePods))
	for _, n := range d.DeletePods {
		if c := ds.pods[n].cookie; claimedCookies[c] == "" {
			rmCookies = append(rmCookies, c)
		}
	}
	for _, pe := range newPods {
		if cur := ds.pods[pe.pod.Name]; cur != nil && cur.cookie != pe.cookie && claimedCookies[cur.cookie] == "" {
			rmCookies = append(rmCookies, cur.cookie)
		}
	}
	var rmIPs []netip.Addr
	for ip := range freedIPs {
		if claimedIPs[ip] == "" {
			rmIPs = append(rmIPs, ip)
		}
	}
	upPods := make(map[uint64]datapath.Pod, len(newPods))
	taken := map[uint32]bool{}
	var pinned map[uint64]datapath.PodInfo // read once, when a pod needs an id
	var held map[uint32]bool               // the ids of pinned
	for _, pe := range newPods {
		if pe.id != 0 {
			upPods[pe.cookie] = pe.datapathPod()
			continue
		}
		if pinned == nil {
			if pinned, err = a.dp.ReadPods(); err != nil {
				a.repairAfter()
				return d, fmt.Errorf("read pods: %w", err)
			}
			held = make(map[uint32]bool, len(pinned))
			for _, p := range pinned {
				held[p.Id] = true
			}
		}
		// A pod the datapath already has (an earlier agent's, adopted)
		// keeps its id and so its counters.
		if old := pinned[pe.cookie].Id; old != 0 && !ds.podIDs[old] && !taken[old] {
			pe.id, taken[old] = old, true
		} else {
			pe.id = ds.allocPodID(taken, held)
			if err := a.dp.ResetPodCounters(pe.id); err != nil {
				a.repairAfter()
				return d, err
			}
		}
		upPods[pe.cookie] = pe.datapathPod()
	}
	if err := a.dp.UpdatePods(upPods, rmCookies, rmIPs); err != nil {
		// The services are written already: put everything back.
		a.repairAfter()
		return d, err
	}

	// Commit to the index.
	for _, n := range d.DeleteServices {
		e := ds.svcs[n]
		if ds.fronts[e.svc.Frontend] == n {
			delete(ds.fronts, e.svc.Frontend)
		}
		delete(ds.svcs, n)
	}
	for i := range d.Services {
		s := d.Services[i]
		s.Backends = slices.Clone(s.Backends)
		if cur, ok := ds.svcs[s.Name]; ok && ds.fronts[cur.svc.Frontend] == s.Name {
			delete(ds.fronts, cur.svc.Frontend)
		}
		ds.svcs[s.Name] = &svcEntry{src: src, svc: s, dp: upsert[i], id: res.IDs[upsert[i].Frontend]}
	}
	for i := range d.Services {
		ds.fronts[d.Services[i].Frontend] = d.Services[i].Name
	}
	forget := func(pe *podEntry) {
		if ds.cookies[pe.cookie] == pe.pod.Name {
			delete(ds.cookies, pe.cookie)
		}
		for _, ip := range pe.ips {
			if ds.podIPs[ip] == pe.pod.Name {
				delete(ds.podIPs, ip)
			}
		}
	}
	for _, n := range d.DeletePods {
		forget(ds.pods[n])
		delete(ds.podIDs, ds.pods[n].id)
		delete(ds.pods, n)
	}
	for _, pe := range newPods {
		if cur := ds.pods[pe.pod.Name]; cur != nil {
			forget(cur)
		}
		ds.pods[pe.pod.Name] = pe
	}
	for _, pe := range newPods {
		ds.cookies[pe.cookie] = pe.pod.Name
		for _, ip := range pe.ips {
			ds.podIPs[ip] = pe.pod.Name
		}
		ds.podIDs[pe.id] = true
	}
	// The north-south load balancer takes the services with algorithm
	// maglev (agent/xdp_linux.go). The socket datapath has the change
	// already; a failure here is returned and retried by the next resync.
	if len(d.Services)+len(d.DeleteServices) > 0 && a.cfg.XDP.Enabled() {
		if err := a.syncXDP(ds.state(), false); err != nil {
			return d, &partialError{err}
		}
	}
	if res.Added+res.Updated+res.Deleted > 0 || len(upPods)+len(rmCookies) > 0 {
		a.log.Debug("reconciled", "source", src, "added", res.Added, "updated", res.Updated, "deleted", res.Deleted,
			"podsWritten", len(upPods), "podsDeleted", len(rmCookies))
	}
	return d, nil
}

func countNew(pods []mesh.Pod, cur map[string]*podEntry) int {
	n := 0
	for _, p := range pods {
		if _, ok := cur[p.Name]; !ok {
			n++
		}
	}
	return n
}

// allocPodID returns the lowest pod id that is neither in use, nor in taken,
// nor held by a pod entry in the datapath (an adopted pod that may come back
// and keep it), and adds it to taken.
func (ds *desired) allocPodID(taken, held map[uint32]bool) uint32 {
	for id := uint32(1); ; id++ {
		if !ds.podIDs[id] && !taken[id] && !held[id] {
			taken[id] = true
			return id
		}
	}
}

// repairAfter restores the maps to the (unchanged) desired state after a
// write failed half way. Capacity refusals are found before the first write,
// so this is for the unexpected (ENOMEM, a map removed behind our back).
func (a *Agent) repairAfter() {
	if rerr := a.resyncLocked(); rerr != nil {
		a.log.Error("datapath repair failed: resync retries periodically", "err", rerr)
	}
}

// resyncLocked rewrites the whole datapath from the desired state: it reads
// the kernel maps again and repairs any drift (entries changed or removed
// behind the agent's back).
func (a *Agent) resyncLocked() error {
	ds := a.state
	a.dp.Refresh()
	svcs := make([]datapath.Service, 0, len(ds.svcs))
	names := make([]string, 0, len(ds.svcs))
	for n, e := range ds.svcs {
		svcs = append(svcs, e.dp)
		names = append(names, n)
	}
	// While a source is pending, entries nobody asked for may be its own
	// (pinned by an earlier run): keep them.
	keep := len(a.pending) > 0
	var res datapath.SyncResult
	var err error
	if keep {
		res, err = a.dp.UpdateServices(svcs, nil)
	} else {
		res, err = a.dp.SyncServices(svcs)
	}
	if err == nil {
		for i, n := range names {
			ds.svcs[n].id = res.IDs[svcs[i].Frontend]
		}
		pods := make(map[uint64]datapath.Pod, len(ds.pods))
		for _, pe := range ds.pods {
			pods[pe.cookie] = pe.datapathPod()
		}
		if keep {
			err = a.dp.UpdatePods(pods, nil, nil)
		} else {
			err = a.dp.SyncPods(pods)
		}
	}
	if err == nil {
		err = a.dp.SetConfig(a.hostCookie, a.cfg.SocketLB.HostNamespaceOnly, a.sockmapSafe())
	}
	if err == nil {
		err = a.syncXDP(ds.state(), true)
	}
	a.metrics.reconcile(err)
	if err != nil {
		a.log.Warn("resync failed", "err", err)
		return err
	}
	if res.Added+res.Updated+res.Deleted > 0 {
		a.log.Info("resync repaired drift", "added", res.Added, "updated", res.Updated, "deleted", res.Deleted)
	}
	return nil
}

// Subscribe registers fn to be called after every change that reached the
// datapath, in order, with what changed (never Replace). fn is first called
// with the whole current state (Replace set). fn runs with the agent's lock
// held: it must be quick and must not call back into the agent.
func (a *Agent) Subscribe(fn func(Delta)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.state.state()
	fn(Delta{Services: st.Services, Pods: st.Pods, Replace: true})
	a.subs = append(a.subs, fn)
}

func (a *Agent) notify(d Delta) {
	for _, fn := range a.subs {
		fn(d)
	}
}
