package xds

import (
	"strconv"
	"strings"

	"github.com/shuntmesh/shunt/mesh"
)

// DefaultClusterDomain is the Kubernetes cluster DNS domain used to build
// service host names when Options.ClusterDomain is empty.
const DefaultClusterDomain = "cluster.local"

// ServiceHost maps a mesh service name to the DNS host name clients use:
//
//	"ns/name:port"  -> "name.ns.svc.<domain>"   (the form the Kubernetes source produces)
//	"ns/name"       -> "name.ns.svc.<domain>"
//	"name:port"     -> "name"                   (a plain name from standalone YAML)
//	"name"          -> "name"
//
// The ":port" suffix of a mesh name is the Kubernetes port name; the number
// always comes from the service frontend.
func ServiceHost(meshName, domain string) string {
	if domain == "" {
		domain = DefaultClusterDomain
	}
	ns, rest, namespaced := strings.Cut(meshName, "/")
	if !namespaced {
		rest = meshName
	}
	if i := strings.LastIndexByte(rest, ':'); i >= 0 {
		rest = rest[:i]
	}
	if !namespaced {
		return rest
	}
	return rest + "." + ns + ".svc." + domain
}

// ListenerName is the name of the API listener a proxyless gRPC client asks
// for when it dials "xds:///<ListenerName>": "<host>:<frontend port>".
func ListenerName(svc *mesh.Service, domain string) string {
	return ServiceHost(svc.Name, domain) + ":" + strconv.Itoa(int(svc.Frontend.Addr.Port()))
}

// ClusterName is the Istio-style name of the service's cluster, which is also
// the name of its ClusterLoadAssignment and RouteConfiguration:
// "outbound|<port>||<host>" for TCP and "outbound|<port>|udp|<host>" for UDP.
func ClusterName(svc *mesh.Service, domain string) string {
	subset := ""
	if svc.Frontend.Proto == mesh.UDP {
		subset = "udp"
	}
	return "outbound|" + strconv.Itoa(int(svc.Frontend.Addr.Port())) + "|" + subset + "|" + ServiceHost(svc.Name, domain)
}

// fallbackClusterName is used when two services map to the same ClusterName
// (possible only with unusual standalone names): mesh names are unique, and
// the "shunt|" prefix never collides with "outbound|".
func fallbackClusterName(svc *mesh.Service) string { return "shunt|" + svc.Name }

// Node flavors select which listeners a node receives.
const (
	// FlavorSidecar is an Envoy sidecar: virtualOutbound/virtualInbound listeners.
	FlavorSidecar = "sidecar"
	// FlavorProxyless is a proxyless gRPC client: one API listener per service.
	FlavorProxyless = "proxyless"
)

// NodeInfo is what Shunt reads from an xDS node.
//
// Node-ID convention (Istio's): "<type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>",
// e.g. "sidecar~10.0.0.5~client-7d9f.default~default.svc.cluster.local". Any
// other ID is accepted as an opaque name (Pod and Namespace stay empty).
//
// The flavor is proxyless when the node's user_agent_name starts with "gRPC"
// (every gRPC xDS client sets it), when its metadata has GENERATOR=grpc
// (Istio's marker), or when the ID's type is "proxyless"; otherwise sidecar.
type NodeInfo struct {
	ID        string `json:"id"`
	Type      string `json:"type,omitempty"`
	IP        string `json:"ip,omitempty"`
	Pod       string `json:"pod,omitempty"`
	Namespace string `json:"namespace,omitempty"`
	Flavor    string `json:"flavor"`
	UserAgent string `json:"userAgent,omitempty"`
}

// ParseNodeID splits an Istio-style node ID. ok is false when id does not
// follow the convention; info.ID is set in every case.
func ParseNodeID(id string) (info NodeInfo, ok bool) {
	info.ID = id
	parts := strings.Split(id, "~")
	if len(parts) != 4 || parts[0] == "" {
		return info, false
	}
	info.Type, info.IP = parts[0], parts[1]
	if pod, ns, found := strings.Cut(parts[2], "."); found {
		info.Pod, info.Namespace = pod, ns
	} else {
		info.Pod = parts[2]
	}
	return info, true
}
