package xds

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"slices"
	"sync"

	clusterservice "github.com/envoyproxy/go-control-plane/envoy/service/cluster/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	endpointservice "github.com/envoyproxy/go-control-plane/envoy/service/endpoint/v3"
	listenerservice "github.com/envoyproxy/go-control-plane/envoy/service/listener/v3"
	routeservice "github.com/envoyproxy/go-control-plane/envoy/service/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	"github.com/shuntmesh/shunt/mesh"
)

// Server is Shunt's xDS control plane: an ADS server (state-of-the-world
// and delta, plus the per-type LDS/RDS/CDS/EDS services) fed by Update.
type Server struct {
	cfg  Config
	opts Options
	log  *slog.Logger
	met  *metrics
	trk  *tracker

	ctx    context.Context
	cancel context.CancelFunc
	plain  *grpc.Server // unix sockets, and TCP without TLS
	secure *grpc.Server // TCP with TLS; nil without TLS

	mu       sync.Mutex // serializes Update
	tr       *translator
	hashOf   map[types.Resource]string // content hashes of the last translation's objects
	caches   map[string]*typeCache
	warnings []string

	// testHook, when set, edits each translation before it is applied.
	testHook func(*Resources)
}

// typeCache is one LinearCache and the content hashes of what it holds.
type typeCache struct {
	key, typeURL string
	lc           *cache.LinearCache
	hashes       map[string]string
}

// New builds a server. logger may be nil (logs are dropped); reg may be
// nil (metrics are kept but not exported).
func New(cfg Config, logger *slog.Logger, reg prometheus.Registerer) (*Server, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	met, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("xds: registering metrics: %w", err)
	}
	s := &Server{
		cfg:    cfg,
		opts:   Options{ClusterDomain: cfg.ClusterDomain, ConnectTimeout: cfg.ConnectTimeout},
		log:    logger,
		met:    met,
		trk:    newTracker(logger, met, cfg.MaxStreams),
		caches: map[string]*typeCache{},
	}
	s.tr = newTranslator(s.opts)
	cpLog := cpLogger{logger}
	lcs := map[string]*cache.LinearCache{}
	for _, key := range applyOrder {
		lc := cache.NewLinearCache(cacheTypes[key], cache.WithLogger(cpLog))
		lcs[key] = lc
		s.caches[key] = &typeCache{key: key, typeURL: cacheTypes[key], lc: lc, hashes: map[string]string{}}
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	xs := serverv3.NewServer(s.ctx, &viewCache{caches: lcs, log: logger}, s.trk,
		sotw.WithOrderedADS(), sotw.WithLogger(cpLog))

	base := []grpc.ServerOption{
		grpc.MaxConcurrentStreams(cfg.MaxStreamsPerConn),
		grpc.MaxRecvMsgSize(cfg.MaxRecvMsgSize),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: cfg.KeepaliveTime, Timeout: cfg.KeepaliveTimeout}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: cfg.KeepaliveMinTime, PermitWithoutStream: true}),
	}
	s.plain = grpc.NewServer(base...)
	register(s.plain, xs)
	if cfg.TLSCertFile != "" {
		tc, err := serverTLS(cfg)
		if err != nil {
			return nil, err
		}
		s.secure = grpc.NewServer(append(slices.Clone(base), grpc.Creds(credentials.NewTLS(tc)))...)
		register(s.secure, xs)
	}
	return s, nil
}

func register(g *grpc.Server, xs serverv3.Server) {
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, xs)
	listenerservice.RegisterListenerDiscoveryServiceServer(g, xs)
	routeservice.RegisterRouteDiscoveryServiceServer(g, xs)
	clusterservice.RegisterClusterDiscoveryServiceServer(g, xs)
	endpointservice.RegisterEndpointDiscoveryServiceServer(g, xs)
}

func serverTLS(cfg Config) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(cfg.TLSCertFile, cfg.TLSKeyFile)
	if err != nil {
		return nil, fmt.Errorf("xds: loading TLS key pair: %w", err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if cfg.TLSClientCAFile != "" {
		pem, err := os.ReadFile(cfg.TLSClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("xds: reading client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("xds: no certificate in %s", cfg.TLSClientCAFile)
		}
		tc.ClientCAs, tc.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return tc, nil
}

// Serve answers xDS on lis until Stop. Unix-socket listeners are served in
// plaintext; TCP listeners with TLS when Config has a certificate. Serve may
// be called for several listeners at once.
func (s *Server) Serve(lis net.Listener) error {
	g := s.plain
	if s.secure != nil && lis.Addr().Network() != "unix" {
		g = s.secure
	}
	if err := g.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("xds: serving %s: %w", lis.Addr(), err)
	}
	return nil
}

// ListenAndServe listens on Config.UnixSocket and/or Config.TCPAddr and
// serves until Stop or the first listener error.
func (s *Server) ListenAndServe() error {
	var ls []net.Listener
	closeAll := func() {
		for _, l := range ls {
			l.Close()
		}
	}
	if p := s.cfg.UnixSocket; p != "" {
		if fi, err := os.Lstat(p); err == nil && fi.Mode()&fs.ModeSocket != 0 {
			if err := os.Remove(p); err != nil {
				return fmt.Errorf("xds: removing stale socket: %w", err)
			}
		}
		l, err := net.Listen("unix", p)
		if err != nil {
			return fmt.Errorf("xds: %w", err)
		}
		ls = append(ls, l)
		if err := os.Chmod(p, 0o660); err != nil {
			closeAll()
			return fmt.Errorf("xds: %w", err)
		}
	}
	if a := s.cfg.TCPAddr; a != "" {
		l, err := net.Listen("tcp", a)
		if err != nil {
			closeAll()
			return fmt.Errorf("xds: %w", err)
		}
		ls = append(ls, l)
	}
	if len(ls) == 0 {
		return errors.New("xds: neither unixSocket nor tcpAddr is configured")
	}
	errc := make(chan error, len(ls))
	for _, l := range ls {
		go func() { errc <- s.Serve(l) }()
	}
	err := <-errc
	s.Stop()
	for range len(ls) - 1 {
		<-errc
	}
	return err
}

// Stop closes every listener and stream at once. xDS streams never end by
// themselves, so there is no graceful variant: clients reconnect and keep
// their last configuration meanwhile.
func (s *Server) Stop() {
	s.cancel()
	s.plain.Stop()
	if s.secure != nil {
		s.secure.Stop()
	}
}

// Update makes st the served configuration. It is idempotent: resources
// whose content did not change keep their version and are not re-sent, and
// only the watchers of changed resources are woken (an endpoint change
// wakes the EDS watchers of that one service). An invalid state, or a
// translation that fails validation, is rejected whole and the previous
// configuration stays.
func (s *Server) Update(st *mesh.State) error {
	if st == nil {
		return errors.New("xds: nil state")
	}
	if err := st.Validate(); err != nil {
		return fmt.Errorf("xds: invalid state: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()

	tr, known := s.tr, s.hashOf
	if s.testHook != nil {
		// The hook edits resources in place: keep them out of the memo.
		tr, known = newTranslator(s.opts), nil
	}
	res, err := tr.translate(st)
	if err != nil {
		return err
	}
	if s.testHook != nil {
		s.testHook(res)
	}
	hashOf := make(map[types.Resource]string, len(known))
	sets := desiredSets(res, func(r types.Resource) string {
		h, ok := known[r]
		if !ok {
			h = contentHash(r)
		}
		hashOf[r] = h
		return h
	})
	if s.testHook == nil {
		s.hashOf = hashOf
	}

	type change struct {
		tc      *typeCache
		upserts map[string]types.Resource
		deletes []string
		hashes  map[string]string
	}
	var changes []change
	// References only change when a name set or a non-EDS resource changes.
	needCheck := false
	for _, set := range sets {
		tc := s.caches[set.key]
		c := change{tc: tc, upserts: map[string]types.Resource{}, hashes: make(map[string]string, len(set.items))}
		for name, e := range set.items {
			c.hashes[name] = e.hash
			old, existed := tc.hashes[name]
			if old != e.hash {
				if err := validateDeep(e.res); err != nil {
					return fmt.Errorf("xds: generated %s %q is invalid: %w", typeName(e.res), name, err)
				}
				c.upserts[name] = e.res
				needCheck = needCheck || !existed || set.key != keyEDS
			}
		}
		for name := range tc.hashes {
			if _, ok := set.items[name]; !ok {
				c.deletes = append(c.deletes, name)
				needCheck = true
			}
		}
		slices.Sort(c.deletes)
		if len(c.upserts) > 0 || len(c.deletes) > 0 {
			changes = append(changes, c)
		}
	}
	if len(changes) == 0 {
		s.warnings = res.Warnings
		return nil
	}
	if needCheck {
		if err := res.checkConsistent(); err != nil {
			return fmt.Errorf("xds: inconsistent translation: %w", err)
		}
	}

	for _, c := range changes { // applyOrder: referenced before referrer
		if len(c.upserts) > 0 {
			if err := c.tc.lc.UpdateResources(c.upserts, nil); err != nil {
				return fmt.Errorf("xds: updating %s: %w", c.tc.key, err)
			}
		}
	}
	for i := len(changes) - 1; i >= 0; i-- { // and removed after its referrers
		c := changes[i]
		if len(c.deletes) > 0 {
			if err := c.tc.lc.UpdateResources(nil, c.deletes); err != nil {
				return fmt.Errorf("xds: updating %s: %w", c.tc.key, err)
			}
		}
	}
	s.warnings = res.Warnings
	summary := []any{}
	for _, c := range changes {
		c.tc.hashes = c.hashes
		summary = append(summary, c.tc.key, fmt.Sprintf("+%d -%d", len(c.upserts), len(c.deletes)))
	}
	counts := map[string]int{}
	for _, tc := range s.caches {
		counts[tc.typeURL] += len(tc.hashes)
	}
	for typeURL, n := range counts {
		s.met.resources.WithLabelValues(typeURL).Set(float64(n))
	}
	s.log.Debug("xds: configuration updated", summary...)
	return nil
}

// Status reports the open streams, each connected node's sent, acked and
// rejected versions per type, and the served resource counts.
func (s *Server) Status() Status {
	open, nodes := s.trk.snapshot()
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Streams: open, Nodes: nodes, Resources: map[string]int{}, Warnings: slices.Clone(s.warnings)}
	for _, t := range []string{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
		st.Resources[t] = 0
	}
	for _, tc := range s.caches {
		st.Resources[tc.typeURL] += len(tc.hashes)
	}
	return st
}

// cpLogger adapts slog to go-control-plane's logger. Its Info messages are
// per-watch chatter, so they go to Debug.
type cpLogger struct{ l *slog.Logger }

func (c cpLogger) Debugf(format string, args ...any) { c.logf(slog.LevelDebug, format, args) }
func (c cpLogger) Infof(format string, args ...any)  { c.logf(slog.LevelDebug, format, args) }
func (c cpLogger) Warnf(format string, args ...any)  { c.logf(slog.LevelWarn, format, args) }
func (c cpLogger) Errorf(format string, args ...any) { c.logf(slog.LevelError, format, args) }

func (c cpLogger) logf(level slog.Level, format string, args []any) {
	if !c.l.Enabled(context.Background(), level) {
		return
	}
	c.l.Log(context.Background(), level, fmt.Sprintf(format, args...), "component", "go-control-plane")
}
