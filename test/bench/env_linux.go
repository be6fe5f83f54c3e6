package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
)

// Names of everything a run creates; <id> is the pid of the shuntctl
// running the benchmark, which lets a later run tell leftovers of a dead
// run from a live one. Network namespaces deliberately do not start with
// "shunt-": that prefix belongs to the test harness, which reaps what it
// does not own.
const (
	cgroupPrefix = "shunt-bench-" // <cgroup2>/shunt-bench-<id>, /sys/fs/bpf/shunt-bench-<id>
	netnsPrefix  = "shuntbench-"  // /run/netns/shuntbench-<id>[-<name>]
	netnsDir     = "/run/netns"
	bpffsRoot    = "/sys/fs/bpf"

	cleanupTimeout = 10 * time.Second
)

// env is one benchmark run's private world. close removes all of it.
type env struct {
	id     string
	log    io.Writer
	exe    string
	cgroup string // <cgroup2>/shunt-bench-<id>
	bpffs  string // /sys/fs/bpf/shunt-bench-<id>
	tmp    string

	mu     sync.Mutex
	netns  []string // names under /run/netns, in creation order
	procs  map[*exec.Cmd]bool
	closed bool
}

func logf(w io.Writer, format string, a ...any) {
	if w != nil {
		fmt.Fprintf(w, format+"\n", a...)
	}
}

// newEnv checks the prerequisites, removes leftovers of dead runs and
// creates the run's cgroup, bpffs folder and temporary folder. On error,
// whatever was created is removed again.
func newEnv(log io.Writer) (_ *env, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("the benchmark needs root (network namespaces, cgroups, eBPF)")
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own binary: %w", err)
	}
	cg2, err := agent.CgroupV2Root()
	if err != nil {
		return nil, err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(bpffsRoot, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		return nil, fmt.Errorf("bpffs is not mounted at %s (mount -t bpf bpf %s)", bpffsRoot, bpffsRoot)
	}
	reapStale(cg2, log)
	id := strconv.Itoa(os.Getpid())
	e := &env{id: id, log: log, exe: exe, procs: map[*exec.Cmd]bool{},
		cgroup: filepath.Join(cg2, cgroupPrefix+id), bpffs: filepath.Join(bpffsRoot, cgroupPrefix+id)}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if err := os.Mkdir(e.cgroup, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup: %w", err)
	}
	if e.tmp, err = os.MkdirTemp("", cgroupPrefix+id+"-"); err != nil {
		return nil, err
	}
	// The agent creates the bpffs folder itself; cleanup removes it.
	return e, nil
}

// subCgroup creates <run cgroup>/name.
func (e *env) subCgroup(name string) (string, error) {
	p := filepath.Join(e.cgroup, name)
	if err := os.Mkdir(p, 0o755); err != nil {
		return "", fmt.Errorf("create cgroup: %w", err)
	}
	return p, nil
}

// addNetNS creates network namespace shuntbench-<id>-<name> with lo up and
// returns its path.
func (e *env) addNetNS(name string) (string, error) {
	ns := netnsPrefix + e.id + "-" + name
	if err := run(nil, "ip", "netns", "add", ns); err != nil {
		return "", err
	}
	e.mu.Lock()
	e.netns = append(e.netns, ns)
	e.mu.Unlock()
	if err := run(nil, "ip", "-n", ns, "link", "set", "lo", "up"); err != nil {
		return "", err
	}
	return filepath.Join(netnsDir, ns), nil
}

// run runs a command to completion (no context: cleanup must not be
// cancelled), with stdin if given; its output goes into the error.
func run(stdin io.Reader, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Stdin = stdin
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// command prepares the shuntctl binary re-executed as `bench worker ARGS`
// inside netns (via nsenter) and cgroup (clone3 CLONE_INTO_CGROUP: in the
// cgroup from its first instruction). The caller must call release after
// Start.
func (e *env) command(netns, cgroup string, args ...string) (cmd *exec.Cmd, release func(), err error) {
	return e.commandAs(netns, cgroup, -1, e.exe, append([]string{"bench", "worker"}, args...)...)
}

// commandAs prepares prog inside netns and cgroup as command does, running
// as uid and gid uid (no supplementary groups) when uid ≥ 0.
func (e *env) commandAs(netns, cgroup string, uid int, prog string, args ...string) (cmd *exec.Cmd, release func(), err error) {
	fd, err := unix.Open(cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open cgroup %s: %w", cgroup, err)
	}
	ns := []string{"--net=" + netns}
	if uid >= 0 {
		ns = append(ns, "--setuid="+strconv.Itoa(uid), "--setgid="+strconv.Itoa(uid))
	}
	cmd = exec.Command("nsenter", append(append(ns, "--", prog), args...)...)
	// Own process group: a Ctrl-C reaches only the benchmark, which then
	// stops its workers itself. No async preemption signals: fewer EINTRs.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd, Setpgid: true}
	cmd.Env = append(os.Environ(), "GODEBUG=asyncpreemptoff=1")
	return cmd, func() { unix.Close(fd) }, nil
}

func (e *env) track(cmd *exec.Cmd) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return errors.New("benchmark environment already closed")
	}
	e.procs[cmd] = true
	return nil
}

func (e *env) untrack(cmd *exec.Cmd) {
	e.mu.Lock()
	delete(e.procs, cmd)
	e.mu.Unlock()
}

// startServer starts a server worker (args: the worker's name and flags)
// and waits until it listens. It runs until the env is closed (its stdin is
// a pipe from this process, so it also ends if this process dies).
func (e *env) startServer(netns, cgroup string, args ...string) error {
	cmd, release, err := e.command(netns, cgroup, args...)
	if err != nil {
		return err
	}
	if _, err := cmd.StdinPipe(); err != nil {
		release()
		return err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		release()
		return err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := e.launch(cmd, release, "server"); err != nil {
		return err
	}
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(out).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = fmt.Errorf("unexpected %q", line)
		}
		ready <- err
		io.Copy(io.Discard, out)
	}()
	select {
	case err = <-ready:
	case <-time.After(10 * time.Second):
		err = errors.New("not ready after 10s")
	}
	if err != nil {
		e.stop(cmd)
		return fmt.Errorf("server in %s: %v: %s", netns, err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// clientProc is a worker in --control mode: it takes one request per line
// on standard input and answers each with one line on standard output.
type clientProc struct {
	e      *env
	desc   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *bufio.Reader
	stderr bytes.Buffer // read only after the process ended
}

// startClient starts a client worker that runs when told (clientProc.run).
func (e *env) startClient(desc, netns, cgroup string, args ...string) (*clientProc, error) {
	return e.startControlled(desc, netns, cgroup, -1, append([]string{"client", "--control"}, args...)...)
}

// startControlled starts the worker args (as uid if ≥ 0) in --control
// style; desc names it in errors.
func (e *env) startControlled(desc, netns, cgroup string, uid int, args ...string) (*clientProc, error) {
	cmd, release, err := e.commandAs(netns, cgroup, uid, e.exe, append([]string{"bench", "worker"}, args...)...)
	if err != nil {
		return nil, err
	}
	p := &clientProc{e: e, desc: desc, cmd: cmd}
	cmd.Stderr = &p.stderr
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		release()
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		release()
		return nil, err
	}
	p.out = bufio.NewReader(out)
	if err := e.launch(cmd, release, desc); err != nil {
		return nil, err
	}
	return p, nil
}

// launch starts a prepared command and tracks it (stopped by close);
// release (if not nil) is called once it started or failed.
func (e *env) launch(cmd *exec.Cmd, release func(), desc string) error {
	if release != nil {
		defer release()
	}
	if err := e.track(cmd); err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		e.untrack(cmd)
		return fmt.Errorf("start %s: %w", desc, err)
	}
	return nil
}

// request sends one line and returns the answer line; the worker is
// stopped when it does not answer within timeout or ctx ends.
func (p *clientProc) request(ctx context.Context, line string, timeout time.Duration) ([]byte, error) {
	type reply struct {
		line []byte
		err  error
	}
	ch := make(chan reply, 1)
	if _, err := fmt.Fprintln(p.stdin, line); err != nil {
		return nil, p.failed(err)
	}
	go func() {
		line, err := p.out.ReadBytes('\n')
		ch <- reply{line, err}
	}()
	var rp reply
	select {
	case rp = <-ch:
	case <-ctx.Done():
		p.e.stop(p.cmd)
		<-ch
		return nil, ctx.Err()
	case <-time.After(timeout):
		p.e.stop(p.cmd)
		<-ch
		return nil, fmt.Errorf("%s: no answer after %v", p.desc, timeout)
	}
	if rp.err != nil {
		return nil, p.failed(rp.err)
	}
	return rp.line, nil
}

// run makes the client run warm (unmeasured) then dur (measured).
func (p *clientProc) run(ctx context.Context, warm, dur time.Duration) (ClientResult, error) {
	var res ClientResult
	line, err := p.request(ctx, fmt.Sprintf("%s %s", warm, dur), warm+dur+30*time.Second)
	if err != nil {
		return res, err
	}
	if err := json.Unmarshal(line, &res); err != nil {
		return res, fmt.Errorf("%s output %q: %w", p.desc, line, err)
	}
	if res.Err != "" {
		return res, fmt.Errorf("%s: %s", p.desc, res.Err)
	}
	return res, nil
}

// failed stops the worker and describes how it ended.
func (p *clientProc) failed(err error) error {
	p.e.stop(p.cmd)
	return fmt.Errorf("%s: %v: %s", p.desc, err, strings.TrimSpace(p.stderr.String()))
}

// close ends the client: end of input, then a kill if it does not exit.
func (p *clientProc) close() {
	p.stdin.Close()
	done := make(chan struct{})
	go func() {
		p.cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
		p.e.untrack(p.cmd)
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-done
		p.e.untrack(p.cmd)
	}
}

// stop kills a worker by its PID and reaps it.
func (e *env) stop(cmd *exec.Cmd) {
	if cmd.Process != nil {
		cmd.Process.Kill()
		cmd.Wait()
	}
	e.untrack(cmd)
}

// close removes everything the run created, in reverse order, trying every
// step; it is safe to call more than once.
func (e *env) close() error {
	e.mu.Lock()
	e.closed = true
	procs := make([]*exec.Cmd, 0, len(e.procs))
	for c := range e.procs {
		procs = append(procs, c)
	}
	e.mu.Unlock()
	for _, c := range procs {
		e.stop(c)
	}
	var errs []error
	// Backstop: anything still in the run's cgroups (nothing else can be).
	if err := removeCgroupTree(e.cgroup); err != nil {
		errs = append(errs, err)
	}
	if err := datapath.Cleanup(e.bpffs); err != nil {
		errs = append(errs, fmt.Errorf("bpffs: %w", err))
	}
	e.mu.Lock()
	netns := slices.Clone(e.netns)
	e.netns = nil
	e.mu.Unlock()
	for i := len(netns) - 1; i >= 0; i-- {
		if err := deleteNetNS(netns[i]); err != nil {
			errs = append(errs, err)
		}
	}
	if e.tmp != "" {
		if err := os.RemoveAll(e.tmp); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func deleteNetNS(name string) error {
	if _, err := os.Lstat(filepath.Join(netnsDir, name)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return run(nil, "ip", "netns", "del", name)
}

// cgroupDirs lists path and every cgroup below it, deepest first.
func cgroupDirs(path string) []string {
	var dirs []string
	filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	slices.SortStableFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	return dirs
}

func cgroupPopulated(path string) bool {
	b, err := os.ReadFile(filepath.Join(path, "cgroup.events"))
	if err != nil {
		return false
	}
	return !strings.Contains(string(b), "populated 0")
}

// removeCgroupTree kills what is left in the subtree (cgroup.kill only
// reaches the subtree's own processes) and removes it, deepest first.
func removeCgroupTree(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if cgroupPopulated(path) {
		if err := os.WriteFile(filepath.Join(path, "cgroup.kill"), []byte("1"), 0); err != nil {
			return fmt.Errorf("kill cgroup %s: %w", path, err)
		}
		deadline := time.Now().Add(cleanupTimeout)
		for cgroupPopulated(path) {
			if time.Now().After(deadline) {
				return fmt.Errorf("cgroup %s still populated after cgroup.kill", path)
			}
			time.Sleep(10 * time.Millisecond)
		}
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
				time.Sleep(10 * time.Millisecond)
				continue
			}
			errs = append(errs, fmt.Errorf("rmdir %s: %w", dir, err))
			break
		}
	}
	return errors.Join(errs...)
}

// ownerAlive reports whether the run <id> (a pid) is still going: the
// process exists and is a benchmark (its command line has "bench").
func ownerAlive(id string) bool {
	pid, err := strconv.Atoi(id)
	if err != nil || pid <= 0 {
		return false
	}
	if pid == os.Getpid() {
		return true
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	return bytes.Contains(b, []byte("bench"))
}

// reapStale removes what runs that died (kill -9) left behind. Only names
// with the benchmark's prefixes whose owning pid is gone are touched.
func reapStale(cg2 string, log io.Writer) {
	if ents, err := os.ReadDir(netnsDir); err == nil {
		for _, d := range ents {
			rest, ok := strings.CutPrefix(d.Name(), netnsPrefix)
			id, _, _ := strings.Cut(rest, "-")
			if ok && !ownerAlive(id) {
				err := deleteNetNS(d.Name())
				logf(log, "removed leftover network namespace %s of a dead benchmark run (err=%v)", d.Name(), err)
			}
		}
	}
	m, _ := filepath.Glob(filepath.Join(cg2, cgroupPrefix+"*"))
	for _, p := range m {
		if !ownerAlive(strings.TrimPrefix(filepath.Base(p), cgroupPrefix)) {
			err := removeCgroupTree(p)
			logf(log, "removed leftover cgroup %s of a dead benchmark run (err=%v)", p, err)
		}
	}
	m, _ = filepath.Glob(filepath.Join(bpffsRoot, cgroupPrefix+"*"))
	for _, p := range m {
		if !ownerAlive(strings.TrimPrefix(filepath.Base(p), cgroupPrefix)) {
			err := datapath.Cleanup(p)
			logf(log, "removed leftover bpffs folder %s of a dead benchmark run (err=%v)", p, err)
		}
	}
	m, _ = filepath.Glob(filepath.Join(os.TempDir(), cgroupPrefix+"*"))
	for _, p := range m {
		id, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(p), cgroupPrefix), "-")
		if !ownerAlive(id) {
			os.RemoveAll(p)
		}
	}
}

func inode(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}
