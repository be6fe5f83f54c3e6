// Package xds feeds Envoy sidecars and proxyless gRPC clients from the mesh
// model: Translate turns a mesh.State into LDS/RDS/CDS/EDS resources, and
// Server serves them over ADS (state-of-the-world and delta) with
// go-control-plane.
//
// # Resources
//
// See Translate for the per-service rules. In short, for a mesh service
// "ns/name:port" with frontend VIP:P:
//
//	cluster, CLA, route   outbound|P||name.ns.svc.cluster.local   (UDP: outbound|P|udp|...)
//	API listener (gRPC)   name.ns.svc.cluster.local:P             (dial xds:///name.ns.svc.cluster.local:P)
//	sidecar filter chain  virtualOutbound (0.0.0.0:15001) chain matching VIP/32, port P
//
// A mesh name without a namespace ("web" or "web:http") is used as the host
// as is ("web:P"). Sidecars also get virtualInbound (0.0.0.0:15006) and the
// ORIGINAL_DST clusters PassthroughCluster and InboundPassthroughCluster.
// Both wildcard listeners use the original_dst listener filter: Shunt's
// cgroup getsockopt answers SO_ORIGINAL_DST for the redirected sockets.
//
// Endpoints: active backends with weight > 0 form priority 0 (HEALTHY,
// weighted), terminating ones with weight > 0 the next priority, and
// weight-0 (drained) backends the last one with health DRAINING; empty
// groups are skipped so priorities have no gap (gRPC requires that).
// Envoy and gRPC spill to a lower priority only when the higher one has no
// usable endpoint, and the clusters disable Envoy's panic mode, so drained
// backends never get new connections: mesh.Service.ActiveSet's rule.
//
// # Views and node IDs
//
// The node selects its view. Node IDs follow Istio's convention,
// "sidecar~<pod IP>~<pod>.<namespace>~<namespace>.svc.cluster.local"
// (ParseNodeID); any other ID is accepted as an opaque name. A node is
// proxyless (API listeners) when its user_agent_name starts with "gRPC", its
// metadata has GENERATOR=grpc, or its ID type is "proxyless"; otherwise it is
// an Envoy sidecar (virtualOutbound/virtualInbound). Clusters, endpoints and
// routes are shared by all views, so today every node of a flavor gets the
// same resources; per-pod views plug in at viewKey and the views table.
//
// # Changes, caches and versions
//
// Server.Apply takes a Change (upserted services by name, deleted names,
// or Replace = the whole set; Update(state) is a Replace) and costs in
// proportion to it: only the changed services are validated
// (mesh.Service.Validate, unique frontends against an index) and
// translated, and a service's objects are rebuilt only when their inputs
// changed (an endpoint change builds one ClusterLoadAssignment). The one
// resource that grows with the number of services is the sidecar's
// virtualOutbound listener (a filter chain per TCP service): adding,
// removing or re-addressing a service rebuilds it from the existing
// chains. Name collisions resolve as in a fresh translation (the first
// mesh name in sort order owns a name; when it goes, the next claimant is
// re-translated and takes it). A refused change leaves everything as it
// was; a Replace is also checked whole with the snapshot Consistent()
// rules (tests check incremental results against fresh translations).
//
// Listeners, routes and clusters live in go-control-plane LinearCaches (one
// listener cache per flavor); endpoints, the resources that churn, in
// edsCache, which keeps LinearCache's protocol behaviour but answers a
// change in O(watches × changed names) instead of O(watches × subscribed
// names) (see edsCache). A small cache.Cache picks the node's view.
// Every new object passes ValidateAll (including the typed configs inside
// Any fields) when it is built; its deterministic encoding is hashed, and a
// cache gets only the resources whose hash changed: an unchanged service
// sends nothing, and an endpoint change wakes only the watchers of that
// one ClusterLoadAssignment, never the listener or cluster watchers.
// Additions are applied EDS→CDS→RDS→LDS and removals in reverse (make
// before break).
//
// Names derive from the service identity and versions from content: delta
// responses carry each resource's SHA-256 content hash as its version. The
// state-of-the-world version_info is LinearCache's per-type counter, which
// advances only when a resource of that type changed content.
//
// Feed connects a producer that must not wait (the agent calls its
// subscribers under its lock) to Apply: Enqueue merges a change into the
// pending one and returns; one goroutine applies, coalescing bursts.
//
// Nothing is served before the first successful Apply: a sidecar that
// connects while the agent starts waits in the listen backlog instead of
// receiving an empty configuration.
//
// # NACKs
//
// A NACK (a request carrying error_detail) is counted in
// shunt_xds_nacks_total{node,type_url}, logged at Warn with the node, the
// rejected version and the client's error text, and kept in Status (last
// NACK per node and type, next to the last sent and accepted versions and
// whether a response is pending). The rejected version is never re-sent by
// itself: LinearCache answers a watch only when a resource differs from
// what the stream was last sent, and the one hole in that rule, a client
// NACKing its very first response (its version_info is then empty, which
// LinearCache takes as "send everything now", the ~10,000 NACKs/s loop
// measured with the snapshot cache), is closed in viewCache. The client
// keeps its last accepted configuration and receives the next real change.
//
// # Transport and limits
//
// Serve takes any listener: unix sockets are served in plaintext (the
// socket file is group 1337, the sidecars', mode 0660 by default), TCP
// only with TLS when started from Config (optionally requiring client
// certificates). Keepalive pings detect dead clients. Memory per client is
// bounded by MaxStreams (total streams), MaxStreamsPerConn,
// MaxRecvMsgSize, MaxResourceNames (names watched per stream and type),
// fixed 64 KiB gRPC receive windows, a write buffer released between
// writes, and at most one queued response per type per stream.
//
// # Metrics
//
//	shunt_xds_connected_clients              open xDS streams
//	shunt_xds_pushes_total{type_url}         responses sent
//	shunt_xds_nacks_total{node,type_url}     responses rejected (a node's series go 10 min after it left)
//	shunt_xds_resources{type_url}            resources served (listeners of all flavors added up)
//	shunt_xds_update_errors_total            changes the server refused
//	shunt_xds_streams_refused_total{limit}   streams refused or closed by max_streams / max_resource_names
package xds
