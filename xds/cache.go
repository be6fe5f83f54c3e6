package xds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// Cache keys. Each names one cache holding one resource type (edsCache for
// endpoints, a LinearCache for the others); views
// map a type URL to one of them.
const (
	keyEDS          = "eds"
	keyCDS          = "cds"
	keyRDS          = "rds"
	keyLDSSidecar   = "lds/" + FlavorSidecar
	keyLDSProxyless = "lds/" + FlavorProxyless
)

// applyOrder is make-before-break: a resource is added before anything
// that refers to it (EDS < CDS < RDS < LDS); removals run in reverse.
var applyOrder = []string{keyEDS, keyCDS, keyRDS, keyLDSSidecar, keyLDSProxyless}

var cacheTypes = map[string]string{
	keyEDS:          resource.EndpointType,
	keyCDS:          resource.ClusterType,
	keyRDS:          resource.RouteType,
	keyLDSSidecar:   resource.ListenerType,
	keyLDSProxyless: resource.ListenerType,
}

// views maps a view key to the cache key serving each type URL. Every
// view shares the EDS, CDS and RDS caches, so endpoint churn touches one
// cache whatever the number of views; only the listeners differ.
//
// Per-pod differences are added by giving viewKey a finer key (for example
// flavor+"/"+namespace+"/"+pod) and registering that view's own caches for
// the types that differ.
var views = map[string]map[string]string{
	FlavorSidecar: {
		resource.ListenerType: keyLDSSidecar,
		resource.RouteType:    keyRDS,
		resource.ClusterType:  keyCDS,
		resource.EndpointType: keyEDS,
	},
	FlavorProxyless: {
		resource.ListenerType: keyLDSProxyless,
		resource.RouteType:    keyRDS,
		resource.ClusterType:  keyCDS,
		resource.EndpointType: keyEDS,
	},
}

// flavorOf decides which listeners a node gets (see NodeInfo).
func flavorOf(node *corev3.Node) string {
	if strings.HasPrefix(strings.ToLower(node.GetUserAgentName()), "grpc") {
		return FlavorProxyless
	}
	if g := node.GetMetadata().GetFields()["GENERATOR"]; g != nil && g.GetStringValue() == "grpc" {
		return FlavorProxyless
	}
	if info, ok := ParseNodeID(node.GetId()); ok && info.Type == FlavorProxyless {
		return FlavorProxyless
	}
	return FlavorSidecar
}

// viewKey selects the view a node is served from. Today the view depends
// on the flavor only: every sidecar gets the same resources.
func viewKey(node *corev3.Node) string { return flavorOf(node) }

func nodeInfo(node *corev3.Node) NodeInfo {
	info, _ := ParseNodeID(node.GetId())
	info.Flavor = flavorOf(node)
	info.UserAgent = strings.TrimSpace(node.GetUserAgentName() + " " + node.GetUserAgentVersion())
	return info
}

// viewCache is the cache.Cache handed to go-control-plane's server. It
// routes each watch to the LinearCache of the node's view and type, and
// keeps NACKs from turning into a resend loop.
//
// The NACK guard: LinearCache answers a state-of-the-world request at once
// when its version_info is empty ("the client has nothing"). A client that
// NACKs its very first response reports exactly that (it has no accepted
// version), so LinearCache would resend the rejected resources immediately,
// the client would NACK again, and so on: the loop measured at about 10,000
// NACKs/s with the snapshot cache. A NACK is never a request for the same
// data again, so the guard gives LinearCache a non-empty version for it:
// the watch then answers only when a resource differs from what this
// stream was last sent, that is when the configuration actually changes.
// Delta streams already track what was sent per resource and need no guard.
type viewCache struct {
	caches map[string]cache.ConfigWatcher
	log    *slog.Logger
}

var _ cache.Cache = (*viewCache)(nil)

// nackVersion marks a NACK's version_info when the client had accepted
// nothing yet. Any non-empty value works; this one reads well in logs.
const nackVersion = "nacked"

func (v *viewCache) pick(node *corev3.Node, typeURL string) cache.ConfigWatcher {
	key, ok := views[viewKey(node)][typeURL]
	if !ok {
		return nil
	}
	return v.caches[key]
}

func (v *viewCache) CreateWatch(req *cache.Request, sub cache.Subscription, ch chan cache.Response) (func(), error) {
	c := v.pick(req.GetNode(), req.GetTypeUrl())
	if c == nil {
		// An unserved type stays pending instead of failing the whole ADS
		// stream the other types share.
		v.log.Debug("xds: watch for an unserved type", "node", req.GetNode().GetId(), "type_url", req.GetTypeUrl())
		return func() {}, nil
	}
	if req.GetErrorDetail() != nil && req.GetVersionInfo() == "" {
		req = withVersion(req, nackVersion)
	}
	return c.CreateWatch(req, sub, ch)
}

func (v *viewCache) CreateDeltaWatch(req *cache.DeltaRequest, sub cache.Subscription, ch chan cache.DeltaResponse) (func(), error) {
	c := v.pick(req.GetNode(), req.GetTypeUrl())
	if c == nil {
		v.log.Debug("xds: delta watch for an unserved type", "node", req.GetNode().GetId(), "type_url", req.GetTypeUrl())
		return func() {}, nil
	}
	return c.CreateDeltaWatch(req, sub, ch)
}

func (v *viewCache) Fetch(context.Context, *cache.Request) (cache.Response, error) {
	return nil, errors.New("xds: fetch (REST) is not served")
}

// withVersion copies a request with another version_info; the request
// received from the stream is left untouched.
func withVersion(req *discoveryv3.DiscoveryRequest, version string) *discoveryv3.DiscoveryRequest {
	return &discoveryv3.DiscoveryRequest{
		VersionInfo:      version,
		Node:             req.GetNode(),
		ResourceNames:    req.GetResourceNames(),
		ResourceLocators: req.GetResourceLocators(),
		TypeUrl:          req.GetTypeUrl(),
		ResponseNonce:    req.GetResponseNonce(),
		ErrorDetail:      req.GetErrorDetail(),
	}
}

// entry is one desired resource and the hash of its deterministic encoding.
type entry struct {
	res     types.Resource
	hash    string
	encoded []byte // deterministic encoding (nil when not kept)
}

type desiredSet struct {
	key     string
	typeURL string
	items   map[string]entry
}

// desiredSets splits a translation by cache, in applyOrder, with content
// hashes: a resource whose hash did not change is never re-sent.
// hash may serve known hashes (nil: compute every one).
func desiredSets(r *Resources, hash func(types.Resource) string) []desiredSet {
	if hash == nil {
		hash = contentHash
	}
	byKey := map[string][]types.Resource{
		keyEDS:          toResources(r.Endpoints),
		keyCDS:          toResources(r.Clusters),
		keyRDS:          toResources(r.Routes),
		keyLDSSidecar:   toResources(r.SidecarListeners),
		keyLDSProxyless: toResources(r.APIListeners),
	}
	out := make([]desiredSet, 0, len(applyOrder))
	for _, key := range applyOrder {
		set := desiredSet{key: key, typeURL: cacheTypes[key], items: make(map[string]entry, len(byKey[key]))}
		for _, res := range byKey[key] {
			set.items[cache.GetResourceName(res)] = entry{res: res, hash: hash(res)}
		}
		out = append(out, set)
	}
	return out
}

func contentHash(res types.Resource) string {
	_, h := encode(res)
	return h
}

// encode returns a resource's deterministic encoding and its content hash.
func encode(res types.Resource) ([]byte, string) {
	b, err := cache.MarshalResource(res)
	if err != nil {
		// Generated messages always marshal; keep the resource distinct.
		return nil, fmt.Sprintf("unmarshalable:%p", res)
	}
	return b, cache.HashResource(b)[:32]
}
