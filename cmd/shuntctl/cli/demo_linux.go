package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
)

// demo runs the standalone demo: a node network namespace with three backend
// pods and one client pod (each a netns + a cgroup laid out like kubelet's),
// shuntd attached to the demo's own cgroup, connections to a VIP, the
// counters, and a cleanup that removes everything it made.
func demo(args []string, w io.Writer) (err error) {
	fs := newFlags("demo")
	n := fs.Int("connections", 300, "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if os.Geteuid() != 0 {
		return errors.New("demo: needs root (network namespaces, cgroups, eBPF)")
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	shuntd := filepath.Join(filepath.Dir(self), "shuntd")
	if _, err := os.Stat(shuntd); err != nil {
		if shuntd, err = exec.LookPath("shuntd"); err != nil {
			return errors.New("demo: shuntd not found next to shuntctl or in PATH (make build)")
		}
	}
	cgRoot, err := agent.CgroupV2Root()
	if err != nil {
		return err
	}
	if err := ensureBPFFS(); err != nil {
		return err
	}
	d := &demoEnv{w: w, cg: filepath.Join(cgRoot, "shunt-demo"), bpffs: "/sys/fs/bpf/shunt-demo", tmp: "/run/shunt-demo"}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	defer d.cleanup()
	d.cleanup() // leftovers of an interrupted earlier run
	if err := d.setup(); err != nil {
		return err
	}

	step(w, "starting shuntd (attached to %s, pins under %s)", d.cg, d.bpffs)
	cfg := fmt.Sprintf("datapath:\n  bpffsRoot: %s\n  cgroup: %s\nservices:\n  - name: demo/web\n    frontend: 10.96.0.10:80\n    backends:\n", d.bpffs, d.cg)
	for i := 1; i <= 3; i++ {
		cfg += fmt.Sprintf("      - addr: 10.244.1.%d:8080\n", i)
	}
	cfgPath := filepath.Join(d.tmp, "shunt.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	sock := filepath.Join(d.tmp, "shuntd.sock")
	if _, err := d.start("node", io.Discard, shuntd, "-config", cfgPath, "-api-socket", sock, "-metrics-addr", "",
		"-state-file", filepath.Join(d.tmp, "state.json")); err != nil {
		return err
	}
	c := agent.NewClient(sock)
	if err := waitAPI(ctx, c); err != nil {
		return err
	}
	fmt.Fprintf(w, "\n%s\n", cfg)

	for i := 1; i <= 3; i++ {
		var ready readyWriter
		ready.ch = make(chan struct{})
		if _, err := d.start(fmt.Sprintf("be%d", i), &ready, self, "demo-app", "serve", fmt.Sprintf("be%d", i), fmt.Sprintf("10.244.1.%d:8080", i)); err != nil {
			return err
		}
		select {
		case <-ready.ch:
		case <-time.After(10 * time.Second):
			return errors.New("demo: backend did not start")
		}
	}

	step(w, "client pod: %d connections to the VIP 10.96.0.10:80", *n)
	if err := d.run("client", w, self, "demo-app", "connect", "10.96.0.10:80", fmt.Sprint(*n)); err != nil {
		return err
	}
	step(w, "shuntctl service update: weights 1:1:4, no restart")
	if err := c.UpdateService(agent.ServiceConfig{Name: "demo/web", Frontend: "10.96.0.10:80", Backends: []agent.BackendConfig{
		{Addr: "10.244.1.1:8080", Weight: u32(1)}, {Addr: "10.244.1.2:8080", Weight: u32(1)}, {Addr: "10.244.1.3:8080", Weight: u32(4)}}}); err != nil {
		return err
	}
	if err := d.run("client", w, self, "demo-app", "connect", "10.96.0.10:80", fmt.Sprint(*n)); err != nil {
		return err
	}
	step(w, "shuntctl service list")
	if err := Run([]string{"--socket", sock, "service", "list"}, w, w); err != nil {
		return err
	}
	step(w, "shuntctl status")
	if err := Run([]string{"--socket", sock, "status"}, w, w); err != nil {
		return err
	}
	step(w, "cleaning up: stopping shuntd, removing links, pins, pods, cgroups")
	return nil
}

func u32(v uint32) *uint32 { return &v }

func step(w io.Writer, f string, a ...any) { fmt.Fprintf(w, "\n==> "+f+"\n", a...) }

type readyWriter struct {
	ch   chan struct{}
	done bool
}

func (r *readyWriter) Write(b []byte) (int, error) {
	if !r.done && strings.Contains(string(b), "READY") {
		r.done = true
		close(r.ch)
	}
	return len(b), nil
}

func waitAPI(ctx context.Context, c *agent.Client) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		var st agent.Status
		err := c.Status(&st)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("demo: shuntd did not come up: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type demoEnv struct {
	w                 io.Writer
	cg, bpffs, tmp    string
	procs             []*exec.Cmd
	createdNS, vethes []string
}

var demoPods = []string{"node", "be1", "be2", "be3", "client"}

func (d *demoEnv) ns(p string) string { return "shunt-demo-" + p }

func (d *demoEnv) cgroupOf(p string) string {
	if p == "node" {
		return filepath.Join(d.cg, "node")
	}
	return filepath.Join(d.cg, "kubepods.slice", "kubepods-besteffort.slice", "kubepods-besteffort-pod"+p+".slice", "cri-containerd-"+p+".scope")
}

func sh(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (d *demoEnv) setup() error {
	step(d.w, "creating a node and 4 pods (network namespace + veth + cgroup each)")
	if err := os.MkdirAll(d.tmp, 0o700); err != nil {
		return err
	}
	for _, p := range demoPods {
		if err := sh("ip", "netns", "add", d.ns(p)); err != nil {
			return err
		}
		if err := os.MkdirAll(d.cgroupOf(p), 0o755); err != nil {
			return err
		}
		if err := sh("ip", "-n", d.ns(p), "link", "set", "lo", "up"); err != nil {
			return err
		}
	}
	node := d.ns("node")
	if err := sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
		return err
	}
	if err := sh("ip", "-n", node, "addr", "add", "169.254.1.1/32", "dev", "lo"); err != nil {
		return err
	}
	for i, p := range demoPods[1:] {
		ip := fmt.Sprintf("10.244.1.%d", i+1)
		veth := "sd-" + p
		cmds := [][]string{
			{"ip", "-n", node, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", d.ns(p)},
			{"ip", "-n", node, "link", "set", veth, "up"},
			{"ip", "-n", node, "route", "add", ip + "/32", "dev", veth},
			{"ip", "-n", d.ns(p), "addr", "add", ip + "/32", "dev", "eth0"},
			{"ip", "-n", d.ns(p), "link", "set", "eth0", "up"},
			{"ip", "-n", d.ns(p), "route", "add", "169.254.1.1", "dev", "eth0"},
			{"ip", "-n", d.ns(p), "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"},
		}
		for _, c := range cmds {
			if err := sh(c...); err != nil {
				return err
			}
		}
		fmt.Fprintf(d.w, "    pod %-6s %s  netns /run/netns/%s  cgroup %s\n", p, ip, d.ns(p), d.cgroupOf(p))
	}
	return nil
}

// start runs a process in pod p's netns and cgroup from its first
// instruction (clone3 CLONE_INTO_CGROUP).
func (d *demoEnv) start(p string, out io.Writer, name string, args ...string) (*exec.Cmd, error) {
	cg, err := os.Open(d.cgroupOf(p))
	if err != nil {
		return nil, err
	}
	defer cg.Close()
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + d.ns(p), "--", name}, args...)...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd()), Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", name, p, err)
	}
	d.procs = append(d.procs, cmd)
	return cmd, nil
}

func (d *demoEnv) run(p string, out io.Writer, name string, args ...string) error {
	cmd, err := d.start(p, out, name, args...)
	if err != nil {
		return err
	}
	return cmd.Wait()
}

func (d *demoEnv) cleanup() {
	for i := len(d.procs) - 1; i >= 0; i-- {
		c := d.procs[i]
		if c.ProcessState == nil {
			c.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { c.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(3 * time.Second):
				c.Process.Kill()
				<-done
			}
		}
	}
	d.procs = nil
	if err := datapath.Cleanup(d.bpffs); err != nil {
		fmt.Fprintln(d.w, "cleanup:", err)
	}
	for _, p := range demoPods {
		exec.Command("ip", "netns", "del", d.ns(p)).Run()
	}
	// Depth-first rmdir of the demo's cgroups (empty once its processes ended).
	var dirs []string
	filepath.WalkDir(d.cg, func(path string, e os.DirEntry, err error) error {
		if err == nil && e.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	sort.Sort(sort.Reverse(sort.StringSlice(dirs)))
	for _, dir := range dirs {
		os.Remove(dir)
	}
	os.RemoveAll(d.tmp)
}

func ensureBPFFS() error {
	var st syscall.Statfs_t
	if err := syscall.Statfs("/sys/fs/bpf", &st); err == nil && st.Type == 0xcafe4a11 {
		return nil
	}
	return sh("mount", "-t", "bpf", "bpf", "/sys/fs/bpf")
}

// demoApp is the demo's tiny backend and client, run inside the pods.
func demoApp(args []string, w io.Writer) error {
	if len(args) < 3 {
		return errors.New("demo-app serve ID ADDR | connect VIP COUNT")
	}
	switch args[0] {
	case "serve":
		l, err := net.Listen("tcp", args[2])
		if err != nil {
			return err
		}
		fmt.Fprintln(w, "READY")
		for {
			c, err := l.Accept()
			if err != nil {
				return err
			}
			fmt.Fprintf(c, "%s\n", args[1])
			c.Close()
		}
	case "connect":
		var count int
		fmt.Sscan(args[2], &count)
		seen := map[string]int{}
		peers := map[string]int{}
		fails := 0
		for i := 0; i < count; i++ {
			c, err := net.DialTimeout("tcp", args[1], 2*time.Second)
			if err != nil {
				fails++
				continue
			}
			line, _ := bufio.NewReader(c).ReadString('\n')
			seen[strings.TrimSpace(line)]++
			peers[c.RemoteAddr().String()]++ // getpeername(): the VIP, not the backend
			c.Close()
		}
		var ids []string
		for id := range seen {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		for _, id := range ids {
			fmt.Fprintf(w, "    %-4s %4d  %s\n", id, seen[id], strings.Repeat("#", seen[id]*60/max(count, 1)))
		}
		for p, k := range peers {
			fmt.Fprintf(w, "    getpeername() seen by the app: %s (%d connections)\n", p, k)
		}
		if fails > 0 {
			return fmt.Errorf("%d of %d connections failed", fails, count)
		}
		return nil
	}
	return fmt.Errorf("demo-app: unknown mode %q", args[0])
}
