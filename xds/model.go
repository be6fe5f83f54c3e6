package xds

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/proto"

	"github.com/shuntmesh/shunt/mesh"
)

// Change is one change to the served mesh services: upserts by name and
// deletions. With Replace, Services is the whole set and every other
// service goes (Delete is ignored).
type Change struct {
	Services []mesh.Service
	Delete   []string
	Replace  bool
}

// Empty tells whether c changes nothing.
func (c *Change) Empty() bool { return !c.Replace && len(c.Services)+len(c.Delete) == 0 }

// model is the incremental translation of the mesh services into xDS
// resources. A change costs in proportion to its size: only the changed
// services are validated and translated, and the objects of a service are
// rebuilt only when their inputs changed (an endpoint change builds one
// ClusterLoadAssignment). The exceptions are inherent to the resources: the
// sidecar's virtualOutbound listener holds one filter chain per TCP
// service, so adding, removing or re-addressing a service rebuilds that one
// listener (its chains are reused).
//
// Name collisions (two services deriving the same cluster or API listener
// name) are resolved as a fresh translation would: the claimant whose mesh
// name sorts first owns the name; the others get the fallback cluster name
// and no API listener. When the owner goes, the next claimant is
// re-translated and takes the name over.
//
// prepare computes a change without touching the model, so a refused change
// (invalid service, frontend collision) leaves everything as it was; commit
// makes it current.
type model struct {
	opts Options
	svcs map[string]*svcOut // by mesh name

	fronts         map[mesh.Frontend]string
	clusterClaims  map[string][]string // primary cluster name -> claimants, sorted
	listenerClaims map[string][]string // primary API listener name -> claimants, sorted
	v6             int                 // TCP services with an IPv6 frontend
	warned         int                 // services with translation warnings

	inbound, outbound *listenerv3.Listener
	passthrough       []*clusterv3.Cluster
}

// svcOut is the translation of one service.
type svcOut struct {
	svc      mesh.Service // a copy, with its own backend slice
	pcn, pln string       // the names it claims ("" pln: UDP, no API listener)
	cn, ln   string       // the names it got ("" ln: none)
	warnings []string
	cluster  *clusterv3.Cluster
	cla      *endpointv3.ClusterLoadAssignment
	chain    *listenerv3.FilterChain // nil for UDP
	api      *listenerv3.Listener    // nil without API listener
	route    *routev3.RouteConfiguration
}

func newModel(opts Options) *model {
	opts = opts.withDefaults()
	return &model{
		opts:           opts,
		svcs:           map[string]*svcOut{},
		fronts:         map[mesh.Frontend]string{},
		clusterClaims:  map[string][]string{},
		listenerClaims: map[string][]string{},
		passthrough: []*clusterv3.Cluster{
			passthroughCluster(PassthroughClusterName, opts),
			passthroughCluster(InboundPassthroughCluster, opts),
		},
	}
}

// plan is a prepared change.
type plan struct {
	m       *model
	outs    map[string]*svcOut // new translations, by mesh name
	dels    map[string]bool    // services removed
	cClaims map[string][]string
	lClaims map[string][]string
	fronts  map[mesh.Frontend]string // frontend -> service, "" = released
	v6      int

	inbound, outbound *listenerv3.Listener // nil: unchanged
	first             bool                 // the model had no listeners yet
}

// diff is what a plan changes per cache key: resources to upsert by name
// (possibly the same objects as before; the server skips those) and
// names to delete.
type diff struct {
	up  map[string]map[string]types.Resource
	del map[string][]string
}

// prepare validates ch and translates what it changes. rebuild forces a
// fresh translation of every service (nothing reused).
func (m *model) prepare(ch Change, rebuild bool) (*plan, error) {
	p := &plan{m: m, outs: map[string]*svcOut{}, dels: map[string]bool{},
		cClaims: map[string][]string{}, lClaims: map[string][]string{}, fronts: map[mesh.Frontend]string{}, v6: m.v6,
		first: m.outbound == nil}

	up := make(map[string]*mesh.Service, len(ch.Services))
	for i := range ch.Services {
		s := &ch.Services[i]
		if _, dup := up[s.Name]; dup {
			return nil, &mesh.FieldError{Field: svcField(s.Name, "name"), Msg: "duplicate service name"}
		}
		up[s.Name] = s
	}
	if ch.Replace {
		for n := range m.svcs {
			if up[n] == nil {
				p.dels[n] = true
			}
		}
	} else {
		for _, n := range ch.Delete {
			if up[n] != nil {
				return nil, &mesh.FieldError{Field: svcField(n, "name"), Msg: "both updated and deleted"}
			}
			if m.svcs[n] != nil {
				p.dels[n] = true
			}
		}
	}
	names := make([]string, 0, len(up))
	for n, s := range up {
		if cur := m.svcs[n]; cur != nil && !rebuild && sameService(&cur.svc, s) {
			continue
		}
		names = append(names, n)
	}
	slices.Sort(names) // deterministic errors
	for _, n := range names {
		if err := up[n].Validate(fmt.Sprintf("services[%s]", n)); err != nil {
			return nil, err
		}
	}

	// Frontends: release those of removed services and the old ones of
	// changed services, then claim the new ones.
	release := func(cur *svcOut) {
		f := cur.svc.Frontend
		if m.fronts[f] == cur.svc.Name {
			p.fronts[f] = ""
		}
		if cur.chain != nil && f.Addr.Addr().Is6() {
			p.v6--
		}
	}
	for n := range p.dels {
		release(m.svcs[n])
	}
	for _, n := range names {
		if cur := m.svcs[n]; cur != nil {
			release(cur)
		}
	}
	for _, n := range names {
		f := up[n].Frontend
		owner, changed := p.fronts[f]
		if !changed {
			owner = m.fronts[f]
		}
		if owner != "" {
			return nil, &mesh.FieldError{Field: svcField(n, "frontend"), Msg: fmt.Sprintf("frontend %s already used by service %q", f, owner)}
		}
		p.fronts[f] = n
		if f.Proto != mesh.UDP && f.Addr.Addr().Is6() {
			p.v6++
		}
	}

	// Names: withdraw the claims of removed and changed services, file the
	// new ones, and re-translate every claimant of a name whose claimants
	// changed (its owner may have changed).
	touched := map[string]*mesh.Service{}
	for _, n := range names {
		touched[n] = up[n]
	}
	affectedC, affectedL := map[string]bool{}, map[string]bool{}
	withdraw := func(cur *svcOut) {
		p.unclaim(p.cClaims, m.clusterClaims, cur.pcn, cur.svc.Name)
		affectedC[cur.pcn] = true
		if cur.pln != "" {
			p.unclaim(p.lClaims, m.listenerClaims, cur.pln, cur.svc.Name)
			affectedL[cur.pln] = true
		}
	}
	for n := range p.dels {
		withdraw(m.svcs[n])
	}
	for _, n := range names {
		if cur := m.svcs[n]; cur != nil {
			withdraw(cur)
		}
		pcn, pln := m.primaryNames(up[n])
		p.claim(p.cClaims, m.clusterClaims, pcn, n)
		affectedC[pcn] = true
		if pln != "" {
			p.claim(p.lClaims, m.listenerClaims, pln, n)
			affectedL[pln] = true
		}
	}
	for c := range affectedC {
		for _, n := range p.claims(p.cClaims, m.clusterClaims, c) {
			if touched[n] == nil {
				touched[n] = &m.svcs[n].svc
			}
		}
	}
	for l := range affectedL {
		for _, n := range p.claims(p.lClaims, m.listenerClaims, l) {
			if touched[n] == nil {
				touched[n] = &m.svcs[n].svc
			}
		}
	}
	if rebuild {
		for n, cur := range m.svcs {
			if touched[n] == nil && !p.dels[n] {
				touched[n] = &cur.svc
			}
		}
	}

	chainsChanged := false
	for n := range p.dels {
		chainsChanged = chainsChanged || m.svcs[n].chain != nil
	}
	for n, svc := range touched {
		prev := m.svcs[n]
		if rebuild {
			prev = nil
		}
		out, err := p.translate(svc, prev)
		if err != nil {
			return nil, err
		}
		p.outs[n] = out
		if cur := m.svcs[n]; (cur == nil && out.chain != nil) || (cur != nil && cur.chain != out.chain) {
			chainsChanged = true
		}
	}

	v6, wasV6 := p.v6 > 0, m.v6 > 0
	if p.first || rebuild || v6 != wasV6 {
		p.inbound = inboundListener(v6)
		if err := validateDeep(p.inbound); err != nil {
			return nil, fmt.Errorf("xds: generated listener %q is invalid: %w", p.inbound.GetName(), err)
		}
	}
	if p.first || rebuild || v6 != wasV6 || chainsChanged {
		// The chains were validated one by one when built: validate the
		// listener without them instead of walking every chain again.
		if err := validateDeep(outboundListener(nil, v6)); err != nil {
			return nil, fmt.Errorf("xds: generated listener %q is invalid: %w", OutboundListenerName, err)
		}
		p.outbound = outboundListener(p.chains(), v6)
	}
	return p, nil
}

// sameService tells whether two services translate identically.
func sameService(a, b *mesh.Service) bool {
	return a.Name == b.Name && a.Frontend == b.Frontend && a.Algorithm == b.Algorithm &&
		a.Mode == b.Mode && slices.Equal(a.Backends, b.Backends)
}

func svcField(name, f string) string { return fmt.Sprintf("services[%s].%s", name, f) }

// primaryNames are the cluster and API listener names a service claims.
func (m *model) primaryNames(svc *mesh.Service) (cn, ln string) {
	cn = ClusterName(svc, m.opts.ClusterDomain)
	if svc.Frontend.Proto != mesh.UDP { // tcp_proxy and gRPC are TCP only
		ln = ListenerName(svc, m.opts.ClusterDomain)
	}
	return cn, ln
}

// claims returns the claimants of name as the plan sees them.
func (p *plan) claims(local, base map[string][]string, name string) []string {
	if l, ok := local[name]; ok {
		return l
	}
	return base[name]
}

func (p *plan) claim(local, base map[string][]string, name, svc string) {
	l := slices.Clone(p.claims(local, base, name))
	if i, found := slices.BinarySearch(l, svc); !found {
		l = slices.Insert(l, i, svc)
	}
	local[name] = l
}

func (p *plan) unclaim(local, base map[string][]string, name, svc string) {
	l := slices.Clone(p.claims(local, base, name))
	if i, found := slices.BinarySearch(l, svc); found {
		l = slices.Delete(l, i, i+1)
	}
	local[name] = l
}

// translate builds one service's resources, reusing what prev built from
// the same inputs. Every new object is validated.
func (p *plan) translate(svc *mesh.Service, prev *svcOut) (*svcOut, error) {
	m := p.m
	out := &svcOut{svc: *svc}
	out.svc.Backends = slices.Clone(svc.Backends)
	out.pcn, out.pln = m.primaryNames(svc)
	out.cn = out.pcn
	if owners := p.claims(p.cClaims, m.clusterClaims, out.pcn); len(owners) > 0 && owners[0] != svc.Name {
		out.cn = fallbackClusterName(svc)
		out.warnings = append(out.warnings, fmt.Sprintf("service %q: cluster name %q already used by %q; using %q", svc.Name, out.pcn, owners[0], out.cn))
	}
	if out.pln != "" {
		out.ln = out.pln
		if owners := p.claims(p.lClaims, m.listenerClaims, out.pln); len(owners) > 0 && owners[0] != svc.Name {
			out.ln = ""
			out.warnings = append(out.warnings, fmt.Sprintf("service %q: API listener %q already used by %q; proxyless clients cannot reach this service by name", svc.Name, out.pln, owners[0]))
		}
	}

	// Cluster, filter chain, API listener and route depend on the names,
	// the frontend and the algorithm; the endpoints on names, protocol and
	// backends.
	if prev != nil && prev.cn == out.cn && prev.ln == out.ln &&
		prev.svc.Frontend == svc.Frontend && prev.svc.Algorithm == svc.Algorithm {
		out.cluster, out.chain, out.api, out.route = prev.cluster, prev.chain, prev.api, prev.route
	} else {
		out.cluster = buildCluster(svc, out.cn, m.opts)
		if svc.Frontend.Proto != mesh.UDP {
			out.chain = outboundChain(svc, out.cn)
		}
		if out.ln != "" {
			out.api = apiListener(out.ln, out.cn)
			out.route = routeConfig(svc, out.cn, ServiceHost(svc.Name, m.opts.ClusterDomain))
		}
		built := []proto.Message{out.cluster}
		if out.chain != nil {
			built = append(built, out.chain)
		}
		if out.api != nil {
			built = append(built, out.api, out.route)
		}
		for _, r := range built {
			if err := validateDeep(r); err != nil {
				return nil, fmt.Errorf("xds: service %q: generated %s is invalid: %w", svc.Name, typeName(r), err)
			}
		}
	}
	if prev != nil && prev.cn == out.cn && prev.svc.Frontend.Proto == svc.Frontend.Proto && slices.Equal(prev.svc.Backends, svc.Backends) {
		out.cla = prev.cla
	} else {
		cla, err := buildLoadAssignment(svc, out.cn)
		if err != nil {
			return nil, err
		}
		if err := validateDeep(cla); err != nil {
			return nil, fmt.Errorf("xds: service %q: generated ClusterLoadAssignment is invalid: %w", svc.Name, err)
		}
		out.cla = cla
	}
	return out, nil
}

// current returns the service's translation after the plan.
func (p *plan) current(name string) *svcOut {
	if out := p.outs[name]; out != nil {
		return out
	}
	if p.dels[name] {
		return nil
	}
	return p.m.svcs[name]
}

// names lists the services after the plan, sorted.
func (p *plan) names() []string {
	out := make([]string, 0, len(p.m.svcs)+len(p.outs))
	for n := range p.m.svcs {
		if !p.dels[n] && p.outs[n] == nil {
			out = append(out, n)
		}
	}
	for n := range p.outs {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// chains are the outbound filter chains after the plan, in service order.
func (p *plan) chains() []*listenerv3.FilterChain {
	var out []*listenerv3.FilterChain
	for _, n := range p.names() {
		if c := p.current(n).chain; c != nil {
			out = append(out, c)
		}
	}
	return out
}

// diff lists the resources the plan adds, replaces and removes, per cache.
func (p *plan) diff() *diff {
	d := &diff{up: map[string]map[string]types.Resource{}, del: map[string][]string{}}
	for _, key := range applyOrder {
		d.up[key] = map[string]types.Resource{}
	}
	removed := map[string]map[string]bool{}
	for _, key := range applyOrder {
		removed[key] = map[string]bool{}
	}
	drop := func(o *svcOut) {
		removed[keyEDS][o.cn] = true
		removed[keyCDS][o.cn] = true
		if o.api != nil {
			removed[keyRDS][o.cn] = true
			removed[keyLDSProxyless][o.ln] = true
		}
	}
	for n := range p.dels {
		drop(p.m.svcs[n])
	}
	for n, o := range p.outs {
		if prev := p.m.svcs[n]; prev != nil {
			drop(prev)
		}
		d.up[keyEDS][o.cn] = o.cla
		d.up[keyCDS][o.cn] = o.cluster
		if o.api != nil {
			d.up[keyRDS][o.cn] = o.route
			d.up[keyLDSProxyless][o.ln] = o.api
		}
	}
	if p.first {
		for _, c := range p.m.passthrough {
			d.up[keyCDS][c.GetName()] = c
		}
	}
	if p.inbound != nil {
		d.up[keyLDSSidecar][InboundListenerName] = p.inbound
	}
	if p.outbound != nil {
		d.up[keyLDSSidecar][OutboundListenerName] = p.outbound
	}
	for _, key := range applyOrder {
		for name := range removed[key] {
			if _, kept := d.up[key][name]; !kept {
				d.del[key] = append(d.del[key], name)
			}
		}
		slices.Sort(d.del[key])
	}
	return d
}

// commit makes the plan the model's state.
func (p *plan) commit() {
	m := p.m
	for n := range p.dels {
		if len(m.svcs[n].warnings) > 0 {
			m.warned--
		}
		delete(m.svcs, n)
	}
	for n, o := range p.outs {
		if prev := m.svcs[n]; prev != nil && len(prev.warnings) > 0 {
			m.warned--
		}
		if len(o.warnings) > 0 {
			m.warned++
		}
		m.svcs[n] = o
	}
	for f, n := range p.fronts {
		if n == "" {
			delete(m.fronts, f)
		} else {
			m.fronts[f] = n
		}
	}
	commitClaims(m.clusterClaims, p.cClaims)
	commitClaims(m.listenerClaims, p.lClaims)
	m.v6 = p.v6
	if p.inbound != nil {
		m.inbound = p.inbound
	}
	if p.outbound != nil {
		m.outbound = p.outbound
	}
}

func commitClaims(base, local map[string][]string) {
	for name, l := range local {
		if len(l) == 0 {
			delete(base, name)
		} else {
			base[name] = l
		}
	}
}

// apply prepares and commits ch.
func (m *model) apply(ch Change) error {
	p, err := m.prepare(ch, false)
	if err != nil {
		return err
	}
	p.commit()
	return nil
}

// resources returns everything the model serves, each list sorted by name.
func (m *model) resources() *Resources { return (&plan{m: m}).resources() }

// resources returns everything served after the plan, each list sorted by
// name.
func (p *plan) resources() *Resources {
	r := &Resources{}
	for _, n := range p.names() {
		o := p.current(n)
		r.Clusters = append(r.Clusters, o.cluster)
		r.Endpoints = append(r.Endpoints, o.cla)
		if o.api != nil {
			r.APIListeners = append(r.APIListeners, o.api)
			r.Routes = append(r.Routes, o.route)
		}
		r.Warnings = append(r.Warnings, o.warnings...)
	}
	in, out := p.m.inbound, p.m.outbound
	if p.inbound != nil {
		in = p.inbound
	}
	if p.outbound != nil {
		out = p.outbound
	}
	if out != nil {
		r.SidecarListeners = []*listenerv3.Listener{in, out}
		r.Clusters = append(r.Clusters, p.m.passthrough...)
	}
	byName := func(a, b types.Resource) int {
		return strings.Compare(cache.GetResourceName(a), cache.GetResourceName(b))
	}
	slices.SortFunc(r.SidecarListeners, func(a, b *listenerv3.Listener) int { return byName(a, b) })
	slices.SortFunc(r.APIListeners, func(a, b *listenerv3.Listener) int { return byName(a, b) })
	slices.SortFunc(r.Routes, func(a, b *routev3.RouteConfiguration) int { return byName(a, b) })
	slices.SortFunc(r.Clusters, func(a, b *clusterv3.Cluster) int { return byName(a, b) })
	slices.SortFunc(r.Endpoints, func(a, b *endpointv3.ClusterLoadAssignment) int { return byName(a, b) })
	return r
}

// warnings lists the translation warnings in service order.
func (m *model) warnings() []string {
	if m.warned == 0 {
		return nil
	}
	var out []string
	for _, n := range slices.Sorted(maps.Keys(m.svcs)) {
		out = append(out, m.svcs[n].warnings...)
	}
	return out
}

// newResources returns the objects a plan built, for the test hook.
func (p *plan) newResources() *Resources {
	r := &Resources{}
	for _, o := range p.outs {
		r.Clusters = append(r.Clusters, o.cluster)
		r.Endpoints = append(r.Endpoints, o.cla)
		if o.api != nil {
			r.APIListeners = append(r.APIListeners, o.api)
			r.Routes = append(r.Routes, o.route)
		}
	}
	for _, l := range []*listenerv3.Listener{p.inbound, p.outbound} {
		if l != nil {
			r.SidecarListeners = append(r.SidecarListeners, l)
		}
	}
	return r
}
