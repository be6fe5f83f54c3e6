package xds

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"maps"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/shuntmesh/shunt/mesh"
)

// These tests speak the xDS protocol directly, as Envoy would, to pin down
// what grpc-go's client cannot show: delta xDS, a NACK of the very first
// response, and exactly which pushes an update causes.

const rawNodeID = "sidecar~10.0.0.9~raw-0.default~default.svc.cluster.local"

func envoyNode() *corev3.Node { return &corev3.Node{Id: rawNodeID, UserAgentName: "envoy"} }

var (
	echoCluster  = "outbound|7070||echo.default.svc.cluster.local"
	otherCluster = "outbound|80||other.default.svc.cluster.local"
)

func rawState(echoWeight uint32, otherPort uint16) *mesh.State {
	st := echoState(
		be(ap("10.0.7.1:7070"), echoWeight, ""),
		be(ap("10.0.7.2:7070"), 1, ""),
	)
	st.Services[1].Backends[0].Addr = netip.AddrPortFrom(netip.MustParseAddr("10.0.9.9"), otherPort)
	return st
}

// serveTCP serves s on a loopback TCP port and returns a client connection.
func serveTCP(t *testing.T, s *Server, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(lis) }()
	t.Cleanup(func() {
		s.Stop()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func newRawServer(t *testing.T, cfg Config, st *mesh.State) (*Server, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	s, err := New(cfg, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(st); err != nil {
		t.Fatal(err)
	}
	return s, reg
}

func streamCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

type sotwClient struct {
	t *testing.T
	discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
}

func (c sotwClient) send(req *discoveryv3.DiscoveryRequest) {
	c.t.Helper()
	if err := c.Send(req); err != nil {
		c.t.Fatal(err)
	}
}

func (c sotwClient) recv(typeURL string) *discoveryv3.DiscoveryResponse {
	c.t.Helper()
	r, err := c.Recv()
	if err != nil {
		c.t.Fatal(err)
	}
	if r.GetTypeUrl() != typeURL {
		c.t.Fatalf("next response is %s (version %s, %d resources), want %s", r.GetTypeUrl(), r.GetVersionInfo(), len(r.GetResources()), typeURL)
	}
	return r
}

func (c sotwClient) ack(r *discoveryv3.DiscoveryResponse, names ...string) {
	c.t.Helper()
	c.send(&discoveryv3.DiscoveryRequest{TypeUrl: r.GetTypeUrl(), VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce(), ResourceNames: names})
}

// resourceNamesOf decodes the names of a sotw response's resources.
func resourceNamesOf(t *testing.T, r *discoveryv3.DiscoveryResponse) []string {
	t.Helper()
	var out []string
	for _, a := range r.GetResources() {
		m, err := a.UnmarshalNew()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, cache.GetResourceName(m))
	}
	slices.Sort(out)
	return out
}

// TestSotwNACKOfFirstResponseIsNotResent is the resend-loop trap: a
// client that NACKs its first response reports version_info "" (it accepted
// nothing), which a plain LinearCache answers by sending the same rejected
// resources again at once.
func TestSotwNACKOfFirstResponseIsNotResent(t *testing.T) {
	s, reg := newRawServer(t, Config{}, rawState(1, 80))
	conn := serveTCP(t, s, nil)
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c := sotwClient{t, st}

	c.send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.ClusterType})
	r1 := c.recv(resource.ClusterType)
	if got := resourceNamesOf(t, r1); !slices.Equal(got, []string{InboundPassthroughCluster, PassthroughClusterName, echoCluster, otherCluster}) {
		t.Fatalf("clusters: %q", got)
	}
	c.send(&discoveryv3.DiscoveryRequest{
		TypeUrl: resource.ClusterType, ResponseNonce: r1.GetNonce(),
		ErrorDetail: &status.Status{Code: int32(codes.InvalidArgument), Message: "test: rejected"},
	})
	// The next message must answer this EDS request: the stream is ordered,
	// so a resend of the clusters would come first.
	c.send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: []string{echoCluster}})
	c.ack(c.recv(resource.EndpointType), echoCluster)

	n, ok := nodeStatus(s, rawNodeID)
	if !ok {
		t.Fatal("node not in Status")
	}
	cds := n.Types[resource.ClusterType]
	if cds.LastNACK == nil || cds.LastNACK.Version != r1.GetVersionInfo() || cds.LastNACK.Error != "test: rejected" || cds.AckedVersion != "" || cds.Pushes != 1 {
		t.Fatalf("cluster status: %+v nack %+v", cds, cds.LastNACK)
	}
	if n.Flavor != FlavorSidecar {
		t.Errorf("flavor %q", n.Flavor)
	}

	// A real change is sent, once.
	if err := s.Update(rawState(2, 80)); err != nil { // endpoints only: no CDS
		t.Fatal(err)
	}
	c.ack(c.recv(resource.EndpointType), echoCluster)
	st2 := rawState(2, 80)
	st2.Services[0].Algorithm = mesh.Maglev
	if err := s.Update(st2); err != nil {
		t.Fatal(err)
	}
	r2 := c.recv(resource.ClusterType)
	if r2.GetVersionInfo() == r1.GetVersionInfo() || len(r2.GetResources()) != 4 {
		t.Fatalf("second CDS response: version %s, %d resources", r2.GetVersionInfo(), len(r2.GetResources()))
	}
	if got := testMetric(t, reg, "shunt_xds_nacks_total", resource.ClusterType); got != 1 {
		t.Errorf("nacks = %v", got)
	}
	if got := testMetric(t, reg, "shunt_xds_pushes_total", resource.ClusterType); got != 2 {
		t.Errorf("CDS pushes = %v, want 2", got)
	}
}

// TestSotwPushesOnlyWhatChanged: an unchanged Update sends nothing, and an
// endpoint change wakes only the EDS watchers of that one service.
func TestSotwPushesOnlyWhatChanged(t *testing.T) {
	s, reg := newRawServer(t, Config{}, rawState(1, 80))
	conn := serveTCP(t, s, nil)
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c := sotwClient{t, st}
	c.send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.ListenerType})
	lds := c.recv(resource.ListenerType)
	if got := resourceNamesOf(t, lds); !slices.Equal(got, []string{InboundListenerName, OutboundListenerName}) {
		t.Fatalf("sidecar listeners: %q", got)
	}
	c.ack(lds)
	c.send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.ClusterType})
	c.ack(c.recv(resource.ClusterType))
	c.send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: []string{echoCluster}})
	eds := c.recv(resource.EndpointType)
	c.ack(eds, echoCluster)

	if err := s.Update(rawState(1, 80)); err != nil { // identical
		t.Fatal(err)
	}
	if err := s.Update(rawState(1, 81)); err != nil { // another service's endpoints
		t.Fatal(err)
	}
	if err := s.Update(rawState(2, 81)); err != nil { // this stream's endpoints
		t.Fatal(err)
	}
	eds2 := c.recv(resource.EndpointType)
	if got := resourceNamesOf(t, eds2); !slices.Equal(got, []string{echoCluster}) || eds2.GetVersionInfo() == eds.GetVersionInfo() {
		t.Fatalf("EDS after the change: %q version %s", got, eds2.GetVersionInfo())
	}
	c.ack(eds2, echoCluster)
	for typ, want := range map[string]float64{resource.ListenerType: 1, resource.ClusterType: 1, resource.EndpointType: 2} {
		if got := testMetric(t, reg, "shunt_xds_pushes_total", typ); got != want {
			t.Errorf("pushes{%s} = %v, want %v", typ, got, want)
		}
	}
	waitFor(t, "the ACK", func() bool {
		n, _ := nodeStatus(s, rawNodeID)
		return n.Types[resource.EndpointType].AckedVersion == eds2.GetVersionInfo()
	})
}

type deltaClient struct {
	t *testing.T
	discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
}

func (c deltaClient) send(req *discoveryv3.DeltaDiscoveryRequest) {
	c.t.Helper()
	if err := c.Send(req); err != nil {
		c.t.Fatal(err)
	}
}

func (c deltaClient) recv(typeURL string, wantNames, wantRemoved []string) *discoveryv3.DeltaDiscoveryResponse {
	c.t.Helper()
	r, err := c.Recv()
	if err != nil {
		c.t.Fatal(err)
	}
	var got []string
	for _, res := range r.GetResources() {
		if res.GetVersion() == "" {
			c.t.Errorf("delta resource %s has no version", res.GetName())
		}
		got = append(got, res.GetName())
	}
	slices.Sort(got)
	removed := slices.Sorted(slices.Values(r.GetRemovedResources()))
	if r.GetTypeUrl() != typeURL || !slices.Equal(got, wantNames) || !slices.Equal(removed, wantRemoved) {
		c.t.Fatalf("delta response %s %q removed %q; want %s %q removed %q", r.GetTypeUrl(), got, removed, typeURL, wantNames, wantRemoved)
	}
	return r
}

func (c deltaClient) ack(r *discoveryv3.DeltaDiscoveryResponse) {
	c.t.Helper()
	c.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: r.GetTypeUrl(), ResponseNonce: r.GetNonce()})
}

// TestDeltaADS: incremental xDS sends only changed resources and explicit
// removals, and a NACKed resource is not re-sent.
func TestDeltaADS(t *testing.T) {
	s, reg := newRawServer(t, Config{}, rawState(1, 80))
	conn := serveTCP(t, s, nil)
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c := deltaClient{t, st}
	allClusters := []string{InboundPassthroughCluster, PassthroughClusterName, echoCluster, otherCluster}
	c.send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode(), TypeUrl: resource.ClusterType})
	c.ack(c.recv(resource.ClusterType, allClusters, nil))
	c.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNamesSubscribe: []string{echoCluster, otherCluster}})
	c.ack(c.recv(resource.EndpointType, []string{echoCluster, otherCluster}, nil))

	if err := s.Update(rawState(1, 80)); err != nil {
		t.Fatal(err)
	}
	if err := s.Update(rawState(2, 80)); err != nil {
		t.Fatal(err)
	}
	bad := c.recv(resource.EndpointType, []string{echoCluster}, nil)
	c.send(&discoveryv3.DeltaDiscoveryRequest{
		TypeUrl: resource.EndpointType, ResponseNonce: bad.GetNonce(),
		ErrorDetail: &status.Status{Code: int32(codes.InvalidArgument), Message: "test: bad endpoints"},
	})
	// The rejected resource is not re-sent: the next response carries the
	// next change only.
	if err := s.Update(rawState(2, 81)); err != nil {
		t.Fatal(err)
	}
	c.ack(c.recv(resource.EndpointType, []string{otherCluster}, nil))
	waitFor(t, "the delta NACK in Status", func() bool {
		n, _ := nodeStatus(s, rawNodeID)
		ts := n.Types[resource.EndpointType]
		return ts.LastNACK != nil && ts.LastNACK.Version == bad.GetSystemVersionInfo() && ts.NACKs == 1
	})

	// Removing a service removes its cluster first, then its endpoints.
	st2 := rawState(2, 81)
	st2.Services = st2.Services[:1]
	if err := s.Update(st2); err != nil {
		t.Fatal(err)
	}
	c.recv(resource.ClusterType, nil, []string{otherCluster})
	c.recv(resource.EndpointType, nil, []string{otherCluster})
	if got := testMetric(t, reg, "shunt_xds_nacks_total", resource.EndpointType); got != 1 {
		t.Errorf("nacks = %v", got)
	}
}

// TestUpdateRejectsInvalidState: a bad state changes nothing.
func TestUpdateRejectsInvalidState(t *testing.T) {
	s, _ := newRawServer(t, Config{}, rawState(1, 80))
	before := s.Status().Resources
	bad := rawState(1, 80)
	bad.Services = append(bad.Services, bad.Services[0])
	if err := s.Update(bad); err == nil {
		t.Fatal("duplicate service accepted")
	}
	if err := s.Update(nil); err == nil {
		t.Fatal("nil state accepted")
	}
	if after := s.Status().Resources; !mapsEqual(before, after) {
		t.Fatalf("resources changed: %v -> %v", before, after)
	}
	if got := s.resourceNames(keyLDSProxyless); !slices.Equal(got, []string{"echo.default.svc.cluster.local:7070", "other.default.svc.cluster.local:80"}) {
		t.Fatalf("API listeners: %q", got)
	}
	s.Stop()
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestMaxStreams: streams beyond the limit are refused.
func TestMaxStreams(t *testing.T) {
	s, _ := newRawServer(t, Config{MaxStreams: 1}, rawState(1, 80))
	conn := serveTCP(t, s, nil)
	ads := discoveryv3.NewAggregatedDiscoveryServiceClient(conn)
	first, err := ads.StreamAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c := sotwClient{t, first}
	c.send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.ClusterType})
	c.recv(resource.ClusterType)

	second, err := ads.StreamAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := second.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.ClusterType}); err != nil && !errors.Is(err, context.Canceled) {
		t.Logf("send: %v", err)
	}
	if _, err := second.Recv(); grpcstatus.Code(err) != codes.ResourceExhausted {
		t.Fatalf("second stream: %v, want RESOURCE_EXHAUSTED", err)
	}
	if got := s.Status().Streams; got != 1 {
		t.Errorf("Status().Streams = %d", got)
	}
}

// TestTLS serves over TCP with a certificate from Config.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	certPEM, keyPEM := selfSigned(t)
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{TLSCertFile: certFile}, nil, nil); err == nil {
		t.Fatal("certificate without key accepted")
	}
	s, _ := newRawServer(t, Config{TLSCertFile: certFile, TLSKeyFile: keyFile}, rawState(1, 80))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	conn := serveTCP(t, s, credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "xds.shunt.test"}))
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c := sotwClient{t, st}
	c.send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.ClusterType})
	c.recv(resource.ClusterType)
}

func selfSigned(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "xds.shunt.test"},
		DNSNames:     []string{"xds.shunt.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

func testMetric(t *testing.T, reg *prometheus.Registry, name, typeURL string) float64 {
	t.Helper()
	return (&testServer{reg: reg}).metric(t, name, typeURL)
}

// TestListenAndServeUnix: a stale socket file is replaced, the socket is
// served in plaintext, and Stop ends ListenAndServe without error.
func TestListenAndServeUnix(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "xds.sock")
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()

	// The socket's group is the sidecars' (1337 by default); a non-root
	// test run can only hand it to its own group.
	gid := os.Getegid()
	s, err := New(Config{UnixSocket: sock, UnixSocketGID: &gid, UnixSocketMode: 0o640}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Update(rawState(1, 80)); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.ListenAndServe() }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(streamCtx(t), grpc.WaitForReady(true))
	if err != nil {
		t.Fatal(err)
	}
	c := sotwClient{t, st}
	c.send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.ListenerType})
	c.recv(resource.ListenerType)
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o640 || fi.Sys().(*syscall.Stat_t).Gid != uint32(gid) {
		t.Errorf("socket mode: %v %v", fi.Mode(), err)
	}
	s.Stop()
	if err := <-done; err != nil {
		t.Fatalf("ListenAndServe: %v", err)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []Config{
		{TLSCertFile: "a"},
		{TLSKeyFile: "a"},
		{TLSClientCAFile: "ca"},
		{KeepaliveTime: -1},
		{MaxStreams: -1},
		{MaxResourceNames: -1},
		{TCPAddr: ":15010"}, // TCP is TLS only
		{TCPAddr: "15010", TLSCertFile: "c", TLSKeyFile: "k"},
		{UnixSocketMode: 0o1777},
		{UnixSocketGID: new(-1)},
	} {
		if err := c.WithDefaults().Validate(); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
	if err := (Config{}).WithDefaults().Validate(); err != nil {
		t.Errorf("zero config: %v", err)
	}
	if _, err := New(Config{}, nil, nil); err != nil {
		t.Fatal(err)
	}
}

// resourceNames lists what a cache holds.
func (s *Server) resourceNames(key string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Sorted(maps.Keys(s.caches[key].entries))
}

// TestConfigJSON: the YAML/JSON form takes durations as strings.
func TestConfigJSON(t *testing.T) {
	var c Config
	if err := json.Unmarshal([]byte(`{"keepaliveTime":"45s","connectTimeout":"1m30s","keepaliveMinTime":5000000000,"maxResourceNames":10}`), &c); err != nil {
		t.Fatal(err)
	}
	if time.Duration(c.KeepaliveTime) != 45*time.Second || time.Duration(c.ConnectTimeout) != 90*time.Second ||
		time.Duration(c.KeepaliveMinTime) != 5*time.Second || c.MaxResourceNames != 10 {
		t.Fatalf("parsed %+v", c)
	}
	if err := json.Unmarshal([]byte(`{"keepaliveTime":"soon"}`), &c); err == nil {
		t.Fatal("bad duration accepted")
	}
	b, err := json.Marshal(Config{KeepaliveTime: Duration(30 * time.Second)})
	if err != nil || !strings.Contains(string(b), `"keepaliveTime":"30s"`) {
		t.Fatalf("marshalled %s, %v", b, err)
	}
}

// TestMaxResourceNames: a stream watching more names than the limit is
// closed with RESOURCE_EXHAUSTED, sotw and delta; the limit is counted.
func TestMaxResourceNames(t *testing.T) {
	s, reg := newRawServer(t, Config{MaxResourceNames: 2}, rawState(1, 80))
	conn := serveTCP(t, s, nil)
	ads := discoveryv3.NewAggregatedDiscoveryServiceClient(conn)

	st, err := ads.StreamAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c := sotwClient{t, st}
	c.send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.EndpointType, ResourceNames: []string{echoCluster, otherCluster}})
	c.recv(resource.EndpointType) // two names: within the limit
	c.send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: []string{echoCluster, otherCluster, "x"}})
	for {
		if _, err := st.Recv(); err != nil {
			if grpcstatus.Code(err) != codes.ResourceExhausted {
				t.Fatalf("sotw stream over the limit: %v, want RESOURCE_EXHAUSTED", err)
			}
			break
		}
	}

	ds, err := ads.DeltaAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	d := deltaClient{t, ds}
	d.send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode(), TypeUrl: resource.EndpointType, ResourceNamesSubscribe: []string{echoCluster}})
	d.ack(d.recv(resource.EndpointType, []string{echoCluster}, nil))
	d.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNamesSubscribe: []string{otherCluster, "x"}})
	for {
		if _, err := ds.Recv(); err != nil {
			if grpcstatus.Code(err) != codes.ResourceExhausted {
				t.Fatalf("delta stream over the limit: %v, want RESOURCE_EXHAUSTED", err)
			}
			break
		}
	}
	if got := testMetric(t, reg, "shunt_xds_streams_refused_total", ""); got != 2 {
		t.Errorf("streams refused = %v, want 2", got)
	}
}

// TestStatusPendingAndWatching: a response not yet answered is pending;
// the ACK clears it; Watching counts the names asked for.
func TestStatusPendingAndWatching(t *testing.T) {
	s, _ := newRawServer(t, Config{}, rawState(1, 80))
	conn := serveTCP(t, s, nil)
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	c := sotwClient{t, st}
	c.send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.EndpointType, ResourceNames: []string{echoCluster, otherCluster}})
	r := c.recv(resource.EndpointType)
	waitFor(t, "the response to show as pending", func() bool {
		n, _ := nodeStatus(s, rawNodeID)
		ts := n.Types[resource.EndpointType]
		return ts.Pending && ts.SentVersion == r.GetVersionInfo() && ts.Watching == 2
	})
	c.ack(r, echoCluster, otherCluster)
	waitFor(t, "the ACK to clear pending", func() bool {
		n, _ := nodeStatus(s, rawNodeID)
		ts := n.Types[resource.EndpointType]
		return !ts.Pending && ts.AckedVersion == r.GetVersionInfo()
	})
}

// TestNothingServedBeforeFirstApply: a client that connects before the
// server has any state waits and then gets the whole configuration, never
// an empty one (Envoy would drop every cluster it had).
func TestNothingServedBeforeFirstApply(t *testing.T) {
	s, err := New(Config{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	conn := serveTCP(t, s, nil)
	got := make(chan []string, 1)
	go func() {
		st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(streamCtx(t), grpc.WaitForReady(true))
		if err != nil {
			t.Error(err)
			got <- nil
			return
		}
		if err := st.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode(), TypeUrl: resource.ClusterType}); err != nil {
			t.Error(err)
		}
		r, err := st.Recv()
		if err != nil {
			t.Error(err)
			got <- nil
			return
		}
		got <- resourceNamesOf(t, r)
	}()
	time.Sleep(200 * time.Millisecond) // let the client try first (not an assertion)
	if err := s.Update(rawState(1, 80)); err != nil {
		t.Fatal(err)
	}
	if names := <-got; len(names) != 4 {
		t.Fatalf("first CDS response: %q, want the 4 clusters", names)
	}
}
