//go:build linux

package compat_test

import (
	"testing"

	"github.com/shuntmesh/shunt/test/compat"
	"github.com/shuntmesh/shunt/test/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

func runBaseline(t *testing.T, setups []compat.Setup, scenarios func(compat.Setup) []compat.Scenario) {
	env := harness.New(t)
	var m compat.Matrix
	var failed []compat.Result
	for _, s := range setups {
		topo := compat.NewTopology(t, env, s)
		res := compat.Run(t, env, topo, scenarios(s))
		m.Add(res)
		failed = append(failed, res.Failed()...)
	}
	t.Logf("compatibility matrix:\n%s%s", m.String(), m.Notes())
	for _, r := range failed {
		t.Errorf("baseline failed: %v", r)
	}
}

// TestDirect: plain TCP between two pods passes every scenario (IPv4 all,
// IPv6 the light ones).
func TestDirect(t *testing.T) {
	t.Parallel()
	runBaseline(t, []compat.Setup{{Name: "direct/v4"}, {Name: "direct/v6", Family: 6}}, func(s compat.Setup) []compat.Scenario {
		if s.Family == 6 {
			return compat.Light()
		}
		return compat.All()
	})
}

// TestGoSidecar: the harness's Go sidecar, steered by Istio's iptables
// REDIRECT rules, changes nothing applications see: in the client pod only,
// and in both pods (client sidecar → server sidecar's inbound 15006), both
// relay modes, IPv4 and IPv6.
func TestGoSidecar(t *testing.T) {
	t.Parallel()
	runBaseline(t, []compat.Setup{
		{Name: "go-client/v4", ClientProxy: compat.GoProxy, IPTables: true},
		{Name: "go-both/v4", ClientProxy: compat.GoProxy, ServerProxy: compat.GoProxy, IPTables: true},
		{Name: "go-both/v6", Family: 6, ClientProxy: compat.GoProxy, ServerProxy: compat.GoProxy, IPTables: true},
		{Name: "goblocking-both/v4", ClientProxy: compat.GoBlockingProxy, ServerProxy: compat.GoBlockingProxy, IPTables: true},
	}, func(s compat.Setup) []compat.Scenario {
		switch s.Name {
		case "go-both/v4":
			return compat.All()
		case "goblocking-both/v4":
			// The relay style matters for closes, resets and flow control.
			return compat.Select(compat.Light(), "epoll", "blocking/client", "blocking/server", "halfclose",
				"rst-blocking/client", "rst-epoll/client", "rst-blocking/server", "rst-epoll/server",
				"backpressure/client", "backpressure/server")
		}
		return compat.Light()
	})
}

// TestHAProxySidecar: Debian's haproxy as the sidecar of both pods, steered
// by iptables (IPv4: haproxy reads SO_ORIGINAL_DST for IPv4 only).
func TestHAProxySidecar(t *testing.T) {
	t.Parallel()
	runBaseline(t, []compat.Setup{
		{Name: "haproxy-both/v4", ClientProxy: compat.HAProxy, ServerProxy: compat.HAProxy, IPTables: true},
	}, func(compat.Setup) []compat.Scenario { return compat.All() })
}
