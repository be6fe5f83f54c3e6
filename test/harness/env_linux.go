package harness

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

const (
	// EnvApp names the helper app a re-executed test binary must run.
	EnvApp = "SHUNT_HARNESS_APP"
	// EnvReapStale, when set for a test binary calling Main, removes leftovers
	// of earlier harness runs whose owning process is dead before tests start.
	EnvReapStale = "SHUNT_HARNESS_REAP_STALE"

	// BPFFSRoot is where bpffs must be mounted.
	BPFFSRoot = "/sys/fs/bpf"

	netnsDir       = "/run/netns"
	registryDir    = "/run/shunt-test" // one file per live Env: "<pid> <starttime>"
	cgroupPrefix   = "shunt-test-"     // <cgroup2>/shunt-test-<id>, /sys/fs/bpf/shunt-test-<id>
	netnsPrefix    = "shunt-"          // /run/netns/shunt-<id>-<pod>
	nodeName       = "node"
	maxPodsPerEnv  = 250
	cleanupTimeout = 10 * time.Second
)

// Addresses of the node network namespace and of the pods' next hops.
var (
	// NodeIPv4 and NodeIPv6 are the node namespace's own addresses (on its lo).
	NodeIPv4 = netip.MustParseAddr("10.244.0.1")
	NodeIPv6 = netip.MustParseAddr("fd00:244:ffff::1")
	// GatewayIPv4 and GatewayIPv6 are the pods' default next hops. The v4 one
	// is a local address of the node namespace (on lo, so it answers ARP on
	// every veth); the v6 one is configured on every node-side veth.
	GatewayIPv4 = netip.MustParseAddr("169.254.1.1")
	GatewayIPv6 = netip.MustParseAddr("fe80::1")
)

var (
	mainCalled atomic.Bool

	activeMu sync.Mutex
	active   = map[string]bool{} // ids of Envs of this process not yet cleaned up
)

// Env is one test's isolated environment. Create it with New.
type Env struct {
	t      testing.TB
	id     string
	cgroup string
	bpffs  string
	node   *Pod

	mu      sync.Mutex
	pods    []*Pod
	byName  map[string]*Pod
	nextIdx int
	procs   map[*Proc]struct{}

	cleanupOnce sync.Once
}

// New creates an isolated environment for one test: a cgroup v2 directory
// <cgroup2 mount>/shunt-test-<id>/, a bpffs directory /sys/fs/bpf/shunt-test-<id>/
// and a "node" network namespace shunt-<id>-node (lo up, forwarding on inside
// it only). Everything is removed by t.Cleanup. New skips the test when not
// running as root.
func New(t testing.TB) *Env {
	t.Helper()
	if os.Getenv(EnvApp) != "" || !mainCalled.Load() {
		t.Fatalf("harness: call harness.Main(m) from TestMain before using harness.New")
	}
	if os.Geteuid() != 0 {
		t.Skip("harness: privileged test, needs root")
	}
	if err := EnsureBPFFS(); err != nil {
		t.Fatalf("harness: %v", err)
	}
	cg2, err := Cgroup2Mount()
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	id, err := claimID(cg2, t.Name())
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	e := &Env{
		t:      t,
		id:     id,
		cgroup: filepath.Join(cg2, cgroupPrefix+id),
		bpffs:  filepath.Join(BPFFSRoot, cgroupPrefix+id),
		byName: map[string]*Pod{},
		procs:  map[*Proc]struct{}{},
	}
	activeMu.Lock()
	active[id] = true
	activeMu.Unlock()
	t.Cleanup(e.cleanup) // registered first so it runs last

	if err := os.Mkdir(e.cgroup, 0o755); err != nil {
		t.Fatalf("harness: create test cgroup: %v", err)
	}
	if err := os.Mkdir(e.bpffs, 0o700); err != nil {
		t.Fatalf("harness: create bpffs dir: %v", err)
	}
	node := &Pod{
		env:       e,
		name:      nodeName,
		netns:     netnsPrefix + id + "-" + nodeName,
		cgroup:    filepath.Join(e.cgroup, nodeName),
		podCgroup: filepath.Join(e.cgroup, nodeName),
		ipv4:      NodeIPv4,
		ipv6:      NodeIPv6,
		isNode:    true,
	}
	node.nsPath = filepath.Join(netnsDir, node.netns)
	e.node = node
	if err := os.Mkdir(node.cgroup, 0o755); err != nil {
		t.Fatalf("harness: create node cgroup: %v", err)
	}
	if err := e.setupNode(); err != nil {
		t.Fatalf("harness: node netns: %v", err)
	}
	return e
}

// ID is the random suffix shared by all of this Env's names.
func (e *Env) ID() string { return e.id }

// CgroupPath is the test's cgroup v2 directory (absolute): attach BPF
// programs here, never to the cgroup root.
func (e *Env) CgroupPath() string { return e.cgroup }

// BPFFSPath is the test's bpffs directory, for the agent's pins.
func (e *Env) BPFFSPath() string { return e.bpffs }

// Node is the node network namespace as a Pod whose cgroup is <test cgroup>/node.
func (e *Env) Node() *Pod { return e.node }

// Pods returns the pods created so far (not the node), in creation order.
func (e *Env) Pods() []*Pod {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]*Pod(nil), e.pods...)
}

func (e *Env) setupNode() error {
	n := e.node
	if err := addNetNS(n.netns); err != nil {
		return err
	}
	err := inNetNS(n.nsPath, func() error {
		return writeSysctls(map[string]string{
			"net/ipv4/ip_forward":                "1",
			"net/ipv6/conf/all/forwarding":       "1",
			"net/ipv6/conf/default/forwarding":   "1",
			"net/ipv4/conf/all/rp_filter":        "0",
			"net/ipv4/conf/default/rp_filter":    "0",
			"net/ipv6/conf/all/accept_dad":       "0",
			"net/ipv6/conf/default/accept_dad":   "0",
			"net/ipv6/conf/default/disable_ipv6": "0",
		})
	})
	if err != nil {
		return err
	}
	return ipBatch(n.netns, [][]string{
		{"link", "set", "lo", "up"},
		{"addr", "add", NodeIPv4.String() + "/32", "dev", "lo"},
		{"addr", "add", GatewayIPv4.String() + "/32", "dev", "lo"},
		{"addr", "add", NodeIPv6.String() + "/128", "dev", "lo"},
	})
}

func (e *Env) trackProc(p *Proc) {
	e.mu.Lock()
	e.procs[p] = struct{}{}
	e.mu.Unlock()
}

func (e *Env) untrackProc(p *Proc) {
	e.mu.Lock()
	delete(e.procs, p)
	e.mu.Unlock()
}

func (e *Env) procsIn(pod *Pod) []*Proc {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []*Proc
	for p := range e.procs {
		if pod == nil || p.pod == pod {
			out = append(out, p)
		}
	}
	return out
}

// cleanup removes everything in reverse order of creation, attempting every
// step and reporting each failure with t.Errorf.
func (e *Env) cleanup() {
	e.cleanupOnce.Do(func() {
		var failed bool
		report := func(format string, args ...any) {
			failed = true
			e.t.Errorf("harness cleanup: "+format, args...)
		}
		// 1. Processes we started, by PID (pidfd), SIGKILL then wait.
		for _, p := range e.procsIn(nil) {
			p.killAndWait()
			e.untrackProc(p)
		}
		// 2. Stragglers: anything left inside OUR cgroup subtree only.
		if err := killCgroupTree(e.cgroup); err != nil {
			report("%v", err)
		}
		// 3. Pods (normally already torn down by their own cleanup), newest first.
		e.mu.Lock()
		pods := append([]*Pod(nil), e.pods...)
		e.mu.Unlock()
		for i := len(pods) - 1; i >= 0; i-- {
			for _, err := range pods[i].teardown() {
				report("%v", err)
			}
			if len(pods[i].teardownErrs) > 0 { // reported by the pod's own cleanup
				failed = true
			}
		}
		// 4. The node namespace.
		if e.node != nil {
			if err := deleteNetNS(e.node.netns); err != nil {
				report("%v", err)
			}
		}
		// 5. Cgroups, depth first.
		if err := removeCgroupTree(e.cgroup); err != nil {
			report("%v", err)
		}
		// 6. bpffs pins.
		if err := os.RemoveAll(e.bpffs); err != nil {
			report("remove %s: %v", e.bpffs, err)
		}
		// 7. Ownership record: kept on failure so LeakCheck attributes the leak.
		if !failed {
			releaseID(e.id)
		}
		activeMu.Lock()
		delete(active, e.id)
		activeMu.Unlock()
	})
}

// ---- cgroup v2 ----

// Cgroup2Mount returns the mount point of the cgroup v2 hierarchy, read from
// /proc/self/mountinfo (e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified).
func Cgroup2Mount() (string, error) {
	mounts, err := readMountinfo()
	if err != nil {
		return "", err
	}
	for _, m := range mounts {
		if m.fstype == "cgroup2" {
			return m.point, nil
		}
	}
	return "", errors.New("no cgroup2 mount in /proc/self/mountinfo")
}

type mountEntry struct{ point, fstype string }

// readMountinfo lists this process's mounts (mount point, file system type).
func readMountinfo() ([]mountEntry, error) {
	ms, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil, err
	}
	out := make([]mountEntry, 0, len(ms))
	for _, m := range ms {
		out = append(out, mountEntry{point: m.Mountpoint, fstype: m.FSType})
	}
	return out, nil
}

// killCgroupTree kills every process inside the cgroup subtree at path (and
// nothing else) and waits until the subtree is empty.
func killCgroupTree(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := os.WriteFile(filepath.Join(path, "cgroup.kill"), []byte("1"), 0); err != nil {
		// Older kernels: kill the PIDs listed in each cgroup of the subtree.
		for _, dir := range cgroupDirs(path) {
			for _, pid := range cgroupPIDs(dir) {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
		}
	}
	deadline := time.Now().Add(cleanupTimeout)
	for {
		pop, err := cgroupPopulated(path)
		if err != nil || !pop {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s still populated after kill: pids %v", path, cgroupPIDs(path))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func cgroupPopulated(path string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(path, "cgroup.events"))
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "populated "); ok {
			return v != "0", nil
		}
	}
	return false, nil
}

func cgroupPIDs(dir string) []int {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// cgroupDirs lists path and every cgroup below it, deepest first.
func cgroupDirs(path string) []string {
	var dirs []string
	_ = filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	sort.SliceStable(dirs, func(i, j int) bool {
		return strings.Count(dirs[i], "/") > strings.Count(dirs[j], "/")
	})
	return dirs
}

// removeCgroupTree rmdirs path and its descendants, depth first, killing
// stragglers of that subtree first.
func removeCgroupTree(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := killCgroupTree(path); err != nil {
		return err
	}
	var errs []error
	for _, dir := range cgroupDirs(path) {
		deadline := time.Now().Add(cleanupTimeout)
		for {
			err := unix.Rmdir(dir)
			if err == nil || errors.Is(err, unix.ENOENT) {
				break
			}
			if errors.Is(err, unix.EBUSY) && time.Now().Before(deadline) {
				_ = killCgroupTree(dir)
				time.Sleep(10 * time.Millisecond)
				continue
			}
			errs = append(errs, fmt.Errorf("rmdir %s: %w", dir, err))
			break
		}
	}
	return errors.Join(errs...)
}

// ---- bpffs ----

// EnsureBPFFS mounts bpffs at /sys/fs/bpf when nothing is mounted there.
func EnsureBPFFS() error {
	var st unix.Statfs_t
	if err := unix.Statfs(BPFFSRoot, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(BPFFSRoot, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("bpf", BPFFSRoot, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", BPFFSRoot, err)
	}
	return nil
}

// ---- ids and ownership ----

func randBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return b
}

func randHex(n int) string { return hex.EncodeToString(randBytes(n)) }

type owner struct {
	pid   int
	start uint64
	who   string // "<binary> <test>", to name the culprit of a leftover
}

func selfOwner() owner {
	st, _ := procStartTime(os.Getpid())
	return owner{pid: os.Getpid(), start: st}
}

// procStartTime is field 22 of /proc/<pid>/stat (guards against PID reuse).
func procStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bad stat")
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3 (state)
	if len(f) < 20 {
		return 0, errors.New("short stat")
	}
	return strconv.ParseUint(f[19], 10, 64)
}

func (o owner) alive() bool {
	st, err := procStartTime(o.pid)
	return err == nil && st == o.start
}

// claimID reserves a 4-hex-digit id atomically (O_EXCL file in /run/shunt-test)
// that no leftover resource uses, so parallel tests and test binaries never
// collide.
func claimID(cg2, test string) (string, error) {
	me := selfOwner()
	for attempt := 0; attempt < 200; attempt++ {
		id := randHex(2)
		if err := os.MkdirAll(registryDir, 0o755); err != nil {
			return "", err
		}
		f, err := os.OpenFile(filepath.Join(registryDir, id), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if errors.Is(err, os.ErrExist) || errors.Is(err, os.ErrNotExist) { // taken, or dir removed concurrently
			continue
		}
		if err != nil {
			return "", err
		}
		_, werr := fmt.Fprintf(f, "%d %d %s %s\n", me.pid, me.start, filepath.Base(os.Args[0]), test)
		cerr := f.Close()
		if err := errors.Join(werr, cerr); err != nil {
			_ = os.Remove(f.Name())
			return "", err
		}
		if idInUse(cg2, id) {
			_ = os.Remove(f.Name())
			continue
		}
		return id, nil
	}
	return "", errors.New("could not find a free harness id")
}

func idInUse(cg2, id string) bool {
	for _, p := range []string{filepath.Join(cg2, cgroupPrefix+id), filepath.Join(BPFFSRoot, cgroupPrefix+id)} {
		if _, err := os.Lstat(p); err == nil {
			return true
		}
	}
	m, _ := filepath.Glob(filepath.Join(netnsDir, netnsPrefix+id+"-*"))
	return len(m) > 0
}

func releaseID(id string) {
	_ = os.Remove(filepath.Join(registryDir, id))
	_ = unix.Rmdir(registryDir) // only succeeds when empty
}

func readOwner(id string) (owner, bool) {
	b, err := os.ReadFile(filepath.Join(registryDir, id))
	if err != nil {
		return owner{}, false
	}
	var o owner
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return owner{}, false
	}
	pid, err1 := strconv.Atoi(f[0])
	start, err2 := strconv.ParseUint(f[1], 10, 64)
	if err1 != nil || err2 != nil {
		return owner{}, false
	}
	o.pid, o.start, o.who = pid, start, strings.Join(f[2:], " ")
	return o, true
}

// ---- leaks ----

// Leak is one leftover resource of the harness.
type Leak struct {
	ID       string // harness id parsed from the name ("" if it does not parse)
	Kind     string // "netns", "cgroup", "bpffs" or "registry"
	Path     string
	OwnerPID int    // 0 when unknown
	Owner    string // the owner's binary and test, when recorded
	Own      bool   // created by this process
}

func (l Leak) String() string {
	who := "owner unknown"
	switch {
	case l.Own:
		who = "leaked by this process"
	case l.OwnerPID != 0:
		who = fmt.Sprintf("owner pid %d is gone", l.OwnerPID)
		if l.Owner != "" {
			who = fmt.Sprintf("owner pid %d, %s, is gone", l.OwnerPID, l.Owner)
		}
	}
	return fmt.Sprintf("%s %s (%s)", l.Kind, l.Path, who)
}

// FindLeaks lists harness resources (netns shunt-*, cgroup shunt-test-*,
// /sys/fs/bpf/shunt-test-*, ownership records) that are neither owned by a
// live Env of this process nor by another live process.
func FindLeaks() []Leak {
	type cand struct{ id, kind, path string }
	var cands []cand
	if ents, err := os.ReadDir(netnsDir); err == nil {
		for _, d := range ents {
			if rest, ok := strings.CutPrefix(d.Name(), netnsPrefix); ok {
				id, _, _ := strings.Cut(rest, "-")
				cands = append(cands, cand{id, "netns", filepath.Join(netnsDir, d.Name())})
			}
		}
	}
	if cg2, err := Cgroup2Mount(); err == nil {
		m, _ := filepath.Glob(filepath.Join(cg2, cgroupPrefix+"*"))
		for _, p := range m {
			cands = append(cands, cand{strings.TrimPrefix(filepath.Base(p), cgroupPrefix), "cgroup", p})
		}
	}
	m, _ := filepath.Glob(filepath.Join(BPFFSRoot, cgroupPrefix+"*"))
	for _, p := range m {
		cands = append(cands, cand{strings.TrimPrefix(filepath.Base(p), cgroupPrefix), "bpffs", p})
	}
	if ents, err := os.ReadDir(registryDir); err == nil {
		for _, d := range ents {
			cands = append(cands, cand{d.Name(), "registry", filepath.Join(registryDir, d.Name())})
		}
	}
	me := os.Getpid()
	var leaks []Leak
	for _, c := range cands {
		activeMu.Lock()
		live := active[c.id]
		activeMu.Unlock()
		if live {
			continue
		}
		o, ok := readOwner(c.id)
		if ok && o.pid != me && o.alive() {
			continue // belongs to another running test binary
		}
		// Owners remove their record last: if the record was gone when read,
		// a path that is gone now was being cleaned up, not leaked.
		if _, err := os.Lstat(c.path); err != nil {
			continue
		}
		l := Leak{ID: c.id, Kind: c.kind, Path: c.path}
		if ok {
			l.OwnerPID, l.Owner = o.pid, o.who
			l.Own = o.pid == me
		}
		leaks = append(leaks, l)
	}
	return leaks
}

// LeakCheck reports, with t.Errorf, every harness resource left over that no
// live Env (of this or another running process) owns, except leftovers of
// dead runs that were already there when this one started (Main warns about
// those: their run failed where it died). Call it after all Envs
// of the package are cleaned up; Main does so automatically.
func LeakCheck(t testing.TB) {
	t.Helper()
	for _, l := range FindLeaks() {
		if _, stale := staleAtStart.Load(l.Path); stale && !l.Own {
			continue // an earlier run's, reported by Main when this one started
		}
		t.Errorf("harness leak: %s", l)
	}
}

// reapStale removes leftovers whose owner is dead or unknown. Only names
// with the harness prefixes are touched.
func reapStale(logf func(string, ...any)) {
	for _, l := range FindLeaks() {
		if l.Own {
			continue
		}
		var err error
		switch l.Kind {
		case "netns":
			err = deleteNetNS(filepath.Base(l.Path))
		case "cgroup":
			err = removeCgroupTree(l.Path)
		case "bpffs":
			err = os.RemoveAll(l.Path)
		}
		logf("harness: reaped stale %s (err=%v)", l, err)
	}
	for _, l := range FindLeaks() {
		if l.Kind == "registry" && !l.Own {
			releaseID(l.ID)
		}
	}
}

// staleAtStart holds the paths of leftovers of dead runs found by Main.
var staleAtStart sync.Map

// kernelLogAbout returns the kernel log lines naming pid (an OOM kill, a
// fatal signal) and any kernel fault, to say why an owner died without
// cleaning up.
func kernelLogAbout(pid int) []string {
	out, err := exec.Command("dmesg").Output()
	if err != nil {
		return nil
	}
	// "Killed process 9400 (x)", "x[9400]: segfault", "pid=9400"; not timestamps.
	// Kernel faults kill the task that was in the kernel without naming
	// it as such: report those too.
	re := regexp.MustCompile(fmt.Sprintf(`(?:process |pid[ =:]?|\w\[)%d\b|BUG:|Oops|general protection fault|Out of memory`, pid))
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if re.MatchString(l) && !strings.Contains(l, "audit") {
			lines = append(lines, l)
		}
	}
	if len(lines) > 10 {
		lines = lines[len(lines)-10:]
	}
	return lines
}

// ---- Main ----

// Main is the TestMain of packages using the harness. When the binary was
// re-executed as a helper app (SHUNT_HARNESS_APP set) it runs that app and
// exits. Otherwise it mounts bpffs if needed, runs the tests, and fails the
// run (exit 1) if this run leaked harness resources. Leftovers of earlier,
// dead runs are reported as a warning (set SHUNT_HARNESS_REAP_STALE=1 to
// remove them) and fail the run only if they appeared while it ran.
// Not being root is fatal only when $CI is set; otherwise tests using New skip.
func Main(m *testing.M) {
	if app := os.Getenv(EnvApp); app != "" {
		os.Exit(RunApp(app, os.Args[1:]))
	}
	mainCalled.Store(true)
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "harness: privileged tests need root (network namespaces, cgroups, bpffs); they will be skipped")
		if os.Getenv("CI") != "" {
			os.Exit(1)
		}
		os.Exit(m.Run())
	}
	if err := EnsureBPFFS(); err != nil {
		fmt.Fprintln(os.Stderr, "harness:", err)
		os.Exit(1)
	}
	logf := func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }
	sweepAppBinaries()
	if os.Getenv(EnvReapStale) != "" {
		reapStale(logf)
	}
	gone := map[int]bool{}
	for _, l := range FindLeaks() {
		staleAtStart.Store(l.Path, true)
		logf("harness: WARNING: stale leftover from an earlier run: %s (set %s=1 to remove)", l, EnvReapStale)
		if l.OwnerPID != 0 && !gone[l.OwnerPID] {
			gone[l.OwnerPID] = true
			for _, k := range kernelLogAbout(l.OwnerPID) {
				logf("harness: kernel log about pid %d: %s", l.OwnerPID, k)
			}
		}
	}
	code := m.Run()
	removeAppBinary()
	removeAgentBinaries()
	sweepAppBinaries() // e.g. of child test binaries that panicked
	for _, l := range FindLeaks() {
		if _, stale := staleAtStart.Load(l.Path); stale && !l.Own {
			continue
		}
		logf("harness: LEAK: %s", l)
		code = 1
	}
	os.Exit(code)
}
