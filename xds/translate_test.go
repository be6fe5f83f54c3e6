package xds

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/shuntmesh/shunt/mesh"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// smallState covers every translation rule: weights, drain, terminating,
// both algorithms, a UDP frontend, a plain name and an IPv6 frontend.
func smallState() *mesh.State {
	return &mesh.State{Services: []mesh.Service{
		{
			Name:     "default/web:http",
			Frontend: mesh.Frontend{Addr: ap("10.96.0.10:80"), Proto: mesh.TCP},
			Backends: []mesh.Backend{
				{Addr: ap("10.0.1.2:8080"), Weight: 3, Name: "web-b"},
				{Addr: ap("10.0.1.1:8080"), Weight: 1, Name: "web-a"},
				{Addr: ap("10.0.1.3:8080"), Weight: 0, Name: "web-drained"},
				{Addr: ap("10.0.1.4:8080"), Weight: 1, State: mesh.Terminating, Name: "web-old"},
			},
			Algorithm: mesh.Random,
		},
		{
			Name:      "default/db:pg",
			Frontend:  mesh.Frontend{Addr: ap("10.96.0.11:5432"), Proto: mesh.TCP},
			Backends:  []mesh.Backend{{Addr: ap("10.0.2.1:5432"), Weight: 1}, {Addr: ap("10.0.2.2:5432"), Weight: 1}},
			Algorithm: mesh.Maglev,
		},
		{
			Name:     "kube-system/dns:dns",
			Frontend: mesh.Frontend{Addr: ap("10.96.0.12:53"), Proto: mesh.UDP},
			Backends: []mesh.Backend{{Addr: ap("10.0.3.1:53"), Weight: 1}},
		},
		{
			Name:     "legacy",
			Frontend: mesh.Frontend{Addr: ap("10.96.0.13:9000"), Proto: mesh.TCP},
			Backends: []mesh.Backend{
				{Addr: ap("10.0.4.1:9000"), Weight: 2, State: mesh.Terminating},
				{Addr: ap("10.0.4.2:9000"), Weight: 0, State: mesh.Terminating},
			},
		},
		{
			Name:     "default/v6:http",
			Frontend: mesh.Frontend{Addr: ap("[fd00::10]:80"), Proto: mesh.TCP},
			Backends: []mesh.Backend{{Addr: ap("[fd00:1::1]:8080"), Weight: 1}},
		},
	}}
}

// renderJSON renders resources as indented protojson. protojson's own
// whitespace is deliberately unstable, so it is re-indented by encoding/json.
func renderJSON[T proto.Message](t testing.TB, msgs []T) string {
	t.Helper()
	var parts []string
	for _, m := range msgs {
		b, err := protojson.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		parts = append(parts, string(b))
	}
	raw := "[" + strings.Join(parts, ",") + "]"
	var out bytes.Buffer
	if err := json.Indent(&out, []byte(raw), "", "  "); err != nil {
		t.Fatal(err)
	}
	return out.String()
}

func renderResources(t testing.TB, r *Resources) string {
	var b strings.Builder
	section := func(name, body string) { fmt.Fprintf(&b, "-- %s --\n%s\n", name, body) }
	section("listeners (sidecar)", renderJSON(t, r.SidecarListeners))
	section("listeners (proxyless)", renderJSON(t, r.APIListeners))
	section("routes", renderJSON(t, r.Routes))
	section("clusters", renderJSON(t, r.Clusters))
	section("endpoints", renderJSON(t, r.Endpoints))
	section("warnings", strings.Join(r.Warnings, "\n"))
	return b.String()
}

func checkGolden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./xds/ -run %s -update)", err, t.Name())
	}
	if string(want) != got {
		t.Errorf("%s differs from the translation (run with -update to accept):\n%s", path, diffLines(string(want), got))
	}
}

// diffLines shows the first differing lines, enough to locate a change.
func diffLines(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < len(w) || i < len(g); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			return fmt.Sprintf("line %d:\n  want: %s\n  got:  %s", i+1, wl, gl)
		}
	}
	return "(no line differs)"
}

func TestTranslateGolden(t *testing.T) {
	for name, st := range map[string]*mesh.State{
		"small": smallState(),
		"empty": {},
	} {
		t.Run(name, func(t *testing.T) {
			if err := st.Validate(); err != nil {
				t.Fatal(err)
			}
			r, err := Translate(st, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if err := r.Check(); err != nil {
				t.Fatalf("Check: %v", err)
			}
			checkGolden(t, name, renderResources(t, r))
		})
	}
}

// TestTranslateDeterministic: arrival order of services and backends must
// not change a byte of the output.
func TestTranslateDeterministic(t *testing.T) {
	a, err := Translate(smallState(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	st := smallState()
	for i, j := 0, len(st.Services)-1; i < j; i, j = i+1, j-1 {
		st.Services[i], st.Services[j] = st.Services[j], st.Services[i]
	}
	for i := range st.Services {
		bs := st.Services[i].Backends
		for x, y := 0, len(bs)-1; x < y; x, y = x+1, y-1 {
			bs[x], bs[y] = bs[y], bs[x]
		}
	}
	b, err := Translate(st, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if renderResources(t, a) != renderResources(t, b) {
		t.Fatal("translation depends on input order")
	}
	ha, hb := hashAll(t, a), hashAll(t, b)
	for k, v := range ha {
		if hb[k] != v {
			t.Errorf("version of %s differs: %s vs %s", k, v, hb[k])
		}
	}
}

func hashAll(t *testing.T, r *Resources) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, set := range desiredSets(r, nil) {
		for name, e := range set.items {
			out[set.typeURL+"/"+set.key+"/"+name] = e.hash
		}
	}
	return out
}

func TestServiceHost(t *testing.T) {
	for in, want := range map[string]string{
		"default/web:http": "web.default.svc.cluster.local",
		"default/web":      "web.default.svc.cluster.local",
		"web:http":         "web",
		"web":              "web",
		"api.example.com":  "api.example.com",
	} {
		if got := ServiceHost(in, ""); got != want {
			t.Errorf("ServiceHost(%q) = %q, want %q", in, got, want)
		}
	}
	if got := ServiceHost("ns/a:p", "corp.internal"); got != "a.ns.svc.corp.internal" {
		t.Errorf("custom domain: %q", got)
	}
}

func TestParseNodeID(t *testing.T) {
	info, ok := ParseNodeID("sidecar~10.0.0.5~client-7d9f.default~default.svc.cluster.local")
	if !ok || info.Type != "sidecar" || info.IP != "10.0.0.5" || info.Pod != "client-7d9f" || info.Namespace != "default" {
		t.Fatalf("got %+v ok=%v", info, ok)
	}
	if info, ok := ParseNodeID("node-1"); ok || info.ID != "node-1" {
		t.Fatalf("opaque id: %+v ok=%v", info, ok)
	}
}

// TestNameCollisions: two services with the same derived names are both
// served; the second gets the fallback cluster name and no API listener.
func TestNameCollisions(t *testing.T) {
	st := &mesh.State{Services: []mesh.Service{
		{Name: "default/web:a", Frontend: mesh.Frontend{Addr: ap("10.96.0.1:80"), Proto: mesh.TCP}, Backends: []mesh.Backend{{Addr: ap("10.0.0.1:80"), Weight: 1}}},
		{Name: "default/web:b", Frontend: mesh.Frontend{Addr: ap("10.96.0.2:80"), Proto: mesh.TCP}, Backends: []mesh.Backend{{Addr: ap("10.0.0.2:80"), Weight: 1}}},
	}}
	r, err := Translate(st, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Check(); err != nil {
		t.Fatal(err)
	}
	if len(r.APIListeners) != 1 || len(r.Routes) != 1 || len(r.Endpoints) != 2 || len(r.Warnings) != 2 {
		t.Fatalf("listeners=%d routes=%d endpoints=%d warnings=%q", len(r.APIListeners), len(r.Routes), len(r.Endpoints), r.Warnings)
	}
	if r.Endpoints[1].GetClusterName() != "shunt|default/web:b" {
		t.Fatalf("fallback name: %q", r.Endpoints[1].GetClusterName())
	}
}

// TestModelReplace: the model fed whole states (Replace) reuses its
// previous output and produces exactly what a fresh translation does,
// through every kind of change.
func TestModelReplace(t *testing.T) {
	m := newModel(Options{})
	steps := []func(*mesh.State){
		func(*mesh.State) {},
		func(st *mesh.State) { st.Services[0].Backends[0].Weight = 7 },
		func(st *mesh.State) { st.Services[0].Algorithm = mesh.Maglev },
		func(st *mesh.State) { st.Services[1].Frontend.Addr = ap("10.96.0.99:5433") },
		func(st *mesh.State) { st.Services = st.Services[1:] },
		func(st *mesh.State) { // v6 gone: listeners lose "::"
			st.Services[3].Frontend.Addr = ap("10.96.0.14:80")
			st.Services[3].Backends[0].Addr = ap("10.0.5.1:8080")
		},
		func(st *mesh.State) { // collision: the new service sorts first and takes the names
			st.Services = append(st.Services, mesh.Service{Name: "default/db:other", Frontend: mesh.Frontend{Addr: ap("10.96.1.1:5433"), Proto: mesh.TCP},
				Backends: []mesh.Backend{{Addr: ap("10.0.2.9:5432"), Weight: 1}}})
		},
		func(st *mesh.State) { st.Services[2].Backends = nil },
		func(st *mesh.State) { st.Services = st.Services[:len(st.Services)-1] }, // the owner goes: db:pg takes its names back
	}
	st := smallState()
	for i, step := range steps {
		step(st)
		if err := m.apply(Change{Services: st.Services, Replace: true}); err != nil {
			t.Fatal(err)
		}
		checkModel(t, fmt.Sprintf("step %d", i), m, st)
	}
}

// checkModel compares the model with a fresh translation of st and checks
// it (ValidateAll, Consistent).
func checkModel(t *testing.T, what string, m *model, st *mesh.State) {
	t.Helper()
	fresh, err := Translate(st, Options{})
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	inc := m.resources()
	if a, b := renderResources(t, inc), renderResources(t, fresh); a != b {
		t.Fatalf("%s: incremental translation differs from a fresh one:\n%s", what, diffLines(b, a))
	}
	if err := inc.Check(); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// TestModelDeltas: random sequences of upserts and deletions, with name
// collisions, moving frontends, UDP and IPv6, applied as deltas, always
// equal a fresh translation of the resulting state; refused deltas change
// nothing.
func TestModelDeltas(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	// A small name and address space so that collisions happen often:
	// "ns0/web:a" and "ns0/web:b" claim the same names on the same port.
	randomService := func() mesh.Service {
		ns, name, port := rng.IntN(2), []string{"web", "db"}[rng.IntN(2)], []string{"a", "b", "c"}[rng.IntN(3)]
		s := mesh.Service{Name: fmt.Sprintf("ns%d/%s:%s", ns, name, port), Frontend: mesh.Frontend{Proto: mesh.TCP}}
		vip := netip.AddrFrom4([4]byte{10, 96, 0, byte(rng.IntN(12))})
		if rng.IntN(5) == 0 {
			vip = netip.MustParseAddr(fmt.Sprintf("fd00::%d", rng.IntN(12)+1))
		}
		s.Frontend.Addr = netip.AddrPortFrom(vip, uint16(80+rng.IntN(2)))
		if rng.IntN(6) == 0 {
			s.Frontend.Proto = mesh.UDP
		}
		if rng.IntN(4) == 0 {
			s.Algorithm = mesh.Maglev
		}
		for j := range rng.IntN(4) {
			b := mesh.Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(j), byte(rng.IntN(3))}), 8080), Weight: uint32(rng.IntN(3))}
			if vip.Is6() {
				b.Addr = netip.AddrPortFrom(netip.MustParseAddr(fmt.Sprintf("fd00:1::%d:%d", j, rng.IntN(3))), 8080)
			}
			if rng.IntN(4) == 0 {
				b.State = mesh.Terminating
			}
			if !slices.ContainsFunc(s.Backends, func(x mesh.Backend) bool { return x.Addr == b.Addr }) {
				s.Backends = append(s.Backends, b)
			}
		}
		return s
	}
	m := newModel(Options{})
	cur := map[string]mesh.Service{}
	state := func() *mesh.State {
		st := &mesh.State{}
		for _, n := range slices.Sorted(maps.Keys(cur)) {
			st.Services = append(st.Services, cur[n])
		}
		return st
	}
	refused := 0
	for step := range 500 {
		var ch Change
		for range 1 + rng.IntN(3) {
			if len(cur) > 0 && rng.IntN(3) == 0 {
				names := slices.Sorted(maps.Keys(cur))
				ch.Delete = append(ch.Delete, names[rng.IntN(len(names))])
			} else {
				ch.Services = append(ch.Services, randomService())
			}
		}
		before := renderResources(t, m.resources())
		err := m.apply(ch)
		if err != nil {
			refused++
			if after := renderResources(t, m.resources()); after != before {
				t.Fatalf("step %d: refused change (%v) modified the model", step, err)
			}
			continue
		}
		for _, n := range ch.Delete {
			delete(cur, n)
		}
		for _, s := range ch.Services {
			cur[s.Name] = s
		}
		checkModel(t, fmt.Sprintf("step %d", step), m, state())
	}
	t.Logf("%d of 500 changes refused", refused)
	if refused == 0 || refused > 400 {
		t.Errorf("%d of 500 random changes refused: the generator does not cover both outcomes", refused)
	}
}
