package agent

import (
	"net/netip"
	"testing"

	"github.com/shuntmesh/shunt/mesh"
)

// North-south frontends go to the XDP load balancer whatever the socket
// LB's algorithm; in-cluster ones only when they ask for Maglev.
func TestXDPServicesSelectsNorthSouth(t *testing.T) {
	be := []mesh.Backend{{Addr: netip.MustParseAddrPort("10.244.1.2:8080"), Weight: 1}}
	fe := func(s string) mesh.Frontend {
		return mesh.Frontend{Addr: netip.MustParseAddrPort(s), Proto: mesh.TCP}
	}
	st := &mesh.State{Services: []mesh.Service{
		{Name: "cluster", Frontend: fe("10.96.0.1:80"), Backends: be, Kind: mesh.ClusterIP},
		{Name: "cluster-maglev", Frontend: fe("10.96.0.2:80"), Backends: be, Kind: mesh.ClusterIP, Algorithm: mesh.Maglev},
		{Name: "nodeport", Frontend: fe("192.0.2.10:30080"), Backends: be, Kind: mesh.NodePort},
		{Name: "lb", Frontend: fe("203.0.113.10:80"), Backends: be, Kind: mesh.LoadBalancer, AffinityTimeout: 10800},
		{Name: "external", Frontend: fe("198.51.100.7:80"), Backends: be, Kind: mesh.ExternalIP},
		{Name: "standalone", Frontend: fe("10.96.0.3:80"), Backends: be},
	}}
	var got []string
	for _, x := range XDPServices(st) {
		got = append(got, x.Frontend.String())
		// sessionAffinity: ClientIP reaches the load balancer.
		if want := x.Frontend.String() == "203.0.113.10:80"; x.ClientIPAffinity != want {
			t.Errorf("%s: client-IP affinity %v, want %v", x.Frontend, x.ClientIPAffinity, want)
		}
	}
	want := []string{"10.96.0.2:80", "192.0.2.10:30080", "203.0.113.10:80", "198.51.100.7:80"}
	if len(got) != len(want) {
		t.Fatalf("XDP services %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("XDP services %v, want %v", got, want)
		}
	}
}
