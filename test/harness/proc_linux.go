package harness

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ProcOpts configures a process started in a pod.
type ProcOpts struct {
	// UID and GID are applied when SetUser is true (sidecars: 1337/1337).
	// Supplementary groups are dropped.
	UID, GID uint32
	SetUser  bool
	// Timeout: for Run/Exec/Connect/Stream the limit for the whole run
	// (default 60s); for Start/StartCmd the process is killed after it (0: never).
	Timeout time.Duration
	// Env is appended to the test binary's environment.
	Env []string
	// Stdin, if set, is the process's standard input.
	Stdin io.Reader
}

const (
	defaultRunTimeout   = 60 * time.Second
	defaultReadyTimeout = 10 * time.Second
	stopGrace           = 10 * time.Second
)

// Proc is a process running in a pod's netns and cgroup.
type Proc struct {
	pod    *Pod
	desc   string
	cmd    *exec.Cmd
	stdout *outBuf
	stderr *outBuf

	done     chan struct{}
	waitErr  error
	termSent atomic.Bool
	killSent atomic.Bool
	timedOut atomic.Bool // killed by the ProcOpts.Timeout watchdog
}

// Start runs helper app (serve, connect, stream, info, pause, or one added
// with RegisterApp) inside the pod: network namespace via
// `nsenter --net=<path>`, cgroup via clone3(CLONE_INTO_CGROUP) so the process
// is in the pod's cgroup from its first instruction. It is killed (SIGKILL by
// PID, then waited) at cleanup. Failures to start are fatal to the test, so
// call Start from the test's goroutine.
func (p *Pod) Start(opts ProcOpts, app string, args ...string) *Proc {
	p.env.t.Helper()
	pr, err := p.start(opts, app, false, args)
	if err != nil {
		p.env.t.Fatalf("harness: %v", err)
	}
	p.env.t.Cleanup(pr.killAndWait)
	pr.watchdog(opts.Timeout)
	return pr
}

// StartCmd is Start for an arbitrary command (e.g. "haproxy", "iperf3").
func (p *Pod) StartCmd(opts ProcOpts, name string, args ...string) *Proc {
	p.env.t.Helper()
	pr, err := p.start(opts, "", false, append([]string{name}, args...))
	if err != nil {
		p.env.t.Fatalf("harness: %v", err)
	}
	p.env.t.Cleanup(pr.killAndWait)
	pr.watchdog(opts.Timeout)
	return pr
}

// Run runs helper app to completion (limit opts.Timeout, default 60s) and
// returns its stdout. A non-zero exit or timeout is an error that includes
// stderr.
func (p *Pod) Run(opts ProcOpts, app string, args ...string) ([]byte, error) {
	pr, err := p.start(opts, app, false, args)
	if err != nil {
		return nil, err
	}
	return pr.complete(opts.Timeout)
}

// Exec runs an arbitrary command in the pod's netns and cgroup (as root, 60s
// limit) and returns its combined stdout and stderr.
func (p *Pod) Exec(name string, args ...string) ([]byte, error) {
	return p.ExecOpts(ProcOpts{}, name, args...)
}

// ExecOpts is Exec with options.
func (p *Pod) ExecOpts(opts ProcOpts, name string, args ...string) ([]byte, error) {
	pr, err := p.start(opts, "", true, append([]string{name}, args...))
	if err != nil {
		return nil, err
	}
	return pr.complete(opts.Timeout)
}

// Connect runs the connect app with args and parses its JSON result.
func (p *Pod) Connect(opts ProcOpts, args ...string) (ConnectResult, error) {
	out, err := p.Run(opts, "connect", args...)
	if err != nil {
		return ConnectResult{}, err
	}
	return ParseConnectResult(out)
}

// Stream runs the stream app with args and parses its JSON result.
func (p *Pod) Stream(opts ProcOpts, args ...string) (StreamResult, error) {
	out, err := p.Run(opts, "stream", args...)
	if err != nil {
		return StreamResult{}, err
	}
	var r StreamResult
	return r, decodeLastJSON(out, &r)
}

// Info runs the info app and returns what the process saw of itself.
func (p *Pod) Info(opts ProcOpts) (ProcInfo, error) {
	out, err := p.Run(opts, "info")
	if err != nil {
		return ProcInfo{}, err
	}
	var r ProcInfo
	return r, decodeLastJSON(out, &r)
}

// ParseConnectResult decodes the connect app's output (its last JSON line).
func ParseConnectResult(out []byte) (ConnectResult, error) {
	var r ConnectResult
	err := decodeLastJSON(out, &r)
	return r, err
}

func decodeLastJSON(out []byte, v any) error {
	lines := bytes.Split(bytes.TrimSpace(out), []byte("\n"))
	for i := len(lines) - 1; i >= 0; i-- {
		if l := bytes.TrimSpace(lines[i]); len(l) > 0 && l[0] == '{' {
			if err := json.Unmarshal(l, v); err != nil {
				return fmt.Errorf("decode %q: %w", l, err)
			}
			return nil
		}
	}
	return fmt.Errorf("no JSON object in output %q", out)
}

func (p *Pod) start(opts ProcOpts, app string, combined bool, argv []string) (*Proc, error) {
	if len(argv) == 0 && app == "" {
		return nil, errors.New("no command")
	}
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		return nil, err
	}
	var prog []string
	desc := ""
	if app != "" {
		if _, ok := lookupApp(app); !ok {
			return nil, fmt.Errorf("unknown helper app %q", app)
		}
		bin, err := appBinary()
		if err != nil {
			return nil, err
		}
		prog = append([]string{bin}, argv...)
		desc = app
	} else {
		prog = argv
		desc = argv[0]
	}
	desc = fmt.Sprintf("%s in %s", desc, p.netns)
	if p.env.cgroupGone() {
		return nil, fmt.Errorf("start %s: environment already cleaned up", desc)
	}

	args := []string{"--net=" + p.nsPath}
	if opts.SetUser {
		args = append(args, "--setgid="+strconv.FormatUint(uint64(opts.GID), 10),
			"--setuid="+strconv.FormatUint(uint64(opts.UID), 10))
	}
	args = append(args, "--")
	args = append(args, prog...)

	cmd := exec.Command(nsenter, args...)
	env := make([]string, 0, len(os.Environ())+len(opts.Env)+1)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, EnvApp+"=") {
			env = append(env, kv)
		}
	}
	if app != "" {
		env = append(env, EnvApp+"="+app)
	}
	cmd.Env = append(env, opts.Env...)
	cmd.Stdin = opts.Stdin

	cg, err := unix.Open(p.cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", p.cgroup, err)
	}
	defer unix.Close(cg)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		UseCgroupFD: true,
		CgroupFD:    cg,
		// Dies with the test binary if that is killed before cleanup (not
		// kept across nsenter's setuid).
		Pdeathsig: syscall.SIGKILL,
	}
	pr := &Proc{pod: p, desc: desc, cmd: cmd, stdout: newOutBuf(), done: make(chan struct{})}
	pr.stderr = pr.stdout
	if !combined {
		pr.stderr = newOutBuf()
	}
	cmd.Stdout, cmd.Stderr = pr.stdout, pr.stderr
	cmd.WaitDelay = 2 * time.Second

	p.env.trackProc(pr)
	if err := cmd.Start(); err != nil {
		p.env.untrackProc(pr)
		return nil, fmt.Errorf("start %s: %w", desc, err)
	}
	go func() {
		pr.waitErr = cmd.Wait()
		close(pr.done)
	}()
	return pr, nil
}

// watchdog kills a Start/StartCmd process after d (Run/Exec enforce their own limit).
func (pr *Proc) watchdog(d time.Duration) {
	if d > 0 {
		t := time.AfterFunc(d, func() {
			pr.timedOut.Store(true)
			pr.signal(syscall.SIGKILL)
		})
		go func() { <-pr.done; t.Stop() }()
	}
}

func (e *Env) cgroupGone() bool {
	_, err := os.Stat(e.cgroup)
	return err != nil
}

// complete waits for a Run/Exec process, killing it after timeout.
func (pr *Proc) complete(timeout time.Duration) ([]byte, error) {
	defer pr.pod.env.untrackProc(pr)
	if timeout <= 0 {
		timeout = defaultRunTimeout
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-pr.done:
	case <-timer.C:
		pr.killAndWait()
		return pr.stdout.Bytes(), fmt.Errorf("%s: timed out after %v; stderr: %s", pr.desc, timeout, tail(pr.stderr.Bytes()))
	}
	return pr.stdout.Bytes(), pr.exitError()
}

// Pid is the process id (of the app itself: nsenter execs it in place).
func (pr *Proc) Pid() int { return pr.cmd.Process.Pid }

// Done is closed when the process has exited and been reaped.
func (pr *Proc) Done() <-chan struct{} { return pr.done }

// Stdout returns what the process wrote to stdout so far.
func (pr *Proc) Stdout() []byte { return pr.stdout.Bytes() }

// Stderr returns what the process wrote to stderr so far.
func (pr *Proc) Stderr() []byte { return pr.stderr.Bytes() }

// Signal sends sig to the process (by pidfd, so never to a reused PID).
func (pr *Proc) Signal(sig os.Signal) error {
	if sig == syscall.SIGTERM {
		pr.termSent.Store(true)
	}
	if sig == syscall.SIGKILL {
		pr.killSent.Store(true)
	}
	err := pr.cmd.Process.Signal(sig)
	if errors.Is(err, os.ErrProcessDone) {
		return nil
	}
	return err
}

func (pr *Proc) signal(sig syscall.Signal) { _ = pr.Signal(sig) }

// Wait waits for the process to exit. Exits caused by our own Stop/Kill are
// not errors; other failures include stderr.
func (pr *Proc) Wait() error {
	<-pr.done
	return pr.exitError()
}

// Stop sends SIGTERM, waits (SIGKILL after 10s) and returns stdout.
func (pr *Proc) Stop() ([]byte, error) {
	pr.signal(syscall.SIGTERM)
	select {
	case <-pr.done:
	case <-time.After(stopGrace):
		pr.signal(syscall.SIGKILL)
		<-pr.done
		return pr.stdout.Bytes(), fmt.Errorf("%s: did not exit within %v of SIGTERM", pr.desc, stopGrace)
	}
	pr.pod.env.untrackProc(pr)
	return pr.stdout.Bytes(), pr.exitError()
}

// Kill sends SIGKILL and waits.
func (pr *Proc) Kill() error {
	err := pr.Signal(syscall.SIGKILL)
	<-pr.done
	pr.pod.env.untrackProc(pr)
	return err
}

func (pr *Proc) killAndWait() {
	select {
	case <-pr.done:
		return
	default:
	}
	pr.signal(syscall.SIGKILL)
	select {
	case <-pr.done:
	case <-time.After(cleanupTimeout):
		pr.pod.env.t.Errorf("harness cleanup: %s (pid %d) not reaped after SIGKILL", pr.desc, pr.Pid())
	}
}

// WaitReady waits (10s) until the app printed a line "READY".
func (pr *Proc) WaitReady() error { return pr.WaitReadyTimeout(defaultReadyTimeout) }

// WaitReadyTimeout is WaitReady with an explicit limit.
func (pr *Proc) WaitReadyTimeout(d time.Duration) error {
	return pr.waitOut(d, "READY line", func(b []byte) bool {
		return bytes.HasPrefix(b, []byte("READY\n")) || bytes.Contains(b, []byte("\nREADY\n"))
	})
}

// WaitFor waits until stdout contains s.
func (pr *Proc) WaitFor(s string, d time.Duration) error {
	return pr.waitOut(d, strconv.Quote(s), func(b []byte) bool { return bytes.Contains(b, []byte(s)) })
}

func (pr *Proc) waitOut(d time.Duration, what string, match func([]byte) bool) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		b, changed := pr.stdout.snapshot()
		if match(b) {
			return nil
		}
		select {
		case <-changed:
		case <-pr.done:
			if b, _ := pr.stdout.snapshot(); match(b) {
				return nil
			}
			return fmt.Errorf("%s exited before %s: %v; stdout: %s; stderr: %s", pr.desc, what, pr.exitError(), tail(pr.stdout.Bytes()), tail(pr.stderr.Bytes()))
		case <-timer.C:
			return fmt.Errorf("%s: no %s within %v; stdout: %s; stderr: %s", pr.desc, what, d, tail(pr.stdout.Bytes()), tail(pr.stderr.Bytes()))
		}
	}
}

func (pr *Proc) exitError() error {
	err := pr.waitErr
	if err == nil {
		return nil
	}
	if pr.timedOut.Load() {
		return fmt.Errorf("%s: killed after its timeout: %w; stderr: %s", pr.desc, err, tail(pr.stderr.Bytes()))
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			if ws.Signal() == syscall.SIGTERM && pr.termSent.Load() || ws.Signal() == syscall.SIGKILL && pr.killSent.Load() {
				return nil
			}
		}
	}
	return fmt.Errorf("%s: %w; stderr: %s", pr.desc, err, tail(pr.stderr.Bytes()))
}

func tail(b []byte) string {
	const max = 2000
	s := strings.TrimSpace(string(b))
	if len(s) > max {
		s = "..." + s[len(s)-max:]
	}
	return s
}

// outBuf collects output and wakes waiters on every write.
type outBuf struct {
	mu      sync.Mutex
	b       []byte
	changed chan struct{}
}

func newOutBuf() *outBuf { return &outBuf{changed: make(chan struct{})} }

func (o *outBuf) Write(p []byte) (int, error) {
	o.mu.Lock()
	o.b = append(o.b, p...)
	close(o.changed)
	o.changed = make(chan struct{})
	o.mu.Unlock()
	return len(p), nil
}

func (o *outBuf) Bytes() []byte {
	o.mu.Lock()
	defer o.mu.Unlock()
	return bytes.Clone(o.b)
}

func (o *outBuf) snapshot() ([]byte, <-chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return bytes.Clone(o.b), o.changed
}

// ---- the re-executable binary ----

var (
	appBinMu  sync.Mutex
	appBinDir string
	appBinary = func() (string, error) {
		appBinMu.Lock()
		defer appBinMu.Unlock()
		if appBinDir != "" {
			return filepath.Join(appBinDir, "app"), nil
		}
		exe, err := os.Executable()
		if err != nil {
			return "", err
		}
		// go test builds into a 0700 directory, which uid 1337 cannot
		// traverse: expose the binary from a 0755 directory named after this
		// process, so Main can sweep copies of crashed runs.
		me := selfOwner()
		dir := filepath.Join(os.TempDir(), fmt.Sprintf("%s%d-%d", appBinPrefix, me.pid, me.start))
		if err := os.RemoveAll(dir); err != nil {
			return "", err
		}
		if err := os.Mkdir(dir, 0o755); err != nil {
			return "", err
		}
		if err := os.Chmod(dir, 0o755); err != nil { // umask
			return "", err
		}
		dst := filepath.Join(dir, "app")
		if err := copyFile(exe, dst); err != nil {
			os.RemoveAll(dir)
			return "", err
		}
		appBinDir = dir
		return dst, nil
	}
)

func copyFile(src, dst string) error {
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

const appBinPrefix = "shunt-harness-bin-"

// sweepAppBinaries removes copies left by test binaries that died.
func sweepAppBinaries() {
	m, _ := filepath.Glob(filepath.Join(os.TempDir(), appBinPrefix+"*"))
	for _, dir := range m {
		var o owner
		if _, err := fmt.Sscanf(filepath.Base(dir), appBinPrefix+"%d-%d", &o.pid, &o.start); err != nil {
			continue
		}
		if !o.alive() {
			os.RemoveAll(dir)
		}
	}
}

func removeAppBinary() {
	appBinMu.Lock()
	defer appBinMu.Unlock()
	if appBinDir != "" {
		os.RemoveAll(appBinDir)
		appBinDir = ""
	}
}
