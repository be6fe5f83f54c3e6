package xdplb

import (
	"crypto/sha256"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/test/harness"
)

// agentNode is an in-process agent (agent.New, as shuntd runs it) with the
// load balancer on the eth0 of a pod of its own and the backend side on the
// same device; its socket LB is attached to the test's cgroup.
type agentNode struct {
	t    *testing.T
	env  *harness.Env
	pod  *harness.Pod
	a    *agent.Agent
	root string // the agent's bpffs root
}

func newAgentNode(t *testing.T) *agentNode {
	t.Helper()
	requireRoot(t)
	env := harness.New(t)
	n := &agentNode{t: t, env: env, pod: env.NewPod("lbnode"), root: filepath.Join(env.BPFFSPath(), "agent")}
	var cfg agent.Config
	cfg.Datapath.Root = n.root
	cfg.Datapath.Cgroup = env.CgroupPath()
	cfg.HostNetNS = env.Node().NetNSPath()
	cfg.StateFile = filepath.Join(t.TempDir(), "state.json")
	cfg.XDP = xdp.Config{Devices: []string{"eth0"}, DSRDevices: []string{"eth0"}, NetNS: n.pod.NetNSPath(), Seed: e2eSeed,
		TableSize: 251, NodeAddr: n.pod.IPv4().String(), NodeAddr6: n.pod.IPv6().String(), MaxFlows: 16384, MaxBackends: 256, MaxServices: 64}
	a, err := agent.New(cfg, slog.New(slog.NewTextHandler(testWriter{t}, nil)), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		a.Close()
		xdp.Cleanup(n.root) // detach and unpin what the agent left attached
	})
	n.a = a
	return n
}

// resyncServices are three maglev services, one per forwarding kind.
func resyncServices() []mesh.Service {
	mk := func(name, front string, mode mesh.ForwardingMode, disp mesh.Dispatch, proto mesh.Protocol) mesh.Service {
		s := mesh.Service{Name: name, Frontend: mesh.Frontend{Addr: ap(front), Proto: proto}, Algorithm: mesh.Maglev, Mode: mode, Dispatch: disp}
		for i := 1; i <= 3; i++ {
			s.Backends = append(s.Backends, mesh.Backend{Addr: ap(fmt.Sprintf("10.244.7.%d:8080", i)), Weight: 1})
		}
		return s
	}
	return []mesh.Service{
		mk("ipip", "10.96.7.1:80", mesh.DSR, mesh.IPIP, mesh.TCP),
		mk("geneve", "10.96.7.2:80", mesh.DSR, mesh.Geneve, mesh.TCP),
		mk("snat", "10.96.7.3:53", mesh.SNAT, "", mesh.UDP),
	}
}

func (n *agentNode) pinnedMap(name string) *ebpf.Map {
	n.t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(n.root, "xdp", "maps", name), nil)
	if err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { m.Close() })
	return m
}

func innerTable(t *testing.T, tables *ebpf.Map, id uint32) *ebpf.Map {
	t.Helper()
	var inner *ebpf.Map
	if err := tables.Lookup(id, &inner); err != nil {
		t.Fatalf("lb_tables[%d]: %v", id, err)
	}
	t.Cleanup(func() { inner.Close() })
	return inner
}

// pinnedState reads the load balancer's and the backend side's pinned maps
// back (not through the agent) into a form without ids: per frontend its
// mode, dispatch, whether its generation is live, and its Maglev table as
// the backends of its slots; lb_config; dsr_services. Also the inner map
// id of each service's table.
func (n *agentNode) pinnedState() (map[string]string, map[string]uint32) {
	t := n.t
	t.Helper()
	svcs, tables, gens, backends := n.pinnedMap(bpf.XdplbMapLbServices), n.pinnedMap(bpf.XdplbMapLbTables), n.pinnedMap(bpf.XdplbMapLbSvcGen), n.pinnedMap(bpf.XdplbMapLbBackends)
	out, tableIDs := map[string]string{}, map[string]uint32{}
	var k bpf.XdplbXlbVip
	var v bpf.XdplbXlbService
	it := svcs.Iterate()
	for it.Next(&k, &v) {
		name := fmt.Sprintf("service %v:%d/%d", k.Addr[0], k.Port, k.Proto)
		var gen uint32
		if err := gens.Lookup(v.Id, &gen); err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		inner := innerTable(t, tables, v.Id)
		info, err := inner.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		tableIDs[name] = uint32(id)
		for slot := uint32(0); slot < inner.MaxEntries(); slot++ {
			var beID uint32
			var be bpf.XdplbXlbBackend
			if err := inner.Lookup(slot, &beID); err != nil {
				t.Fatal(err)
			}
			if err := backends.Lookup(beID, &be); err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(h, "%v:%d via %v,", be.Addr, be.Port, be.Tunnel)
		}
		out[name] = fmt.Sprintf("mode %d dispatch %d size %d live %v table %x", v.Mode, v.Dispatch, v.Size, gen == v.Gen && gen != 0, h.Sum(nil)[:8])
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	var cfg bpf.XdplbXlbConfig
	if err := n.pinnedMap(bpf.XdplbMapLbConfig).Lookup(uint32(0), &cfg); err != nil {
		t.Fatal(err)
	}
	out["lb_config"] = fmt.Sprintf("%+v", cfg)
	var dk bpf.DsrDsrSvcKey
	var dv bpf.DsrDsrLocal
	dit := n.pinnedMap(bpf.DsrMapDsrServices).Iterate()
	for dit.Next(&dk, &dv) {
		out[fmt.Sprintf("dsr %+v", dk)] = fmt.Sprintf("%+v", dv)
	}
	if err := dit.Err(); err != nil {
		t.Fatal(err)
	}
	return out, tableIDs
}

// checkPicks runs the loaded program on fresh flows (new source ports
// every call, so no conntrack entry masks the table) to each service and
// compares the backend with mesh/maglev's pick.
func (n *agentNode) checkPicks(svcs []mesh.Service, round int) (mismatches int) {
	t := n.t
	t.Helper()
	dp := n.a.XDP()
	for _, s := range svcs {
		xs := xdp.Service{}
		for _, b := range s.Backends {
			xs.Backends = append(xs.Backends, xdp.Backend{Addr: b.Addr, Weight: b.Weight})
		}
		for i := 0; i < 20; i++ {
			src := netip.AddrPortFrom(ip("198.51.100.77"), uint16(20000+round*1000+i))
			res, err := xdp.Which(dp.Program(), dp.Conntrack(), s.Frontend.Proto, src, s.Frontend.Addr)
			if err != nil {
				t.Fatal(err)
			}
			want := tableOwnerProto(t, xs, src, s.Frontend.Addr, ipProtoNum(s.Frontend.Proto == mesh.UDP))
			if res.Verdict != "XDP_TX" || res.Backend.String() != want {
				mismatches++
			}
		}
	}
	return mismatches
}

// TestAgentResyncRepairsXDP: entries of the pinned XDP maps deleted or
// changed behind the agent's back (a service, a Maglev table's slots, a
// service generation, a backend, the node configuration, a backend-side
// entry) are back after the agent's periodic resync, and the program picks
// what mesh/maglev picks again. A resync with nothing to repair keeps the
// tables (no new inner maps).
func TestAgentResyncRepairsXDP(t *testing.T) {
	n := newAgentNode(t)
	svcs := resyncServices()
	if err := n.a.Apply(agent.SourceKubernetes, agent.Delta{Services: svcs}); err != nil {
		t.Fatal(err)
	}
	want, tableIDs := n.pinnedState()
	if len(want) != 3+1+6 { // services, lb_config, dsr_services of the 2 DSR services
		t.Fatalf("pinned state has %d entries: %v", len(want), want)
	}
	if bad := n.checkPicks(svcs, 0); bad != 0 {
		t.Fatalf("before any drift, %d picks differ from mesh/maglev", bad)
	}
	if err := n.a.Resync(); err != nil {
		t.Fatal(err)
	}
	if got, ids := n.pinnedState(); fmt.Sprint(got) != fmt.Sprint(want) || fmt.Sprint(ids) != fmt.Sprint(tableIDs) {
		t.Fatalf("a resync without drift changed the maps:\n got %v %v\nwant %v %v", got, ids, want, tableIDs)
	}

	// Drift, written to the pinned maps directly.
	svcMap, tables := n.pinnedMap(bpf.XdplbMapLbServices), n.pinnedMap(bpf.XdplbMapLbTables)
	read := func(front string, proto mesh.Protocol) (bpf.XdplbXlbVip, bpf.XdplbXlbService) {
		t.Helper()
		fk := xdp.FlowKey(proto, ap("192.0.2.1:1"), ap(front))
		k := bpf.XdplbXlbVip{Addr: fk.Dst, Port: fk.Dport, Proto: fk.Proto, Family: fk.Family}
		var v bpf.XdplbXlbService
		if err := svcMap.Lookup(&k, &v); err != nil {
			t.Fatalf("lb_services[%s]: %v", front, err)
		}
		return k, v
	}
	ipipKey, _ := read("10.96.7.1:80", mesh.TCP)
	if err := svcMap.Delete(&ipipKey); err != nil {
		t.Fatal(err)
	}
	_, gen := read("10.96.7.2:80", mesh.TCP)
	table := innerTable(t, tables, gen.Id)
	var other uint32
	if err := table.Lookup(uint32(0), &other); err != nil {
		t.Fatal(err)
	}
	for slot := uint32(0); slot < table.MaxEntries(); slot += 2 {
		if err := table.Put(slot, other); err != nil { // half the slots to one backend
			t.Fatal(err)
		}
	}
	_, snat := read("10.96.7.3:53", mesh.UDP)
	if err := n.pinnedMap(bpf.XdplbMapLbSvcGen).Put(snat.Id, uint32(0)); err != nil {
		t.Fatal(err)
	}
	var be bpf.XdplbXlbBackend
	beMap := n.pinnedMap(bpf.XdplbMapLbBackends)
	if err := beMap.Lookup(other, &be); err != nil {
		t.Fatal(err)
	}
	be.Port++ // a backend's port changed
	if err := beMap.Put(other, be); err != nil {
		t.Fatal(err)
	}
	cfgMap := n.pinnedMap(bpf.XdplbMapLbConfig)
	var cfg bpf.XdplbXlbConfig
	if err := cfgMap.Lookup(uint32(0), &cfg); err != nil {
		t.Fatal(err)
	}
	cfg.Seed ^= 0xdeadbeef
	if err := cfgMap.Put(uint32(0), cfg); err != nil {
		t.Fatal(err)
	}
	dsrMap := n.pinnedMap(bpf.DsrMapDsrServices)
	var dk bpf.DsrDsrSvcKey
	if !dsrMap.Iterate().Next(&dk, new(bpf.DsrDsrLocal)) {
		t.Fatal("dsr_services is empty")
	}
	if err := dsrMap.Delete(&dk); err != nil {
		t.Fatal(err)
	}
	drift, _ := n.pinnedState()
	changed := 0
	for k, v := range want {
		if drift[k] != v {
			changed++
			t.Logf("drift: %s: %q", k, drift[k])
		}
	}
	if changed != 5 { // 3 services, lb_config, one dsr_services entry
		t.Fatalf("%d entries drifted, want 5", changed)
	}
	if bad := n.checkPicks(svcs, 1); bad < 40 {
		t.Fatalf("only %d of 60 picks differ from mesh/maglev with the maps corrupted: the test proves nothing", bad)
	}

	// The periodic resync.
	if err := n.a.Resync(); err != nil {
		t.Fatal(err)
	}
	got, _ := n.pinnedState()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("after resync: %s = %q, want %q", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("after resync %d entries, want %d: %v", len(got), len(want), got)
	}
	if bad := n.checkPicks(svcs, 2); bad != 0 {
		t.Errorf("after resync, %d of 60 picks differ from mesh/maglev", bad)
	}
}

func healthz(t *testing.T, a *agent.Agent) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	a.Handler(nil).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz", nil))
	return rec.Code, rec.Body.String()
}

// TestAgentHealthXDPLinks: /healthz (the DaemonSet's liveness and readiness
// probe) answers 503, naming the device and the reason, when a configured
// device lost its program: a link detached behind the agent's back (the
// XDP link, a tcx link of the backend side) or a link's pin removed. The
// periodic resync attaches (or pins) again and /healthz answers 200.
func TestAgentHealthXDPLinks(t *testing.T) {
	n := newAgentNode(t)
	if code, body := healthz(t, n.a); code != http.StatusOK {
		t.Fatalf("healthz %d %q with everything attached", code, body)
	}
	pin := func(name string) string { return filepath.Join(n.root, "xdp", "links", name) }
	ifindex := 0
	if err := n.pod.InNetNS(func() error {
		iface, err := net.InterfaceByName("eth0")
		if err == nil {
			ifindex = iface.Index
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	linkOn := func(name string) (id link.ID, dev int) {
		t.Helper()
		l, err := link.LoadPinnedLink(pin(name), nil)
		if err != nil {
			t.Fatalf("pinned link %s: %v", name, err)
		}
		defer l.Close()
		info, err := l.Info()
		if err != nil {
			t.Fatal(err)
		}
		if x := info.XDP(); x != nil {
			return info.ID, int(x.Ifindex)
		}
		return info.ID, int(info.TCX().Ifindex)
	}
	for _, c := range []struct {
		name, link, reason string
		detach             bool
	}{
		{"XDP link detached", "xdp-eth0", "detached", true},
		{"backend side ingress link detached", "dsr-in-eth0", "detached", true},
		{"XDP link's pin removed", "xdp-eth0", "pin is gone", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			before, _ := linkOn(c.link)
			if c.detach {
				l, err := link.LoadPinnedLink(pin(c.link), nil)
				if err != nil {
					t.Fatal(err)
				}
				if err := l.Detach(); err != nil {
					t.Fatalf("detach %s: %v", c.link, err)
				}
				l.Close()
			} else if err := os.Remove(pin(c.link)); err != nil {
				t.Fatal(err)
			}
			err := n.a.Healthy()
			if err == nil || !strings.Contains(err.Error(), c.link+" on eth0") || !strings.Contains(err.Error(), c.reason) {
				t.Fatalf("Healthy() = %v, want an error naming %s on eth0: %s", err, c.link, c.reason)
			}
			code, body := healthz(t, n.a)
			if code != http.StatusServiceUnavailable || !strings.Contains(body, c.link+" on eth0") {
				t.Errorf("healthz %d %q, want 503 naming %s", code, body, c.link)
			}
			if st, err := n.a.XDPStatus(); err != nil || len(st.LinkProblems) != 1 || st.LinkProblems[0].Name != c.link {
				t.Errorf("lb status: link problems %+v (%v), want %s", st.LinkProblems, err, c.link)
			}
			if err := n.a.Resync(); err != nil {
				t.Fatal(err)
			}
			if err := n.a.Healthy(); err != nil {
				t.Fatalf("after resync: %v", err)
			}
			if code, body := healthz(t, n.a); code != http.StatusOK {
				t.Errorf("after resync: healthz %d %q", code, body)
			}
			if st, err := n.a.XDPStatus(); err != nil || len(st.LinkProblems) != 0 {
				t.Errorf("after resync: link problems %+v (%v)", st.LinkProblems, err)
			}
			after, dev := linkOn(c.link)
			if dev != ifindex {
				t.Errorf("after resync %s is on ifindex %d, eth0 is %d", c.link, dev, ifindex)
			}
			if c.detach == (after == before) { // a new link, or the same one pinned again
				t.Errorf("%s: link %d before, %d after resync", c.link, before, after)
			}
		})
	}
}
