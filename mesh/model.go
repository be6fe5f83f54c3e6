// Package mesh is Shunt's pure model of what the datapath should do: services
// (one frontend each), their backends, enrolled pods and the per-pod modes.
//
// It imports no kernel, Kubernetes or gRPC package and builds on any OS. The
// Kubernetes informers and the standalone YAML both produce a State; the agent
// reconciles the kernel maps and the xDS snapshot from it.
package mesh

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
)

// Protocol is the L4 protocol of a frontend.
type Protocol string

const (
	TCP Protocol = "TCP"
	UDP Protocol = "UDP"
)

// ParseProtocol accepts tcp/udp in any case; empty means TCP.
func ParseProtocol(s string) (Protocol, error) {
	switch strings.ToUpper(s) {
	case "", "TCP":
		return TCP, nil
	case "UDP":
		return UDP, nil
	}
	return "", fmt.Errorf("unknown protocol %q (want TCP or UDP)", s)
}

// Algorithm selects how a backend is chosen for a new connection.
type Algorithm string

const (
	// Random is weighted random selection at connect time (the default).
	Random Algorithm = "random"
	// Maglev is consistent hashing; used by the north-south XDP path.
	Maglev Algorithm = "maglev"
)

// ForwardingMode applies to the north-south XDP path.
type ForwardingMode string

const (
	SNAT   ForwardingMode = "snat"
	DSR    ForwardingMode = "dsr"
	Hybrid ForwardingMode = "hybrid" // TCP via DSR, UDP via SNAT
)

// Dispatch selects how the north-south XDP load balancer carries a DSR
// packet to its backend; the backend side (dsr) undoes it.
type Dispatch string

const (
	// IPIP encapsulates (IPIP, IP6IP6, 4in6, 6in4 by the families of the
	// service and of the backend's tunnel address); the inner packet is
	// unchanged. The default.
	IPIP Dispatch = "ipip"
	// Geneve encapsulates in Geneve (UDP 6081) with the service VIP:port in
	// a Geneve option; the inner packet is addressed to the backend.
	Geneve Dispatch = "geneve"
	// IPOption addresses the packet to the backend and carries the service
	// VIP:port in an IPv4 option (IPv6: a destination option). Some routers
	// drop packets with options.
	IPOption Dispatch = "opt"
)

// BackendState is the lifecycle state of an endpoint.
type BackendState string

const (
	// Active backends take new connections in proportion to their weight.
	Active BackendState = "active"
	// Terminating backends are used only when no active backend is left.
	Terminating BackendState = "terminating"
)

// MaxWeight is the largest backend weight accepted.
const MaxWeight = 65535

// MaxBackendsPerService bounds the backends of one service.
const MaxBackendsPerService = 4096

// Backend is one endpoint of a service.
type Backend struct {
	Addr netip.AddrPort `json:"addr"`
	// Weight is relative; 0 means drain: no new connections, existing ones
	// are untouched. Nil in config means 1.
	Weight uint32       `json:"weight"`
	State  BackendState `json:"state,omitempty"`
	// Name optionally identifies the backend (pod name, node name).
	Name string `json:"name,omitempty"`
	// Tunnel is where the XDP load balancer sends encapsulated (IPIP,
	// Geneve) packets for this backend, usually its node's address; it may
	// be of the other family (4in6). Zero: the backend's own address.
	Tunnel netip.Addr `json:"tunnel,omitzero"`
}

// Frontend is what clients connect to: VIP, port and protocol.
type Frontend struct {
	Addr  netip.AddrPort `json:"addr"`
	Proto Protocol       `json:"proto"`
}

func (f Frontend) String() string {
	return fmt.Sprintf("%s/%s", f.Addr, strings.ToLower(string(f.Proto)))
}

// FrontendKind says how clients reach a frontend. It is optional
// (standalone services leave it empty); Kubernetes services set it.
type FrontendKind string

const (
	// ClusterIP frontends are reached from inside the cluster only.
	ClusterIP FrontendKind = "clusterIP"
	// NodePort frontends are a node address and the service's node port.
	NodePort FrontendKind = "nodePort"
	// LoadBalancer frontends are a load balancer ingress IP.
	LoadBalancer FrontendKind = "loadBalancer"
	// ExternalIP frontends are an address of spec.externalIPs.
	ExternalIP FrontendKind = "externalIP"
)

// NorthSouth tells whether traffic from outside the cluster arrives at this
// frontend: the north-south (XDP) path serves these in addition to the
// socket LB.
func (k FrontendKind) NorthSouth() bool {
	return k == NodePort || k == LoadBalancer || k == ExternalIP
}

// MaxAffinityTimeout is the largest session affinity timeout accepted
// (Kubernetes' limit, one day).
const MaxAffinityTimeout = 86400

// Origin names the object a service was made from (Kubernetes: namespace,
// Service name, port name and appProtocol). It is optional and informative:
// xDS and status use it, the datapath does not.
type Origin struct {
	Namespace   string `json:"namespace,omitempty"`
	Name        string `json:"name,omitempty"`
	Port        string `json:"port,omitempty"`
	AppProtocol string `json:"appProtocol,omitempty"`
}

// Service is one frontend and the backends it balances to.
type Service struct {
	// Name is unique within a State, e.g. "default/web:http".
	Name      string         `json:"name"`
	Frontend  Frontend       `json:"frontend"`
	Backends  []Backend      `json:"backends"`
	Algorithm Algorithm      `json:"algorithm,omitempty"`
	Mode      ForwardingMode `json:"mode,omitempty"`
	// Dispatch applies to DSR (and hybrid TCP) on the XDP path.
	Dispatch Dispatch `json:"dispatch,omitempty"`
	// Kind is how clients reach the frontend (optional).
	Kind FrontendKind `json:"kind,omitempty"`
	// AffinityTimeout, when not 0, asks for client-IP session affinity:
	// a client's connections go to the same backend while it has been seen
	// within this many seconds (Kubernetes sessionAffinity: ClientIP).
	AffinityTimeout uint32 `json:"affinityTimeoutSeconds,omitempty"`
	Origin          Origin `json:"origin,omitzero"`
}

// Equal tells whether a and b are the same service, backends in order.
func (s *Service) Equal(o *Service) bool {
	return s.Name == o.Name && s.Frontend == o.Frontend && s.Algorithm == o.Algorithm && s.Mode == o.Mode &&
		s.Dispatch == o.Dispatch && s.Kind == o.Kind && s.AffinityTimeout == o.AffinityTimeout && s.Origin == o.Origin &&
		slices.Equal(s.Backends, o.Backends)
}

// HostNSOnly is a tri-state per-pod override of the global hostNamespaceOnly.
type HostNSOnly string

const (
	// Inherit uses the agent-wide setting.
	Inherit HostNSOnly = ""
	// Bypass: the pod's sockets see the VIP untouched (socket LB skipped).
	Bypass HostNSOnly = "bypass"
	// Translate: the pod's sockets are translated even if the global
	// setting is hostNamespaceOnly.
	Translate HostNSOnly = "translate"
)

// SockmapMode is the per-pod acceleration mode (shunt.dev/sockmap).
type SockmapMode string

const (
	SockmapAuto SockmapMode = "auto"
	SockmapOn   SockmapMode = "on"
	SockmapOff  SockmapMode = "off"
)

// Pod is a workload enrolled in the mesh, identified in the datapath by the
// cookie of its network namespace.
type Pod struct {
	// Name is unique within a State, e.g. "default/client-7d9f".
	Name string `json:"name"`
	// NetNS is a path to the pod's network namespace (/run/netns/x or
	// /proc/PID/ns/net). The agent resolves it to a netns cookie.
	NetNS string `json:"netns"`
	// SocketLB overrides the global hostNamespaceOnly for this pod.
	SocketLB HostNSOnly `json:"socketLB,omitempty"`
	// Sockmap is the acceleration mode (shunt.dev/sockmap); "" = auto.
	Sockmap SockmapMode `json:"sockmap,omitempty"`
	// IPs are the pod's addresses. Empty: the agent reads them from the
	// network namespace.
	IPs []netip.Addr `json:"ips,omitempty"`
	// Sidecar, when set, steers the pod's outbound TCP connections to its
	// sidecar proxy and same-node sidecars' connections to its inbound
	// listener, without iptables.
	Sidecar *Sidecar `json:"sidecar,omitempty"`
	// UID optionally identifies the pod object (Kubernetes metadata.uid).
	UID string `json:"uid,omitempty"`
}

// Sidecar describes a pod's sidecar proxy (Istio conventions by default).
type Sidecar struct {
	// UID of the proxy's processes: their sockets are never steered.
	// Default 1337.
	UID uint32 `json:"uid,omitempty"`
	// OutboundPort is the proxy's outbound listener on loopback
	// (127.0.0.1 / ::1). Default 15001.
	OutboundPort uint16 `json:"outboundPort,omitempty"`
	// InboundPort is the proxy's inbound listener on the pod's addresses.
	// Default 15006.
	InboundPort uint16 `json:"inboundPort,omitempty"`
	// ExcludeOutboundPorts are destination ports never steered
	// (traffic.sidecar.istio.io/excludeOutboundPorts).
	ExcludeOutboundPorts []uint16 `json:"excludeOutboundPorts,omitempty"`
	// ExcludeOutboundCIDRs are destinations never steered
	// (traffic.sidecar.istio.io/excludeOutboundIPRanges).
	ExcludeOutboundCIDRs []netip.Prefix `json:"excludeOutboundCIDRs,omitempty"`
	// IncludeOutboundCIDRs, when not empty, limit steering to these
	// destinations (traffic.sidecar.istio.io/includeOutboundIPRanges;
	// empty = "*" = everything). Exclusions win.
	IncludeOutboundCIDRs []netip.Prefix `json:"includeOutboundCIDRs,omitempty"`
	// ExcludeInboundPorts are ports of this pod that same-node sidecars
	// reach directly, not through InboundPort
	// (traffic.sidecar.istio.io/excludeInboundPorts).
	ExcludeInboundPorts []uint16 `json:"excludeInboundPorts,omitempty"`
}

// Clone returns a deep copy (nil for nil).
func (s *Sidecar) Clone() *Sidecar {
	if s == nil {
		return nil
	}
	c := *s
	c.ExcludeOutboundPorts = slices.Clone(s.ExcludeOutboundPorts)
	c.ExcludeOutboundCIDRs = slices.Clone(s.ExcludeOutboundCIDRs)
	c.IncludeOutboundCIDRs = slices.Clone(s.IncludeOutboundCIDRs)
	c.ExcludeInboundPorts = slices.Clone(s.ExcludeInboundPorts)
	return &c
}

// Sidecar defaults (Istio's).
const (
	DefaultSidecarUID   = 1337
	DefaultOutboundPort = 15001
	DefaultInboundPort  = 15006
	// MaxSidecarPorts and MaxSidecarCIDRs bound each list (the datapath
	// keeps them in fixed-size arrays).
	MaxSidecarPorts = 16
	MaxSidecarCIDRs = 16
)

// WithDefaults returns a copy with the defaults filled in.
func (s Sidecar) WithDefaults() Sidecar {
	if s.UID == 0 {
		s.UID = DefaultSidecarUID
	}
	if s.OutboundPort == 0 {
		s.OutboundPort = DefaultOutboundPort
	}
	if s.InboundPort == 0 {
		s.InboundPort = DefaultInboundPort
	}
	return s
}

// Equal tells whether p and q describe the same enrollment.
func (p *Pod) Equal(q *Pod) bool {
	if p.Name != q.Name || p.NetNS != q.NetNS || p.UID != q.UID || p.SocketLB != q.SocketLB || p.Sockmap != q.Sockmap ||
		!slices.Equal(p.IPs, q.IPs) {
		return false
	}
	if (p.Sidecar == nil) != (q.Sidecar == nil) {
		return false
	}
	if p.Sidecar == nil {
		return true
	}
	a, b := p.Sidecar, q.Sidecar
	return a.UID == b.UID && a.OutboundPort == b.OutboundPort && a.InboundPort == b.InboundPort &&
		slices.Equal(a.ExcludeOutboundPorts, b.ExcludeOutboundPorts) &&
		slices.Equal(a.ExcludeOutboundCIDRs, b.ExcludeOutboundCIDRs) &&
		slices.Equal(a.IncludeOutboundCIDRs, b.IncludeOutboundCIDRs) &&
		slices.Equal(a.ExcludeInboundPorts, b.ExcludeInboundPorts)
}

func (s *Sidecar) validate(prefix string) error {
	d := s.WithDefaults()
	if d.OutboundPort == d.InboundPort {
		return fieldErr(prefix+".inboundPort", "must differ from outboundPort (%d)", d.OutboundPort)
	}
	for _, l := range []struct {
		name  string
		ports []uint16
	}{{"excludeOutboundPorts", s.ExcludeOutboundPorts}, {"excludeInboundPorts", s.ExcludeInboundPorts}} {
		if len(l.ports) > MaxSidecarPorts {
			return fieldErr(prefix+"."+l.name, "%d ports, at most %d", len(l.ports), MaxSidecarPorts)
		}
		for i, p := range l.ports {
			if p == 0 {
				return fieldErr(fmt.Sprintf("%s.%s[%d]", prefix, l.name, i), "port must not be 0")
			}
		}
	}
	for _, l := range []struct {
		name  string
		cidrs []netip.Prefix
	}{{"excludeOutboundCIDRs", s.ExcludeOutboundCIDRs}, {"includeOutboundCIDRs", s.IncludeOutboundCIDRs}} {
		if len(l.cidrs) > MaxSidecarCIDRs {
			return fieldErr(prefix+"."+l.name, "%d ranges, at most %d", len(l.cidrs), MaxSidecarCIDRs)
		}
		for i, c := range l.cidrs {
			if !c.IsValid() || c.Addr().Is4In6() || c.Addr().Zone() != "" {
				return fieldErr(fmt.Sprintf("%s.%s[%d]", prefix, l.name, i), "invalid range %q", c)
			}
		}
	}
	return nil
}

// State is the complete desired state.
type State struct {
	Services []Service `json:"services"`
	Pods     []Pod     `json:"pods"`
}

// ActiveSet returns the backends that take new connections: the active
// backends with weight > 0 or, when none is left, the terminating ones with
// weight > 0. The result is sorted by address so that it is independent of
// the order the backends arrived in.
func (s *Service) ActiveSet() []Backend {
	var active, term []Backend
	for _, b := range s.Backends {
		if b.Weight == 0 {
			continue
		}
		if b.State == Terminating {
			term = append(term, b)
		} else {
			active = append(active, b)
		}
	}
	set := active
	if len(set) == 0 {
		set = term
	}
	SortBackends(set)
	return set
}

// SortBackends sorts by the stable key (address, port). The order must not
// depend on arrival order: every node must build identical tables.
func SortBackends(bs []Backend) {
	sort.SliceStable(bs, func(i, j int) bool { return bs[i].Addr.Compare(bs[j].Addr) < 0 })
}

// FieldError names the offending field of an invalid State.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

func fieldErr(field, format string, a ...any) error {
	return &FieldError{Field: field, Msg: fmt.Sprintf(format, a...)}
}

// Validate checks one service. prefix names it in errors.
func (s *Service) Validate(prefix string) error {
	if s.Name == "" {
		return fieldErr(prefix+".name", "must not be empty")
	}
	f := s.Frontend
	if !f.Addr.IsValid() || f.Addr.Addr().IsUnspecified() {
		return fieldErr(prefix+".frontend", "invalid address %q", f.Addr)
	}
	if f.Addr.Port() == 0 {
		return fieldErr(prefix+".frontend", "port must not be 0")
	}
	if f.Addr.Addr().Is4In6() {
		return fieldErr(prefix+".frontend", "use the IPv4 form of %s", f.Addr.Addr())
	}
	if f.Addr.Addr().Zone() != "" {
		return fieldErr(prefix+".frontend", "zoned addresses are not supported")
	}
	if f.Proto != TCP && f.Proto != UDP {
		return fieldErr(prefix+".frontend.proto", "unknown protocol %q (want TCP or UDP)", f.Proto)
	}
	switch s.Algorithm {
	case "", Random, Maglev:
	default:
		return fieldErr(prefix+".algorithm", "unknown algorithm %q (want random or maglev)", s.Algorithm)
	}
	switch s.Mode {
	case "", SNAT, DSR, Hybrid:
	default:
		return fieldErr(prefix+".mode", "unknown forwarding mode %q (want snat, dsr or hybrid)", s.Mode)
	}
	switch s.Dispatch {
	case "", IPIP, Geneve, IPOption:
	default:
		return fieldErr(prefix+".dispatch", "unknown dispatch %q (want ipip, geneve or opt)", s.Dispatch)
	}
	switch s.Kind {
	case "", ClusterIP, NodePort, LoadBalancer, ExternalIP:
	default:
		return fieldErr(prefix+".kind", "unknown frontend kind %q (want clusterIP, nodePort, loadBalancer or externalIP)", s.Kind)
	}
	if s.AffinityTimeout > MaxAffinityTimeout {
		return fieldErr(prefix+".affinityTimeoutSeconds", "%d is above the maximum %d", s.AffinityTimeout, MaxAffinityTimeout)
	}
	if len(s.Backends) > MaxBackendsPerService {
		return fieldErr(prefix+".backends", "%d backends, at most %d allowed", len(s.Backends), MaxBackendsPerService)
	}
	seen := make(map[netip.AddrPort]bool, len(s.Backends))
	for i, b := range s.Backends {
		// The field path is only formatted on error: this loop runs for every
		// backend of every service on each update.
		bp := lazyPath{prefix, i}
		if !b.Addr.IsValid() || b.Addr.Addr().IsUnspecified() || b.Addr.Port() == 0 {
			return fieldErr(bp.String(), "invalid backend address %q", b.Addr)
		}
		if b.Addr.Addr().Is4In6() {
			return fieldErr(bp.String(), "use the IPv4 form of %s", b.Addr.Addr())
		}
		if b.Addr.Addr().Is4() != f.Addr.Addr().Is4() {
			return fieldErr(bp.String(), "address family of %s differs from frontend %s", b.Addr, f.Addr)
		}
		if seen[b.Addr] {
			return fieldErr(bp.String(), "duplicate backend %s", b.Addr)
		}
		seen[b.Addr] = true
		if b.Weight > MaxWeight {
			return fieldErr(bp.String()+".weight", "%d is above the maximum %d", b.Weight, MaxWeight)
		}
		if b.Tunnel.IsValid() && (b.Tunnel.IsUnspecified() || b.Tunnel.Zone() != "" || b.Tunnel.Is4In6()) {
			return fieldErr(bp.String()+".tunnel", "invalid tunnel address %q", b.Tunnel)
		}
		switch b.State {
		case "", Active, Terminating:
		default:
			return fieldErr(bp.String()+".state", "unknown state %q (want active or terminating)", b.State)
		}
	}
	return nil
}

type lazyPath struct {
	prefix string
	i      int
}

func (p lazyPath) String() string { return fmt.Sprintf("%s.backends[%d]", p.prefix, p.i) }

// Validate checks the whole state: every service and pod, unique names and
// unique frontends.
func (st *State) Validate() error {
	names := map[string]bool{}
	fronts := map[Frontend]string{}
	for i, s := range st.Services {
		p := fmt.Sprintf("services[%d]", i)
		if err := s.Validate(p); err != nil {
			return err
		}
		if names[s.Name] {
			return fieldErr(p+".name", "duplicate service name %q", s.Name)
		}
		names[s.Name] = true
		if other, ok := fronts[s.Frontend]; ok {
			return fieldErr(p+".frontend", "frontend %s already used by service %q", s.Frontend, other)
		}
		fronts[s.Frontend] = s.Name
	}
	pods := map[string]bool{}
	for i, p := range st.Pods {
		pp := fmt.Sprintf("pods[%d]", i)
		if p.Name == "" {
			return fieldErr(pp+".name", "must not be empty")
		}
		if pods[p.Name] {
			return fieldErr(pp+".name", "duplicate pod name %q", p.Name)
		}
		pods[p.Name] = true
		if p.NetNS == "" {
			return fieldErr(pp+".netns", "must not be empty")
		}
		switch p.SocketLB {
		case Inherit, Bypass, Translate:
		default:
			return fieldErr(pp+".socketLB", "unknown value %q (want bypass or translate)", p.SocketLB)
		}
		switch p.Sockmap {
		case "", SockmapAuto, SockmapOn, SockmapOff:
		default:
			return fieldErr(pp+".sockmap", "unknown value %q (want auto, on or off)", p.Sockmap)
		}
		if p.Sidecar != nil {
			if err := p.Sidecar.validate(pp + ".sidecar"); err != nil {
				return err
			}
		}
		for j, ip := range p.IPs {
			if !ip.IsValid() || ip.IsUnspecified() || ip.IsLoopback() || ip.Is4In6() || ip.Zone() != "" {
				return fieldErr(fmt.Sprintf("%s.ips[%d]", pp, j), "invalid pod address %q", ip)
			}
		}
	}
	return nil
}

// Clone returns a deep copy.
func (st *State) Clone() *State {
	out := &State{Services: make([]Service, len(st.Services)), Pods: make([]Pod, len(st.Pods))}
	for i, p := range st.Pods {
		p.Sidecar = p.Sidecar.Clone()
		p.IPs = slices.Clone(p.IPs)
		out.Pods[i] = p
	}
	for i, s := range st.Services {
		s.Backends = append([]Backend(nil), s.Backends...)
		out.Services[i] = s
	}
	return out
}
