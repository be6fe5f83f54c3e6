package xds

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Status is a point-in-time view of the server and its connected nodes.
type Status struct {
	// Streams is the number of open xDS streams.
	Streams int `json:"streams"`
	// Nodes are the nodes with at least one open stream that sent a
	// request, sorted by ID.
	Nodes []NodeStatus `json:"nodes"`
	// Resources counts the resources served per type URL.
	Resources map[string]int `json:"resources"`
	// Warnings are the translation warnings of the last Update.
	Warnings []string `json:"warnings,omitempty"`
}

// NodeStatus is what one node has been sent and has accepted.
type NodeStatus struct {
	NodeInfo
	Streams     int       `json:"streams"`
	Peers       []string  `json:"peers,omitempty"`
	ConnectedAt time.Time `json:"connectedAt"`
	// Types is keyed by type URL.
	Types map[string]TypeStatus `json:"types"`
}

// TypeStatus tracks one resource type of one node.
type TypeStatus struct {
	// Watching is the number of resource names the node last asked for; 0
	// is a wildcard watch (everything of the type).
	Watching     int       `json:"watching"`
	SentVersion  string    `json:"sentVersion,omitempty"`
	SentAt       time.Time `json:"sentAt,omitzero"`
	Pushes       uint64    `json:"pushes"`
	AckedVersion string    `json:"ackedVersion,omitempty"`
	AckedAt      time.Time `json:"ackedAt,omitzero"`
	// Pending: the latest response has been neither ACKed nor NACKed yet.
	Pending  bool   `json:"pending"`
	NACKs    uint64 `json:"nacks"`
	LastNACK *NACK  `json:"lastNack,omitempty"`
}

// NACK is a rejected response.
type NACK struct {
	// Version is the rejected version (as sent); empty when the NACK did
	// not name the latest response.
	Version string    `json:"version"`
	Nonce   string    `json:"nonce"`
	Error   string    `json:"error"`
	Time    time.Time `json:"time"`
}

type metrics struct {
	nacks        *prometheus.CounterVec
	pushes       *prometheus.CounterVec
	clients      prometheus.Gauge
	resources    *prometheus.GaugeVec
	updateErrors prometheus.Counter
	refused      *prometheus.CounterVec
}

// nackSeriesRetention is how long the NACK series of a node stay exported
// after its last stream closed: long enough to be scraped, short enough
// that pod churn does not grow the label set without bound.
const nackSeriesRetention = 10 * time.Minute

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shunt_xds_nacks_total",
			Help: "xDS responses rejected by a client, by node ID and resource type (a node's series go 10 minutes after it disconnected).",
		}, []string{"node", "type_url"}),
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shunt_xds_pushes_total",
			Help: "xDS responses sent to clients, by resource type.",
		}, []string{"type_url"}),
		clients: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "shunt_xds_connected_clients",
			Help: "Open xDS streams.",
		}),
		resources: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "shunt_xds_resources",
			Help: "xDS resources served, by resource type (listeners of every node flavor added up).",
		}, []string{"type_url"}),
		updateErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "shunt_xds_update_errors_total",
			Help: "Changes of the mesh state the xDS server refused (the served configuration stayed as it was).",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "shunt_xds_streams_refused_total",
			Help: "xDS streams refused or closed by a limit (max_streams, max_resource_names).",
		}, []string{"limit"}),
	}
	// Series exist at 0 before the first event, so that the first refusal
	// (or NACK, see request) is an increase Prometheus sees.
	m.refused.WithLabelValues("max_streams")
	m.refused.WithLabelValues("max_resource_names")
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.nacks, m.pushes, m.clients, m.resources, m.updateErrors, m.refused} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

type streamKey struct {
	delta bool
	id    int64
}

type sent struct {
	nonce, version string
	answered       bool
}

type streamState struct {
	peer     string
	admitted bool
	node     *nodeState
	last     map[string]sent                // type URL -> latest response
	delta    map[string]map[string]struct{} // type URL -> subscribed names (delta streams)
}

type nodeState struct {
	info        NodeInfo
	streams     int
	peers       map[string]int
	connectedAt time.Time
	types       map[string]*TypeStatus
}

// tracker implements go-control-plane's server callbacks: it admits
// streams (bounded), follows ACKs and NACKs per node and type, and feeds
// the metrics and Status.
type tracker struct {
	log        *slog.Logger
	met        *metrics
	maxStreams int
	maxNames   int
	now        func() time.Time

	mu      sync.Mutex
	open    int
	streams map[streamKey]*streamState
	nodes   map[string]*nodeState
	gone    map[string]uint64 // node ID -> generation, for the NACK series retention
	gen     uint64
}

var _ serverv3.Callbacks = (*tracker)(nil)

func newTracker(log *slog.Logger, met *metrics, maxStreams, maxNames int) *tracker {
	return &tracker{
		log: log, met: met, maxStreams: maxStreams, maxNames: maxNames, now: time.Now,
		streams: map[streamKey]*streamState{},
		nodes:   map[string]*nodeState{},
		gone:    map[string]uint64{},
	}
}

func (t *tracker) streamOpen(ctx context.Context, k streamKey) error {
	st := &streamState{last: map[string]sent{}}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		st.peer = p.Addr.String()
		if st.peer == "" || st.peer == "@" {
			st.peer = p.Addr.Network()
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.streams[k] = st
	if t.open >= t.maxStreams {
		t.met.refused.WithLabelValues("max_streams").Inc()
		return status.Errorf(codes.ResourceExhausted, "xds: %d streams open, the limit", t.open)
	}
	st.admitted = true
	t.open++
	t.met.clients.Inc()
	return nil
}

func (t *tracker) streamClosed(k streamKey) {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.streams[k]
	if st == nil {
		return
	}
	delete(t.streams, k)
	if st.admitted {
		t.open--
		t.met.clients.Dec()
	}
	if n := st.node; n != nil {
		n.streams--
		if n.peers[st.peer]--; n.peers[st.peer] <= 0 {
			delete(n.peers, st.peer)
		}
		if n.streams <= 0 {
			delete(t.nodes, n.info.ID)
			t.forgetLater(n.info.ID)
		}
	}
}

// forgetLater drops the node's NACK series after nackSeriesRetention
// unless it reconnected meanwhile. Must hold t.mu.
func (t *tracker) forgetLater(id string) {
	t.gen++
	gen := t.gen
	t.gone[id] = gen
	time.AfterFunc(nackSeriesRetention, func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		if g, ok := t.gone[id]; ok && g == gen {
			delete(t.gone, id)
			t.met.nacks.DeletePartialMatch(prometheus.Labels{"node": id})
		}
	})
}

// attach binds a stream to its node on the stream's first request.
// Must hold t.mu.
func (t *tracker) attach(st *streamState, node *corev3.Node) *nodeState {
	if st.node != nil || node == nil {
		return st.node
	}
	info := nodeInfo(node)
	delete(t.gone, info.ID)
	n := t.nodes[info.ID]
	if n == nil {
		n = &nodeState{info: info, peers: map[string]int{}, connectedAt: t.now(), types: map[string]*TypeStatus{}}
		t.nodes[info.ID] = n
	}
	n.streams++
	n.peers[st.peer]++
	st.node = n
	return n
}

func (n *nodeState) typ(typeURL string) *TypeStatus {
	ts := n.types[typeURL]
	if ts == nil {
		ts = &TypeStatus{}
		n.types[typeURL] = ts
	}
	return ts
}

// request records a request: the names it watches (refused beyond
// maxNames), and the ACK or NACK it carries. version is what the client
// reports as accepted (sotw) or "" (delta: the acked version is the one
// sent with that nonce). watching is the number of names now watched
// (0: wildcard).
func (t *tracker) request(k streamKey, node *corev3.Node, typeURL, nonce, version string, watching int, errDetail *status.Status) error {
	t.mu.Lock()
	st := t.streams[k]
	if st == nil {
		t.mu.Unlock()
		return nil
	}
	if watching > t.maxNames {
		t.mu.Unlock()
		t.met.refused.WithLabelValues("max_resource_names").Inc()
		return status.Errorf(codes.ResourceExhausted, "xds: %d %s resource names watched on one stream, the limit is %d", watching, typeURL, t.maxNames)
	}
	n := t.attach(st, node)
	if n != nil {
		if _, seen := n.types[typeURL]; !seen {
			t.met.nacks.WithLabelValues(n.info.ID, typeURL) // at 0 until a NACK
		}
		n.typ(typeURL).Watching = watching
	}
	if nonce == "" {
		t.mu.Unlock()
		return nil // a subscription, not an answer to a response
	}
	last := st.last[typeURL]
	if last.nonce == nonce {
		last.answered = true
		st.last[typeURL] = last
	}
	now := t.now()
	if errDetail == nil {
		if n != nil && last.nonce == nonce {
			ts := n.typ(typeURL)
			if version == "" {
				version = last.version
			}
			ts.AckedVersion, ts.AckedAt = version, now
		}
		t.mu.Unlock()
		return nil
	}
	nack := &NACK{Nonce: nonce, Error: errDetail.Message(), Time: now}
	if last.nonce == nonce {
		nack.Version = last.version
	}
	id := ""
	if n != nil {
		ts := n.typ(typeURL)
		ts.NACKs++
		ts.LastNACK = nack
		id = n.info.ID
	}
	t.met.nacks.WithLabelValues(id, typeURL).Inc()
	t.mu.Unlock()
	t.log.Warn("xds: client rejected configuration; it keeps its last accepted one",
		"node", id, "type_url", typeURL, "version", nack.Version, "nonce", nonce, "accepted_version", version, "error", nack.Error)
	return nil
}

// deltaWatching updates a delta stream's subscription set and returns its
// size (0 for a wildcard subscription, which names nothing).
func (t *tracker) deltaWatching(k streamKey, typeURL string, sub, unsub []string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.streams[k]
	if st == nil {
		return 0
	}
	if st.delta == nil {
		st.delta = map[string]map[string]struct{}{}
	}
	set := st.delta[typeURL]
	if set == nil {
		set = map[string]struct{}{}
		st.delta[typeURL] = set
	}
	for _, n := range sub {
		if len(set) > t.maxNames {
			break // refused by request; do not grow further
		}
		if n != "*" {
			set[n] = struct{}{}
		}
	}
	for _, n := range unsub {
		delete(set, n)
	}
	return len(set)
}

func (t *tracker) response(k streamKey, node *corev3.Node, typeURL, nonce, version string) {
	t.met.pushes.WithLabelValues(typeURL).Inc()
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.streams[k]
	if st == nil {
		return
	}
	st.last[typeURL] = sent{nonce: nonce, version: version}
	if n := t.attach(st, node); n != nil {
		ts := n.typ(typeURL)
		ts.SentVersion, ts.SentAt = version, t.now()
		ts.Pushes++
	}
}

func (t *tracker) snapshot() (int, []NodeStatus) {
	t.mu.Lock()
	defer t.mu.Unlock()
	pending := map[*nodeState]map[string]bool{}
	for _, st := range t.streams {
		if st.node == nil {
			continue
		}
		for typeURL, last := range st.last {
			if !last.answered {
				if pending[st.node] == nil {
					pending[st.node] = map[string]bool{}
				}
				pending[st.node][typeURL] = true
			}
		}
	}
	out := make([]NodeStatus, 0, len(t.nodes))
	for _, n := range t.nodes {
		ns := NodeStatus{NodeInfo: n.info, Streams: n.streams, ConnectedAt: n.connectedAt, Types: map[string]TypeStatus{}}
		for p := range n.peers {
			ns.Peers = append(ns.Peers, p)
		}
		slices.Sort(ns.Peers)
		for typeURL, ts := range n.types {
			c := *ts
			c.Pending = pending[n][typeURL]
			if ts.LastNACK != nil {
				nack := *ts.LastNACK
				c.LastNACK = &nack
			}
			ns.Types[typeURL] = c
		}
		out = append(out, ns)
	}
	slices.SortFunc(out, func(a, b NodeStatus) int { return strings.Compare(a.ID, b.ID) })
	return t.open, out
}

// go-control-plane callbacks. Stream IDs are counted separately by the
// sotw and the delta server, hence streamKey.

func (t *tracker) OnStreamOpen(ctx context.Context, id int64, _ string) error {
	return t.streamOpen(ctx, streamKey{id: id})
}

func (t *tracker) OnStreamClosed(id int64, _ *corev3.Node) { t.streamClosed(streamKey{id: id}) }

func (t *tracker) OnStreamRequest(id int64, req *discoveryv3.DiscoveryRequest) error {
	var errDetail *status.Status
	if req.GetErrorDetail() != nil {
		errDetail = status.FromProto(req.GetErrorDetail())
	}
	return t.request(streamKey{id: id}, req.GetNode(), req.GetTypeUrl(), req.GetResponseNonce(), req.GetVersionInfo(),
		len(req.GetResourceNames()), errDetail)
}

func (t *tracker) OnStreamResponse(_ context.Context, id int64, req *discoveryv3.DiscoveryRequest, resp *discoveryv3.DiscoveryResponse) {
	t.response(streamKey{id: id}, req.GetNode(), resp.GetTypeUrl(), resp.GetNonce(), resp.GetVersionInfo())
}

func (t *tracker) OnDeltaStreamOpen(ctx context.Context, id int64, _ string) error {
	return t.streamOpen(ctx, streamKey{delta: true, id: id})
}

func (t *tracker) OnDeltaStreamClosed(id int64, _ *corev3.Node) {
	t.streamClosed(streamKey{delta: true, id: id})
}

func (t *tracker) OnStreamDeltaRequest(id int64, req *discoveryv3.DeltaDiscoveryRequest) error {
	var errDetail *status.Status
	if req.GetErrorDetail() != nil {
		errDetail = status.FromProto(req.GetErrorDetail())
	}
	k := streamKey{delta: true, id: id}
	watching := t.deltaWatching(k, req.GetTypeUrl(), req.GetResourceNamesSubscribe(), req.GetResourceNamesUnsubscribe())
	return t.request(k, req.GetNode(), req.GetTypeUrl(), req.GetResponseNonce(), "", watching, errDetail)
}

func (t *tracker) OnStreamDeltaResponse(id int64, req *discoveryv3.DeltaDiscoveryRequest, resp *discoveryv3.DeltaDiscoveryResponse) {
	t.response(streamKey{delta: true, id: id}, req.GetNode(), resp.GetTypeUrl(), resp.GetNonce(), resp.GetSystemVersionInfo())
}

func (t *tracker) OnFetchRequest(context.Context, *discoveryv3.DiscoveryRequest) error {
	return status.Error(codes.Unimplemented, "xds: fetch (REST) is not served")
}

func (t *tracker) OnFetchResponse(*discoveryv3.DiscoveryRequest, *discoveryv3.DiscoveryResponse) {}
