package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/test/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

// agentProc is a shuntd started in the test's node network namespace, attached
// to the test's cgroup, pinning under the test's bpffs folder.
type agentProc struct {
	t        testing.TB
	env      *harness.Env
	dir      string
	cfgPath  string
	socket   string
	proc     *harness.Proc
	shuntd   string
	shuntctl string
	metrics  string
}

var metricsPort = struct {
	sync.Mutex
	next int
}{next: 29900}

func newAgent(t testing.TB, env *harness.Env, config string) *agentProc {
	t.Helper()
	shuntd, shuntctl := harness.AgentBinaries(t)
	dir := t.TempDir()
	metricsPort.Lock()
	port := metricsPort.next
	metricsPort.next++
	metricsPort.Unlock()
	a := &agentProc{t: t, env: env, dir: dir, cfgPath: filepath.Join(dir, "shunt.yaml"), socket: filepath.Join(dir, "shuntd.sock"),
		shuntd: shuntd, shuntctl: shuntctl, metrics: fmt.Sprintf("127.0.0.1:%d", port)}
	// The test's own bpffs folder and cgroup go into the datapath section,
	// merged with whatever datapath settings the test gives.
	dp := fmt.Sprintf("datapath:\n  bpffsRoot: %s\n  cgroup: %s\n", env.BPFFSPath(), env.CgroupPath())
	full := dp + config
	if strings.Contains(config, "datapath:\n") {
		full = strings.Replace(config, "datapath:\n", dp, 1)
	}
	if err := os.WriteFile(a.cfgPath, []byte(full), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if a.proc != nil {
			a.proc.Kill()
		}
		// Remove links and pins even when the test failed half-way.
		exec.Command(shuntctl, "cleanup", "--bpffs-root", env.BPFFSPath()).Run()
	})
	a.start()
	return a
}

// start runs shuntd and waits until its API answers.
func (a *agentProc) start() {
	a.t.Helper()
	a.proc = a.env.Node().StartCmd(harness.ProcOpts{}, a.shuntd,
		"-config", a.cfgPath, "-api-socket", a.socket, "-state-file", filepath.Join(a.dir, "state.json"),
		"-metrics-addr", a.metrics, "-log-level", "debug")
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := a.ctlErr("status"); err == nil {
			return
		}
		select {
		case <-a.proc.Done():
			a.t.Fatalf("shuntd exited: %s", a.proc.Stderr())
		default:
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("shuntd API did not come up: %s", a.proc.Stderr())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (a *agentProc) kill9() {
	a.t.Helper()
	if err := a.proc.Kill(); err != nil {
		a.t.Fatal(err)
	}
	<-a.proc.Done()
}

func (a *agentProc) ctlErr(args ...string) (string, error) {
	var out bytes.Buffer
	cmd := exec.Command(a.shuntctl, append([]string{"--socket", a.socket}, args...)...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func (a *agentProc) ctl(args ...string) string {
	a.t.Helper()
	out, err := a.ctlErr(args...)
	if err != nil {
		a.t.Fatalf("shuntctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// metric returns the value of one sample line of /metrics (prefix match on
// the full name with labels), or "" when absent.
func (a *agentProc) metric(series string) string {
	a.t.Helper()
	out, err := a.env.Node().Exec("curl", "-sf", "http://"+a.metrics+"/metrics")
	if err != nil {
		a.t.Fatalf("scrape: %v %s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, series+" ") {
			return strings.TrimPrefix(line, series+" ")
		}
	}
	return ""
}

// status returns shuntctl status --json.
func (a *agentProc) status() agent.Status {
	a.t.Helper()
	var st agent.Status
	if err := json.Unmarshal([]byte(a.ctl("status", "--json")), &st); err != nil {
		a.t.Fatal(err)
	}
	return st
}
