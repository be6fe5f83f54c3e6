package xdplb

import (
	"net/netip"
	"os"
	"testing"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/mesh/maglev"
)

// The fixtures' configuration.
const (
	testSeed   = "c2h1bnQteGRwLWxi" // "shunt-xdp-lb"
	testSize   = 251
	snatLo     = 40000
	snatHi     = 40999
	clientPort = 33000
)

var (
	node4 = netip.MustParseAddr("10.0.0.1")
	node6 = netip.MustParseAddr("fd00::1")
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
func ip(s string) netip.Addr     { return netip.MustParseAddr(s) }

func be(addr string, w uint32) xdp.Backend { return xdp.Backend{Addr: ap(addr), Weight: w} }

func beT(addr, tunnel string, w uint32) xdp.Backend {
	return xdp.Backend{Addr: ap(addr), Tunnel: ip(tunnel), Weight: w}
}

// fixtureServices are the services the fixtures run against.
func fixtureServices() []xdp.Service {
	three4 := []xdp.Backend{be("10.1.0.1:8080", 1), be("10.1.0.2:8080", 1), be("10.1.0.3:8080", 1)}
	three6 := []xdp.Backend{be("[fd00:1::1]:8080", 1), be("[fd00:1::2]:8080", 1), be("[fd00:1::3]:8080", 1)}
	return []xdp.Service{
		{Frontend: ap("10.96.0.1:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPIP, Backends: three4},
		{Frontend: ap("10.96.0.2:53"), Proto: mesh.UDP, Mode: mesh.SNAT, Backends: []xdp.Backend{be("10.1.0.1:5353", 1), be("10.1.0.2:5353", 2)}},
		{Frontend: ap("10.96.0.3:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.Geneve, Backends: three4},
		{Frontend: ap("10.96.0.4:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPOption, Backends: three4},
		{Frontend: ap("[fd00:96::1]:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPIP, Backends: three6},
		{Frontend: ap("10.96.0.6:80"), Proto: mesh.TCP, Mode: mesh.DSR, Backends: []xdp.Backend{
			beT("10.1.0.1:8080", "fd00:2::1", 1), beT("10.1.0.2:8080", "fd00:2::2", 1)}},
		{Frontend: ap("[fd00:96::7]:80"), Proto: mesh.TCP, Mode: mesh.DSR, Backends: []xdp.Backend{
			beT("[fd00:1::1]:8080", "10.2.0.1", 1)}},
		{Frontend: ap("10.96.0.8:80"), Proto: mesh.TCP, Mode: mesh.Hybrid, Dispatch: mesh.Geneve, Backends: three4},
		{Frontend: ap("10.96.0.8:80"), Proto: mesh.UDP, Mode: mesh.Hybrid, Dispatch: mesh.Geneve, Backends: three4},
		{Frontend: ap("10.96.0.9:80"), Proto: mesh.TCP, Mode: mesh.DSR, Backends: []xdp.Backend{be("10.1.0.1:8080", 0)}},
		{Frontend: ap("[fd00:96::2]:53"), Proto: mesh.UDP, Mode: mesh.SNAT, Backends: []xdp.Backend{be("[fd00:1::1]:5353", 1)}},
		{Frontend: ap("[fd00:96::3]:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.Geneve, Backends: three6},
		{Frontend: ap("[fd00:96::4]:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPOption, Backends: three6},
		{Frontend: ap("10.96.0.10:53"), Proto: mesh.UDP, Mode: mesh.DSR, Backends: []xdp.Backend{
			be("10.1.0.1:53", 1), be("10.1.0.2:53", 3), be("10.1.0.3:53", 0), be("10.1.0.4:53", 2)}},
		{Frontend: ap("10.96.0.11:53"), Proto: mesh.UDP, Mode: mesh.DSR, Dispatch: mesh.IPOption, Backends: three4},
		{Frontend: ap("[fd00:96::10]:53"), Proto: mesh.UDP, Mode: mesh.DSR, Dispatch: mesh.Geneve, Backends: three6},
		// Client-IP session affinity: DSR and SNAT.
		{Frontend: ap("10.96.0.12:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPIP, ClientIPAffinity: true, Backends: three4},
		{Frontend: ap("[fd00:96::12]:53"), Proto: mesh.UDP, Mode: mesh.SNAT, ClientIPAffinity: true, Backends: three6},
	}
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("privileged test: needs root (loads eBPF programs)")
	}
}

// newLB loads the load balancer with private maps (nothing pinned or
// attached) and the fixture services.
func newLB(t testing.TB, svcs []xdp.Service) *xdp.Datapath {
	t.Helper()
	requireRoot(t)
	cfg := xdp.Config{Seed: testSeed, TableSize: testSize, NodeAddr: node4.String(), NodeAddr6: node6.String(),
		SNATPorts: "40000-40999", MaxFlows: 65536, MaxBackends: 1024, MaxServices: 64}
	d, err := xdp.Open(cfg, "", nil)
	if err != nil {
		t.Fatalf("load xdplb: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	if _, err := d.Sync(svcs); err != nil {
		t.Fatalf("sync: %v", err)
	}
	return d
}

// model is the Go side's independent expectation: Maglev tables from
// mesh/maglev, slots from maglev.FlowHash and the flows' entropy from
// xdp.CTFlowHash.
type model struct {
	seed maglev.Seed
	svcs map[string]xdp.Service
}

func newModel(t testing.TB, svcs []xdp.Service) *model {
	seed, err := maglev.ParseSeed(testSeed)
	if err != nil {
		t.Fatal(err)
	}
	m := &model{seed: seed, svcs: map[string]xdp.Service{}}
	for _, s := range svcs {
		m.svcs[xdp.FrontendString(s.Frontend, s.Proto)] = s
	}
	return m
}

func proto(udp bool) mesh.Protocol {
	if udp {
		return mesh.UDP
	}
	return mesh.TCP
}

func ipProtoNum(udp bool) uint8 {
	if udp {
		return 17
	}
	return 6
}

// hash is the conntrack hash of src -> dst: its entropy (encapsulation,
// SNAT port).
func (m *model) hash(src, dst netip.AddrPort, udp bool) uint32 {
	return xdp.CTFlowHash(proto(udp), src, dst, m.seed.DatapathSeed())
}

// pick is the backend Maglev gives the flow src -> dst (a frontend).
func (m *model) pick(t testing.TB, src, dst netip.AddrPort, udp bool) xdp.Backend {
	t.Helper()
	s, ok := m.svcs[xdp.FrontendString(dst, proto(udp))]
	if !ok {
		t.Fatalf("no service %s", dst)
	}
	mb := make([]maglev.Backend, len(s.Backends))
	for i, b := range s.Backends {
		mb[i] = maglev.Backend{Key: b.Key(), Weight: b.Weight}
	}
	tab, err := maglev.Build(mb, testSize, m.seed)
	if err != nil {
		t.Fatal(err)
	}
	tu := maglev.NewTuple(src, dst, ipProtoNum(udp))
	if s.ClientIPAffinity {
		tu = tu.ClientOnly()
	}
	b, ok := tab.LookupBackend(maglev.FlowHash(tu, m.seed.DatapathSeed()))
	if !ok {
		t.Fatalf("service %s has no backend", dst)
	}
	for _, x := range s.Backends {
		if x.Key() == b.Key {
			return x
		}
	}
	t.Fatalf("backend %s not found", b.Key)
	return xdp.Backend{}
}

func tunnelOf(b xdp.Backend) netip.Addr {
	if b.Tunnel.IsValid() {
		return b.Tunnel
	}
	return b.Addr.Addr()
}

func nodeFor(a netip.Addr) netip.Addr {
	if a.Is4() {
		return node4
	}
	return node6
}

// snatPort is the first node port the load balancer tries for a flow.
func snatPort(hash uint32) uint16 {
	return uint16(snatLo + (hash>>8)%(snatHi-snatLo+1))
}
