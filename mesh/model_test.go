package mesh

import (
	"errors"
	"net/netip"
	"testing"
)

func TestServiceKindAffinityOrigin(t *testing.T) {
	s := Service{Name: "n/s:80/tcp/nodePort@10.0.0.1:30080", Frontend: Frontend{Addr: netip.MustParseAddrPort("10.0.0.1:30080"), Proto: TCP},
		Kind: NodePort, AffinityTimeout: 10800, Origin: Origin{Namespace: "n", Name: "s", Port: "http", AppProtocol: "http"}}
	if err := s.Validate("s"); err != nil {
		t.Fatal(err)
	}
	if !s.Kind.NorthSouth() || ClusterIP.NorthSouth() || FrontendKind("").NorthSouth() {
		t.Error("NorthSouth: node ports, load balancer and external IPs only")
	}
	for _, tc := range []struct {
		mut   func(*Service)
		field string
	}{
		{func(s *Service) { s.Kind = "ingress" }, "s.kind"},
		{func(s *Service) { s.AffinityTimeout = MaxAffinityTimeout + 1 }, "s.affinityTimeoutSeconds"},
	} {
		bad := s
		tc.mut(&bad)
		var fe *FieldError
		if err := bad.Validate("s"); !errors.As(err, &fe) || fe.Field != tc.field {
			t.Errorf("error %v, want one naming %s", err, tc.field)
		}
	}
	o := s
	if !s.Equal(&o) {
		t.Error("a copy must be equal")
	}
	for _, mut := range []func(*Service){
		func(s *Service) { s.Kind = ClusterIP },
		func(s *Service) { s.AffinityTimeout = 0 },
		func(s *Service) { s.Origin.AppProtocol = "" },
		func(s *Service) { s.Backends = []Backend{{Addr: netip.MustParseAddrPort("10.1.0.1:80"), Weight: 1}} },
	} {
		o := s
		mut(&o)
		if s.Equal(&o) {
			t.Errorf("changed service %+v compares equal", o)
		}
	}
}
