//go:build linux

package harness_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/test/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

const (
	tcpPort = 8080
	udpPort = 8081
)

// startServers runs TCP and UDP serve (v4 + v6) in pod with id = pod name.
func startServers(t *testing.T, p *harness.Pod, opts harness.ProcOpts) {
	t.Helper()
	for _, s := range []struct {
		proto string
		port  int
	}{{"tcp", tcpPort}, {"udp", udpPort}} {
		pr := p.Start(opts, "serve", "--id", p.Name(), "--proto", s.proto,
			"--listen", fmt.Sprintf("0.0.0.0:%d", s.port), "--listen", fmt.Sprintf("[::]:%d", s.port))
		if err := pr.WaitReady(); err != nil {
			t.Fatal(err)
		}
	}
}

func hasAddr(m map[string]int, a netip.Addr, want int) bool {
	n := 0
	for k, v := range m {
		if ap, err := netip.ParseAddrPort(k); err == nil && ap.Addr() == a {
			n += v
		}
	}
	return n == want
}

// TestConnectivity: pods reach each other and the node, and the node reaches
// pods, over TCP, connected UDP and unconnected UDP, v4 and v6.
func TestConnectivity(t *testing.T) {
	t.Parallel()
	e := harness.New(t)
	a, b := e.NewPod("a"), e.NewPod("b")
	node := e.Node()
	all := []*harness.Pod{a, b, node}
	for _, p := range all {
		startServers(t, p, harness.ProcOpts{})
	}
	const count = 3
	modes := []struct {
		name, proto, udp string
		port             int
	}{
		{"tcp", "tcp", "connected", tcpPort},
		{"udp-connected", "udp", "connected", udpPort},
		{"udp-unconnected", "udp", "unconnected", udpPort},
	}
	for _, src := range all {
		for _, dst := range all {
			if src == dst {
				continue
			}
			for _, fam := range []string{"v4", "v6"} {
				srcIP, dstIP := src.IPv4(), dst.IPv4()
				if fam == "v6" {
					srcIP, dstIP = src.IPv6(), dst.IPv6()
				}
				for _, m := range modes {
					name := fmt.Sprintf("%s->%s/%s/%s", src.Name(), dst.Name(), fam, m.name)
					target := netip.AddrPortFrom(dstIP, uint16(m.port))
					r, err := src.Connect(harness.ProcOpts{}, "--target", target.String(), "--proto", m.proto,
						"--udp", m.udp, "--count", strconv.Itoa(count))
					if err != nil {
						t.Errorf("%s: %v", name, err)
						continue
					}
					if r.OK != count || r.Fail != 0 || r.Backends[dst.Name()] != count {
						t.Errorf("%s: %v", name, r)
						continue
					}
					if m.udp == "unconnected" {
						if r.Sources[target.String()] != count {
							t.Errorf("%s: reply source not %s: %v", name, target, r)
						}
					} else if r.Peers[target.String()] != count {
						t.Errorf("%s: getpeername not %s: %v", name, target, r)
					}
					if !hasAddr(r.Remotes, srcIP, count) {
						t.Errorf("%s: server did not see client %s: %v", name, srcIP, r)
					}
					if r.ServerLocals[target.String()] != count {
						t.Errorf("%s: server local address not %s: %v", name, target, r)
					}
				}
			}
		}
	}
}

// TestEchoIntegrity streams random bytes through the echo server and back.
func TestEchoIntegrity(t *testing.T) {
	t.Parallel()
	e := harness.New(t)
	a, b := e.NewPod("a"), e.NewPod("b")
	startServers(t, b, harness.ProcOpts{})
	for _, dst := range []netip.Addr{b.IPv4(), b.IPv6()} {
		target := netip.AddrPortFrom(dst, tcpPort).String()
		r, err := a.Stream(harness.ProcOpts{}, "--target", target, "--bytes", strconv.Itoa(8<<20))
		if err != nil {
			t.Fatal(err)
		}
		if !r.OK || r.Sent != 8<<20 || r.Received != r.Sent || r.SHA256Sent != r.SHA256Received || r.Backend != "b" {
			t.Errorf("stream to %s: %+v", target, r)
		}
		c, err := a.Connect(harness.ProcOpts{}, "--target", target, "--echo", "100000", "--count", "2")
		if err != nil || c.OK != 2 {
			t.Errorf("connect --echo to %s: %v %v", target, c, err)
		}
	}
	// A slow stream stopped with SIGTERM still verifies what it sent.
	pr := a.Start(harness.ProcOpts{}, "stream", "--target", netip.AddrPortFrom(b.IPv4(), tcpPort).String(),
		"--bytes", "8388608", "--chunk", "1024", "--rate-pause", "2ms")
	time.Sleep(500 * time.Millisecond)
	out, err := pr.Stop()
	if err != nil {
		t.Fatal(err)
	}
	var r harness.StreamResult
	if err := json.Unmarshal(bytes.TrimSpace(out), &r); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if !r.OK || !r.Interrupted || r.Sent == 0 || r.Sent >= 8388608 || r.Received != r.Sent || r.Backend != "b" {
		t.Errorf("interrupted stream: %+v", r)
	}
}

// TestErrors: errno names reach the JSON result.
func TestErrors(t *testing.T) {
	t.Parallel()
	e := harness.New(t)
	a, b := e.NewPod("a"), e.NewPod("b")
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--proto", "tcp", "--target", netip.AddrPortFrom(b.IPv4(), 9).String()}, "ECONNREFUSED"},
		{[]string{"--proto", "tcp", "--target", netip.AddrPortFrom(b.IPv6(), 9).String()}, "ECONNREFUSED"},
		{[]string{"--proto", "udp", "--target", netip.AddrPortFrom(b.IPv4(), 9).String()}, "ECONNREFUSED"},
		{[]string{"--proto", "udp", "--udp", "unconnected", "--timeout", "300ms", "--target", netip.AddrPortFrom(b.IPv4(), 9).String()}, "TIMEOUT"},
		// no such pod: the node has no route and answers ICMP unreachable
		{[]string{"--proto", "tcp", "--target", "10.244.1.250:80"}, "ENETUNREACH"},
	}
	for _, c := range cases {
		r, err := a.Connect(harness.ProcOpts{}, append(c.args, "--count", "2")...)
		if err != nil {
			t.Fatal(err)
		}
		if r.OK != 0 || r.Fail != 2 || r.Errors[c.want] != 2 {
			t.Errorf("%v: want 2x %s, got %v", c.args, c.want, r)
		}
	}
}

// TestDuration: connect --duration stops on SIGTERM and still prints JSON.
func TestDuration(t *testing.T) {
	t.Parallel()
	e := harness.New(t)
	a, b := e.NewPod("a"), e.NewPod("b")
	startServers(t, b, harness.ProcOpts{})
	pr := a.Start(harness.ProcOpts{}, "connect", "--target", netip.AddrPortFrom(b.IPv4(), tcpPort).String(),
		"--duration", "1m", "--interval", "10ms")
	time.Sleep(500 * time.Millisecond)
	out, err := pr.Stop()
	if err != nil {
		t.Fatal(err)
	}
	r, err := harness.ParseConnectResult(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.OK < 5 || r.Fail != 0 {
		t.Errorf("duration run: %v", r)
	}
	// --duration alone ends by itself.
	r, err = a.Connect(harness.ProcOpts{}, "--target", netip.AddrPortFrom(b.IPv6(), udpPort).String(),
		"--proto", "udp", "--duration", "300ms", "--interval", "10ms")
	if err != nil || r.OK < 5 || r.Fail != 0 {
		t.Errorf("duration 300ms: %v %v", r, err)
	}
}

var scopeRE = regexp.MustCompile(`^/shunt-test-[0-9a-f]{4}/kubepods\.slice/kubepods-besteffort\.slice/` +
	`kubepods-besteffort-pod[0-9a-f]{8}_[0-9a-f]{4}_4[0-9a-f]{3}_[89ab][0-9a-f]{3}_[0-9a-f]{12}\.slice/` +
	`cri-containerd-[0-9a-f]{64}\.scope$`)

func sameFile(t *testing.T, x, y string) bool {
	t.Helper()
	var a, b unix.Stat_t
	if err := unix.Stat(x, &a); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(y, &b); err != nil {
		t.Fatal(err)
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

func procCgroup(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			return p
		}
	}
	t.Fatalf("no cgroup v2 line in %q", b)
	return ""
}

func procStatus(t *testing.T, pid int, key string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), key+":"); ok {
			return strings.Join(strings.Fields(v), " ")
		}
	}
	return ""
}

// TestPlacement: processes run in the pod's cgroup and netns (and keep the
// host mount namespace), as root or as uid 1337.
func TestPlacement(t *testing.T) {
	t.Parallel()
	e := harness.New(t)
	cg2, err := harness.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	a := e.NewPod("a")
	b := e.NewPod("b")
	rel := strings.TrimPrefix(a.CgroupPath(), cg2)
	if !scopeRE.MatchString(rel) || !strings.HasPrefix(a.CgroupPath(), e.CgroupPath()+"/") {
		t.Errorf("pod cgroup %s does not look like kubelet's", a.CgroupPath())
	}
	if filepath.Dir(a.CgroupPath()) != a.PodCgroupPath() ||
		!strings.Contains(a.PodCgroupPath(), strings.ReplaceAll(a.UID(), "-", "_")) ||
		!strings.HasSuffix(a.CgroupPath(), a.ContainerID()+".scope") {
		t.Errorf("pod cgroup %s / uid %s / container %s inconsistent", a.CgroupPath(), a.UID(), a.ContainerID())
	}
	if a.NetNSPath() != "/run/netns/shunt-"+e.ID()+"-a" || len(a.HostVeth()) > 15 {
		t.Errorf("netns %s, veth %s", a.NetNSPath(), a.HostVeth())
	}

	for _, tc := range []struct {
		pod  *harness.Pod
		opts harness.ProcOpts
		uid  string
	}{
		{a, harness.ProcOpts{}, "0"},
		{a, harness.ProcOpts{SetUser: true, UID: 1337, GID: 1337}, "1337"},
		{e.Node(), harness.ProcOpts{}, "0"},
	} {
		pr := tc.pod.Start(tc.opts, "pause")
		if err := pr.WaitReady(); err != nil {
			t.Fatal(err)
		}
		pid := pr.Pid()
		if got, want := procCgroup(t, pid), strings.TrimPrefix(tc.pod.CgroupPath(), cg2); got != want {
			t.Errorf("%s: pid %d in cgroup %s, want %s", tc.pod.Name(), pid, got, want)
		}
		procs, _ := os.ReadFile(filepath.Join(tc.pod.CgroupPath(), "cgroup.procs"))
		if !strings.Contains("\n"+string(procs), "\n"+strconv.Itoa(pid)+"\n") {
			t.Errorf("pid %d not in %s/cgroup.procs: %q", pid, tc.pod.CgroupPath(), procs)
		}
		if !sameFile(t, fmt.Sprintf("/proc/%d/ns/net", pid), tc.pod.NetNSPath()) {
			t.Errorf("pid %d not in netns %s", pid, tc.pod.NetNSPath())
		}
		if sameFile(t, fmt.Sprintf("/proc/%d/ns/net", pid), "/proc/self/ns/net") {
			t.Errorf("pid %d runs in the host netns", pid)
		}
		if !sameFile(t, fmt.Sprintf("/proc/%d/ns/mnt", pid), "/proc/self/ns/mnt") {
			t.Errorf("pid %d changed mount namespace", pid)
		}
		want := strings.Repeat(tc.uid+" ", 4)[:len(tc.uid)*4+3]
		if got := procStatus(t, pid, "Uid"); got != want {
			t.Errorf("Uid %q, want %q", got, want)
		}
		if got := procStatus(t, pid, "Gid"); got != want {
			t.Errorf("Gid %q, want %q", got, want)
		}
		if got := procStatus(t, pid, "Groups"); got != "" {
			t.Errorf("supplementary groups %q", got)
		}
		if _, err := pr.Stop(); err != nil {
			t.Error(err)
		}
	}

	// The app's own view, as 1337.
	info, err := a.Info(harness.ProcOpts{SetUser: true, UID: 1337, GID: 1337})
	if err != nil {
		t.Fatal(err)
	}
	cookie, err := a.NetNSCookie()
	if err != nil {
		t.Fatal(err)
	}
	cookieB, _ := b.NetNSCookie()
	if info.UID != 1337 || info.GID != 1337 || len(info.Groups) != 0 ||
		info.Cgroup != strings.TrimPrefix(a.CgroupPath(), cg2) || info.NetNSCookie != cookie || cookie == cookieB {
		t.Errorf("info %+v (cookie a %d, b %d)", info, cookie, cookieB)
	}
	if !strings.Contains(strings.Join(info.Addrs, ","), "eth0 "+a.IPv4().String()+"/32") {
		t.Errorf("addrs %v", info.Addrs)
	}

	// Exec: arbitrary commands in netns + cgroup.
	out, err := a.Exec("cat", "/proc/self/cgroup")
	if err != nil || !strings.Contains(string(out), "0::"+strings.TrimPrefix(a.CgroupPath(), cg2)+"\n") {
		t.Errorf("exec cat /proc/self/cgroup: %q %v", out, err)
	}
	out, err = a.Exec("ip", "-o", "addr", "show", "dev", "eth0")
	if err != nil || !strings.Contains(string(out), a.IPv6().String()+"/128") {
		t.Errorf("exec ip addr: %q %v", out, err)
	}
	if _, err := a.Exec("false"); err == nil {
		t.Error("exec false: no error")
	}

	// InNetNS sees the pod's interfaces.
	err = a.InNetNS(func() error {
		ifc, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		addrs, _ := ifc.Addrs()
		for _, ad := range addrs {
			if strings.HasPrefix(ad.String(), a.IPv4().String()+"/") {
				return nil
			}
		}
		return fmt.Errorf("eth0 addrs %v", addrs)
	})
	if err != nil {
		t.Error(err)
	}
}

// TestSidecarUID: uid 1337 can serve and connect.
func TestSidecarUID(t *testing.T) {
	t.Parallel()
	e := harness.New(t)
	a, b := e.NewPod("a"), e.NewPod("b")
	sidecar := harness.ProcOpts{SetUser: true, UID: 1337, GID: 1337}
	pr := b.Start(sidecar, "serve", "--id", "sidecar", "--listen", "0.0.0.0:15001", "--listen", "[::]:15001")
	if err := pr.WaitReady(); err != nil {
		t.Fatal(err)
	}
	if got := procStatus(t, pr.Pid(), "Uid"); got != "1337 1337 1337 1337" {
		t.Errorf("serve Uid %q", got)
	}
	for _, dst := range []netip.Addr{b.IPv4(), b.IPv6()} {
		r, err := a.Connect(sidecar, "--target", netip.AddrPortFrom(dst, 15001).String(), "--count", "2")
		if err != nil || r.OK != 2 || r.Backends["sidecar"] != 2 {
			t.Errorf("connect as 1337 to %s: %v %v", dst, r, err)
		}
	}
	// An unprivileged uid cannot bind a privileged port.
	bad := b.Start(sidecar, "serve", "--listen", "0.0.0.0:80")
	if err := bad.Wait(); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("serve :80 as 1337: %v", err)
	}
}

type snapshot struct {
	id      string
	paths   []string // must not exist afterwards
	pids    []int    // must be dead afterwards
	cgroup  string
	netnses []string
}

func pidAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && len(b) > i+2 && b[i+2] != 'Z' && b[i+2] != 'X'
}

func checkGone(t *testing.T, s snapshot) {
	t.Helper()
	for _, p := range s.paths {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after cleanup (%v)", p, err)
		}
	}
	for _, pid := range s.pids {
		if pidAlive(pid) {
			t.Errorf("pid %d still alive after cleanup", pid)
		}
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), "shunt-"+s.id+"-") {
		t.Errorf("ip netns list still shows env %s: %s", s.id, out)
	}
}

// populate builds an env with pods, processes, a straggler not started by
// the harness, and a BPF map pinned in the env's bpffs directory.
func populate(t *testing.T) snapshot {
	e := harness.New(t)
	a, b := e.NewPod("a"), e.NewPod("b")
	startServers(t, a, harness.ProcOpts{})
	p := b.Start(harness.ProcOpts{SetUser: true, UID: 1337, GID: 1337}, "pause")
	n := e.Node().Start(harness.ProcOpts{}, "pause")
	for _, pr := range []*harness.Proc{p, n} {
		if err := pr.WaitReady(); err != nil {
			t.Fatal(err)
		}
	}
	// A daemonized straggler in b's cgroup that the harness does not know of.
	if out, err := b.Exec("sh", "-c", "sleep 1000 </dev/null >/dev/null 2>&1 &"); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := os.Mkdir(filepath.Join(e.BPFFSPath(), "sub"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := m.Pin(filepath.Join(e.BPFFSPath(), "sub", "map")); err != nil {
		t.Fatal(err)
	}
	s := snapshot{id: e.ID(), cgroup: e.CgroupPath()}
	s.paths = []string{e.CgroupPath(), e.BPFFSPath(), e.Node().NetNSPath(), a.NetNSPath(), b.NetNSPath(),
		"/run/shunt-test/" + e.ID()}
	for _, dir := range []string{a.CgroupPath(), b.CgroupPath(), e.Node().CgroupPath()} {
		b, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		for _, f := range strings.Fields(string(b)) {
			pid, _ := strconv.Atoi(f)
			s.pids = append(s.pids, pid)
		}
	}
	if len(s.pids) < 5 { // 2 serve + pause + pause + sleep
		t.Fatalf("expected >= 5 processes in the env's cgroups, got %v", s.pids)
	}
	for _, p := range s.paths {
		if _, err := os.Lstat(p); err != nil {
			t.Fatalf("%s missing while env alive: %v", p, err)
		}
	}
	return s
}

// TestCleanup: after a sub-environment's cleanup nothing is left: processes
// (including a straggler), veths, netns, cgroups, bpffs pins, ownership record.
func TestCleanup(t *testing.T) {
	t.Parallel()
	var s snapshot
	t.Run("env", func(t *testing.T) {
		s = populate(t)
		e2 := harness.New(t)
		c := e2.NewPod("c")
		pr := c.Start(harness.ProcOpts{}, "pause")
		if err := pr.WaitReady(); err != nil {
			t.Fatal(err)
		}
		// Delete a pod mid-test: processes, netns, veth, node routes and cgroups go.
		c.Delete()
		if pidAlive(pr.Pid()) {
			t.Error("pod process alive after Delete")
		}
		for _, p := range []string{c.NetNSPath(), c.PodCgroupPath()} {
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s exists after Delete", p)
			}
		}
		if out, err := e2.Node().Exec("ip", "route", "show"); err != nil || strings.Contains(string(out), c.IPv4().String()) {
			t.Errorf("node routes after Delete: %s %v", out, err)
		}
		// The name can be reused; the new pod gets new addresses and works.
		c2 := e2.NewPod("c")
		if c2.IPv4() == c.IPv4() || c2.NetNSPath() != c.NetNSPath() {
			t.Errorf("recreated pod: %s %s", c2.IPv4(), c2.NetNSPath())
		}
		startServers(t, c2, harness.ProcOpts{})
		if r, err := e2.Node().Connect(harness.ProcOpts{}, "--target", netip.AddrPortFrom(c2.IPv6(), tcpPort).String()); err != nil || r.OK != 1 {
			t.Errorf("node -> recreated pod: %v %v", r, err)
		}
	})
	checkGone(t, s)
	harness.LeakCheck(t)
}

// TestChildEnv is run by TestCleanupOnFailure in a child test binary.
func TestChildEnv(t *testing.T) {
	mode := os.Getenv("HARNESS_TEST_CHILD")
	if mode == "" {
		t.Skip("helper for TestCleanupOnFailure")
	}
	s := populate(t)
	fmt.Printf("CHILD_ENV_ID=%s\n", s.id)
	for _, p := range s.paths {
		fmt.Printf("CHILD_PATH=%s\n", p)
	}
	for _, pid := range s.pids {
		fmt.Printf("CHILD_PID=%d\n", pid)
	}
	switch mode {
	case "sigkill": // a crash: no cleanup runs at all
		_ = unix.Kill(os.Getpid(), unix.SIGKILL)
		time.Sleep(time.Minute)
	case "panic":
		panic("child test panics on purpose")
	case "fatal":
		t.Fatal("child test fails on purpose")
	}
}

// TestCleanupOnFailure: cleanup also runs when a test fails or panics.
func TestCleanupOnFailure(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	for _, mode := range []string{"fatal", "panic"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestChildEnv$", "-test.v", "-test.count=1")
		cmd.Env = append(os.Environ(), "HARNESS_TEST_CHILD="+mode)
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Fatalf("%s child succeeded:\n%s", mode, out)
		}
		s := parseChild(t, out)
		if mode == "panic" && !strings.Contains(string(out), "child test panics on purpose") ||
			mode == "fatal" && !strings.Contains(string(out), "child test fails on purpose") {
			t.Errorf("%s child did not fail as planned:\n%s", mode, out)
		}
		if strings.Contains(string(out), "harness cleanup:") || strings.Contains(string(out), "harness: LEAK") {
			t.Errorf("%s child reported cleanup problems:\n%s", mode, out)
		}
		checkGone(t, s)
	}
}

func parseChild(t *testing.T, out []byte) snapshot {
	t.Helper()
	var s snapshot
	for _, l := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(l, "CHILD_ENV_ID="); ok {
			s.id = v
		}
		if v, ok := strings.CutPrefix(l, "CHILD_PATH="); ok {
			s.paths = append(s.paths, v)
		}
		if v, ok := strings.CutPrefix(l, "CHILD_PID="); ok {
			pid, _ := strconv.Atoi(v)
			s.pids = append(s.pids, pid)
		}
	}
	if s.id == "" || len(s.paths) == 0 || len(s.pids) == 0 {
		t.Fatalf("child output unexpected:\n%s", out)
	}
	return s
}

// TestReapAfterCrash: a test binary killed with SIGKILL leaks (nothing can
// run), the next run with SHUNT_HARNESS_REAP_STALE=1 removes the leftovers.
func TestReapAfterCrash(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildEnv$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "HARNESS_TEST_CHILD=sigkill")
	out, _ := cmd.Output()
	s := parseChild(t, out)
	var leaked []string
	for _, l := range harness.FindLeaks() {
		if l.ID == s.id {
			leaked = append(leaked, l.Kind)
			// The leftover names its culprit.
			if !strings.Contains(l.String(), "TestChildEnv") {
				t.Errorf("leak does not name the test that made it: %s", l)
			}
		}
	}
	if len(leaked) < 4 { // netns x3, cgroup, bpffs, registry
		t.Errorf("crashed child: expected leaks, FindLeaks shows %v", leaked)
	}
	reap := exec.Command(os.Args[0], "-test.run=^$")
	reap.Env = append(os.Environ(), harness.EnvReapStale+"=1")
	rout, err := reap.CombinedOutput()
	if err != nil || !strings.Contains(string(rout), "reaped stale") {
		t.Errorf("reaper run: %v\n%s", err, rout)
	}
	checkGone(t, s)
	for _, l := range harness.FindLeaks() {
		if l.ID == s.id {
			t.Errorf("still leaked after reaping: %s", l)
		}
	}
}

// TestParallelEnvs: concurrent environments get distinct ids and do not see
// each other even with identical pod names and addresses.
func TestParallelEnvs(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	ids := map[string]bool{}
	for i := range 3 {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			t.Parallel()
			e := harness.New(t)
			mu.Lock()
			if ids[e.ID()] {
				t.Errorf("duplicate id %s", e.ID())
			}
			ids[e.ID()] = true
			mu.Unlock()
			a, b := e.NewPod("a"), e.NewPod("b")
			pr := b.Start(harness.ProcOpts{}, "serve", "--id", "env"+strconv.Itoa(i), "--listen", "[::]:80")
			if err := pr.WaitReady(); err != nil {
				t.Fatal(err)
			}
			r, err := a.Connect(harness.ProcOpts{}, "--target", netip.AddrPortFrom(b.IPv6(), 80).String(), "--count", "5")
			if err != nil || r.OK != 5 || r.Backends["env"+strconv.Itoa(i)] != 5 {
				t.Errorf("%v %v", r, err)
			}
		})
	}
}

// hostState captures what the harness must never change in the machine's
// own network namespace (read from this process, which stays in it).
func hostState(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"-o", "link", "show"}, {"-o", "addr", "show"},
		{"route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"},
	} {
		out, err := exec.Command("ip", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %v: %v %s", args, err, out)
		}
		b.Write(out)
	}
	for _, k := range []string{"ipv4/ip_forward", "ipv6/conf/all/forwarding", "ipv6/conf/default/forwarding",
		"ipv4/conf/all/rp_filter", "ipv6/conf/default/accept_dad"} {
		v, err := os.ReadFile("/proc/sys/net/" + k)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s=%s", k, v)
	}
	return b.String()
}

// TestHostUntouched: building an env, pods and traffic changes nothing in
// the host namespace (links, addresses, routes, sysctls).
func TestHostUntouched(t *testing.T) {
	t.Parallel()
	before := hostState(t)
	t.Run("env", func(t *testing.T) {
		e := harness.New(t)
		a, b := e.NewPod("a"), e.NewPod("b")
		startServers(t, b, harness.ProcOpts{})
		if r, err := a.Connect(harness.ProcOpts{}, "--target", netip.AddrPortFrom(b.IPv4(), tcpPort).String()); err != nil || r.OK != 1 {
			t.Errorf("%v %v", r, err)
		}
		if during := hostState(t); during != before {
			t.Errorf("host namespace changed while the env is alive:\nbefore:\n%s\nduring:\n%s", before, during)
		}
	})
	if after := hostState(t); after != before {
		t.Errorf("host namespace changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}
