package bench

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shuntmesh/shunt/agent"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func TestAddressPlan(t *testing.T) {
	if got := VIP(0); got != netip.MustParseAddrPort("127.96.0.1:80") {
		t.Errorf("VIP(0) = %v", got)
	}
	if got := VIP(300); got != netip.MustParseAddrPort("127.96.1.45:80") {
		t.Errorf("VIP(300) = %v", got)
	}
	if got := Backend(89999); got != netip.MustParseAddrPort("127.101.95.144:8080") {
		t.Errorf("Backend(89999) = %v", got)
	}
	last := VIP(maxServices - 1).Addr()
	if !last.Less(backendBase) || !netip.MustParsePrefix("127.0.0.0/8").Contains(last) {
		t.Errorf("VIPs run into the backends or out of loopback: %v", last)
	}
	svcs := MakeServices(4, 3)
	seen := map[netip.AddrPort]bool{}
	for _, s := range svcs {
		for _, a := range append([]netip.AddrPort{s.VIP}, s.Backends...) {
			if seen[a] {
				t.Errorf("address %v used twice", a)
			}
			seen[a] = true
		}
	}
	if svcs[3].Backends[2] != Backend(11) {
		t.Errorf("last backend = %v, want Backend(11)", svcs[3].Backends[2])
	}
}

// The services are valid agent configuration (the agent validates the
// same way when the benchmark loads them).
func TestServicesAreValidConfig(t *testing.T) {
	cfg := agent.Config{}
	for _, s := range MakeServices(50, 30) {
		cfg.Services = append(cfg.Services, s.Config())
	}
	st, err := cfg.State()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Services) != 50 || len(st.Services[49].Backends) != 30 {
		t.Errorf("got %d services", len(st.Services))
	}
}

func TestKubeProxyRulesGolden(t *testing.T) {
	got := KubeProxyRules(MakeServices(2, 3))
	path := filepath.Join("testdata", "kubeproxy_n2.golden")
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("KubeProxyRules(2 services) differs from %s:\n%s", path, got)
	}
}

func TestKubeProxyRulesShape(t *testing.T) {
	const n, per = 100, 4
	rules := KubeProxyRules(MakeServices(n, per))
	lines := strings.Split(strings.TrimSuffix(rules, "\n"), "\n")
	if lines[0] != "*nat" || lines[len(lines)-1] != "COMMIT" {
		t.Fatalf("not one nat table: %q ... %q", lines[0], lines[len(lines)-1])
	}
	var svcRules []string
	chains := map[string]bool{}
	probs := 0
	for _, l := range lines {
		switch {
		case strings.HasPrefix(l, ":"):
			name := strings.Fields(l)[0][1:]
			if chains[name] {
				t.Errorf("chain %s declared twice", name)
			}
			if len(name) > 28 {
				t.Errorf("chain name %s longer than iptables allows", name)
			}
			chains[name] = true
		case strings.HasPrefix(l, "-A KUBE-SERVICES "):
			svcRules = append(svcRules, l)
		case strings.Contains(l, "--probability"):
			probs++
		}
	}
	if len(svcRules) != n {
		t.Fatalf("%d KUBE-SERVICES rules, want %d", len(svcRules), n)
	}
	// The measured service (the last one) is matched last.
	if !strings.Contains(svcRules[n-1], "-d "+VIP(n-1).Addr().String()+"/32 ") {
		t.Errorf("last KUBE-SERVICES rule is %q, want the VIP of service %d", svcRules[n-1], n-1)
	}
	if probs != n*(per-1) {
		t.Errorf("%d statistic rules, want %d", probs, n*(per-1))
	}
	if want := 4 + 2 + n + n*per; len(chains) != want {
		t.Errorf("%d chains, want %d", len(chains), want)
	}
	if got := strings.Count(rules, "-j DNAT --to-destination "); got != n*per {
		t.Errorf("%d DNAT rules, want %d", got, n*per)
	}
}
