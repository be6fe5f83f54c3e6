package xds

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	originaldstv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	maglevv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/maglev/v3"
	ringhashv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/ring_hash/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/shuntmesh/shunt/mesh"
)

// Fixed names and ports of the sidecar listeners and clusters (Istio's).
const (
	OutboundListenerName      = "virtualOutbound"
	InboundListenerName       = "virtualInbound"
	OutboundPort              = 15001
	InboundPort               = 15006
	PassthroughClusterName    = "PassthroughCluster"
	InboundPassthroughCluster = "InboundPassthroughCluster"

	// grpcChannelIDKey is the filter-state key gRPC clients hash on to keep
	// one channel on one backend (gRFC A42). Envoy has no such key and
	// falls back to a random hash.
	grpcChannelIDKey = "io.grpc.channel_id"
)

// DefaultConnectTimeout is the upstream connect timeout of generated clusters.
const DefaultConnectTimeout = 5 * time.Second

// Options tune the translation. The zero value is valid.
type Options struct {
	// ClusterDomain builds service host names (default "cluster.local").
	ClusterDomain string
	// ConnectTimeout of generated clusters (default DefaultConnectTimeout).
	ConnectTimeout time.Duration
}

func (o Options) withDefaults() Options {
	if o.ClusterDomain == "" {
		o.ClusterDomain = DefaultClusterDomain
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = DefaultConnectTimeout
	}
	return o
}

// Resources is the translation of one mesh.State, every slice sorted by
// resource name. Clusters, Endpoints and Routes are shared by every node;
// the listeners depend on the node's flavor.
type Resources struct {
	// SidecarListeners are served to Envoy sidecars: virtualOutbound and
	// virtualInbound.
	SidecarListeners []*listenerv3.Listener
	// APIListeners are served to proxyless gRPC clients, one per TCP
	// service, named by ListenerName.
	APIListeners []*listenerv3.Listener
	// Routes are referenced (RDS) by the API listeners.
	Routes []*routev3.RouteConfiguration
	// Clusters holds one EDS cluster per service plus the passthrough
	// clusters of the sidecar listeners.
	Clusters []*clusterv3.Cluster
	// Endpoints holds one ClusterLoadAssignment per service.
	Endpoints []*endpointv3.ClusterLoadAssignment
	// Warnings lists services that could not be fully translated (name
	// collisions).
	Warnings []string
}

// Translate turns a mesh state into xDS resources. It is a pure function:
// the same state always gives byte-identical resources. Services are
// validated (mesh.Service.Validate, unique names and frontends); pods are
// ignored.
//
// Per service (one frontend):
//   - a Cluster of type EDS (config from ADS). random: lb_policy ROUND_ROBIN
//     (Envoy weights it; gRPC ignores endpoint weights there). maglev:
//     load_balancing_policy [Maglev, RingHash(XX_HASH)]: Envoy takes Maglev,
//     gRPC (which has no Maglev) skips to ring_hash. The healthy panic
//     threshold is 0 so drained endpoints are never used as a last resort.
//   - a ClusterLoadAssignment with one locality per group, priorities
//     numbered without gaps in this order: active backends with weight > 0
//     (HEALTHY, their weight); terminating backends with weight > 0
//     (HEALTHY); backends with weight 0 (DRAINING, weight unset). Envoy and
//     gRPC only fail over to a lower priority when the higher one has no
//     usable endpoint, which is mesh.Service.ActiveSet's rule: terminating
//     backends take traffic only once no active one is left, drained ones
//     never.
//   - TCP frontends: a filter chain of virtualOutbound matching VIP/port
//     (tcp_proxy to the cluster; maglev hashes on the source IP), and an API
//     listener named ListenerName with an HttpConnectionManager whose RDS
//     route (named like the cluster) sends everything to the cluster.
//     UDP frontends get the cluster and endpoints only.
func Translate(st *mesh.State, opts Options) (*Resources, error) {
	if st == nil {
		return nil, errors.New("xds: nil state")
	}
	m := newModel(opts)
	if err := m.apply(Change{Services: st.Services, Replace: true}); err != nil {
		return nil, err
	}
	return m.resources(), nil
}

// Listeners returns the listeners a node of the given flavor receives.
func (r *Resources) Listeners(flavor string) []*listenerv3.Listener {
	if flavor == FlavorProxyless {
		return r.APIListeners
	}
	return r.SidecarListeners
}

// RoutesFor returns the route configurations a node of the given flavor
// receives: sidecars use tcp_proxy and need none.
func (r *Resources) RoutesFor(flavor string) []*routev3.RouteConfiguration {
	if flavor == FlavorProxyless {
		return r.Routes
	}
	return nil
}

// Snapshot builds the go-control-plane snapshot of one flavor's view.
func (r *Resources) Snapshot(flavor, version string) (*cache.Snapshot, error) {
	return cache.NewSnapshot(version, map[resource.Type][]types.Resource{
		resource.ListenerType: toResources(r.Listeners(flavor)),
		resource.RouteType:    toResources(r.RoutesFor(flavor)),
		resource.ClusterType:  toResources(r.Clusters),
		resource.EndpointType: toResources(r.Endpoints),
	})
}

// Check validates every resource with its proto rules (ValidateAll, and the
// typed configs packed in Any fields, which ValidateAll does not enter) and
// checks each flavor's snapshot for consistency.
//
// go-control-plane's Consistent() looks for RDS references only in listener
// filter chains, not in api_listener, so for the proxyless view it runs
// without routes and the API-listener→route references are checked here
// with the same rule (exactly the referenced routes exist).
func (r *Resources) Check() error {
	for _, group := range [][]types.Resource{
		toResources(r.SidecarListeners), toResources(r.APIListeners),
		toResources(r.Routes), toResources(r.Clusters), toResources(r.Endpoints),
	} {
		for _, res := range group {
			if err := validateDeep(res); err != nil {
				return fmt.Errorf("%s %q: %w", typeName(res), cache.GetResourceName(res), err)
			}
		}
	}
	return r.checkConsistent()
}

func (r *Resources) checkConsistent() error {
	side, err := r.Snapshot(FlavorSidecar, "check")
	if err != nil {
		return err
	}
	if err := side.Consistent(); err != nil {
		return fmt.Errorf("sidecar view: %w", err)
	}
	pl, err := cache.NewSnapshot("check", map[resource.Type][]types.Resource{
		resource.ListenerType: toResources(r.APIListeners),
		resource.ClusterType:  toResources(r.Clusters),
		resource.EndpointType: toResources(r.Endpoints),
	})
	if err != nil {
		return err
	}
	if err := pl.Consistent(); err != nil {
		return fmt.Errorf("proxyless view: %w", err)
	}
	refs := map[string]bool{}
	for _, l := range r.APIListeners {
		h := &hcmv3.HttpConnectionManager{}
		if err := l.GetApiListener().GetApiListener().UnmarshalTo(h); err != nil {
			return fmt.Errorf("listener %q: %w", l.GetName(), err)
		}
		refs[h.GetRds().GetRouteConfigName()] = true
	}
	if len(refs) != len(r.Routes) {
		return fmt.Errorf("proxyless view: %d routes referenced, %d present", len(refs), len(r.Routes))
	}
	for _, rc := range r.Routes {
		if !refs[rc.GetName()] {
			return fmt.Errorf("proxyless view: route %q is not referenced by any API listener", rc.GetName())
		}
	}
	return nil
}

func toResources[T types.Resource](in []T) []types.Resource {
	out := make([]types.Resource, len(in))
	for i, r := range in {
		out[i] = r
	}
	return out
}

func adsSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
		ResourceApiVersion:    corev3.ApiVersion_V3,
	}
}

// mustAny packs a message whose type is linked into this binary; Marshal
// cannot fail for the generated config messages used here.
func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(fmt.Sprintf("xds: packing %T: %v", m, err))
	}
	return a
}

func socketAddress(ap netip.AddrPort, proto corev3.SocketAddress_Protocol) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Protocol:      proto,
		Address:       ap.Addr().String(),
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(ap.Port())},
	}}}
}

func l4(p mesh.Protocol) corev3.SocketAddress_Protocol {
	if p == mesh.UDP {
		return corev3.SocketAddress_UDP
	}
	return corev3.SocketAddress_TCP
}

func buildCluster(svc *mesh.Service, name string, opts Options) *clusterv3.Cluster {
	c := &clusterv3.Cluster{
		Name:                 name,
		AltStatName:          svc.Name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsSource(), ServiceName: name},
		ConnectTimeout:       durationpb.New(opts.ConnectTimeout),
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		CommonLbConfig: &clusterv3.Cluster_CommonLbConfig{
			HealthyPanicThreshold: &typev3.Percent{Value: 0},
		},
	}
	if svc.Algorithm == mesh.Maglev {
		c.LoadBalancingPolicy = &clusterv3.LoadBalancingPolicy{Policies: []*clusterv3.LoadBalancingPolicy_Policy{
			{TypedExtensionConfig: &corev3.TypedExtensionConfig{
				Name:        "envoy.load_balancing_policies.maglev",
				TypedConfig: mustAny(&maglevv3.Maglev{}),
			}},
			{TypedExtensionConfig: &corev3.TypedExtensionConfig{
				Name:        "envoy.load_balancing_policies.ring_hash",
				TypedConfig: mustAny(&ringhashv3.RingHash{HashFunction: ringhashv3.RingHash_XX_HASH}),
			}},
		}}
	}
	return c
}

func buildLoadAssignment(svc *mesh.Service, name string) (*endpointv3.ClusterLoadAssignment, error) {
	var active, term, drained []mesh.Backend
	for _, b := range svc.Backends {
		if !b.Addr.IsValid() || b.Addr.Port() == 0 {
			return nil, fmt.Errorf("xds: service %q: invalid backend %q", svc.Name, b.Addr)
		}
		switch {
		case b.Weight == 0:
			drained = append(drained, b)
		case b.State == mesh.Terminating:
			term = append(term, b)
		default:
			active = append(active, b)
		}
	}
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: name}
	for _, group := range []struct {
		backends []mesh.Backend
		health   corev3.HealthStatus
	}{
		{active, corev3.HealthStatus_HEALTHY},
		{term, corev3.HealthStatus_HEALTHY},
		{drained, corev3.HealthStatus_DRAINING},
	} {
		if len(group.backends) == 0 {
			continue
		}
		mesh.SortBackends(group.backends)
		loc := &endpointv3.LocalityLbEndpoints{
			Locality:            &corev3.Locality{},
			LoadBalancingWeight: wrapperspb.UInt32(1),
			Priority:            uint32(len(cla.Endpoints)),
		}
		for _, b := range group.backends {
			ep := &endpointv3.LbEndpoint{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
					Address:  socketAddress(b.Addr, l4(svc.Frontend.Proto)),
					Hostname: b.Name,
				}},
				HealthStatus: group.health,
			}
			if b.Weight > 0 {
				// Envoy and gRPC reject an explicit weight of 0.
				ep.LoadBalancingWeight = wrapperspb.UInt32(b.Weight)
			}
			loc.LbEndpoints = append(loc.LbEndpoints, ep)
		}
		cla.Endpoints = append(cla.Endpoints, loc)
	}
	return cla, nil
}

func tcpProxyFilter(statPrefix, cluster string, hashSource bool) *listenerv3.Filter {
	tp := &tcpproxyv3.TcpProxy{
		StatPrefix:       statPrefix,
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
	}
	if hashSource {
		tp.HashPolicy = []*typev3.HashPolicy{{PolicySpecifier: &typev3.HashPolicy_SourceIp_{SourceIp: &typev3.HashPolicy_SourceIp{}}}}
	}
	return &listenerv3.Filter{Name: wellknown.TCPProxy, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(tp)}}
}

func outboundChain(svc *mesh.Service, cluster string) *listenerv3.FilterChain {
	vip := svc.Frontend.Addr.Addr()
	return &listenerv3.FilterChain{
		Name: cluster,
		FilterChainMatch: &listenerv3.FilterChainMatch{
			DestinationPort: wrapperspb.UInt32(uint32(svc.Frontend.Addr.Port())),
			PrefixRanges: []*corev3.CidrRange{{
				AddressPrefix: vip.String(),
				PrefixLen:     wrapperspb.UInt32(uint32(vip.BitLen())),
			}},
		},
		Filters: []*listenerv3.Filter{tcpProxyFilter(cluster, cluster, svc.Algorithm == mesh.Maglev)},
	}
}

func originalDstFilter() *listenerv3.ListenerFilter {
	return &listenerv3.ListenerFilter{
		Name:       wellknown.OriginalDestination,
		ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&originaldstv3.OriginalDst{})},
	}
}

func wildcardListener(name string, port uint16, ipv6 bool) *listenerv3.Listener {
	l := &listenerv3.Listener{
		Name:            name,
		Address:         socketAddress(netip.AddrPortFrom(netip.IPv4Unspecified(), port), corev3.SocketAddress_TCP),
		ListenerFilters: []*listenerv3.ListenerFilter{originalDstFilter()},
	}
	if ipv6 {
		l.AdditionalAddresses = []*listenerv3.AdditionalAddress{{
			Address: socketAddress(netip.AddrPortFrom(netip.IPv6Unspecified(), port), corev3.SocketAddress_TCP),
		}}
	}
	return l
}

// outboundListener is where the datapath steers an enrolled app's outbound
// connections. The original_dst listener filter restores the address the
// app dialled (Shunt's cgroup getsockopt answers SO_ORIGINAL_DST), the filter
// chains match it against the service frontends, and anything else is
// passed through to its original destination.
func outboundListener(chains []*listenerv3.FilterChain, ipv6 bool) *listenerv3.Listener {
	l := wildcardListener(OutboundListenerName, OutboundPort, ipv6)
	l.TrafficDirection = corev3.TrafficDirection_OUTBOUND
	l.FilterChains = chains
	l.DefaultFilterChain = &listenerv3.FilterChain{
		Name:    PassthroughClusterName,
		Filters: []*listenerv3.Filter{tcpProxyFilter(PassthroughClusterName, PassthroughClusterName, false)},
	}
	return l
}

// inboundListener receives connections for the pod's own ports and hands
// them to the application at their original destination.
func inboundListener(ipv6 bool) *listenerv3.Listener {
	l := wildcardListener(InboundListenerName, InboundPort, ipv6)
	l.TrafficDirection = corev3.TrafficDirection_INBOUND
	l.FilterChains = []*listenerv3.FilterChain{{
		Name:    InboundPassthroughCluster,
		Filters: []*listenerv3.Filter{tcpProxyFilter(InboundPassthroughCluster, InboundPassthroughCluster, false)},
	}}
	return l
}

func passthroughCluster(name string, opts Options) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		LbPolicy:             clusterv3.Cluster_CLUSTER_PROVIDED,
		ConnectTimeout:       durationpb.New(opts.ConnectTimeout),
	}
}

func apiListener(name, route string) *listenerv3.Listener {
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix: name,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			ConfigSource:    adsSource(),
			RouteConfigName: route,
		}},
		HttpFilters: []*hcmv3.HttpFilter{{
			Name:       wellknown.Router,
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})},
		}},
	}
	return &listenerv3.Listener{
		Name:        name,
		ApiListener: &listenerv3.ApiListener{ApiListener: mustAny(hcm)},
	}
}

func routeConfig(svc *mesh.Service, cluster, host string) *routev3.RouteConfiguration {
	action := &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}
	if svc.Algorithm == mesh.Maglev {
		action.HashPolicy = []*routev3.RouteAction_HashPolicy{{
			PolicySpecifier: &routev3.RouteAction_HashPolicy_FilterState_{
				FilterState: &routev3.RouteAction_HashPolicy_FilterState{Key: grpcChannelIDKey},
			},
		}}
	}
	return &routev3.RouteConfiguration{
		Name: cluster,
		VirtualHosts: []*routev3.VirtualHost{{
			Name: host,
			// One route configuration per service: every authority matches.
			Domains: []string{"*"},
			Routes: []*routev3.Route{{
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: action},
			}},
		}},
	}
}
