package xdplb

import (
	"bufio"
	"crypto/sha256"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/mesh/maglev"
	"github.com/shuntmesh/shunt/test/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

func init() {
	harness.RegisterApp("bulk", appBulk)
	harness.RegisterApp("fetch", appFetch)
}

// bulk --listen ADDR:PORT --id ID --bytes N: per TCP connection writes
// "ID\n" and N deterministic bytes, then closes. Prints READY.
func appBulk(args []string) int {
	var n int
	var data []byte
	return tcpServerApp("bulk", args, func(fs *flag.FlagSet) { fs.IntVar(&n, "bytes", 1<<20, "") },
		func() { data = bulkData(n) },
		func(c net.Conn, id string) {
			fmt.Fprintf(c, "%s\n", id)
			c.Write(data)
		})
}

// tcpServerApp runs a server app with flags --listen ADDR:PORT and --id
// (default name) plus those flags adds: once parsed, ready runs; it prints
// READY and serves each connection with serve, closing it after.
func tcpServerApp(name string, args []string, flags func(*flag.FlagSet), ready func(), serve func(c net.Conn, id string)) int {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	listen := fs.String("listen", "", "")
	id := fs.String("id", name, "")
	if flags != nil {
		flags(fs)
	}
	if fs.Parse(args) != nil {
		return 2
	}
	if ready != nil {
		ready()
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("READY")
	for {
		c, err := ln.Accept()
		if err != nil {
			return 1
		}
		go func() {
			defer c.Close()
			serve(c, *id)
		}()
	}
}

func bulkData(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}

// fetch --target ADDR:PORT --bytes N: connects, reads everything, prints
// {"backend":..., "ok":bool, "error":...} after checking the bytes.
func appFetch(args []string) int {
	return tcpClientApp("fetch", args, func(c *net.TCPConn, n int) (string, error) {
		br := bufio.NewReader(c)
		line, err := br.ReadString('\n')
		if err != nil {
			return "", err
		}
		got, err := io.ReadAll(br)
		if err != nil {
			return "", err
		}
		if sha256.Sum256(got) != sha256.Sum256(bulkData(n)) {
			return "", fmt.Errorf("received %d bytes, different from the %d sent", len(got), n)
		}
		return strings.TrimSpace(line), nil
	})
}

// tcpClientApp runs a client app with flags --target ADDR:PORT, --bytes N
// and --timeout (for everything): talk gets the connection and N and
// returns the backend that answered; the outcome is printed (printOutcome).
func tcpClientApp(name string, args []string, talk func(c *net.TCPConn, n int) (string, error)) int {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	target := fs.String("target", "", "")
	n := fs.Int("bytes", 1<<20, "")
	timeout := fs.Duration("timeout", 20*time.Second, "")
	if fs.Parse(args) != nil {
		return 2
	}
	c, err := net.DialTimeout("tcp", *target, *timeout)
	if err != nil {
		return printOutcome("", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(*timeout))
	return printOutcome(talk(c.(*net.TCPConn), *n))
}

// printOutcome prints a client app's outcome as {"backend":..., "ok":bool,
// "error":...} and returns its exit status (0: the test reads the outcome).
func printOutcome(backend string, err error) int {
	res := struct {
		Backend string `json:"backend"`
		OK      bool   `json:"ok"`
		Error   string `json:"error,omitempty"`
	}{Backend: backend, OK: err == nil}
	if err != nil {
		res.Error = err.Error()
	}
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

const e2eSeed = "ZTJlLXhkcC1zZWVk" // "e2e-xdp-seed"

// lbCluster: a client pod, a load balancer pod (xdplb native on its eth0)
// and three backend pods (dsr on their eth0), all routed through the
// harness's node namespace, which routes the VIPs to the load balancer.
// The load balancer and backend links have MTU 3000 (room for the
// encapsulation); the client keeps 1500.
type lbCluster struct {
	t        *testing.T
	env      *harness.Env
	client   *harness.Pod
	lbPod    *harness.Pod
	backends []*harness.Pod
	lb       *xdp.Datapath
	lbCfg    xdp.Config
	dsr      []*xdp.Datapath
	dsrCfg   []xdp.Config
	svcs     []xdp.Service
}

func ipRun(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func newLBCluster(t *testing.T) *lbCluster {
	t.Helper()
	c := newTopology(t)
	c.lbCfg = xdp.Config{Devices: []string{"eth0"}, NetNS: c.lbPod.NetNSPath(), Seed: e2eSeed, TableSize: 251,
		NodeAddr: c.lbPod.IPv4().String(), NodeAddr6: c.lbPod.IPv6().String(), MaxFlows: 16384, MaxBackends: 256, MaxServices: 64}
	c.lb = c.open(c.lbCfg, "lb")
	if len(c.lb.Generic) != 0 {
		t.Fatalf("native XDP refused on the load balancer's veth: %v", c.lb.Generic)
	}
	c.attachPeerPass(c.lb.PassProgram())
	for _, p := range c.backends {
		cfg := xdp.Config{DSRDevices: []string{"eth0"}, NetNS: p.NetNSPath(), MaxFlows: 16384, MaxBackends: 256, MaxServices: 64}
		c.dsrCfg = append(c.dsrCfg, cfg)
		c.dsr = append(c.dsr, c.open(cfg, p.Name()))
	}
	return c
}

// newTopology builds the pods, links and routes, with servers running on
// the backends (serve on 8080 TCP and UDP, bulk on 9000), but loads nothing.
func newTopology(t *testing.T) *lbCluster {
	t.Helper()
	env := harness.New(t)
	c := &lbCluster{t: t, env: env}
	c.client = env.NewPod("client")
	c.lbPod = env.NewPod("lb")
	node := env.Node().NetNSName()
	for i := 0; i < 3; i++ {
		p := env.NewPod(fmt.Sprintf("be%d", i))
		for _, proto := range []string{"tcp", "udp"} {
			pr := p.Start(harness.ProcOpts{}, "serve", "--id", fmt.Sprintf("be%d", i), "--proto", proto,
				"--listen", "0.0.0.0:8080", "--listen", "[::]:8080")
			if err := pr.WaitReady(); err != nil {
				t.Fatal(err)
			}
		}
		bulk := p.Start(harness.ProcOpts{}, "bulk", "--id", fmt.Sprintf("be%d", i), "--listen", ":9000", "--bytes", "2000000") // v4 and v6
		if err := bulk.WaitReady(); err != nil {
			t.Fatal(err)
		}
		c.backends = append(c.backends, p)
	}
	for _, p := range append([]*harness.Pod{c.lbPod}, c.backends...) {
		ipRun(t, "-n", node, "link", "set", "dev", p.HostVeth(), "mtu", "3000")
		ipRun(t, "-n", p.NetNSName(), "link", "set", "dev", "eth0", "mtu", "3000")
	}
	// A local sender leaves TCP/UDP checksums to the NIC (CHECKSUM_PARTIAL)
	// and a veth passes such packets on as they are, so XDP on the load
	// balancer's veth would see incomplete checksums, which no packet from a
	// real wire has. The node's side of that veth therefore completes them
	// in software, as a physical NIC would have before the wire.
	if out, err := exec.Command("ip", "netns", "exec", node, "ethtool", "-K", c.lbPod.HostVeth(), "tx", "off").CombinedOutput(); err != nil {
		t.Fatalf("ethtool -K %s tx off: %v: %s", c.lbPod.HostVeth(), err, out)
	}
	ipRun(t, "-n", node, "route", "add", "10.96.0.0/24", "via", c.lbPod.IPv4().String(), "dev", c.lbPod.HostVeth())
	ipRun(t, "-n", node, "route", "add", "fd00:96::/64", "via", c.lbPod.IPv6().String(), "dev", c.lbPod.HostVeth())
	return c
}

// attachPeerPass attaches an XDP_PASS program to the node's side of the
// load balancer's veth: a veth drops XDP_TX frames unless its peer runs an
// XDP program.
func (c *lbCluster) attachPeerPass(pass *ebpf.Program) {
	c.t.Helper()
	err := c.env.Node().InNetNS(func() error {
		iface, err := net.InterfaceByName(c.lbPod.HostVeth())
		if err != nil {
			return err
		}
		l, err := link.AttachXDP(link.XDPOptions{Program: pass, Interface: iface.Index, Flags: link.XDPDriverMode})
		if err != nil {
			return fmt.Errorf("attach xdp_pass to %s: %w", c.lbPod.HostVeth(), err)
		}
		c.t.Cleanup(func() { l.Close() })
		return nil
	})
	if err != nil {
		c.t.Fatal(err)
	}
}

// open loads and attaches a datapath pinned under the test's bpffs folder.
func (c *lbCluster) open(cfg xdp.Config, name string) *xdp.Datapath {
	c.t.Helper()
	d, err := xdp.Open(cfg, filepath.Join(c.env.BPFFSPath(), name), slog.New(slog.NewTextHandler(testWriter{c.t}, nil)))
	if err != nil {
		c.t.Fatalf("open %s: %v", name, err)
	}
	c.t.Cleanup(func() { d.Close() })
	return d
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// backendsOf returns the backends' addresses on port (v6: IPv6 addresses),
// with tunnel addresses of the other family when cross is set (4in6).
func (c *lbCluster) backendsOf(port uint16, v6, cross bool, weights ...uint32) []xdp.Backend {
	var out []xdp.Backend
	for i, p := range c.backends {
		a, other := p.IPv4(), p.IPv6()
		if v6 {
			a, other = other, a
		}
		b := xdp.Backend{Addr: netip.AddrPortFrom(a, port), Weight: 1}
		if cross {
			b.Tunnel = other
		}
		if i < len(weights) {
			b.Weight = weights[i]
		}
		out = append(out, b)
	}
	return out
}

// sync writes svcs to the load balancer and every backend.
func (c *lbCluster) sync(svcs []xdp.Service) {
	c.t.Helper()
	c.svcs = svcs
	for _, d := range append([]*xdp.Datapath{c.lb}, c.dsr...) {
		if _, err := d.Sync(svcs); err != nil {
			c.t.Fatalf("sync: %v", err)
		}
	}
}

func (c *lbCluster) connect(args ...string) harness.ConnectResult {
	c.t.Helper()
	r, err := c.client.Connect(harness.ProcOpts{Timeout: 2 * time.Minute}, args...)
	if err != nil {
		c.t.Fatalf("connect %v: %v", args, err)
	}
	return r
}

func (c *lbCluster) lbCounters() map[string]uint64 {
	c.t.Helper()
	v, err := c.lb.Counters()
	if err != nil {
		c.t.Fatal(err)
	}
	m := map[string]uint64{}
	for i, n := range xdp.StatNames {
		m[n] = v[i]
	}
	return m
}

func (c *lbCluster) dsrCounters() map[string]uint64 {
	c.t.Helper()
	m := map[string]uint64{}
	for _, d := range c.dsr {
		v, err := d.DSRCounters()
		if err != nil {
			c.t.Fatal(err)
		}
		for i, n := range xdp.DSRStatNames {
			m[n] += v[i]
		}
	}
	return m
}

func delta(after, before map[string]uint64) map[string]uint64 {
	d := map[string]uint64{}
	for k, v := range after {
		if v != before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}

// TestEndToEnd: real TCP and UDP from a client through the load balancer
// to three backends, for every dispatch and mode. Connections succeed only
// if the backend's stack accepted the decapsulated packet (checksums right)
// and the client's stack accepted the reply from the VIP.
func TestEndToEnd(t *testing.T) {
	c := newLBCluster(t)
	svc := func(vip string, p mesh.Protocol, mode mesh.ForwardingMode, disp mesh.Dispatch, bs []xdp.Backend) xdp.Service {
		return xdp.Service{Frontend: ap(vip), Proto: p, Mode: mode, Dispatch: disp, Backends: bs}
	}
	affinity := func(s xdp.Service) xdp.Service {
		s.ClientIPAffinity = true
		return s
	}
	v4, v6 := c.backendsOf(8080, false, false), c.backendsOf(8080, true, false)
	c.sync([]xdp.Service{
		svc("10.96.0.10:80", mesh.TCP, mesh.DSR, mesh.IPIP, v4),
		svc("10.96.0.10:53", mesh.UDP, mesh.DSR, mesh.IPIP, v4),
		svc("10.96.0.11:80", mesh.TCP, mesh.DSR, mesh.Geneve, v4),
		svc("10.96.0.11:53", mesh.UDP, mesh.DSR, mesh.Geneve, v4),
		svc("10.96.0.12:80", mesh.TCP, mesh.DSR, mesh.IPOption, v4),
		svc("10.96.0.13:80", mesh.TCP, mesh.SNAT, "", v4),
		svc("10.96.0.13:53", mesh.UDP, mesh.SNAT, "", v4),
		svc("10.96.0.14:80", mesh.TCP, mesh.Hybrid, mesh.Geneve, v4),
		svc("10.96.0.14:53", mesh.UDP, mesh.Hybrid, mesh.Geneve, v4),
		svc("10.96.0.15:80", mesh.TCP, mesh.DSR, mesh.IPIP, c.backendsOf(8080, false, true)), // 4in6
		svc("[fd00:96::10]:80", mesh.TCP, mesh.DSR, mesh.IPIP, v6),
		svc("[fd00:96::10]:53", mesh.UDP, mesh.DSR, mesh.IPIP, v6),
		svc("[fd00:96::11]:80", mesh.TCP, mesh.DSR, mesh.Geneve, v6),
		svc("[fd00:96::12]:80", mesh.TCP, mesh.DSR, mesh.IPOption, v6),
		svc("[fd00:96::13]:53", mesh.UDP, mesh.SNAT, "", v6),
		svc("[fd00:96::15]:80", mesh.TCP, mesh.DSR, mesh.IPIP, c.backendsOf(8080, true, true)), // 6in4
		affinity(svc("10.96.0.16:80", mesh.TCP, mesh.DSR, mesh.IPIP, v4)),
		affinity(svc("[fd00:96::16]:53", mesh.UDP, mesh.SNAT, "", v6)),
	})
	client4, client6 := c.client.IPv4().String(), c.client.IPv6().String()
	for _, tc := range []struct {
		name, vip, proto, udp string
		snat                  bool // the backend sees the load balancer's address
		dsr                   bool
		sticky                bool // client-IP affinity: every flow on one backend
	}{
		{"ipip tcp", "10.96.0.10:80", "tcp", "", false, true, false},
		{"ipip udp", "10.96.0.10:53", "udp", "unconnected", false, true, false},
		{"geneve tcp", "10.96.0.11:80", "tcp", "", false, true, false},
		{"geneve udp", "10.96.0.11:53", "udp", "connected", false, true, false},
		{"ip option tcp", "10.96.0.12:80", "tcp", "", false, true, false},
		{"snat tcp", "10.96.0.13:80", "tcp", "", true, false, false},
		{"snat udp", "10.96.0.13:53", "udp", "unconnected", true, false, false},
		{"hybrid tcp (dsr)", "10.96.0.14:80", "tcp", "", false, true, false},
		{"hybrid udp (snat)", "10.96.0.14:53", "udp", "unconnected", true, false, false},
		{"4in6 tcp", "10.96.0.15:80", "tcp", "", false, true, false},
		{"ip6ip6 tcp", "[fd00:96::10]:80", "tcp", "", false, true, false},
		{"ip6ip6 udp", "[fd00:96::10]:53", "udp", "unconnected", false, true, false},
		{"geneve v6 tcp", "[fd00:96::11]:80", "tcp", "", false, true, false},
		{"destination option tcp", "[fd00:96::12]:80", "tcp", "", false, true, false},
		{"snat v6 udp", "[fd00:96::13]:53", "udp", "unconnected", true, false, false},
		{"6in4 tcp", "[fd00:96::15]:80", "tcp", "", false, true, false},
		{"client-ip affinity tcp", "10.96.0.16:80", "tcp", "", false, true, true},
		{"client-ip affinity snat v6 udp", "[fd00:96::16]:53", "udp", "unconnected", true, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lbBefore, dsrBefore := c.lbCounters(), c.dsrCounters()
			args := []string{"--target", tc.vip, "--proto", tc.proto, "--count", "30", "--timeout", "5s"}
			if tc.udp != "" {
				args = append(args, "--udp", tc.udp)
			} else {
				args = append(args, "--echo", "20000")
			}
			r := c.connect(args...)
			if r.Fail != 0 || r.OK != 30 {
				t.Fatalf("%d ok, %d failed: %v", r.OK, r.Fail, r.Errors)
			}
			if tc.sticky && len(r.Backends) != 1 {
				t.Errorf("30 flows of one client went to %v: want one backend (client-IP affinity)", r.Backends)
			} else if !tc.sticky && len(r.Backends) < 2 {
				t.Errorf("30 flows all went to %v: not balanced", r.Backends)
			}
			// The client only ever talked to the VIP.
			seen := r.Peers
			if tc.udp == "unconnected" {
				seen = r.Sources
			}
			for a := range seen {
				if a != tc.vip {
					t.Errorf("client saw replies from %s, want the VIP %s", a, tc.vip)
				}
			}
			// DSR keeps the client's address; SNAT shows the node's.
			want := client4
			if strings.HasPrefix(tc.vip, "[") {
				want = client6
			}
			if tc.snat {
				want = c.lbPod.IPv4().String()
				if strings.HasPrefix(tc.vip, "[") {
					want = c.lbPod.IPv6().String()
				}
			}
			for remote := range r.Remotes {
				if ap, err := netip.ParseAddrPort(remote); err != nil || ap.Addr().String() != want {
					t.Errorf("backend saw the client as %s, want %s", remote, want)
				}
			}
			// The backend's socket is its own address (DNAT on the
			// backend or at the load balancer), port 8080.
			for local := range r.ServerLocals {
				if !strings.HasSuffix(local, ":8080") {
					t.Errorf("backend socket %s, want port 8080", local)
				}
			}
			lb, ds := delta(c.lbCounters(), lbBefore), delta(c.dsrCounters(), dsrBefore)
			t.Logf("load balancer: %v; backends: %v", lb, ds)
			if tc.dsr {
				// Every client packet went LB -> backend, and no reply
				// came back through the load balancer: replies were
				// rewritten on the backends and routed to the client.
				sent := lb["tx_ipip"] + lb["tx_geneve"] + lb["tx_opt"]
				got := ds["in_ipip"] + ds["in_geneve"] + ds["in_opt"]
				if sent == 0 || sent != got {
					t.Errorf("load balancer sent %d DSR packets, backends decapsulated %d", sent, got)
				}
				if ds["out_revnat"] == 0 || lb["pass_not_vip"] != 0 || lb["tx_snat_reply"] != 0 {
					t.Errorf("replies: %d rewritten on the backends, %d seen by the load balancer", ds["out_revnat"], lb["pass_not_vip"]+lb["tx_snat_reply"])
				}
			} else if lb["tx_snat"] == 0 || lb["tx_snat_reply"] == 0 {
				t.Errorf("SNAT: %d packets out, %d replies back through the load balancer", lb["tx_snat"], lb["tx_snat_reply"])
			}
			for _, k := range []string{"drop_no_backend", "drop_no_snat_port", "drop_no_node_addr", "drop_encap", "pass_malformed", "pass_bad_csum"} {
				if lb[k] != 0 {
					t.Errorf("load balancer counted %s %d times", k, lb[k])
				}
			}
			if ds["in_error"] != 0 || ds["out_error"] != 0 || ds["in_malformed"] != 0 {
				t.Errorf("backend errors: %v", ds)
			}
		})
	}
}

// streams starts n long-lived echo streams to vip and returns a function
// that waits for their results.
func (c *lbCluster) streams(vip string, n int) func() []harness.StreamResult {
	var wg sync.WaitGroup
	res := make([]harness.StreamResult, n)
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i], errs[i] = c.client.Stream(harness.ProcOpts{Timeout: 2 * time.Minute},
				"--target", vip, "--bytes", "400000", "--chunk", "4000", "--rate-pause", "20ms")
		}()
	}
	return func() []harness.StreamResult {
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				c.t.Fatalf("stream: %v", err)
			}
		}
		return res
	}
}

// waitFlows waits until the load balancer has conntrack entries for n flows.
func (c *lbCluster) waitFlows(n uint64) {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c.lbCounters()["ct_new"] >= n {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.t.Fatalf("load balancer saw %d new flows, want %d", c.lbCounters()["ct_new"], n)
}

// tableOwner is the backend (by Maglev key) the current table gives a TCP
// flow.
func tableOwner(t *testing.T, s xdp.Service, src, dst netip.AddrPort) string {
	return tableOwnerProto(t, s, src, dst, 6)
}

// tableOwnerProto is tableOwner for a flow of IP protocol proto.
func tableOwnerProto(t *testing.T, s xdp.Service, src, dst netip.AddrPort, proto uint8) string {
	seed, _ := maglev.ParseSeed(e2eSeed)
	var mb []maglev.Backend
	for _, b := range s.Backends {
		mb = append(mb, maglev.Backend{Key: b.Key(), Weight: b.Weight})
	}
	tab, err := maglev.Build(mb, 251, seed)
	if err != nil {
		t.Fatal(err)
	}
	b, ok := tab.LookupBackend(maglev.FlowHash(maglev.NewTuple(src, dst, proto), seed.DatapathSeed()))
	if !ok {
		return ""
	}
	return b.Key
}

// TestConntrackKeepsFlows: established connections stay on their backend
// when a backend is removed from the service or drained (weight 0), even
// those the new Maglev table would send elsewhere; new connections follow
// the new table.
func TestConntrackKeepsFlows(t *testing.T) {
	c := newLBCluster(t)
	const vip = "10.96.0.20:80"
	mk := func(bs []xdp.Backend) []xdp.Service {
		return []xdp.Service{{Frontend: ap(vip), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPIP, Backends: bs}}
	}
	all := c.backendsOf(8080, false, false)
	keyToID := map[string]string{}
	for i, b := range all {
		keyToID[b.Key()] = fmt.Sprintf("be%d", i)
	}
	for _, step := range []struct {
		name  string
		after []xdp.Backend
		gone  string // backend id that must get no new connection
	}{
		{"remove be0", all[1:], "be0"},
		{"drain be1 (weight 0)", c.backendsOf(8080, false, false, 1, 0, 1), "be1"},
	} {
		t.Run(step.name, func(t *testing.T) {
			c.sync(mk(all))
			before := c.lbCounters()["ct_new"]
			const n = 24
			wait := c.streams(vip, n)
			c.waitFlows(before + n)
			c.sync(mk(step.after))
			moved := 0
			for _, r := range wait() {
				if !r.OK {
					t.Errorf("stream on %s broke: %+v", r.Backend, r)
					continue
				}
				local, _ := netip.ParseAddrPort(r.Local)
				if keyToID[tableOwner(t, mk(step.after)[0], local, ap(vip))] != r.Backend {
					moved++
				}
			}
			// Without conntrack these streams would have been sent to
			// another backend mid-connection.
			t.Logf("%d of %d established streams are on a backend the new table no longer gives them", moved, n)
			if moved == 0 {
				t.Errorf("no stream was affected by the change: the test proves nothing")
			}
			r := c.connect("--target", vip, "--proto", "tcp", "--count", "40")
			if r.Fail != 0 || r.Backends[step.gone] != 0 {
				t.Errorf("new connections after %s: %d failed, backends %v", step.name, r.Fail, r.Backends)
			}
		})
	}
}

// TestRestartKeepsServing: 50 requests, and a long stream, while the load
// balancer's and a backend's loader restart (close, reopen adopting the
// pinned maps and links, BPF_LINK_UPDATE, resync): zero failures.
func TestRestartKeepsServing(t *testing.T) {
	c := newLBCluster(t)
	const vip = "10.96.0.30:80"
	svcs := []xdp.Service{{Frontend: ap(vip), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.Geneve, Backends: c.backendsOf(8080, false, false)},
		{Frontend: ap("10.96.0.30:53"), Proto: mesh.UDP, Mode: mesh.SNAT, Backends: c.backendsOf(8080, false, false)}}
	c.sync(svcs)
	linkBefore := c.lb.Links()
	done := make(chan harness.ConnectResult, 2)
	go func() {
		r, _ := c.client.Connect(harness.ProcOpts{Timeout: time.Minute}, "--target", vip, "--proto", "tcp", "--count", "50", "--interval", "40ms", "--echo", "1000")
		done <- r
	}()
	go func() {
		r, _ := c.client.Connect(harness.ProcOpts{Timeout: time.Minute}, "--target", "10.96.0.30:53", "--proto", "udp", "--count", "50", "--interval", "40ms")
		done <- r
	}()
	waitStreams := c.streams(vip, 4)
	for i := 0; i < 3; i++ {
		time.Sleep(300 * time.Millisecond)
		if err := c.lb.Close(); err != nil {
			t.Fatal(err)
		}
		c.lb = c.open(c.lbCfg, "lb")
		if !c.lb.Adopted {
			t.Fatal("restarted load balancer did not adopt the pinned maps")
		}
		if err := c.dsr[1].Close(); err != nil {
			t.Fatal(err)
		}
		c.dsr[1] = c.open(c.dsrCfg[1], "be1")
		c.sync(svcs)
	}
	for i := 0; i < 2; i++ {
		r := <-done
		if r.OK != 50 || r.Fail != 0 {
			t.Errorf("across restarts: %d ok, %d failed: %v", r.OK, r.Fail, r.Errors)
		}
	}
	for _, r := range waitStreams() {
		if !r.OK {
			t.Errorf("stream across restarts broke: %+v", r)
		}
	}
	linkAfter := c.lb.Links()
	if len(linkBefore) != 1 || len(linkAfter) != 1 || linkBefore[0].LinkID != linkAfter[0].LinkID || linkBefore[0].ProgID == linkAfter[0].ProgID {
		t.Errorf("links before %+v, after %+v: want the same link with a new program (BPF_LINK_UPDATE)", linkBefore, linkAfter)
	}
}

// TestPacketTooBigReachesBackend: the node's link to the client has a
// smaller MTU than the client advertises, so full-size replies from a
// backend make the node send ICMP "fragmentation needed" / "packet too big"
// to the VIP. The load balancer must send it to the flow's backend the way
// the flow's packets go (IPIP, Geneve, the service option; for SNAT
// translated back like a reply), and the backend's socket must get it and
// lower its segment size: the 2 MB download completes (otherwise it stalls
// forever).
func TestPacketTooBigReachesBackend(t *testing.T) {
	c := newLBCluster(t)
	node := c.env.Node().NetNSName()
	ipRun(t, "-n", node, "link", "set", "dev", c.client.HostVeth(), "mtu", "1300")
	v4, v6 := c.backendsOf(9000, false, false), c.backendsOf(9000, true, false)
	c.sync([]xdp.Service{
		{Frontend: ap("10.96.0.40:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPIP, Backends: v4},
		{Frontend: ap("10.96.0.41:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.Geneve, Backends: v4},
		{Frontend: ap("10.96.0.42:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPOption, Backends: v4},
		{Frontend: ap("10.96.0.43:80"), Proto: mesh.TCP, Mode: mesh.SNAT, Backends: v4},
		{Frontend: ap("[fd00:96::40]:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPIP, Backends: v6},
		{Frontend: ap("[fd00:96::41]:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.Geneve, Backends: v6},
		{Frontend: ap("[fd00:96::42]:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPOption, Backends: v6},
		{Frontend: ap("[fd00:96::43]:80"), Proto: mesh.TCP, Mode: mesh.SNAT, Backends: v6},
	})
	for _, tc := range []struct {
		vip  string
		snat bool
	}{
		{"10.96.0.40:80", false}, {"10.96.0.41:80", false}, {"10.96.0.42:80", false}, {"10.96.0.43:80", true},
		{"[fd00:96::40]:80", false}, {"[fd00:96::41]:80", false}, {"[fd00:96::42]:80", false}, {"[fd00:96::43]:80", true},
	} {
		vip := tc.vip
		// Forget path MTUs learnt by the previous download.
		for _, p := range c.backends {
			ipRun(t, "-n", p.NetNSName(), "-4", "route", "flush", "cache")
			ipRun(t, "-n", p.NetNSName(), "-6", "route", "flush", "cache")
		}
		lbBefore, dsrBefore := c.lbCounters(), c.dsrCounters()
		out, err := c.client.Run(harness.ProcOpts{Timeout: time.Minute}, "fetch", "--target", vip, "--bytes", "2000000", "--timeout", "15s")
		if err != nil {
			t.Fatalf("fetch %s: %v\n%s", vip, err, out)
		}
		var res struct {
			Backend string `json:"backend"`
			OK      bool   `json:"ok"`
			Error   string `json:"error"`
		}
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatalf("fetch output %q: %v", out, err)
		}
		lb, ds := delta(c.lbCounters(), lbBefore), delta(c.dsrCounters(), dsrBefore)
		t.Logf("%s: %+v; load balancer %v; backends %v", vip, res, lb, ds)
		if !res.OK {
			t.Errorf("download from %s failed: %s", vip, res.Error)
		}
		// DSR: the backend side delivers it (translating it for IPIP);
		// SNAT: the load balancer translated it, the backend side sees
		// plain ICMP.
		if lb["tx_icmp"] == 0 || (ds["in_icmp"] == 0) != tc.snat {
			t.Errorf("%s: ICMP errors: load balancer sent %d, backend side delivered %d", vip, lb["tx_icmp"], ds["in_icmp"])
		}
		if lb["pass_malformed"] != 0 || ds["in_malformed"] != 0 || ds["in_error"] != 0 {
			t.Errorf("%s: load balancer %v, backends %v", vip, lb, ds)
		}
	}
}
