//go:build linux

package compat_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/test/compat"
	"github.com/shuntmesh/shunt/test/harness"
)

// startShunt runs the agent in this process, attached to the environment's
// cgroup and pinning in its bpffs folder; everything is detached and
// unpinned at cleanup.
func startShunt(t *testing.T, env *harness.Env) *agent.Agent {
	t.Helper()
	cfg := agent.Config{
		Datapath:  datapath.Config{Root: env.BPFFSPath(), Cgroup: env.CgroupPath()},
		StateFile: filepath.Join(t.TempDir(), "state.json"),
	}
	a, err := agent.New(cfg, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Close(); err != nil {
			t.Errorf("agent close: %v", err)
		}
		if err := datapath.Cleanup(env.BPFFSPath()); err != nil {
			t.Errorf("datapath cleanup: %v", err)
		}
	})
	return a
}

// enroll (re)configures the topology's pods with a sidecar and a sockmap
// mode; the mode applies to connections established afterwards.
func enroll(t *testing.T, a *agent.Agent, topo *compat.Topology, mode mesh.SockmapMode) {
	t.Helper()
	for name, p := range map[string]*harness.Pod{"compat/client": topo.Client, "compat/server": topo.Server} {
		if err := a.UpdatePod(mesh.Pod{Name: name, NetNS: p.NetNSPath(), Sockmap: mode, Sidecar: &mesh.Sidecar{}}); err != nil {
			t.Fatal(err)
		}
	}
}

// runShunt runs the scenarios through sidecars in both pods steered by
// Shunt (no iptables) under sockmap off, auto and on, one column each.
// off and auto must pass everything; on is reported
// (its hazards are the documented ones).
func runShunt(t *testing.T, setup compat.Setup, scenarios []compat.Scenario, modes ...mesh.SockmapMode) {
	env := harness.New(t)
	a := startShunt(t, env)
	if st, err := a.Status(); err != nil || !st.SockmapSelfTest.Passed {
		t.Fatalf("sockmap self-test did not pass on this kernel: %+v %v", st.SockmapSelfTest, err)
	}
	topo := compat.NewTopology(t, env, setup)
	base := setup.Name
	var m compat.Matrix
	sum := func(event string) uint64 {
		st, err := a.Status()
		if err != nil {
			t.Fatal(err)
		}
		var n uint64
		for _, p := range st.Pods {
			n += p.Counters[event]
		}
		return n
	}
	for _, mode := range modes {
		redir0, bp0, resume0 := sum("msg_redirect"), sum("msg_backpressure"), sum("msg_resume")
		enroll(t, a, topo, mode)
		topo.Name = base + "/" + string(mode)
		res := compat.Run(t, env, topo, scenarios)
		m.Add(res)
		for _, r := range res.Failed() {
			if mode != mesh.SockmapOn {
				t.Errorf("%v", r)
			}
		}
		st, err := a.Status()
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range st.Pods {
			t.Logf("after %s: pod %s counters %v", topo.Name, p.Name, p.Counters)
		}
		// auto must really have accelerated, and the back-pressure cells
		// must have made sends switch to TCP and back (bytes verified).
		if mode == mesh.SockmapAuto {
			if sum("msg_redirect") == redir0 {
				t.Errorf("%s: nothing was accelerated", topo.Name)
			}
			if hasScenario(scenarios, "backpressure/client") && (sum("msg_backpressure") == bp0 || sum("msg_resume") == resume0) {
				t.Errorf("%s: the back-pressure cells never switched sends to TCP and back (msg_backpressure +%d, msg_resume +%d)",
					topo.Name, sum("msg_backpressure")-bp0, sum("msg_resume")-resume0)
			}
		}
	}
	t.Logf("compatibility matrix:\n%s%s", m.String(), m.Notes())
}

func hasScenario(sc []compat.Scenario, name string) bool {
	for _, s := range sc {
		if s.Name == name {
			return true
		}
	}
	return false
}

// EnvFull, set to anything, runs every Shunt configuration on the whole
// catalogue (about three times longer); by default IPv6 runs the light
// scenarios under off and auto only, and haproxy the light ones.
const EnvFull = "SHUNT_COMPAT_FULL"

var (
	allModes = []mesh.SockmapMode{mesh.SockmapOff, mesh.SockmapAuto, mesh.SockmapOn}
	full     = os.Getenv(EnvFull) != ""
)

// TestShuntGoSidecar: the Go sidecar in both pods, IPv4 (whole catalogue,
// off/auto/on) and IPv6.
func TestShuntGoSidecar(t *testing.T) {
	t.Parallel()
	v6, v6modes := compat.Light(), []mesh.SockmapMode{mesh.SockmapOff, mesh.SockmapAuto}
	if full {
		v6, v6modes = compat.All(), allModes
	}
	for _, c := range []struct {
		setup     compat.Setup
		scenarios []compat.Scenario
		modes     []mesh.SockmapMode
	}{
		{compat.Setup{Name: "shunt+go/v4", ClientProxy: compat.GoProxy, ServerProxy: compat.GoProxy}, compat.All(), allModes},
		{compat.Setup{Name: "shunt+go/v6", Family: 6, ClientProxy: compat.GoProxy, ServerProxy: compat.GoProxy}, v6, v6modes},
	} {
		t.Run(c.setup.Name, func(t *testing.T) {
			t.Parallel()
			runShunt(t, c.setup, c.scenarios, c.modes...)
		})
	}
}

// TestShuntHAProxySidecar: haproxy in both pods, IPv4, off/auto/on.
func TestShuntHAProxySidecar(t *testing.T) {
	t.Parallel()
	scenarios := compat.Light()
	if full {
		scenarios = compat.All()
	}
	runShunt(t, compat.Setup{Name: "shunt+haproxy/v4", ClientProxy: compat.HAProxy, ServerProxy: compat.HAProxy}, scenarios, allModes...)
}
