package xds

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"

	"github.com/shuntmesh/shunt/mesh"
)

// TestEDSCacheSotw pins the state-of-the-world behaviour of the endpoint
// cache over a real stream: only subscribed, changed resources are sent;
// a removal is not (sotw has no removals for endpoints); a subscription
// growing by one name gets exactly that one; a legacy wildcard request
// gets everything.
func TestEDSCacheSotw(t *testing.T) {
	st := rawState(1, 80)
	st.Services = append(st.Services, mesh.Service{Name: "default/third:http", Frontend: mesh.Frontend{Addr: ap("10.96.7.9:80"), Proto: mesh.TCP},
		Backends: []mesh.Backend{{Addr: ap("10.0.9.1:80"), Weight: 1}}})
	s, _ := newRawServer(t, Config{}, st)
	conn := serveTCP(t, s, nil)
	ads := discoveryv3.NewAggregatedDiscoveryServiceClient(conn)
	stream, err := ads.StreamAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c := sotwClient{t, stream}
	c.send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.EndpointType, ResourceNames: []string{echoCluster}})
	r := c.recv(resource.EndpointType)
	if got := resourceNamesOf(t, r); !slices.Equal(got, []string{echoCluster}) {
		t.Fatalf("first response: %q", got)
	}
	c.ack(r, echoCluster)

	// Subscribing to one more name sends that one only.
	c.send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce(), ResourceNames: []string{echoCluster, otherCluster}})
	r = c.recv(resource.EndpointType)
	if got := resourceNamesOf(t, r); !slices.Equal(got, []string{otherCluster}) {
		t.Fatalf("after subscribing to %s: %q", otherCluster, got)
	}
	c.ack(r, echoCluster, otherCluster)

	// An unsubscribed service changes, then is removed: nothing is sent.
	// The other service is removed: nothing is sent (no sotw removals).
	// Then the echo service changes: exactly that is sent.
	st.Services[2].Backends[0].Weight = 2
	must(t, s.Update(st))
	st.Services = st.Services[:2]
	must(t, s.Update(st))
	st.Services = st.Services[:1]
	must(t, s.Update(st))
	st.Services[0].Backends[0].Weight = 3
	must(t, s.Update(st))
	r = c.recv(resource.EndpointType)
	if got := resourceNamesOf(t, r); !slices.Equal(got, []string{echoCluster}) {
		t.Fatalf("after the changes: %q", got)
	}
	c.ack(r, echoCluster, otherCluster)

	// A legacy wildcard request (no names) on another stream gets all.
	stream2, err := ads.StreamAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c2 := sotwClient{t, stream2}
	c2.send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.EndpointType})
	if got := resourceNamesOf(t, c2.recv(resource.EndpointType)); !slices.Equal(got, []string{echoCluster}) {
		t.Fatalf("wildcard: %q", got)
	}
}

// TestEDSCacheDeltaUnsubscribe: a delta client that unsubscribes from a
// name gets no more updates for it (go-control-plane forgets what it was
// sent, so nothing is answered to the unsubscription itself).
func TestEDSCacheDeltaUnsubscribe(t *testing.T) {
	st := rawState(1, 80)
	s, _ := newRawServer(t, Config{}, st)
	conn := serveTCP(t, s, nil)
	ds, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c := deltaClient{t, ds}
	c.send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode(), TypeUrl: resource.EndpointType, ResourceNamesSubscribe: []string{echoCluster, otherCluster}})
	r := c.recv(resource.EndpointType, []string{echoCluster, otherCluster}, nil)
	// The ACK unsubscribes: the stream has no watch until the server
	// handled it, so no update can slip in under the old subscription.
	c.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResponseNonce: r.GetNonce(), ResourceNamesUnsubscribe: []string{otherCluster}})
	st.Services[1].Backends[0].Weight = 2 // other: unsubscribed
	must(t, s.Update(st))
	st.Services[0].Backends[0].Weight = 2 // echo
	must(t, s.Update(st))
	c.recv(resource.EndpointType, []string{echoCluster}, nil)
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestEDSCacheProperty drives the endpoint cache as go-control-plane's
// sotw and delta servers do (stream.Subscription, responses applied to it,
// requests re-creating the watch), with random updates, removals,
// (un)subscriptions, ACKs and NACKs, and checks after every step that each
// client holds exactly the current version of every subscribed resource
// (delta: and nothing else), whether the cache took its fast path or not.
func TestEDSCacheProperty(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	c := newEDSCache(resource.EndpointType)
	names := make([]string, 12)
	for i := range names {
		names[i] = fmt.Sprintf("cla-%d", i)
	}
	truth := map[string]string{} // name -> content version
	gen := 0
	update := func() {
		ups := map[string]entry{}
		var dels []string
		for range 1 + rng.IntN(3) {
			n := names[rng.IntN(len(names))]
			if _, ok := ups[n]; ok || slices.Contains(dels, n) {
				continue
			}
			if truth[n] != "" && rng.IntN(4) == 0 {
				dels = append(dels, n)
				delete(truth, n)
				continue
			}
			gen++
			cla := &endpointv3.ClusterLoadAssignment{ClusterName: n, Endpoints: []*endpointv3.LocalityLbEndpoints{{Priority: uint32(gen)}}}
			b, h := encode(cla)
			ups[n] = entry{res: cla, hash: h, encoded: b}
			truth[n] = h
		}
		if err := c.update(ups, dels); err != nil {
			t.Fatal(err)
		}
	}
	randomNames := func() []string {
		var out []string
		for _, n := range names {
			if rng.IntN(2) == 0 {
				out = append(out, n)
			}
		}
		if len(out) == 0 {
			out = names[:1]
		}
		return out
	}

	type client struct {
		delta  bool
		sub    stream.Subscription
		names  []string          // sotw: the names it asks for
		view   map[string]string // what it holds: name -> version
		ch     chan cache.Response
		dch    chan cache.DeltaResponse
		cancel func()
		acked  string // sotw: last accepted version_info
		// poisoned: resources of a NACKed response. The server takes them
		// as sent (as with LinearCache) and sends them again only when
		// they change, so the client lacks them meanwhile.
		poisoned map[string]bool
	}
	watch := func(cl *client, req any) {
		var err error
		if cl.delta {
			cl.cancel, err = c.CreateDeltaWatch(req.(*discoveryv3.DeltaDiscoveryRequest), &cl.sub, cl.dch)
		} else {
			cl.cancel, err = c.CreateWatch(req.(*discoveryv3.DiscoveryRequest), &cl.sub, cl.ch)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	var clients []*client
	for i := range 6 {
		cl := &client{delta: i%2 == 1, view: map[string]string{}, poisoned: map[string]bool{}, ch: make(chan cache.Response, 1), dch: make(chan cache.DeltaResponse, 1)}
		if cl.delta {
			sub := randomNames()
			cl.sub = stream.NewDeltaSubscription(sub, nil, nil, true)
			watch(cl, &discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNamesSubscribe: sub})
		} else {
			cl.names = randomNames()
			cl.sub = stream.NewSotwSubscription(cl.names, true)
			watch(cl, &discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: cl.names})
		}
		clients = append(clients, cl)
	}
	// deliver handles a pending response the way the servers do, then the
	// client's next request (ACK, NACK, or a new subscription).
	deliver := func(cl *client) bool {
		if cl.delta {
			select {
			case r := <-cl.dch:
				dr, _ := r.GetDeltaDiscoveryResponse()
				for _, res := range dr.GetResources() {
					cl.view[res.GetName()] = res.GetVersion()
				}
				for _, n := range dr.GetRemovedResources() {
					delete(cl.view, n)
				}
				cl.sub.SetReturnedResources(r.GetNextVersionMap())
				req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResponseNonce: "n"}
				if rng.IntN(4) == 0 { // change the subscription with the ACK
					n := names[rng.IntN(len(names))]
					if _, ok := cl.sub.SubscribedResources()[n]; ok {
						req.ResourceNamesUnsubscribe = []string{n}
						delete(cl.view, n) // the client forgets it
					} else {
						req.ResourceNamesSubscribe = []string{n}
					}
				}
				cl.cancel()
				cl.sub.UpdateResourceSubscriptions(req.GetResourceNamesSubscribe(), req.GetResourceNamesUnsubscribe())
				watch(cl, req)
				return true
			default:
				return false
			}
		}
		select {
		case r := <-cl.ch:
			dr, _ := r.GetDiscoveryResponse()
			nack := rng.IntN(6) == 0
			for _, a := range dr.GetResources() {
				var cla endpointv3.ClusterLoadAssignment
				if err := a.UnmarshalTo(&cla); err != nil {
					t.Fatal(err)
				}
				if nack {
					cl.poisoned[cla.GetClusterName()] = true
				} else {
					_, h := encode(&cla)
					cl.view[cla.GetClusterName()] = h
					delete(cl.poisoned, cla.GetClusterName())
				}
			}
			if !nack {
				cl.acked = dr.GetVersionInfo()
			}
			cl.sub.SetReturnedResources(r.GetReturnedResources())
			if rng.IntN(4) == 0 {
				cl.names = randomNames()
				for n := range cl.poisoned {
					if !slices.Contains(cl.names, n) {
						delete(cl.poisoned, n) // forgotten by the server: re-sent on re-subscription
					}
				}
			}
			req := &discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: cl.names, VersionInfo: cl.acked, ResponseNonce: "n"}
			if nack {
				req.ErrorDetail = &rpcstatus.Status{Message: "rejected"}
				if req.VersionInfo == "" {
					req.VersionInfo = nackVersion // the viewCache guard
				}
			}
			cl.cancel()
			cl.sub.SetResourceSubscription(cl.names)
			watch(cl, req)
			return true
		default:
			return false
		}
	}
	for step := range 3000 {
		if rng.IntN(3) == 0 {
			update()
		}
		for _, cl := range clients {
			for rng.IntN(2) == 0 && deliver(cl) {
			}
		}
		// Settle: deliver everything pending, then check.
		if step%10 != 9 {
			continue
		}
		for progress := true; progress; {
			progress = false
			for _, cl := range clients {
				if deliver(cl) {
					progress = true
				}
			}
		}
		for i, cl := range clients {
			for n := range cl.sub.SubscribedResources() {
				if v := truth[n]; v != "" && cl.view[n] != v && !cl.poisoned[n] {
					t.Fatalf("step %d: client %d (delta %v) holds %s at %q, current is %q", step, i, cl.delta, n, cl.view[n], v)
				}
			}
			if cl.delta {
				for n, v := range cl.view {
					if _, sub := cl.sub.SubscribedResources()[n]; !sub || truth[n] == "" {
						t.Fatalf("step %d: delta client %d still holds %s (%q): gone or unsubscribed", step, i, n, v)
					}
				}
			}
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	t.Logf("%d updates logged, %d subscription states", len(c.log), len(c.states))
}
