package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/mesh"
)

// SidecarOptions configures RunSidecar.
type SidecarOptions struct {
	// Workloads (default DefaultWorkloads; see ParseWorkload).
	Workloads []string
	// Topologies: 1 = client → sidecar → server, 2 = client → sidecar →
	// the server pod's sidecar → server (default both).
	Topologies []int
	// Proxies: "haproxy", "go" (default both).
	Proxies []string
	// Reps, Duration, Slice, Warmup as in ConnectOptions (defaults 5, 1s,
	// 250ms, 250ms).
	Reps                    int
	Duration, Slice, Warmup time.Duration
	// Quick: 1 repetition of 150ms per configuration (a smoke test of
	// every path; the numbers mean little).
	Quick bool
	// CPU pins every process of the benchmark (apps, proxies) to one CPU;
	// -1: not pinned.
	CPU int
	// Markdown prints only the tables.
	Markdown bool
	Log      io.Writer
}

// Proxy kinds.
const (
	ProxyHAProxy = "haproxy"
	ProxyGo      = "go"
)

func (o SidecarOptions) withDefaults() SidecarOptions {
	if len(o.Workloads) == 0 {
		o.Workloads = DefaultWorkloads
	}
	if len(o.Topologies) == 0 {
		o.Topologies = []int{1, 2}
	}
	if len(o.Proxies) == 0 {
		o.Proxies = []string{ProxyHAProxy, ProxyGo}
	}
	if o.Quick {
		o.Reps = orDefault(o.Reps, 1)
		o.Duration = orDefault(o.Duration, 150*time.Millisecond)
		o.Slice = orDefault(o.Slice, 150*time.Millisecond)
		o.Warmup = orDefault(o.Warmup, 50*time.Millisecond)
	}
	o.Reps = orDefault(o.Reps, 5)
	o.Duration = orDefault(o.Duration, time.Second)
	o.Slice = orDefault(o.Slice, 250*time.Millisecond)
	o.Warmup = orDefault(o.Warmup, 250*time.Millisecond)
	return o
}

// orDefault returns v, or def when v is the zero value.
func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

func (o SidecarOptions) validate() ([]Workload, error) {
	var ws []Workload
	for _, s := range o.Workloads {
		w, err := ParseWorkload(s)
		if err != nil {
			return nil, err
		}
		if slices.ContainsFunc(ws, func(x Workload) bool { return x.Name == w.Name }) {
			return nil, fmt.Errorf("workload %q listed twice", s)
		}
		ws = append(ws, w)
	}
	for _, t := range o.Topologies {
		if t != 1 && t != 2 {
			return nil, fmt.Errorf("topology %d: want 1 or 2", t)
		}
	}
	for _, p := range o.Proxies {
		if p != ProxyHAProxy && p != ProxyGo {
			return nil, fmt.Errorf("proxy %q: want haproxy or go", p)
		}
	}
	if o.Reps < 1 {
		return nil, errors.New("reps: must be at least 1")
	}
	if o.Duration < 10*time.Millisecond || o.Slice < time.Millisecond || o.Warmup < 0 {
		return nil, errors.New("duration ≥ 10ms, slice ≥ 1ms, warmup ≥ 0")
	}
	if o.CPU < -1 || o.CPU >= runtime.NumCPU() {
		return nil, fmt.Errorf("cpu: %d out of range -1..%d", o.CPU, runtime.NumCPU()-1)
	}
	return ws, nil
}

// Istio's conventions, which Shunt's defaults follow.
const (
	sidecarUID   = mesh.DefaultSidecarUID
	outboundPort = mesh.DefaultOutboundPort
	inboundPort  = mesh.DefaultInboundPort
)

// scConfig is one configuration of the sidecar benchmark.
type scConfig struct {
	name  string
	short string // in pod names
	shunt bool
	mode  mesh.SockmapMode
	ipt   bool
}

var scConfigs = map[string]scConfig{
	SCDirect:   {name: SCDirect, short: "direct"},
	SCIPTables: {name: SCIPTables, short: "ipt", ipt: true},
	SCOff:      {name: SCOff, short: "off", shunt: true, mode: mesh.SockmapOff},
	SCAuto:     {name: SCAuto, short: "auto", shunt: true, mode: mesh.SockmapAuto},
	SCOn:       {name: SCOn, short: "on", shunt: true, mode: mesh.SockmapOn},
}

// scProxy is one running sidecar proxy.
type scProxy struct {
	kind   string
	cmd    *exec.Cmd
	ctl    *clientProc // go: answers "stats"
	stats  string      // haproxy: its stats socket
	cgroup string
}

// scGroup is one configuration with one proxy kind: a client pod with its
// sidecar, a server pod without one (topology 1) and a server pod with one
// (topology 2).
type scGroup struct {
	cfg              scConfig
	proxy            string // "" for direct
	client           *benchPod
	server1, server2 *benchPod
	proxyA, proxyB   *scProxy
	srv1CG, srv2CG   string // the echo servers' cgroups
}

func (g *scGroup) desc() string {
	if g.proxy == "" {
		return g.cfg.name
	}
	return g.cfg.name + "/" + g.proxy
}

type sidecarRun struct {
	opts     SidecarOptions
	e        *env
	node     string
	a        *agent.Agent
	groups   []*scGroup
	haproxy  string // version
	selfTest bool
	load     []string
	nsIno    map[string]uint64
}

// RunSidecar runs the sidecar benchmark and writes the report to out. It
// needs root. Everything it creates is removed before it returns, also on
// error or when ctx is cancelled.
func RunSidecar(ctx context.Context, opts SidecarOptions, out io.Writer) error {
	rep, err := MeasureSidecar(ctx, opts)
	if err != nil {
		return err
	}
	rep.Write(out, opts.Markdown)
	return nil
}

// MeasureSidecar runs the benchmark and returns the results; it fails if
// any configuration moved a byte wrongly or took another path than it
// claims (see SidecarCell.Proof).
func MeasureSidecar(ctx context.Context, opts SidecarOptions) (rep *SidecarReport, err error) {
	opts = opts.withDefaults()
	ws, err := opts.validate()
	if err != nil {
		return nil, err
	}
	bins := []string{"ip", "nsenter", "iptables-restore", "iptables-save", "sysctl"}
	if slices.Contains(opts.Proxies, ProxyHAProxy) {
		bins = append(bins, "haproxy")
	}
	for _, bin := range bins {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("%s is needed: %w", bin, err)
		}
	}
	e, err := newEnv(opts.Log)
	if err != nil {
		return nil, err
	}
	r := &sidecarRun{opts: opts, e: e, nsIno: map[string]uint64{}, load: []string{loadAvg()}}
	defer func() {
		if r.a != nil {
			r.a.Close()
		}
		if cerr := e.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleanup: %w", cerr))
		}
	}()
	if err := r.setup(ctx); err != nil {
		return nil, err
	}
	rep = &SidecarReport{SelfTest: r.selfTest}
	for _, topo := range opts.Topologies {
		for _, w := range ws {
			cells, err := r.phase(ctx, topo, w)
			if err != nil {
				return nil, fmt.Errorf("%s, %s: %w", TopologyName(topo), w.Name, err)
			}
			rep.Cells = append(rep.Cells, cells...)
			r.load = append(r.load, loadAvg())
		}
	}
	rep.Method = r.method()
	return rep, nil
}

// ---- setup ----

func (r *sidecarRun) setup(ctx context.Context) error {
	e, o := r.e, r.opts
	// uid 1337 must be able to run the binary: go run and go test build
	// into folders only root can enter.
	if err := os.Chmod(e.tmp, 0o755); err != nil {
		return err
	}
	bin := filepath.Join(e.tmp, "shuntctl")
	if err := copyExecutable(e.exe, bin); err != nil {
		return fmt.Errorf("copy %s: %w", e.exe, err)
	}
	e.exe = bin
	if slices.Contains(o.Proxies, ProxyHAProxy) {
		out, _ := exec.Command("haproxy", "-v").Output()
		r.haproxy, _, _ = strings.Cut(strings.TrimSpace(string(out)), " - ")
	}
	var err error
	if r.node, err = e.addNode(); err != nil {
		return err
	}
	shuntCG, err := e.subCgroup("shunt")
	if err != nil {
		return err
	}
	plainCG, err := e.subCgroup("plain")
	if err != nil {
		return err
	}
	n := 0
	addPod := func(name, parent string) (*benchPod, error) {
		n++
		p, err := e.addPod(r.node, n, name, parent)
		if err != nil {
			return nil, err
		}
		st, err := os.Stat(p.netns)
		if err != nil {
			return nil, err
		}
		r.nsIno[p.netns] = inode(st)
		return p, nil
	}
	two := slices.Contains(o.Topologies, 2)
	direct := &scGroup{cfg: scConfigs[SCDirect]}
	if direct.client, err = addPod("direct-client", plainCG); err != nil {
		return err
	}
	if direct.server1, err = addPod("direct-server", plainCG); err != nil {
		return err
	}
	r.groups = append(r.groups, direct)
	for _, c := range SidecarConfigs {
		cfg := scConfigs[c]
		parent := plainCG
		if cfg.shunt {
			parent = shuntCG
		}
		for _, px := range o.Proxies {
			g := &scGroup{cfg: cfg, proxy: px}
			pre := cfg.short + "-" + px + "-"
			if g.client, err = addPod(pre+"client", parent); err != nil {
				return err
			}
			if g.server1, err = addPod(pre+"server", parent); err != nil {
				return err
			}
			if two {
				if g.server2, err = addPod(pre+"server2", parent); err != nil {
					return err
				}
			}
			r.groups = append(r.groups, g)
		}
	}
	logf(o.Log, "%d pods (network namespaces %s%s-*) on node namespace %s", n, netnsPrefix, e.id, filepath.Base(r.node))

	if err := r.loadShunt(shuntCG); err != nil {
		return err
	}
	for _, g := range r.groups {
		if g.cfg.ipt {
			for _, p := range []*benchPod{g.client, g.server2} {
				if p == nil {
					continue
				}
				if err := run(strings.NewReader(IstioRules), "nsenter", "--net="+p.netns, "iptables-restore"); err != nil {
					return fmt.Errorf("pod %s: iptables rules: %w", p.name, err)
				}
			}
		}
	}
	maxSize := 64 << 10
	for _, w := range o.Workloads {
		if wl, err := ParseWorkload(w); err == nil && wl.Stream {
			maxSize = max(maxSize, wl.Size)
		}
	}
	for _, g := range r.groups {
		for _, s := range []struct {
			p  *benchPod
			cg *string
		}{{g.server1, &g.srv1CG}, {g.server2, &g.srv2CG}} {
			if s.p == nil {
				continue
			}
			if *s.cg, err = s.p.role("server"); err != nil {
				return err
			}
			if err := e.startServer(s.p.netns, *s.cg, "echo", "--port", strconv.Itoa(BackendPort), "--id", s.p.name,
				"--max-size", strconv.Itoa(maxSize), "--cpu", strconv.Itoa(o.CPU)); err != nil {
				return err
			}
		}
		if g.proxy == "" {
			continue
		}
		if g.proxyA, err = r.startProxy(ctx, g.proxy, g.client, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), outboundPort)); err != nil {
			return err
		}
		if g.server2 != nil {
			if g.proxyB, err = r.startProxy(ctx, g.proxy, g.server2, netip.AddrPortFrom(netip.IPv4Unspecified(), inboundPort)); err != nil {
				return err
			}
		}
	}
	logf(o.Log, "echo servers on :%d, sidecar proxies (uid %d) on 127.0.0.1:%d and 0.0.0.0:%d; Shunt self-test passed: %v",
		BackendPort, sidecarUID, outboundPort, inboundPort, r.selfTest)
	return nil
}

// loadShunt loads Shunt on the shunt cgroup and enrolls the pods of the
// Shunt configurations: client pods and topology-2 server pods with a
// sidecar, topology-1 server pods without one, all with the
// configuration's sockmap mode.
func (r *sidecarRun) loadShunt(cgroup string) error {
	var pods []mesh.Pod
	for _, g := range r.groups {
		if !g.cfg.shunt {
			continue
		}
		pods = append(pods,
			mesh.Pod{Name: "bench/" + g.client.name, NetNS: g.client.netns, Sockmap: g.cfg.mode, Sidecar: &mesh.Sidecar{}},
			mesh.Pod{Name: "bench/" + g.server1.name, NetNS: g.server1.netns, Sockmap: g.cfg.mode})
		if g.server2 != nil {
			pods = append(pods, mesh.Pod{Name: "bench/" + g.server2.name, NetNS: g.server2.netns, Sockmap: g.cfg.mode, Sidecar: &mesh.Sidecar{}})
		}
	}
	if len(pods) == 0 {
		return nil
	}
	dir := filepath.Join(r.e.tmp, "agent")
	a, err := agent.New(agent.Config{
		Datapath:  datapath.Config{Root: r.e.bpffs, Cgroup: cgroup},
		HostNetNS: r.node,
		APISocket: filepath.Join(dir, "shuntd.sock"),
		StateFile: filepath.Join(dir, "state.json"),
	}, nil, nil)
	if err != nil {
		return fmt.Errorf("load Shunt: %w", err)
	}
	r.a = a
	if err := a.Apply("bench", agent.Delta{Pods: pods}); err != nil {
		return fmt.Errorf("enroll pods: %w", err)
	}
	st, err := a.Status()
	if err != nil {
		return err
	}
	r.selfTest = st.SockmapSelfTest.Passed
	return nil
}

// IstioRules is Istio's iptables redirection (istio-iptables) reduced to
// what these pods need: inbound TCP to 15006, outbound TCP to 15001 except
// the proxy's own (uid/gid 1337) and loopback.
const IstioRules = `*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
`

// redirectHits reads the packet counters of the two REDIRECT rules in a
// pod (the nat table sees one packet per connection).
func redirectHits(netns string) (outbound, inbound uint64, err error) {
	out, err := exec.Command("nsenter", "--net="+netns, "iptables-save", "-c", "-t", "nat").Output()
	if err != nil {
		return 0, 0, fmt.Errorf("iptables-save: %w", err)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if !strings.Contains(l, "-j REDIRECT") || !strings.HasPrefix(l, "[") {
			continue
		}
		ctr, _, _ := strings.Cut(strings.TrimPrefix(l, "["), ":")
		n, _ := strconv.ParseUint(ctr, 10, 64)
		switch {
		case strings.Contains(l, "-A ISTIO_REDIRECT "):
			outbound = n
		case strings.Contains(l, "-A ISTIO_IN_REDIRECT "):
			inbound = n
		}
	}
	return outbound, inbound, nil
}

func copyExecutable(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Chmod(0o755); err != nil { // umask
		out.Close()
		return err
	}
	return out.Close()
}

// startProxy starts a sidecar proxy of kind in pod p as uid/gid 1337,
// accepting on listen and forwarding to each connection's original
// destination, and waits until it listens.
func (r *sidecarRun) startProxy(ctx context.Context, kind string, p *benchPod, listen netip.AddrPort) (*scProxy, error) {
	e := r.e
	cg, err := p.role("proxy-" + strconv.Itoa(int(listen.Port())))
	if err != nil {
		return nil, err
	}
	px := &scProxy{kind: kind, cgroup: cg}
	desc := fmt.Sprintf("%s proxy in %s", kind, p.name)
	if kind == ProxyGo {
		px.ctl, err = e.startControlled(desc, p.netns, cg, sidecarUID, "proxy", "--listen", listen.String(), "--cpu", strconv.Itoa(r.opts.CPU))
		if err != nil {
			return nil, err
		}
		px.cmd = px.ctl.cmd
		line, err := px.ctl.out.ReadString('\n')
		if err != nil || strings.TrimSpace(line) != "ready" {
			return nil, px.ctl.failed(fmt.Errorf("not ready: %q %v", line, err))
		}
		return px, nil
	}
	// haproxy: one thread, tcp mode, "server 0.0.0.0" = connect to the
	// address the client connected to, which haproxy learns with
	// getsockopt(SO_ORIGINAL_DST) (built with TPROXY/NETFILTER, as
	// Debian's is).
	dir := filepath.Join(e.tmp, "haproxy-"+p.name+"-"+strconv.Itoa(int(listen.Port())))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.Chown(dir, sidecarUID, sidecarUID); err != nil {
		return nil, err
	}
	px.stats = filepath.Join(dir, "stats.sock")
	cfg := HAProxyConfig(listen, px.stats, r.opts.CPU)
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	cmd, release, err := e.commandAs(p.netns, cg, sidecarUID, "haproxy", "-db", "-f", cfgPath)
	if err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, "haproxy.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		release()
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	defer logFile.Close()
	output := func() string {
		b, _ := os.ReadFile(logPath)
		return strings.TrimSpace(string(b))
	}
	if _, err := cmd.StdinPipe(); err != nil {
		release()
		return nil, err
	}
	if err := e.launch(cmd, release, desc); err != nil {
		return nil, err
	}
	px.cmd = cmd
	deadline := time.Now().Add(10 * time.Second)
	ready := func() bool {
		if !listening(cmd.Process.Pid, listen.Port()) {
			return false
		}
		_, err := haproxyBytes(px.stats)
		return err == nil
	}
	for !ready() {
		if exited(cmd.Process.Pid) {
			e.stop(cmd)
			return nil, fmt.Errorf("%s exited: %s", desc, output())
		}
		if time.Now().After(deadline) {
			_, err := haproxyBytes(px.stats)
			return nil, fmt.Errorf("%s: not ready after 10s (listening: %v, stats: %v): %s", desc, listening(cmd.Process.Pid, listen.Port()), err, output())
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return px, nil
}

// HAProxyConfig is the sidecar haproxy's configuration.
func HAProxyConfig(listen netip.AddrPort, statsSock string, cpu int) string {
	pin := ""
	if cpu >= 0 {
		pin = fmt.Sprintf("    cpu-map 1/all %d\n", cpu)
	}
	return fmt.Sprintf(`global
    nbthread 1
%s    maxconn 1000
    stats socket %s mode 600 level user
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen sidecar
    bind %s
    # 0.0.0.0 without a port: the destination the client asked for
    # (SO_ORIGINAL_DST), address and port.
    server original 0.0.0.0
`, pin, statsSock, listen)
}

// listening reports whether process pid's network namespace has a TCP
// listener on port (from /proc/PID/net/tcp: no connection is made, which
// would make a proxy forward to itself).
func listening(pid int, port uint16) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", pid))
	if err != nil {
		return false
	}
	want := fmt.Sprintf(":%04X", port)
	for _, l := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(l)
		if len(f) > 3 && strings.HasSuffix(f[1], want) && f[3] == "0A" {
			return true
		}
	}
	return false
}

// exited reports whether process pid (a child not yet reaped) has ended.
func exited(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return strings.HasPrefix(rest, "Z") || strings.HasPrefix(rest, "X")
}

// haproxyBytes asks haproxy's stats socket for the bytes its frontends
// received and sent.
func haproxyBytes(sock string) (uint64, error) {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return 0, fmt.Errorf("haproxy stats: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "show stat\n"); err != nil {
		return 0, fmt.Errorf("haproxy stats: %w", err)
	}
	sc := bufio.NewScanner(c)
	var head []string
	var total uint64
	found := false
	for sc.Scan() {
		l := sc.Text()
		if h, ok := strings.CutPrefix(l, "# "); ok {
			head = strings.Split(h, ",")
			continue
		}
		f := strings.Split(l, ",")
		if len(f) < 2 || f[1] != "FRONTEND" {
			continue
		}
		for i, name := range head {
			if (name == "bin" || name == "bout") && i < len(f) {
				v, err := strconv.ParseUint(f[i], 10, 64)
				if err != nil {
					return 0, fmt.Errorf("haproxy stats: %s %q", name, f[i])
				}
				total += v
				found = true
			}
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("haproxy stats: %w", err)
	}
	if !found {
		return 0, errors.New("haproxy stats: no frontend bytes")
	}
	return total, nil
}

// bytesForwarded is what a proxy forwarded so far (both directions), with
// the Go proxy's reads+writes.
func (px *scProxy) bytesForwarded(ctx context.Context) (fwd, ops uint64, err error) {
	if px.kind == ProxyHAProxy {
		n, err := haproxyBytes(px.stats)
		return n, 0, err
	}
	line, err := px.ctl.request(ctx, "stats", 10*time.Second)
	if err != nil {
		return 0, 0, err
	}
	var st ProxyStats
	if err := json.Unmarshal(line, &st); err != nil {
		return 0, 0, fmt.Errorf("proxy stats %q: %w", line, err)
	}
	if st.OrigDstFail+st.DialFail+st.Loops > 0 {
		return 0, 0, fmt.Errorf("Go proxy: %d connections without an original destination, %d failed dials, %d loops",
			st.OrigDstFail, st.DialFail, st.Loops)
	}
	return st.Bytes, st.Reads + st.Writes, nil
}

// ---- measuring ----

// scCell is a cell being measured: its client and what to sample.
type scCell struct {
	out     *SidecarCell
	g       *scGroup
	client  *clientProc
	target  *benchPod
	path    []string   // cgroups of every process on the path
	proxies []*scProxy // on the path
}

// procSample is, at one moment, the CPU time of the path's processes (all,
// and the proxies alone), the proxies' wake-ups and the Go proxies'
// reads+writes.
type procSample struct {
	cpu, proxyCPU, proxyUser time.Duration
	wake                     uint64
	ops                      uint64
}

func (a procSample) sub(b procSample) procSample {
	return procSample{cpu: a.cpu - b.cpu, proxyCPU: a.proxyCPU - b.proxyCPU, proxyUser: a.proxyUser - b.proxyUser,
		wake: a.wake - b.wake, ops: a.ops - b.ops}
}

func (a procSample) add(b procSample) procSample {
	return procSample{cpu: a.cpu + b.cpu, proxyCPU: a.proxyCPU + b.proxyCPU, proxyUser: a.proxyUser + b.proxyUser,
		wake: a.wake + b.wake, ops: a.ops + b.ops}
}

func (c *scCell) sample(ctx context.Context) (procSample, error) {
	var s procSample
	for _, cg := range c.path {
		u, _, err := cgroupCPU(cg)
		if err != nil {
			return s, err
		}
		s.cpu += u
	}
	for _, px := range c.proxies {
		u, user, err := cgroupCPU(px.cgroup)
		if err != nil {
			return s, err
		}
		s.proxyCPU += u
		s.proxyUser += user
		s.wake += voluntarySwitches(px.cmd.Process.Pid)
		if px.kind == ProxyGo {
			_, ops, err := px.bytesForwarded(ctx)
			if err != nil {
				return s, err
			}
			s.ops += ops
		}
	}
	return s, nil
}

// cgroupCPU is a cgroup's CPU time (usage_usec) and its user part.
func cgroupCPU(cg string) (usage, user time.Duration, err error) {
	b, err := os.ReadFile(filepath.Join(cg, "cpu.stat"))
	if err != nil {
		return 0, 0, err
	}
	found := 0
	for _, l := range strings.Split(string(b), "\n") {
		name, v, _ := strings.Cut(l, " ")
		if name != "usage_usec" && name != "user_usec" {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%s/cpu.stat: %s: %w", cg, name, err)
		}
		found++
		if name == "usage_usec" {
			usage = time.Duration(n) * time.Microsecond
		} else {
			user = time.Duration(n) * time.Microsecond
		}
	}
	if found != 2 {
		return 0, 0, fmt.Errorf("%s/cpu.stat: no usage_usec/user_usec", cg)
	}
	return usage, user, nil
}

// syscallsDuring counts the system calls the processes pids make while
// f runs, with `perf stat -e raw_syscalls:sys_enter` (a tracepoint count:
// no ptrace, little overhead). It returns ok=false when perf cannot count.
func (e *env) syscallsDuring(pids []int, f func() error) (n uint64, ok bool, err error) {
	type counter struct {
		cmd *exec.Cmd
		out *os.File
	}
	var cs []counter
	defer func() {
		for _, c := range cs {
			if c.cmd.ProcessState == nil {
				e.stop(c.cmd)
			}
			c.out.Close()
			os.Remove(c.out.Name())
		}
	}()
	for _, pid := range pids {
		out, err := os.CreateTemp(e.tmp, "perf-")
		if err != nil {
			return 0, false, err
		}
		cmd := exec.Command("perf", "stat", "-x,", "--no-big-num", "-e", "raw_syscalls:sys_enter", "-p", strconv.Itoa(pid))
		cmd.Stderr = out
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := e.launch(cmd, nil, "perf"); err != nil {
			out.Close()
			return 0, false, nil
		}
		cs = append(cs, counter{cmd, out})
	}
	// Run f only once every perf has opened its counter: the proxies are
	// idle until f runs, so the counts cover f's traffic.
	for _, c := range cs {
		if !perfAttached(c.cmd.Process.Pid, 10*time.Second) {
			return 0, false, nil
		}
	}
	time.Sleep(20 * time.Millisecond)
	ferr := f()
	for _, c := range cs {
		c.cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() {
			c.cmd.Wait()
			close(done)
		}()
		select {
		case <-done:
			e.untrack(c.cmd)
		case <-time.After(5 * time.Second):
			e.stop(c.cmd)
		}
	}
	if ferr != nil {
		return 0, false, ferr
	}
	for _, c := range cs {
		b, err := os.ReadFile(c.out.Name())
		if err != nil {
			return 0, false, err
		}
		found := false
		for _, l := range strings.Split(string(b), "\n") {
			f := strings.Split(l, ",")
			if len(f) > 2 && f[2] == "raw_syscalls:sys_enter" {
				v, err := strconv.ParseUint(f[0], 10, 64)
				if err != nil { // "<not supported>", "<not counted>"
					return 0, false, nil
				}
				n += v
				found = true
			}
		}
		if !found {
			return 0, false, nil
		}
	}
	return n, true, nil
}

// perfAttached waits until process pid holds a perf event.
func perfAttached(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, e := range ents {
			if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); l == "anon_inode:[perf_event]" {
				return true
			}
		}
		if exited(pid) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}

// voluntarySwitches sums voluntary_ctxt_switches over a process's threads:
// each is the thread blocking until something wakes it.
func voluntarySwitches(pid int) uint64 {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	var n uint64
	for _, t := range ents {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, t.Name()))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "voluntary_ctxt_switches:"); ok {
				x, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				n += x
			}
		}
	}
	return n
}

// podCounters is a snapshot of everything that proves a path: Shunt's
// per-pod counters, iptables REDIRECT hits and proxies' forwarded bytes.
type podCounters struct {
	shunt    map[string]map[string]uint64 // pod name → counter
	redirect map[string][2]uint64         // pod name → outbound, inbound hits
	proxied  map[*scProxy]uint64
}

func (r *sidecarRun) counters(ctx context.Context) (podCounters, error) {
	pc := podCounters{shunt: map[string]map[string]uint64{}, redirect: map[string][2]uint64{}, proxied: map[*scProxy]uint64{}}
	if r.a != nil {
		st, err := r.a.Status()
		if err != nil {
			return pc, err
		}
		for _, p := range st.Pods {
			pc.shunt[strings.TrimPrefix(p.Name, "bench/")] = p.Counters
		}
	}
	for _, g := range r.groups {
		if g.cfg.ipt {
			for _, p := range []*benchPod{g.client, g.server2} {
				if p == nil {
					continue
				}
				o, i, err := redirectHits(p.netns)
				if err != nil {
					return pc, err
				}
				pc.redirect[p.name] = [2]uint64{o, i}
			}
		}
		for _, px := range []*scProxy{g.proxyA, g.proxyB} {
			if px == nil {
				continue
			}
			n, _, err := px.bytesForwarded(ctx)
			if err != nil {
				return pc, err
			}
			pc.proxied[px] = n
		}
	}
	return pc, nil
}

// rotate returns 0..n-1 rotated by rep: each cell runs first equally often.
func rotate(n, rep int) []int {
	o := make([]int, n)
	for i := range o {
		o[i] = (i + rep) % n
	}
	return o
}

// phase measures one topology and workload: every configuration and
// proxy, interleaved, then checks the evidence of the paths taken.
func (r *sidecarRun) phase(ctx context.Context, topo int, w Workload) (_ []*SidecarCell, err error) {
	o := r.opts
	var cells []*scCell
	defer func() {
		for _, c := range cells {
			if c.client != nil {
				c.client.close()
			}
		}
	}()
	before, err := r.counters(ctx)
	if err != nil {
		return nil, err
	}
	for _, g := range r.groups {
		target := g.server1
		srvCG := g.srv1CG
		if topo == 2 && g.proxy != "" {
			target, srvCG = g.server2, g.srv2CG
		}
		clientCG, err := g.client.role(fmt.Sprintf("client-t%d", topo))
		if err != nil {
			return nil, err
		}
		c := &scCell{g: g, target: target, out: &SidecarCell{Topology: topo, Workload: w, Config: g.cfg.name, Proxy: g.proxy}}
		c.path = []string{clientCG, srvCG}
		if g.proxyA != nil {
			c.proxies = append(c.proxies, g.proxyA)
			c.path = append(c.path, g.proxyA.cgroup)
		}
		if topo == 2 && g.proxyB != nil {
			c.proxies = append(c.proxies, g.proxyB)
			c.path = append(c.path, g.proxyB.cgroup)
		}
		cells = append(cells, c)
		addr := netip.AddrPortFrom(target.ip, BackendPort)
		if c.client, err = r.e.startControlled(g.desc()+" client", g.client.netns, clientCG, -1, "sclient",
			"--target", addr.String(), "--expect", target.name, "--workload", w.Name, "--cpu", strconv.Itoa(o.CPU)); err != nil {
			return nil, err
		}
		// First run: connect, check the hello, warm up.
		res, err := c.run(ctx, o.Warmup, 0)
		if err != nil {
			return nil, err
		}
		if res.NetNS != r.nsIno[g.client.netns] || res.Cgroup == "" || !strings.HasSuffix(clientCG, res.Cgroup) {
			return nil, fmt.Errorf("%s client ran in netns inode %d, cgroup %q; want %s, %s", g.desc(), res.NetNS, res.Cgroup, g.client.netns, clientCG)
		}
	}
	nSlices, sliceDur := Slices(o.Duration, o.Slice)
	sliceWarm := min(o.Warmup, 10*time.Millisecond)
	last := make([]SidecarClientResult, len(cells))
	for rep := range o.Reps {
		type acc struct {
			tx, bytes, runTx uint64
			elapsed          time.Duration
			hist             Hist
			d                procSample
		}
		accs := make([]acc, len(cells))
		order := rotate(len(cells), rep)
		for range nSlices {
			for _, i := range order {
				c := cells[i]
				s0, err := c.sample(ctx)
				if err != nil {
					return nil, err
				}
				res, err := c.run(ctx, sliceWarm, sliceDur)
				if err != nil {
					return nil, err
				}
				s1, err := c.sample(ctx)
				if err != nil {
					return nil, err
				}
				a := &accs[i]
				if a.hist == nil {
					a.hist = Hist{}
				}
				a.tx += res.Tx
				a.bytes += res.Bytes
				a.runTx += res.RunTx
				a.elapsed += res.Elapsed
				a.hist.Merge(res.Hist)
				a.d = a.d.add(s1.sub(s0))
				last[i] = res
			}
		}
		var line []string
		for _, i := range order {
			a, c := accs[i], cells[i].out
			rate := Ratio(float64(a.tx), a.elapsed.Seconds())
			if w.Stream {
				rate = Ratio(float64(a.bytes)*8, a.elapsed.Seconds())
			}
			c.Rates = append(c.Rates, rate)
			if !w.Stream {
				c.P50 = append(c.P50, a.hist.Percentile(50))
				c.P99 = append(c.P99, a.hist.Percentile(99))
			}
			if a.runTx > 0 {
				c.CPU = append(c.CPU, float64(a.d.cpu.Microseconds())/float64(a.runTx))
				if len(cells[i].proxies) > 0 {
					c.ProxyCPU = append(c.ProxyCPU, float64(a.d.proxyCPU.Microseconds())/float64(a.runTx))
					c.ProxyUser = append(c.ProxyUser, float64(a.d.proxyUser.Microseconds())/float64(a.runTx))
					c.Wakeups = append(c.Wakeups, float64(a.d.wake)/float64(a.runTx))
				}
				if c.Proxy == ProxyGo {
					c.ProxyOps = append(c.ProxyOps, float64(a.d.ops)/float64(a.runTx))
				}
			}
			if w.Stream {
				line = append(line, fmt.Sprintf("%s %s", c.Key(), FormatBits(rate)))
			} else {
				line = append(line, fmt.Sprintf("%s %s", c.Key(), FormatRate(rate)))
			}
		}
		logf(o.Log, "%d sidecar(s), %s, rep %d/%d: %s", topo, w.Name, rep+1, o.Reps, strings.Join(line, ", "))
	}
	// One more slice per cell with perf counting the proxies' system calls
	// (not part of the rates: tracing costs a little).
	if _, err := exec.LookPath("perf"); err == nil {
		for i, c := range cells {
			var pids []int
			for _, px := range c.proxies {
				pids = append(pids, px.cmd.Process.Pid)
			}
			if len(pids) == 0 {
				continue
			}
			var res SidecarClientResult
			ran := false
			n, ok, err := r.e.syscallsDuring(pids, func() (err error) {
				ran = true
				res, err = c.run(ctx, 0, sliceDur)
				return err
			})
			if err != nil {
				return nil, err
			}
			if ok && res.RunTx > 0 {
				c.out.ProxySyscalls = float64(n) / float64(res.RunTx)
			}
			if ran {
				last[i] = res // its totals include this slice
			}
		}
	}
	for i, c := range cells {
		res := last[i]
		c.out.Sent, c.out.Recv, c.out.Verified, c.out.Conns, c.out.EAGAIN = res.Sent, res.Recv, res.Verified, res.Connects, res.EAGAIN
		c.client.close()
		c.client = nil
	}
	// The connections are closed: wait until the proxies have accounted
	// for every byte, then compare the counters with what the clients did.
	var after podCounters
	deadline := time.Now().Add(5 * time.Second)
	for {
		if after, err = r.counters(ctx); err != nil {
			return nil, err
		}
		err = nil
		for _, c := range cells {
			if err = c.prove(r, before, after); err != nil {
				break
			}
		}
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	out := make([]*SidecarCell, len(cells))
	for i, c := range cells {
		out[i] = c.out
	}
	return out, nil
}

func (c *scCell) run(ctx context.Context, warm, dur time.Duration) (SidecarClientResult, error) {
	var res SidecarClientResult
	line, err := c.client.request(ctx, fmt.Sprintf("%s %s", warm, dur), warm+dur+30*time.Second)
	if err != nil {
		return res, err
	}
	if err := json.Unmarshal(line, &res); err != nil {
		return res, fmt.Errorf("%s client output %q: %w", c.g.desc(), line, err)
	}
	if res.Err != "" {
		return res, fmt.Errorf("%s client: %s", c.g.desc(), res.Err)
	}
	return res, nil
}

// prove checks that the cell's bytes were all verified and that the
// counters show the path its configuration claims, and records the
// evidence.
func (c *scCell) prove(r *sidecarRun, before, after podCounters) error {
	out, g, w := c.out, c.g, c.out.Workload
	n, sent, recv := out.Conns, out.Sent, out.Recv
	fail := func(format string, a ...any) error {
		return fmt.Errorf("%s: %s", g.desc(), fmt.Sprintf(format, a...))
	}
	// Every byte the client received was compared, and the echo (or the
	// stream's checks) covered every byte it sent.
	if w.Stream {
		mode := uint64(5)
		if out.Verified != recv+sent-mode*n {
			return fail("%d bytes verified of %d received + %d sent", out.Verified, recv, sent-mode*n)
		}
	} else if out.Verified != recv || recv-helloSize*n != sent-n {
		return fail("%d bytes verified, %d received, %d sent: not a complete echo", out.Verified, recv, sent)
	}
	if n != uint64(w.Conns) || sent == 0 {
		return fail("%d connections, %d bytes sent", n, sent)
	}
	moved := sent + recv
	out.Proxied = map[string]uint64{}
	for _, px := range c.proxies {
		fwd := after.proxied[px] - before.proxied[px]
		role := "sidecar"
		if px == g.proxyB {
			role = "server sidecar"
		}
		if fwd != moved {
			return fail("%s (%s) forwarded %d bytes, the client moved %d", role, px.kind, fwd, moved)
		}
		out.Proxied[role] = fwd
	}
	if g.cfg.ipt {
		out.Redirect = map[string]uint64{}
		ob := after.redirect[g.client.name][0] - before.redirect[g.client.name][0]
		if ob != n {
			return fail("client pod outbound REDIRECT hits %d, want %d (one per connection)", ob, n)
		}
		out.Redirect["client pod outbound"] = ob
		if c.target == g.server2 {
			ib := after.redirect[g.server2.name][1] - before.redirect[g.server2.name][1]
			if ib != n {
				return fail("server pod inbound REDIRECT hits %d, want %d", ib, n)
			}
			out.Redirect["server pod inbound"] = ib
		}
	}
	if !g.cfg.shunt {
		return nil
	}
	delta := func(pod *benchPod) map[string]uint64 {
		d := map[string]uint64{}
		for k, v := range after.shunt[pod.name] {
			d[k] = v - before.shunt[pod.name][k]
		}
		return d
	}
	cl, sv := delta(g.client), delta(c.target)
	out.Counters = map[string]map[string]uint64{"client pod": cl, "server pod": sv}
	if cl["steer_outbound"] != n || cl["origdst_answer"] != n {
		return fail("client pod: steer_outbound %d, origdst_answer %d, want %d each", cl["steer_outbound"], cl["origdst_answer"], n)
	}
	two := c.target == g.server2
	if two && (cl["steer_inbound"] != n || sv["origdst_answer"] != n) {
		return fail("steer_inbound %d (client pod), origdst_answer %d (server pod), want %d each", cl["steer_inbound"], sv["origdst_answer"], n)
	}
	// Accelerated bytes, by leg: app→sidecar (sent), sidecar→app (recv),
	// then sidecar→upstream (sent) and upstream→sidecar (recv) on every
	// further hop.
	var wantInsert [2]uint64 // client pod, server pod
	var wantBytes [2]uint64
	switch {
	case g.cfg.mode == mesh.SockmapOn && !two:
		// app, sidecar (both ends of the loopback leg), sidecar's upstream;
		// the server's accepted socket.
		wantInsert = [2]uint64{3 * n, n}
		wantBytes = [2]uint64{2*sent + recv, recv}
	case g.cfg.mode == mesh.SockmapOn && two:
		wantInsert = [2]uint64{3 * n, 3 * n}
		wantBytes = [2]uint64{2*sent + recv, sent + 2*recv}
	case g.cfg.mode == mesh.SockmapAuto && two && r.selfTest:
		// Only the sidecar→sidecar hop.
		wantInsert = [2]uint64{n, n}
		wantBytes = [2]uint64{sent, recv}
	}
	got := [2]map[string]uint64{cl, sv}
	for i, who := range []string{"client pod", "server pod"} {
		if got[i]["sock_insert"] != wantInsert[i] {
			return fail("%s: sock_insert %d, want %d", who, got[i]["sock_insert"], wantInsert[i])
		}
		b := got[i]["bytes_redirect"]
		if wantBytes[i] == 0 && (b != 0 || got[i]["msg_redirect"] != 0) {
			return fail("%s: %d bytes redirected, want none", who, b)
		}
		// A send made before the peer's end entered the sockhash, or
		// while the peer's queue was full (back-pressure), takes TCP and
		// is counted in bytes_tcp: together they are every byte.
		if wantBytes[i] != 0 && b+got[i]["bytes_tcp"] != wantBytes[i] {
			return fail("%s: %d bytes redirected + %d through TCP (%d misses, %d back-pressure), want %d in all",
				who, b, got[i]["bytes_tcp"], got[i]["msg_miss"], got[i]["msg_backpressure"], wantBytes[i])
		}
	}
	return nil
}

func (r *sidecarRun) method() string {
	o := r.opts
	_, sliceDur := Slices(o.Duration, o.Slice)
	pin := "processes not pinned"
	if o.CPU >= 0 {
		pin = fmt.Sprintf("every process (apps, proxies) pinned to CPU %d", o.CPU)
	}
	hp := ""
	if r.haproxy != "" {
		hp = r.haproxy + " (1 thread, mode tcp), "
	}
	return fmt.Sprintf("Median of %d repetition(s) × %v per configuration, interleaved in %v slices (after %v warm-up), persistent connections; "+
		"pods are network namespaces joined by veth pairs to a node namespace; sidecars run as uid %d; %s; %sGo proxy (net.TCPConn Read/Write loops, %s); "+
		"Shunt sockmap self-test passed: %v; %s, kernel %s, %d CPUs; load average (1 min) during the run: %s.",
		o.Reps, o.Duration, sliceDur, o.Warmup, sidecarUID, pin, hp, runtime.Version(), r.selfTest, shuntVersion(), kernelRelease(), runtime.NumCPU(),
		strings.Join(r.load, " → "))
}
