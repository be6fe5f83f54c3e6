package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/test/kube"
	"github.com/shuntmesh/shunt/test/ops"
)

// TestObservability runs a real Prometheus (Debian's) scraping four real
// shuntd agents while real traffic flows through Shunt, with the alert rules
// of deploy/prometheus loaded, and then runs every query of every panel of
// deploy/grafana/shunt-dashboard.json against it: each must answer with
// data (a series with a number) over the traffic window.
//
// The agents, as on four nodes, all in the test's harness (their own bpffs
// folders and cgroups, never the machine's root cgroup):
//   - "main": socket LB of a Kubernetes Service (real kube-apiserver, the
//     agent as the ServiceAccount of deploy/rbac.yaml), two pods with
//     sidecars whose sidecar↔sidecar hop sockmap auto accelerates, an app
//     steered to its sidecar, and its xDS server with an ADS client;
//   - "lb": the XDP Maglev load balancer on a pod's veth;
//   - "dsr-xb0", "dsr-xb1": the backend side of DSR on two backends.
//
// Then it checks that exactly the alerts the test provoked are active, and
// that faults raise theirs: the API server stopped (ShuntKubernetesAPIDown)
// and a program detached behind the agent's back (ShuntProgramDetached,
// /healthz failing).
//
// The agents run in the test's own (root) network namespace so that they
// reach the API server and Prometheus reaches them on loopback;
// hostNetNS names the harness node namespace as the node's, and the XDP
// ones attach in the pods' namespaces (xdp.netns).
func TestObservability(t *testing.T) {
	c := newCluster(t) // be0..be2 serving TCP/UDP on 8080, and a client
	env := c.env
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// --- Kubernetes: API server, RBAC, node, a Service with endpoints. ---
	cp := kube.Start(t, kube.Options{})
	kc := cp.Admin()
	if err := kc.Namespace(ctx, "shunt-system", nil); err != nil {
		t.Fatal(err)
	}
	rbac, err := os.ReadFile(filepath.Join(ops.Root(), "deploy", "rbac.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := kc.ApplyYAML(ctx, rbac); err != nil {
		t.Fatal(err)
	}
	kubeconfig, err := cp.Kubeconfig("system:serviceaccount:shunt-system:shunt", "system:serviceaccounts", "system:serviceaccounts:shunt-system")
	if err != nil {
		t.Fatal(err)
	}
	const nodeName = "shunt-obs-node"
	node := &corev1.Node{}
	node.Name = nodeName
	if err := kc.Create(ctx, node); err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: harness.NodeIPv4.String()}}
	if err := kc.UpdateStatus(ctx, node); err != nil {
		t.Fatal(err)
	}
	if err := kc.Namespace(ctx, "obs", nil); err != nil {
		t.Fatal(err)
	}

	// --- Pods. ---
	const vip = "10.96.40.40"
	web := &corev1.Service{}
	web.Name, web.Namespace = "web", "obs"
	web.Spec.ClusterIP = vip
	web.Spec.Ports = []corev1.ServicePort{{Name: "http", Port: 80}}
	if err := kc.Create(ctx, web); err != nil {
		t.Fatal(err)
	}
	// An annotation value Shunt does not know: counted as rejected.
	odd := &corev1.Service{}
	odd.Name, odd.Namespace = "odd", "obs"
	odd.Annotations = map[string]string{"shunt.dev/lb-algorithm": "round-robin"}
	odd.Spec.ClusterIP = "10.96.40.41"
	odd.Spec.Ports = []corev1.ServicePort{{Name: "http", Port: 80}}
	if err := kc.Create(ctx, odd); err != nil {
		t.Fatal(err)
	}
	slice := obsSlice(c.backends...)
	if err := kc.Create(ctx, slice); err != nil {
		t.Fatal(err)
	}

	scClient, scServer := env.NewPod("scclient"), env.NewPod("scserver")
	startOrigDst(t, scServer, "0.0.0.0:15006")
	startOrigDst(t, scClient, "127.0.0.1:15001")

	// XDP topology: client -> node -> lb pod (XDP on its eth0) -> IPIP to
	// two backends (tc DSR) -> replies straight from the VIP.
	lbPod := env.NewPod("lb")
	var xbs []*harness.Pod
	for i := 0; i < 2; i++ {
		p := env.NewPod(fmt.Sprintf("xb%d", i))
		if err := p.Start(harness.ProcOpts{}, "serve", "--id", p.Name(), "--listen", "0.0.0.0:8080").WaitReady(); err != nil {
			t.Fatal(err)
		}
		xbs = append(xbs, p)
	}
	nodeNS := env.Node().NetNSName()
	for _, p := range append([]*harness.Pod{lbPod}, xbs...) {
		obsIP(t, "-n", nodeNS, "link", "set", "dev", p.HostVeth(), "mtu", "3000")
		obsIP(t, "-n", p.NetNSName(), "link", "set", "dev", "eth0", "mtu", "3000")
	}
	// Locally sent packets carry partial checksums a veth passes on; a NIC
	// would complete them before the wire (see test/xdplb).
	if out, err := exec.Command("ip", "netns", "exec", nodeNS, "ethtool", "-K", lbPod.HostVeth(), "tx", "off").CombinedOutput(); err != nil {
		t.Fatalf("ethtool: %v: %s", err, out)
	}
	const xvip = "10.97.0.50"
	obsIP(t, "-n", nodeNS, "route", "add", "10.97.0.0/24", "via", lbPod.IPv4().String(), "dev", lbPod.HostVeth())
	pass, err := xdp.Open(xdp.Config{}, "", nil) // only for its XDP_PASS program
	if err != nil {
		t.Fatal(err)
	}
	defer pass.Close()
	err = env.Node().InNetNS(func() error {
		iface, err := net.InterfaceByName(lbPod.HostVeth())
		if err != nil {
			return err
		}
		l, err := link.AttachXDP(link.XDPOptions{Program: pass.PassProgram(), Interface: iface.Index, Flags: link.XDPDriverMode})
		if err != nil {
			return err
		}
		t.Cleanup(func() { l.Close() })
		return nil
	})
	if err != nil {
		t.Fatalf("XDP_PASS on the node side of the load balancer's veth: %v", err)
	}

	// --- Agents. ---
	dir := t.TempDir()
	xdsSock := filepath.Join(dir, "xds.sock")
	main := startObsAgent(t, env, "main", fmt.Sprintf(`datapath:
  cgroup: %s
hostNetNS: %s
xds:
  enabled: true
  unixSocket: %s
  maxStreams: 2
kubernetes:
  kubeconfig: %s
  nodeName: %s
  cgroupRoots: [%s]
pods:
- name: obs-front/client
  netns: %s
  sockmap: auto
  sidecar: {}
- name: obs-back/server
  netns: %s
  sockmap: auto
  sidecar: {}
`, env.CgroupPath(), env.Node().NetNSPath(), xdsSock, kubeconfig, nodeName, env.CgroupPath(), scClient.NetNSPath(), scServer.NetNSPath()))
	edge := fmt.Sprintf(`services:
- name: edge
  frontend: %s:80
  algorithm: maglev
  mode: dsr
  backends: [{addr: "%s:8080"}, {addr: "%s:8080"}]
`, xvip, xbs[0].IPv4(), xbs[1].IPv4())
	const seed = "c2h1bnQtb2JzLTEy"
	lb := startObsAgent(t, env, "lb", fmt.Sprintf("datapath:\n  cgroup: %s\nxdp:\n  devices: [eth0]\n  netns: %s\n  seed: %s\n  tableSize: 251\n  nodeAddr: %s\n  maxFlows: 16384\n  maxBackends: 256\n  maxServices: 64\n%s",
		lbPod.CgroupPath(), lbPod.NetNSPath(), seed, lbPod.IPv4(), edge))
	agents := []*obsAgent{main, lb}
	for _, p := range xbs {
		agents = append(agents, startObsAgent(t, env, "dsr-"+p.Name(), fmt.Sprintf("datapath:\n  cgroup: %s\nxdp:\n  dsrDevices: [eth0]\n  netns: %s\n  seed: %s\n  tableSize: 251\n  maxFlows: 16384\n  maxBackends: 256\n  maxServices: 64\n%s",
			p.CgroupPath(), p.NetNSPath(), seed, edge)))
	}
	var targets []string
	for _, a := range agents {
		targets = append(targets, a.metrics)
	}
	prom := ops.StartPrometheus(t, []ops.ScrapeJob{{Name: "shunt", Targets: targets}}, ops.RulesFile)
	waitUntil(t, "Prometheus to scrape every agent", 60*time.Second, func() error {
		ts, err := prom.Targets(ctx)
		if err != nil {
			return err
		}
		up := 0
		for _, tg := range ts {
			if tg.Health == "up" {
				up++
			}
		}
		if up != len(agents) {
			return fmt.Errorf("%d of %d targets up: %+v", up, len(agents), ts)
		}
		return nil
	})
	waitUntil(t, "the Kubernetes Service in main's maps", 60*time.Second, func() error {
		r, err := c.client.Connect(harness.ProcOpts{Timeout: time.Minute}, "--target", vip+":80", "--count", "1")
		if err != nil || r.OK != 1 {
			return fmt.Errorf("%v %+v", err, r)
		}
		return nil
	})

	// Synced with Kubernetes: ready.
	if code, body := httpGet(t, "http://"+main.metrics+"/readyz"); code != http.StatusOK {
		t.Errorf("main /readyz: %d %s", code, body)
	}

	// --- xDS: an ADS client (the protocol as Envoy speaks it) that accepts
	// the listeners, rejects the clusters (a NACK), and one stream too many.
	// grpc-go's xDS client accepts everything Shunt generates, so the NACK
	// is the test's own; the server's handling and metrics are the real
	// ones. ---
	ads := dialADS(t, ctx, xdsSock, "sidecar~10.244.9.9~obs-0.obs~obs.svc.cluster.local")
	ads.send(&discoveryv3.DiscoveryRequest{Node: ads.node, TypeUrl: resource.ListenerType})
	lds := ads.recv(resource.ListenerType)
	ads.send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.ListenerType, VersionInfo: lds.GetVersionInfo(), ResponseNonce: lds.GetNonce()})
	ads.send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.ClusterType})
	cds := ads.recv(resource.ClusterType)
	ads.send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.ClusterType, ResponseNonce: cds.GetNonce(),
		ErrorDetail: &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: "obs test: cluster rejected"}})
	second := dialADS(t, ctx, xdsSock, "sidecar~10.244.9.10~obs-1.obs~obs.svc.cluster.local")
	second.send(&discoveryv3.DiscoveryRequest{Node: second.node, TypeUrl: resource.ListenerType})
	second.recv(resource.ListenerType)
	third := dialADS(t, ctx, xdsSock, "sidecar~10.244.9.11~obs-2.obs~obs.svc.cluster.local")
	third.send(&discoveryv3.DiscoveryRequest{Node: third.node, TypeUrl: resource.ListenerType})
	if _, err := third.Recv(); err == nil {
		t.Fatal("a third xDS stream was served with maxStreams 2")
	}

	// --- Traffic. ---
	start := time.Now()
	var (
		mu     sync.Mutex
		errs   []string
		counts = map[string]int{}
	)
	fail := func(format string, a ...any) {
		mu.Lock()
		errs = append(errs, fmt.Sprintf(format, a...))
		mu.Unlock()
	}
	add := func(k string, n int) {
		mu.Lock()
		counts[k] += n
		mu.Unlock()
	}
	rounds := func(k string) int {
		mu.Lock()
		defer mu.Unlock()
		return counts[k+"/rounds"]
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	loop := func(name string, fn func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				fn()
				add(name+"/rounds", 1)
			}
		}()
	}
	const askBytes = 256 << 10
	loop("socketlb", func() {
		r, err := c.client.Connect(harness.ProcOpts{Timeout: time.Minute}, "--target", vip+":80", "--count", "20")
		if err != nil || r.OK != 20 {
			fail("socket LB: %v %+v", err, r)
		}
		add("socketlb", r.OK)
	})
	loop("xdp", func() {
		r, err := c.client.Connect(harness.ProcOpts{Timeout: time.Minute}, "--target", xvip+":80", "--count", "10")
		if err != nil || r.OK != 10 {
			fail("XDP: %v %+v", err, r)
		}
		add("xdp", r.OK)
	})
	loop("sidecar", func() {
		// The client pod's sidecar (uid 1337) to the server pod: steered
		// to its inbound listener, both ends accelerated.
		out, err := scClient.Run(harness.ProcOpts{UID: 1337, GID: 1337, SetUser: true, Timeout: time.Minute}, "ask", "--target", scServer.IPv4().String()+":8080", "--bytes", strconv.Itoa(askBytes))
		if err != nil || !strings.HasSuffix(strings.TrimSpace(string(out)), "OK") {
			fail("sidecar hop: %v %s", err, out)
			return
		}
		add("sidecar", 1)
		// The client pod's app: steered to its own sidecar (15001).
		out, err = scClient.Run(harness.ProcOpts{Timeout: time.Minute}, "ask", "--target", "10.96.7.7:80", "--bytes", "4096")
		if err != nil || !strings.HasSuffix(strings.TrimSpace(string(out)), "OK") {
			fail("app to sidecar: %v %s", err, out)
		}
	})
	loop("k8s", func() {
		// Endpoint churn: be2 leaves and comes back.
		for _, bes := range [][]*harness.Pod{c.backends[:2], c.backends} {
			sl := &discoveryv1.EndpointSlice{}
			sl.Name, sl.Namespace = slice.Name, slice.Namespace
			if err := kc.Get(ctx, sl); err != nil {
				fail("get slice: %v", err)
				return
			}
			sl.Endpoints = obsSlice(bes...).Endpoints
			if err := kc.Update(ctx, sl); err != nil {
				fail("update slice: %v", err)
				return
			}
			time.Sleep(time.Second)
		}
	})
	for time.Since(start) < 30*time.Second || rounds("socketlb") < 3 || rounds("xdp") < 3 || rounds("sidecar") < 3 || rounds("k8s") < 3 {
		if time.Since(start) > 5*time.Minute {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	end := time.Now()
	if len(errs) > 0 {
		t.Fatalf("traffic errors: %s", strings.Join(errs, "; "))
	}
	t.Logf("traffic for %v: %d connections through the Service, %d through the XDP load balancer, %d accelerated sidecar hops of %d KiB, %d endpoint changes",
		end.Sub(start).Round(time.Second), counts["socketlb"], counts["xdp"], counts["sidecar"], askBytes>>10, 2*counts["k8s/rounds"])

	// Prometheus has scraped every agent after the traffic ended.
	waitUntil(t, "a scrape after the traffic", 60*time.Second, func() error {
		s, err := prom.Query(ctx, `min(timestamp(up{job="shunt"}))`, time.Now())
		if err != nil {
			return err
		}
		if len(s) != 1 || s[0].Values[0] < float64(end.Unix()+1) {
			return fmt.Errorf("oldest last scrape %v", s)
		}
		return nil
	})
	value := func(expr string) float64 {
		t.Helper()
		s, err := prom.Query(ctx, expr, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if len(s) != 1 {
			t.Fatalf("%s: %d series", expr, len(s))
		}
		return s[0].Values[0]
	}
	// The counters Prometheus holds are the traffic's, exactly.
	if got, want := value(fmt.Sprintf(`sum(shunt_service_translations_total{job="shunt",frontend="%s:80/tcp"})`, vip)), counts["socketlb"]+1; got != float64(want) {
		t.Errorf("translations of the Service: Prometheus has %v, the client made %d connections", got, want)
	}
	// XDP: Prometheus holds the load balancer's own count; a connection
	// reusing the 5-tuple of an earlier one still in the conntrack is not a
	// new flow, so flows <= connections.
	flows := value(`sum(shunt_xdp_service_flows_total{job="shunt",service="edge"})`)
	if own := scrapeValue(t, lb.metrics, fmt.Sprintf(`shunt_xdp_service_flows_total{frontend="%s:80/tcp",service="edge"}`, xvip)); flows != own {
		t.Errorf("XDP new flows of edge: Prometheus has %v, the agent %v", flows, own)
	}
	if n := float64(counts["xdp"]); flows > n || flows < n/2 {
		t.Errorf("XDP new flows of edge: %v for %v connections", flows, n)
	}
	if got, want := value(`sum(shunt_pod_events_total{job="shunt",namespace="obs-front",event="bytes_redirect"})`), counts["sidecar"]*askBytes; got < float64(want) {
		t.Errorf("bytes short-circuited from the client pod: %v, want at least %d", got, want)
	}
	if got := value(`sum(shunt_dsr_events_total{job="shunt",event="in_ipip"})`); got < float64(counts["xdp"]) {
		t.Errorf("DSR decapsulations %v < %d connections", got, counts["xdp"])
	}

	// Every rule evaluates without error on the real series, and the only
	// alerts active are the two this test provoked on purpose.
	rules, err := prom.Rules(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if r.Health != "ok" {
			t.Errorf("rule %s: health %s: %s", r.Name, r.Health, r.LastError)
		}
	}
	if len(rules) < 20 {
		t.Errorf("Prometheus loaded %d rules", len(rules))
	}
	waitUntil(t, "exactly the provoked alerts", 30*time.Second, func() error {
		got, err := activeAlerts(ctx, prom)
		if err != nil {
			return err
		}
		if want := "ShuntXDSConfigRejected/firing ShuntXDSStreamsRefused/firing"; got != want {
			return fmt.Errorf("active alerts %q, want %q", got, want)
		}
		return nil
	})

	// --- Faults. ---
	// The API server goes away: the agent keeps translating with the state
	// it has, and says so.
	cp.StopAPIServer()
	waitUntil(t, "ShuntKubernetesAPIDown", 2*time.Minute, func() error {
		got, err := activeAlerts(ctx, prom)
		if err != nil {
			return err
		}
		if !strings.Contains(got, "ShuntKubernetesAPIDown/pending") {
			return fmt.Errorf("active alerts %q", got)
		}
		return nil
	})
	if r, err := c.client.Connect(harness.ProcOpts{Timeout: time.Minute}, "--target", vip+":80", "--count", "5"); err != nil || r.OK != 5 {
		t.Errorf("with the API server down: %v %+v", err, r)
	}
	cp.StartAPIServer(t)

	// A program detached behind the agent's back.
	l, err := link.LoadPinnedLink(filepath.Join(main.root, "links", "shunt_recvmsg6"), nil)
	if err != nil {
		t.Fatal(err)
	}
	d, ok := l.(interface{ Detach() error })
	if !ok {
		t.Fatalf("pinned link %T cannot be detached", l)
	}
	if err := d.Detach(); err != nil {
		t.Fatalf("detach: %v", err)
	}
	l.Close()
	waitUntil(t, "ShuntProgramDetached", time.Minute, func() error {
		got, err := activeAlerts(ctx, prom)
		if err != nil {
			return err
		}
		if !strings.Contains(got, "ShuntProgramDetached/") {
			return fmt.Errorf("active alerts %q", got)
		}
		return nil
	})
	if code, body := httpGet(t, "http://"+main.metrics+"/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "shunt_recvmsg6") {
		t.Errorf("/healthz with a detached program: %d %q", code, body)
	}
	if got := value(fmt.Sprintf(`shunt_program_attached{job="shunt",instance=%q,program="shunt_recvmsg6"}`, main.metrics)); got != 0 {
		t.Errorf("shunt_program_attached of the detached program = %v", got)
	}

	// --- Every panel of the dashboard answers with data. ---
	dash, err := ops.LoadDashboard(ops.DashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	queries, err := dash.Queries()
	if err != nil {
		t.Fatal(err)
	}
	// Panels whose data this test cannot produce, with the reason. Empty:
	// every panel is fed by the traffic and faults above.
	cannotProduce := map[string]string{}
	qend := time.Now()
	vars := map[string]string{
		"job": "shunt", "instance": ".*",
		"__rate_interval": "10s", "__interval": "2s",
		"__range": fmt.Sprintf("%ds", int(qend.Sub(start).Seconds())+1),
	}
	panels := map[string]bool{}
	for _, q := range queries {
		panels[q.Panel] = true
		if why, ok := cannotProduce[q.Panel]; ok {
			t.Logf("panel %q: not checked: %s", q.Panel, why)
			continue
		}
		expr, err := ops.Substitute(q.Expr, vars)
		if err != nil {
			t.Error(err)
			continue
		}
		var res []ops.Sample
		if q.Instant {
			res, err = prom.Query(ctx, expr, qend)
		} else {
			res, err = prom.QueryRange(ctx, expr, start, qend, 2*time.Second)
		}
		if err != nil {
			t.Errorf("panel %q query %s: %v", q.Panel, q.RefID, err)
			continue
		}
		data := false
		for _, s := range res {
			data = data || s.HasNumber()
		}
		if !data {
			t.Errorf("panel %q query %s returned no data: %s", q.Panel, q.RefID, expr)
		}
	}
	t.Logf("%d panels, %d queries checked against Prometheus", len(panels), len(queries))
}

// obsSlice is the EndpointSlice of Service obs/web: the pods on 8080.
func obsSlice(bes ...*harness.Pod) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{AddressType: discoveryv1.AddressTypeIPv4}
	sl.Name, sl.Namespace = "web-1", "obs"
	sl.Labels = map[string]string{discoveryv1.LabelServiceName: "web"}
	name, port, ready := "http", int32(8080), true
	sl.Ports = []discoveryv1.EndpointPort{{Name: &name, Port: &port}}
	for _, b := range bes {
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{b.IPv4().String()}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}})
	}
	return sl
}

func obsIP(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// activeAlerts lists the active alerts as sorted "name/state" words.
func activeAlerts(ctx context.Context, p *ops.Prometheus) (string, error) {
	as, err := p.Alerts(ctx)
	if err != nil {
		return "", err
	}
	var out []string
	for _, a := range as {
		out = append(out, a.Labels["alertname"]+"/"+a.State)
	}
	sort.Strings(out)
	return strings.Join(out, " "), nil
}

func waitUntil(t *testing.T, what string, d time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String()
}

// scrapeValue reads one series' value from an agent's /metrics.
func scrapeValue(t *testing.T, addr, series string) float64 {
	t.Helper()
	_, body := httpGet(t, "http://"+addr+"/metrics")
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("%s: no series %s", addr, series)
	return 0
}

// obsAgent is a shuntd process of TestObservability.
type obsAgent struct {
	name, root, socket, metrics string
	cmd                         *exec.Cmd
	done                        chan struct{}
	log                         *harness.SyncBuffer
}

// startObsAgent runs shuntd with config (its bpffs folder is added) in the
// test's network namespace and waits until /healthz answers ok. It is
// killed by PID and its pins removed when the test ends.
func startObsAgent(t *testing.T, env *harness.Env, name, config string) *obsAgent {
	t.Helper()
	shuntd, shuntctl := harness.AgentBinaries(t)
	dir := t.TempDir()
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	a := &obsAgent{name: name, root: filepath.Join(env.BPFFSPath(), name), socket: filepath.Join(dir, "shuntd.sock"),
		metrics: fmt.Sprintf("127.0.0.1:%d", port), done: make(chan struct{}), log: &harness.SyncBuffer{}}
	config = strings.Replace(config, "datapath:\n", "datapath:\n  bpffsRoot: "+a.root+"\n", 1)
	cfg := filepath.Join(dir, "shunt.yaml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	a.cmd = exec.Command(shuntd, "-config", cfg, "-api-socket", a.socket, "-state-file", filepath.Join(dir, "state.json"), "-metrics-addr", a.metrics)
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.cmd.Wait(); close(a.done) }()
	t.Cleanup(func() {
		a.cmd.Process.Kill()
		<-a.done
		if t.Failed() {
			t.Logf("shuntd %s log:\n%s", name, a.log.String())
		}
		if out, err := exec.Command(shuntctl, "cleanup", "--bpffs-root", a.root).CombinedOutput(); err != nil {
			t.Errorf("cleanup %s: %v: %s", a.root, err, out)
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + a.metrics + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return a
			}
		}
		select {
		case <-a.done:
			t.Fatalf("shuntd %s exited: %s", name, a.log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("shuntd %s not healthy: %v\n%s", name, err, a.log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// adsClient is one ADS stream on the agent's xDS unix socket.
type adsClient struct {
	t    *testing.T
	node *corev3.Node
	discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
}

func dialADS(t *testing.T, ctx context.Context, sock, nodeID string) *adsClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &adsClient{t: t, node: &corev3.Node{Id: nodeID, UserAgentName: "envoy"}, AggregatedDiscoveryService_StreamAggregatedResourcesClient: st}
}

func (c *adsClient) send(r *discoveryv3.DiscoveryRequest) {
	c.t.Helper()
	if err := c.Send(r); err != nil {
		c.t.Fatal(err)
	}
}

func (c *adsClient) recv(typeURL string) *discoveryv3.DiscoveryResponse {
	c.t.Helper()
	r, err := c.Recv()
	if err != nil {
		c.t.Fatal(err)
	}
	if r.GetTypeUrl() != typeURL {
		c.t.Fatalf("xDS response %s, want %s", r.GetTypeUrl(), typeURL)
	}
	return r
}
