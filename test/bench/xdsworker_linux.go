package bench

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/anypb"
)

// The xds-clients worker (`shuntctl bench worker xds-clients`) is the
// benchmark's sidecars: N raw ADS clients, each on its own gRPC connection
// (as N Envoys would be), state of the world, watching what an Envoy
// sidecar watches: every cluster (CDS wildcard), then the endpoints of
// every EDS cluster (one EDS request naming them all). Every response is
// ACKed at once. It runs in its own process so that the benchmark's heap
// holds only the server.
//
// Output, one line each, on stdout:
//
//	ready                                  every client has ACKed its first CDS and EDS responses
//	eds CLIENT UNIXNANO N CLUSTER MAXPORT  an EDS response after ready: N resources, the first one's
//	                                       cluster and the highest endpoint port in it (N ≤ 8)
//	cds CLIENT UNIXNANO N                  a CDS response after ready
//	err MESSAGE                            a client failed (the worker exits)
//
// UNIXNANO is the wall clock when Recv returned.

func xdsClientsMain(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("xds-clients", flag.ContinueOnError)
	sock := fs.String("socket", "", "xDS server unix socket")
	n := fs.Int("clients", 100, "clients")
	delta := fs.Bool("delta", false, "delta ADS instead of state of the world")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *sock == "" || *n < 1 {
		return errors.New("xds-clients: --socket and --clients ≥ 1 are required")
	}
	out := &lineWriter{w: bufio.NewWriter(stdout)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { // the benchmark closes our stdin (or dies): stop
		io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	var ready sync.WaitGroup
	errc := make(chan error, *n)
	for i := range *n {
		ready.Add(1)
		go func() {
			if *delta {
				errc <- runDeltaXDSClient(ctx, *sock, i, &ready, out)
			} else {
				errc <- runXDSClient(ctx, *sock, i, &ready, out)
			}
		}()
	}
	go func() {
		ready.Wait()
		out.line("ready")
	}()
	for range *n {
		if err := <-errc; err != nil && ctx.Err() == nil {
			out.line("err client: " + err.Error())
			return err
		}
	}
	return nil
}

type lineWriter struct {
	mu sync.Mutex
	w  *bufio.Writer
}

func (l *lineWriter) line(s string) {
	l.mu.Lock()
	l.w.WriteString(s)
	l.w.WriteByte('\n')
	l.w.Flush()
	l.mu.Unlock()
}

func dialXDS(sock string) (*grpc.ClientConn, error) {
	return grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20)))
}

func xdsBenchNode(id int) *corev3.Node {
	return &corev3.Node{Id: fmt.Sprintf("sidecar~127.0.0.1~client-%03d.bench~bench.svc.cluster.local", id), UserAgentName: "envoy"}
}

// edsReport formats an EDS response after ready.
func edsReport(id int, at int64, res []*anypb.Any) (string, error) {
	cluster, port := "-", 0
	if len(res) <= 8 && len(res) > 0 {
		var cla endpointv3.ClusterLoadAssignment
		if err := res[0].UnmarshalTo(&cla); err != nil {
			return "", err
		}
		cluster, port = cla.GetClusterName(), maxPort(&cla)
	}
	return fmt.Sprintf("eds %d %d %d %s %d", id, at, len(res), cluster, port), nil
}

func runXDSClient(ctx context.Context, sock string, id int, ready *sync.WaitGroup, out *lineWriter) (err error) {
	readyDone := false
	defer func() {
		if !readyDone {
			ready.Done()
		}
	}()
	conn, err := dialXDS(sock)
	if err != nil {
		return err
	}
	defer conn.Close()
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	node := xdsBenchNode(id)
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}); err != nil {
		return err
	}
	var edsNames []string
	gotEDS := false
	for {
		r, err := st.Recv()
		if err != nil {
			return err
		}
		at := time.Now().UnixNano()
		switch r.GetTypeUrl() {
		case resource.ClusterType:
			if readyDone {
				out.line(fmt.Sprintf("cds %d %d %d", id, at, len(r.GetResources())))
			}
			names, err := edsClusters(r.GetResources())
			if err != nil {
				return err
			}
			if err := st.Send(&discoveryv3.DiscoveryRequest{TypeUrl: r.GetTypeUrl(), VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce()}); err != nil {
				return err
			}
			if !slices.Equal(names, edsNames) {
				edsNames = names
				if err := st.Send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: edsNames}); err != nil {
					return err
				}
			}
		case resource.EndpointType:
			if readyDone {
				line, err := edsReport(id, at, r.GetResources())
				if err != nil {
					return err
				}
				out.line(line)
			}
			if err := st.Send(&discoveryv3.DiscoveryRequest{TypeUrl: r.GetTypeUrl(), VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce(), ResourceNames: edsNames}); err != nil {
				return err
			}
			if !gotEDS {
				gotEDS = true
				readyDone = true
				ready.Done()
			}
		default:
			return fmt.Errorf("unexpected response type %s", r.GetTypeUrl())
		}
	}
}

// runDeltaXDSClient is runXDSClient over delta ADS: a wildcard CDS
// subscription, then a subscription to the endpoints of every EDS cluster;
// ACKs carry only the nonce.
func runDeltaXDSClient(ctx context.Context, sock string, id int, ready *sync.WaitGroup, out *lineWriter) (err error) {
	readyDone := false
	defer func() {
		if !readyDone {
			ready.Done()
		}
	}()
	conn, err := dialXDS(sock)
	if err != nil {
		return err
	}
	defer conn.Close()
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{Node: xdsBenchNode(id), TypeUrl: resource.ClusterType}); err != nil {
		return err
	}
	subscribed := map[string]bool{}
	for {
		r, err := st.Recv()
		if err != nil {
			return err
		}
		at := time.Now().UnixNano()
		anys := make([]*anypb.Any, len(r.GetResources()))
		for i, res := range r.GetResources() {
			anys[i] = res.GetResource()
		}
		if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: r.GetTypeUrl(), ResponseNonce: r.GetNonce()}); err != nil {
			return err
		}
		switch r.GetTypeUrl() {
		case resource.ClusterType:
			if readyDone {
				out.line(fmt.Sprintf("cds %d %d %d", id, at, len(anys)))
			}
			names, err := edsClusters(anys)
			if err != nil {
				return err
			}
			var more []string
			for _, n := range names {
				if !subscribed[n] {
					subscribed[n] = true
					more = append(more, n)
				}
			}
			if len(more) > 0 {
				if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNamesSubscribe: more}); err != nil {
					return err
				}
			}
		case resource.EndpointType:
			if readyDone {
				line, err := edsReport(id, at, anys)
				if err != nil {
					return err
				}
				out.line(line)
			} else {
				readyDone = true
				ready.Done()
			}
		default:
			return fmt.Errorf("unexpected response type %s", r.GetTypeUrl())
		}
	}
}

// edsClusters lists the EDS service names of clusters.
func edsClusters(res []*anypb.Any) ([]string, error) {
	var names []string
	for _, a := range res {
		var c clusterv3.Cluster
		if err := a.UnmarshalTo(&c); err != nil {
			return nil, err
		}
		if c.GetType() == clusterv3.Cluster_EDS {
			n := c.GetEdsClusterConfig().GetServiceName()
			if n == "" {
				n = c.GetName()
			}
			names = append(names, n)
		}
	}
	return names, nil
}

func maxPort(cla *endpointv3.ClusterLoadAssignment) int {
	m := 0
	for _, loc := range cla.GetEndpoints() {
		for _, ep := range loc.GetLbEndpoints() {
			m = max(m, int(ep.GetEndpoint().GetAddress().GetSocketAddress().GetPortValue()))
		}
	}
	return m
}
