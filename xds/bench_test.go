package xds

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/shuntmesh/shunt/mesh"
)

// bigState has services × backends: every 10th service uses Maglev, every
// 7th backend is drained and every 11th terminating.
func bigState(services, backends int) *mesh.State {
	st := &mesh.State{Services: make([]mesh.Service, services)}
	for i := range services {
		svc := mesh.Service{
			Name:     fmt.Sprintf("ns%d/svc%d:http", i%50, i),
			Frontend: mesh.Frontend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}), 80), Proto: mesh.TCP},
		}
		if i%10 == 0 {
			svc.Algorithm = mesh.Maglev
		}
		for j := range backends {
			k := i*backends + j
			b := mesh.Backend{
				Addr:   netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(k >> 16), byte(k >> 8), byte(k)}), 8080),
				Weight: 1,
			}
			if j%7 == 6 {
				b.Weight = 0
			}
			if j%11 == 10 {
				b.State = mesh.Terminating
			}
			svc.Backends = append(svc.Backends, b)
		}
		st.Services[i] = svc
	}
	return st
}

// BenchmarkTranslate3000x30 builds every resource for 3000 services with
// 30 endpoints each.
func BenchmarkTranslate3000x30(b *testing.B) {
	st := bigState(3000, 30)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Translate(st, Options{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTranslateAndHash3000x30 adds the content hashing that decides
// what changed (deterministic marshal + SHA-256 of every resource).
func BenchmarkTranslateAndHash3000x30(b *testing.B) {
	st := bigState(3000, 30)
	b.ReportAllocs()
	for b.Loop() {
		r, err := Translate(st, Options{})
		if err != nil {
			b.Fatal(err)
		}
		desiredSets(r, nil)
	}
}

// BenchmarkUpdateOneEndpoint3000x30 is Server.Update (a Replace of the
// whole state) after one endpoint change: every service is compared, one
// is re-translated, and the whole result is checked with Consistent().
func BenchmarkUpdateOneEndpoint3000x30(b *testing.B) {
	st := bigState(3000, 30)
	s := loadedServer(b, st)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		st.Services[1].Backends[0].Weight = uint32(1 + i%2)
		if err := s.Update(st); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkApplyOneEndpoint3000x30 is the incremental path the agent
// feeds: Server.Apply with the one changed service.
func BenchmarkApplyOneEndpoint3000x30(b *testing.B) {
	st := bigState(3000, 30)
	s := loadedServer(b, st)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		svc := st.Services[1]
		svc.Backends = slices.Clone(svc.Backends)
		svc.Backends[0].Weight = uint32(1 + i%2)
		if err := s.Apply(Change{Services: []mesh.Service{svc}}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkApplyAddService3000x30 adds and removes one service: the
// sidecar's virtualOutbound listener (one filter chain per service) is
// rebuilt and hashed each time.
func BenchmarkApplyAddService3000x30(b *testing.B) {
	st := bigState(3001, 30)
	extra := st.Services[3000]
	st.Services = st.Services[:3000]
	s := loadedServer(b, st)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		ch := Change{Services: []mesh.Service{extra}}
		if i%2 == 0 {
			ch = Change{Delete: []string{extra.Name}}
		}
		if err := s.Apply(ch); err != nil {
			b.Fatal(err)
		}
	}
}

func TestBigStateChecks(t *testing.T) {
	if testing.Short() {
		t.Skip("large state")
	}
	st := bigState(300, 30)
	if err := st.Validate(); err != nil {
		t.Fatal(err)
	}
	r, err := Translate(st, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Check(); err != nil {
		t.Fatal(err)
	}
}

// loadedServer is a server holding st.
func loadedServer(b *testing.B, st *mesh.State) *Server {
	b.Helper()
	s, err := New(Config{}, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(s.Stop)
	if err := s.Update(st); err != nil {
		b.Fatal(err)
	}
	return s
}
