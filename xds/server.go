package xds

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

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
	ready  chan struct{} // closed by the first successful Apply
	plain  *grpc.Server  // unix sockets, and TCP without TLS
	secure *grpc.Server  // TCP with TLS; nil without TLS

	mu      sync.Mutex // serializes Apply
	model   *model
	rebuild bool // translate everything afresh on the next Apply
	caches  map[string]*typeCache

	// testHook, when set, edits the objects an Apply built before they are
	// served (set it with setTestHook).
	testHook func(*Resources)
}

// typeCache is one cache and what it holds: the served objects and their
// content hashes, by name.
type typeCache struct {
	key, typeURL string
	store        interface {
		update(ups map[string]entry, dels []string) error
	}
	entries map[string]entry
}

// linearStore feeds a LinearCache.
type linearStore struct{ lc *cache.LinearCache }

func (l linearStore) update(ups map[string]entry, dels []string) error {
	m := make(map[string]types.Resource, len(ups))
	for name, e := range ups {
		m[name] = e.res
	}
	return l.lc.UpdateResources(m, dels)
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
		opts:   Options{ClusterDomain: cfg.ClusterDomain, ConnectTimeout: time.Duration(cfg.ConnectTimeout)},
		log:    logger,
		met:    met,
		trk:    newTracker(logger, met, cfg.MaxStreams, cfg.MaxResourceNames),
		caches: map[string]*typeCache{},
	}
	s.model = newModel(s.opts)
	cpLog := cpLogger{logger}
	watchers := map[string]cache.ConfigWatcher{}
	for _, key := range applyOrder {
		tc := &typeCache{key: key, typeURL: cacheTypes[key], entries: map[string]entry{}}
		if key == keyEDS {
			ec := newEDSCache(cacheTypes[key])
			tc.store, watchers[key] = ec, ec
		} else {
			lc := cache.NewLinearCache(cacheTypes[key], cache.WithLogger(cpLog))
			tc.store, watchers[key] = linearStore{lc}, lc
		}
		s.caches[key] = tc
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.ready = make(chan struct{})
	xs := serverv3.NewServer(s.ctx, &viewCache{caches: watchers, log: logger}, s.trk,
		sotw.WithOrderedADS(), sotw.WithLogger(cpLog))

	base := []grpc.ServerOption{
		grpc.MaxConcurrentStreams(cfg.MaxStreamsPerConn),
		grpc.MaxRecvMsgSize(cfg.MaxRecvMsgSize),
		// Fixed receive windows (setting them turns off gRPC's BDP-driven
		// growth up to 16 MiB per connection): clients send small requests.
		grpc.InitialWindowSize(64 << 10),
		grpc.InitialConnWindowSize(64 << 10),
		// Release a connection's write buffer between writes: most xDS
		// connections are idle most of the time.
		grpc.SharedWriteBuffer(true),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: time.Duration(cfg.KeepaliveTime), Timeout: time.Duration(cfg.KeepaliveTimeout)}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: time.Duration(cfg.KeepaliveMinTime), PermitWithoutStream: true}),
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
//
// Nothing is accepted before the first successful Apply (connections wait
// in the listen backlog): a sidecar that connects while the agent starts
// must not receive an empty configuration, which would make Envoy drop
// every cluster it had.
func (s *Server) Serve(lis net.Listener) error {
	select {
	case <-s.ready:
	case <-s.ctx.Done():
		lis.Close()
		return nil
	}
	g := s.plain
	if s.secure != nil && lis.Addr().Network() != "unix" {
		g = s.secure
	}
	if err := g.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("xds: serving %s: %w", lis.Addr(), err)
	}
	return nil
}

// Listen opens the listeners Config names: the unix socket (its folder
// created, a stale socket file replaced, owner group and mode set) and/or
// the TCP address.
func (s *Server) Listen() ([]net.Listener, error) {
	var ls []net.Listener
	fail := func(err error) ([]net.Listener, error) {
		for _, l := range ls {
			l.Close()
		}
		return nil, fmt.Errorf("xds: %w", err)
	}
	if p := s.cfg.UnixSocket; p != "" {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return fail(err)
		}
		if fi, err := os.Lstat(p); err == nil && fi.Mode()&fs.ModeSocket != 0 {
			if err := os.Remove(p); err != nil {
				return fail(fmt.Errorf("removing stale socket: %w", err))
			}
		}
		l, err := net.Listen("unix", p)
		if err != nil {
			return fail(err)
		}
		ls = append(ls, l)
		if err := os.Chown(p, -1, *s.cfg.UnixSocketGID); err != nil {
			return fail(err)
		}
		if err := os.Chmod(p, fs.FileMode(s.cfg.UnixSocketMode)); err != nil {
			return fail(err)
		}
	}
	if a := s.cfg.TCPAddr; a != "" {
		l, err := net.Listen("tcp", a)
		if err != nil {
			return fail(err)
		}
		ls = append(ls, l)
	}
	if len(ls) == 0 {
		return nil, errors.New("xds: neither unixSocket nor tcpAddr is configured")
	}
	return ls, nil
}

// ListenAndServe listens (see Listen) and serves until Stop or the first
// listener error.
func (s *Server) ListenAndServe() error {
	ls, err := s.Listen()
	if err != nil {
		return err
	}
	return s.ServeAll(ls)
}

// ServeAll serves every listener until Stop or the first listener error,
// which stops the server.
func (s *Server) ServeAll(ls []net.Listener) error {
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

// Update makes st's services the whole served configuration (a Change
// with Replace); pods are ignored.
func (s *Server) Update(st *mesh.State) error {
	if st == nil {
		return errors.New("xds: nil state")
	}
	return s.Apply(Change{Services: st.Services, Replace: true})
}

// Apply changes the served configuration. It costs in proportion to the
// change: only the named services are validated and translated, resources
// whose content did not change keep their version and are not re-sent, and
// only the watchers of changed resources are woken (an endpoint change wakes
// the EDS watchers of that one service). A change that is invalid (a
// service failing validation, a frontend used twice, a name both updated
// and deleted) is rejected whole and the previous configuration stays. A
// Replace is also checked whole with the snapshot Consistent() rules.
func (s *Server) Apply(ch Change) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ch.Empty() && !s.rebuild {
		return nil
	}
	p, err := s.model.prepare(ch, s.rebuild)
	if err != nil {
		return err
	}
	if s.testHook != nil {
		s.testHook(p.newResources())
	}
	d := p.diff()

	type change struct {
		tc      *typeCache
		upserts map[string]entry // changed content, with its encoding
		deletes []string
		entries map[string]entry // new entries, including unchanged content under a new object
	}
	var changes []change
	for _, key := range applyOrder { // referenced before referrer
		tc := s.caches[key]
		c := change{tc: tc, upserts: map[string]entry{}, entries: map[string]entry{}}
		for name, res := range d.up[key] {
			old, ok := tc.entries[name]
			if ok && old.res == res {
				continue
			}
			b, h := encode(res)
			c.entries[name] = entry{res: res, hash: h}
			if !ok || old.hash != h {
				c.upserts[name] = entry{res: res, hash: h, encoded: b}
			}
		}
		for _, name := range d.del[key] {
			if _, ok := tc.entries[name]; ok {
				c.deletes = append(c.deletes, name)
			}
		}
		if len(c.entries) > 0 || len(c.deletes) > 0 {
			changes = append(changes, c)
		}
	}
	if ch.Replace {
		if err := p.resources().checkConsistent(); err != nil {
			return fmt.Errorf("xds: inconsistent translation: %w", err)
		}
	}
	p.commit()
	s.rebuild = false

	var errs []error
	for _, c := range changes {
		if len(c.upserts) > 0 {
			if err := c.tc.store.update(c.upserts, nil); err != nil {
				errs = append(errs, fmt.Errorf("xds: updating %s: %w", c.tc.key, err))
			}
		}
	}
	for i := len(changes) - 1; i >= 0; i-- { // and removed after its referrers
		c := changes[i]
		if len(c.deletes) > 0 {
			if err := c.tc.store.update(nil, c.deletes); err != nil {
				errs = append(errs, fmt.Errorf("xds: updating %s: %w", c.tc.key, err))
			}
		}
	}
	var summary []any
	counts := map[string]int{}
	for _, c := range changes {
		maps.Copy(c.tc.entries, c.entries)
		for _, name := range c.deletes {
			delete(c.tc.entries, name)
		}
		if len(c.upserts)+len(c.deletes) > 0 {
			summary = append(summary, c.tc.key, fmt.Sprintf("+%d -%d", len(c.upserts), len(c.deletes)))
		}
	}
	for _, tc := range s.caches {
		counts[tc.typeURL] += len(tc.entries)
	}
	for typeURL, n := range counts {
		s.met.resources.WithLabelValues(typeURL).Set(float64(n))
	}
	if len(summary) > 0 {
		s.log.Debug("xds: configuration updated", summary...)
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	select {
	case <-s.ready:
	default:
		close(s.ready) // the caches hold the first configuration: serve
	}
	return nil
}

// setTestHook installs (or, with nil, removes) the test hook; the next
// Apply translates every service afresh so the hook sees, or no longer
// sees, all of them.
func (s *Server) setTestHook(h func(*Resources)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.testHook, s.rebuild = h, true
}

// Status reports the open streams, each connected node's sent, acked and
// rejected versions per type, and the served resource counts.
func (s *Server) Status() Status {
	open, nodes := s.trk.snapshot()
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Streams: open, Nodes: nodes, Resources: map[string]int{}, Warnings: s.model.warnings()}
	for _, t := range []string{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
		st.Resources[t] = 0
	}
	for _, tc := range s.caches {
		st.Resources[tc.typeURL] += len(tc.entries)
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
