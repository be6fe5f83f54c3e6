package agent_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/xds"
)

func TestXDSConfigSection(t *testing.T) {
	c, err := agent.ParseConfig([]byte(`
xds:
  enabled: true
  tcpAddr: "127.0.0.1:15010"
  tlsCertFile: /etc/shunt/xds.crt
  tlsKeyFile: /etc/shunt/xds.key
  keepaliveTime: 45s
  maxStreams: 100
  maxResourceNames: 5000
  unixSocketGID: 0
`))
	if err != nil {
		t.Fatal(err)
	}
	x := c.WithDefaults().XDS
	if !x.Enabled || x.UnixSocket != agent.DefaultXDSSocket || x.TCPAddr != "127.0.0.1:15010" || time.Duration(x.KeepaliveTime) != 45*time.Second ||
		x.MaxStreams != 100 || x.MaxResourceNames != 5000 || *x.UnixSocketGID != 0 || x.UnixSocketMode != 0o660 || x.MaxStreamsPerConn != xds.DefaultMaxStreamsPerConn {
		t.Fatalf("xds section: %+v", x)
	}
	if err := x.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{
		"xds:\n  tcpAddr: \":15010\"\n",    // TCP needs TLS
		"xds:\n  keepaliveTime: soon\n",    // not a duration
		"xds:\n  maxStream: 3\n",           // unknown field
		"xds:\n  tlsCertFile: /a.crt\n",    // cert without key
		"xds:\n  unixSocketMode: 0o1777\n", // not a YAML int: refused
		"xds:\n  maxResourceNames: -1\n",   // negative
		"xds:\n  enabled: true\n  tcpAddr: \"15010\"\n  tlsCertFile: a\n  tlsKeyFile: b\n", // no port
	} {
		c, err := agent.ParseConfig([]byte(bad))
		if err == nil {
			err = c.WithDefaults().XDS.Validate()
		}
		if err == nil {
			t.Errorf("accepted:\n%s", bad)
		}
	}
}

// TestXDSFedFromAgent: shuntd's xDS server serves the agent's desired
// state, and a change of one service reaches a sidecar-like ADS client
// (watching every cluster and every endpoint) as exactly one EDS response
// with exactly that service's endpoints; nothing else is pushed.
func TestXDSFedFromAgent(t *testing.T) {
	env := harness.New(t)
	dir := t.TempDir()
	gid := os.Getegid()
	cfg := agent.Config{
		APISocket: filepath.Join(dir, "api.sock"),
		XDS:       agent.XDSConfig{Enabled: true, Config: xds.Config{UnixSocket: filepath.Join(dir, "xds", "xds.sock"), UnixSocketGID: &gid}},
	}
	for i := range 20 {
		cfg.Services = append(cfg.Services, agent.ServiceConfig{
			Name: fmt.Sprintf("ns/svc%d:http", i), Frontend: fmt.Sprintf("10.96.0.%d:80", i+1),
			Backends: []agent.BackendConfig{{Addr: fmt.Sprintf("10.244.%d.1:8080", i)}, {Addr: fmt.Sprintf("10.244.%d.2:8080", i)}},
		})
	}
	reg := prometheus.NewRegistry()
	a := newXDSAgent(t, env, cfg, reg)

	conn, err := grpc.NewClient("unix://"+cfg.XDS.UnixSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx, grpc.WaitForReady(true))
	if err != nil {
		t.Fatal(err)
	}
	node := &corev3.Node{Id: "sidecar~10.244.9.9~client.ns~ns.svc.cluster.local", UserAgentName: "envoy"}
	send := func(r *discoveryv3.DiscoveryRequest) {
		t.Helper()
		if err := st.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	recv := func(typeURL string) *discoveryv3.DiscoveryResponse {
		t.Helper()
		r, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.GetTypeUrl() != typeURL {
			t.Fatalf("got a %s response (%d resources), want %s", r.GetTypeUrl(), len(r.GetResources()), typeURL)
		}
		return r
	}
	// As Envoy does: all clusters, then the endpoints of every EDS cluster.
	send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType})
	cds := recv(resource.ClusterType)
	if len(cds.GetResources()) != 20+2 { // + the two passthrough clusters
		t.Fatalf("%d clusters", len(cds.GetResources()))
	}
	send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.ClusterType, VersionInfo: cds.GetVersionInfo(), ResponseNonce: cds.GetNonce()})
	var names []string
	for i := range 20 {
		names = append(names, fmt.Sprintf("outbound|80||svc%d.ns.svc.cluster.local", i))
	}
	send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: names})
	eds := recv(resource.EndpointType)
	if len(eds.GetResources()) != 20 {
		t.Fatalf("%d endpoint assignments", len(eds.GetResources()))
	}
	send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, VersionInfo: eds.GetVersionInfo(), ResponseNonce: eds.GetNonce(), ResourceNames: names})

	// One service's endpoints change (shuntctl service update).
	if err := a.UpdateService(agent.ServiceConfig{Name: "ns/svc7:http", Frontend: "10.96.0.8:80",
		Backends: []agent.BackendConfig{{Addr: "10.244.7.1:8080"}, {Addr: "10.244.7.3:8080"}}}); err != nil {
		t.Fatal(err)
	}
	eds2 := recv(resource.EndpointType)
	if len(eds2.GetResources()) != 1 {
		t.Fatalf("EDS response with %d resources, want only the changed one", len(eds2.GetResources()))
	}
	var cla endpointv3.ClusterLoadAssignment
	if err := eds2.GetResources()[0].UnmarshalTo(&cla); err != nil {
		t.Fatal(err)
	}
	var addrs []string
	for _, loc := range cla.GetEndpoints() {
		for _, ep := range loc.GetLbEndpoints() {
			addrs = append(addrs, ep.GetEndpoint().GetAddress().GetSocketAddress().GetAddress())
		}
	}
	slices.Sort(addrs)
	if cla.GetClusterName() != "outbound|80||svc7.ns.svc.cluster.local" || !slices.Equal(addrs, []string{"10.244.7.1", "10.244.7.3"}) {
		t.Fatalf("changed CLA: %s %v", cla.GetClusterName(), addrs)
	}
	send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, VersionInfo: eds2.GetVersionInfo(), ResponseNonce: eds2.GetNonce(), ResourceNames: names})

	// A new service: its cluster (CDS is state of the world: all 23), then
	// nothing else until the client asks for its endpoints.
	if err := a.UpdateService(agent.ServiceConfig{Name: "ns/new:http", Frontend: "10.96.1.1:80", Backends: []agent.BackendConfig{{Addr: "10.244.50.1:8080"}}}); err != nil {
		t.Fatal(err)
	}
	cds2 := recv(resource.ClusterType)
	if got := clusterNames(t, cds2); len(got) != 23 || !slices.Contains(got, "outbound|80||new.ns.svc.cluster.local") {
		t.Fatalf("CDS after adding a service: %v", got)
	}

	var x xds.Status
	deadline := time.Now().Add(30 * time.Second)
	for { // the last ACK is processed by the server asynchronously
		if x, err = a.XDSStatus(); err != nil {
			t.Fatal(err)
		}
		if len(x.Nodes) == 1 && x.Nodes[0].Types[resource.EndpointType].AckedVersion == eds2.GetVersionInfo() || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if x.Resources[resource.EndpointType] != 21 || x.Streams != 1 || len(x.Nodes) != 1 || x.Nodes[0].ID != node.Id {
		t.Fatalf("status: %+v", x)
	}
	eps := x.Nodes[0].Types[resource.EndpointType]
	if eps.Pushes != 2 || eps.Watching != 20 || eps.AckedVersion != eds2.GetVersionInfo() {
		t.Fatalf("EDS status: %+v", eps)
	}
	if n := x.Nodes[0].Types[resource.ClusterType].Pushes; n != 2 {
		t.Fatalf("%d CDS pushes, want 2", n)
	}

	a.StopXDS()
	if _, err := a.XDSStatus(); !errors.Is(err, agent.ErrNotFound) {
		t.Fatalf("status after StopXDS: %v", err)
	}
	if _, err := os.Stat(cfg.XDS.UnixSocket); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
}

// newXDSAgent starts an agent with its xDS server in env.
func newXDSAgent(t *testing.T, env *harness.Env, cfg agent.Config, reg *prometheus.Registry) *agent.Agent {
	t.Helper()
	cfg.Datapath.Root = env.BPFFSPath()
	cfg.Datapath.Cgroup = env.CgroupPath()
	cfg.HostNetNS = env.Node().NetNSPath()
	cfg.StateFile = filepath.Join(t.TempDir(), "state.json")
	a, err := agent.New(cfg, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if err := a.StartXDS(reg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.StopXDS)
	return a
}

func clusterNames(t *testing.T, r *discoveryv3.DiscoveryResponse) []string {
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
