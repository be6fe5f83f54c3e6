package cli

import (
	"strings"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/shuntmesh/shunt/xds"
)

func TestWriteXDSStatus(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	st := xds.Status{
		Streams:   1,
		Resources: map[string]int{resource.ListenerType: 2, resource.ClusterType: 5, resource.EndpointType: 3},
		Warnings:  []string{`service "b": cluster name taken`},
		Nodes: []xds.NodeStatus{{
			NodeInfo: xds.NodeInfo{ID: "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local", Flavor: xds.FlavorSidecar},
			Types: map[string]xds.TypeStatus{
				resource.EndpointType: {Watching: 3, SentVersion: "7", AckedVersion: "7"},
				resource.ClusterType: {SentVersion: "4", AckedVersion: "3", NACKs: 1,
					LastNACK: &xds.NACK{Version: "4", Error: "bad\n  lb policy", Time: now.Add(-90 * time.Second)}},
				"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret": {Pending: true, SentVersion: "1"},
			},
		}},
	}
	var b strings.Builder
	if err := writeXDSStatus(&b, st, now); err != nil {
		t.Fatal(err)
	}
	want := `xDS server: 1 streams, 1 nodes; serving LDS 2, RDS 0, CDS 5, EDS 3
warning: service "b": cluster name taken

NODE                                        FLAVOR   TYPE    WATCHING  SENT  ACKED  PENDING  NACKS  LAST NACK
sidecar~10.0.0.1~a.ns~ns.svc.cluster.local  sidecar  CDS     *         4     3      no       1      version 4, 1m30s ago: bad lb policy
                                                     EDS     3         7     7      no       0      -
                                                     Secret  *         1     -      yes      0      -
`
	if got := b.String(); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
}
