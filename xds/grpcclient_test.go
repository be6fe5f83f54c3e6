package xds

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthgrpc "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	_ "google.golang.org/grpc/xds" // registers the xds:/// resolver and the xDS balancers

	"github.com/shuntmesh/shunt/mesh"
)

// The grpc-go xDS client takes its bootstrap from GRPC_XDS_BOOTSTRAP_CONFIG,
// which grpc reads into a package variable when it is initialized, before
// TestMain runs. So TestMain re-runs the test binary as a child with the
// variable set; the bootstrap points at a unix socket that each test's
// Server listens on in turn.
var xdsSocket string

const (
	testNodeID    = "sidecar~127.0.0.1~client-0.default~default.svc.cluster.local"
	socketEnv     = "SHUNT_XDS_TEST_SOCKET"
	bootstrapEnv  = "GRPC_XDS_BOOTSTRAP_CONFIG"
	bootstrapTmpl = `{
  "xds_servers": [{"server_uri": "unix://%s", "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
  "node": {"id": %q, "cluster": "shunt-test"}
}`
)

func TestMain(m *testing.M) {
	if xdsSocket = os.Getenv(socketEnv); xdsSocket != "" {
		runTests(m) // exits
	}
	dir, err := os.MkdirTemp("", "shunt-xds")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sock := filepath.Join(dir, "xds.sock")
	cmd := exec.Command(os.Args[0], os.Args[1:]...)
	cmd.Env = append(os.Environ(), socketEnv+"="+sock, bootstrapEnv+"="+fmt.Sprintf(bootstrapTmpl, sock, testNodeID))
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	err = cmd.Run()
	os.RemoveAll(dir)
	if ee, ok := err.(*exec.ExitError); ok {
		os.Exit(ee.ExitCode())
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

const (
	echoName   = "default/echo:grpc"
	echoTarget = "xds:///echo.default.svc.cluster.local:7070"
)

// echoState is one service behind the VIP 10.96.7.7:7070 (gRPC clients
// never dial the VIP; the name is what matters) plus an unrelated service.
func echoState(bs ...mesh.Backend) *mesh.State {
	return &mesh.State{Services: []mesh.Service{
		{Name: echoName, Frontend: mesh.Frontend{Addr: ap("10.96.7.7:7070"), Proto: mesh.TCP}, Backends: bs},
		{Name: "default/other:http", Frontend: mesh.Frontend{Addr: ap("10.96.7.8:80"), Proto: mesh.TCP},
			Backends: []mesh.Backend{{Addr: ap("10.0.9.9:80"), Weight: 1}}},
	}}
}

func be(addr netip.AddrPort, weight uint32, state mesh.BackendState) mesh.Backend {
	return mesh.Backend{Addr: addr, Weight: weight, State: state}
}

// startBackends starts n real gRPC servers on 127.0.0.1 serving the
// standard health service; the client learns which one answered from the
// peer address.
func startBackends(t *testing.T, n int) []netip.AddrPort {
	t.Helper()
	var out []netip.AddrPort
	for range n {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := grpc.NewServer()
		healthgrpc.RegisterHealthServer(srv, health.NewServer())
		go srv.Serve(lis)
		t.Cleanup(srv.Stop)
		out = append(out, netip.MustParseAddrPort(lis.Addr().String()))
	}
	return out
}

// logRecorder keeps the messages of the records logged through it.
type logRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, rec.Message)
	return nil
}
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *logRecorder) WithGroup(string) slog.Handler      { return r }
func (r *logRecorder) count(substr string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.msgs {
		if strings.Contains(m, substr) {
			n++
		}
	}
	return n
}

type testServer struct {
	*Server
	reg  *prometheus.Registry
	logs *logRecorder
}

// startXDS serves a new Server on the bootstrap's unix socket.
func startXDS(t *testing.T, st *mesh.State, hook ...func(*Resources)) *testServer {
	t.Helper()
	reg := prometheus.NewRegistry()
	logs := &logRecorder{}
	s, err := New(Config{}, slog.New(logs), reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hook {
		s.setTestHook(h)
	}
	if err := s.Update(st); err != nil {
		t.Fatal(err)
	}
	os.Remove(xdsSocket)
	lis, err := net.Listen("unix", xdsSocket)
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
	return &testServer{Server: s, reg: reg, logs: logs}
}

// metric reads one sample of a registered metric (0 when absent).
func (ts *testServer) metric(t *testing.T, name, typeURL string) float64 {
	t.Helper()
	mfs, err := ts.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := typeURL == ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "type_url" && l.GetValue() == typeURL {
					match = true
				}
			}
			if !match {
				continue
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	return 0
}

func dialEcho(t *testing.T) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(echoTarget, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// spread makes n RPCs and counts them per backend. Every RPC must succeed.
func spread(t *testing.T, conn *grpc.ClientConn, n int) map[netip.AddrPort]int {
	t.Helper()
	out := map[netip.AddrPort]int{}
	hc := healthgrpc.NewHealthClient(conn)
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		var p peer.Peer
		_, err := hc.Check(ctx, &healthgrpc.HealthCheckRequest{}, grpc.Peer(&p), grpc.WaitForReady(true))
		cancel()
		if err != nil {
			t.Fatalf("RPC failed: %v", err)
		}
		out[netip.MustParseAddrPort(p.Addr.String())]++
	}
	return out
}

// waitSpread polls batches of RPCs until one batch reaches exactly the
// backends in want (each at least once, no other); a deadline, not a sleep,
// bounds it.
func waitSpread(t *testing.T, conn *grpc.ClientConn, want ...netip.AddrPort) {
	t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	var got map[netip.AddrPort]int
	for time.Now().Before(deadline) {
		got = spread(t, conn, 10*len(want))
		if sameSet(got, want) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("RPCs never spread over exactly %v; last batch %v", want, got)
}

func sameSet(got map[netip.AddrPort]int, want []netip.AddrPort) bool {
	if len(got) != len(want) {
		return false
	}
	for _, w := range want {
		if got[w] == 0 {
			return false
		}
	}
	return true
}

// assertOnly checks a further batch, once converged, stays on want.
func assertOnly(t *testing.T, conn *grpc.ClientConn, want ...netip.AddrPort) {
	t.Helper()
	got := spread(t, conn, 20*len(want))
	for b := range got {
		if !slices.Contains(want, b) {
			t.Fatalf("RPC reached %s, which should get no new traffic (batch %v)", b, got)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func nodeStatus(s *Server, id string) (NodeStatus, bool) {
	for _, n := range s.Status().Nodes {
		if n.ID == id {
			return n, true
		}
	}
	return NodeStatus{}, false
}

// acked reports whether the node accepted the latest version sent for
// every xDS type a gRPC client uses.
func acked(s *Server, id string) bool {
	n, ok := nodeStatus(s, id)
	if !ok {
		return false
	}
	for _, typ := range []string{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
		ts, ok := n.Types[typ]
		if !ok || ts.SentVersion == "" || ts.AckedVersion != ts.SentVersion {
			return false
		}
	}
	return true
}

// TestGRPCClientFollowsEndpoints: a real proxyless gRPC client balances
// over the backends and follows drain, removal, addition and the
// terminating-only-as-last-resort rule.
func TestGRPCClientFollowsEndpoints(t *testing.T) {
	b := startBackends(t, 4)
	s := startXDS(t, echoState(be(b[0], 1, ""), be(b[1], 1, ""), be(b[2], 1, "")))
	conn := dialEcho(t)

	waitSpread(t, conn, b[0], b[1], b[2])
	waitFor(t, "the client's ACKs", func() bool { return acked(s.Server, testNodeID) })
	n, _ := nodeStatus(s.Server, testNodeID)
	if n.Flavor != FlavorProxyless || n.Pod != "client-0" || n.Namespace != "default" || !strings.HasPrefix(n.UserAgent, "gRPC Go") {
		t.Errorf("node status: %+v", n.NodeInfo)
	}

	// Drain: weight 0 keeps the endpoint (DRAINING) but no new RPC.
	if err := s.Update(echoState(be(b[0], 1, ""), be(b[1], 1, ""), be(b[2], 0, ""))); err != nil {
		t.Fatal(err)
	}
	waitSpread(t, conn, b[0], b[1])
	assertOnly(t, conn, b[0], b[1])

	// Remove b1 entirely.
	if err := s.Update(echoState(be(b[0], 1, ""), be(b[2], 0, ""))); err != nil {
		t.Fatal(err)
	}
	waitSpread(t, conn, b[0])
	assertOnly(t, conn, b[0])

	// Add b3: it gets traffic.
	if err := s.Update(echoState(be(b[0], 1, ""), be(b[2], 0, ""), be(b[3], 1, ""))); err != nil {
		t.Fatal(err)
	}
	waitSpread(t, conn, b[0], b[3])

	// Terminating backends are used only when no active one is left.
	if err := s.Update(echoState(be(b[0], 1, mesh.Terminating), be(b[3], 1, ""))); err != nil {
		t.Fatal(err)
	}
	waitSpread(t, conn, b[3])
	assertOnly(t, conn, b[3])
	if err := s.Update(echoState(be(b[0], 1, mesh.Terminating), be(b[3], 1, mesh.Terminating))); err != nil {
		t.Fatal(err)
	}
	waitSpread(t, conn, b[0], b[3])

	if got := s.metric(t, "shunt_xds_connected_clients", ""); got < 1 {
		t.Errorf("shunt_xds_connected_clients = %v", got)
	}
	if got := s.metric(t, "shunt_xds_resources", resource.ClusterType); got != 4 { // 2 services + 2 passthrough
		t.Errorf("shunt_xds_resources{cluster} = %v, want 4", got)
	}
	if got := s.metric(t, "shunt_xds_pushes_total", resource.EndpointType); got < 6 {
		t.Errorf("shunt_xds_pushes_total{endpoint} = %v, want at least one per update", got)
	}
}

// TestGRPCClientSurvivesServerRestart: the client keeps serving from its
// last configuration while the control plane is down, reconnects to the
// restarted one on the same address and follows its updates.
func TestGRPCClientSurvivesServerRestart(t *testing.T) {
	b := startBackends(t, 3)
	all := echoState(be(b[0], 1, ""), be(b[1], 1, ""), be(b[2], 1, ""))
	s1 := startXDS(t, all)
	conn := dialEcho(t)
	waitSpread(t, conn, b[0], b[1], b[2])

	s1.Stop()
	// The data plane does not depend on the control plane being up.
	if got := spread(t, conn, 30); len(got) != 3 {
		t.Errorf("while the server is down: %v", got)
	}

	s2 := startXDS(t, all)
	waitFor(t, "the client to reconnect and ACK", func() bool { return acked(s2.Server, testNodeID) })
	if err := s2.Update(echoState(be(b[0], 1, ""), be(b[2], 1, ""))); err != nil {
		t.Fatal(err)
	}
	waitSpread(t, conn, b[0], b[2])
	assertOnly(t, conn, b[0], b[2])
}

// TestGRPCClientNACK: a cluster gRPC rejects (lb_policy RANDOM is valid
// for Envoy, unknown to gRPC) is NACKed; the NACK shows in Status, the
// metric and the log; the client keeps its last good cluster and still
// follows endpoint updates; the rejected version is not re-sent.
func TestGRPCClientNACK(t *testing.T) {
	b := startBackends(t, 3)
	s := startXDS(t, echoState(be(b[0], 1, ""), be(b[1], 1, ""), be(b[2], 1, "")))
	conn := dialEcho(t)
	waitSpread(t, conn, b[0], b[1], b[2])
	waitFor(t, "the client's ACKs", func() bool { return acked(s.Server, testNodeID) })

	s.setTestHook(randomLB)
	if err := s.Update(echoState(be(b[0], 1, ""), be(b[1], 1, ""), be(b[2], 1, ""))); err != nil {
		t.Fatal(err)
	}
	var nack TypeStatus
	waitFor(t, "the NACK in Status", func() bool {
		n, _ := nodeStatus(s.Server, testNodeID)
		nack = n.Types[resource.ClusterType]
		return nack.LastNACK != nil
	})
	if !strings.Contains(nack.LastNACK.Error, "lbPolicy") || nack.LastNACK.Version == "" || nack.LastNACK.Version != nack.SentVersion {
		t.Errorf("NACK: %+v (sent %q)", nack.LastNACK, nack.SentVersion)
	}
	if nack.AckedVersion == nack.SentVersion {
		t.Errorf("the rejected version %q is reported as acked", nack.SentVersion)
	}
	if got := s.metric(t, "shunt_xds_nacks_total", resource.ClusterType); got < 1 {
		t.Errorf("shunt_xds_nacks_total{cluster} = %v", got)
	}
	if s.logs.count("rejected") < 1 {
		t.Error("no log line for the NACK")
	}
	cdsPushes := s.metric(t, "shunt_xds_pushes_total", resource.ClusterType)
	nacks := s.metric(t, "shunt_xds_nacks_total", resource.ClusterType)

	// Last good config: still round robin over the three backends.
	if got := spread(t, conn, 30); len(got) != 3 {
		t.Errorf("after the NACK: %v", got)
	}
	// An endpoint-only change still reaches the client. The ADS stream is
	// ordered, so a resend loop of the rejected clusters would have run
	// before this update got through.
	if err := s.Update(echoState(be(b[0], 1, ""), be(b[1], 1, ""), be(b[2], 0, ""))); err != nil {
		t.Fatal(err)
	}
	waitSpread(t, conn, b[0], b[1])
	if got := s.metric(t, "shunt_xds_pushes_total", resource.ClusterType) - cdsPushes; got > 1 {
		t.Errorf("the rejected clusters were re-sent %v times", got)
	}
	if got := s.metric(t, "shunt_xds_nacks_total", resource.ClusterType) - nacks; got > 1 {
		t.Errorf("%v more NACKs after the first", got)
	}

	// Fixing the cluster clears the rejection.
	s.setTestHook(nil)
	if err := s.Update(echoState(be(b[0], 1, ""), be(b[1], 1, ""), be(b[2], 0, ""))); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the fixed cluster to be ACKed", func() bool { return acked(s.Server, testNodeID) })
	n, _ := nodeStatus(s.Server, testNodeID)
	if n.Types[resource.ClusterType].NACKs != 1 {
		t.Errorf("NACK count %d, want 1", n.Types[resource.ClusterType].NACKs)
	}
}

// randomLB makes the echo cluster unacceptable to gRPC (lb_policy RANDOM,
// which Envoy supports and ValidateAll accepts).
func randomLB(r *Resources) {
	for _, c := range r.Clusters {
		if c.GetName() == ClusterName(&echoState().Services[0], "") {
			c.LbPolicy = clusterv3.Cluster_RANDOM
		}
	}
}

// TestGRPCClientNACKOfFirstConfig: the client rejects the first cluster it
// ever gets, so its NACK carries no accepted version. The rejected clusters
// must not be re-sent; the fixed ones, once, make the client work.
func TestGRPCClientNACKOfFirstConfig(t *testing.T) {
	b := startBackends(t, 2)
	st := echoState(be(b[0], 1, ""), be(b[1], 1, ""))
	s := startXDS(t, st, randomLB)
	conn := dialEcho(t)
	conn.Connect()
	waitFor(t, "the NACK in Status", func() bool {
		n, _ := nodeStatus(s.Server, testNodeID)
		nack := n.Types[resource.ClusterType].LastNACK
		return nack != nil && strings.Contains(nack.Error, "lbPolicy")
	})
	// The client's NACK was answered by nothing; fix the cluster and the
	// next CDS push is the fixed one.
	s.setTestHook(nil)
	if err := s.Update(st); err != nil {
		t.Fatal(err)
	}
	waitSpread(t, conn, b[0], b[1])
	waitFor(t, "the fixed cluster to be ACKed", func() bool { return acked(s.Server, testNodeID) })
	if got := s.metric(t, "shunt_xds_pushes_total", resource.ClusterType); got > 3 {
		t.Errorf("%v CDS pushes for one rejected and one fixed version", got)
	}
	if got := s.metric(t, "shunt_xds_nacks_total", resource.ClusterType); got < 1 || got > 2 {
		t.Errorf("%v NACKs", got)
	}
}
