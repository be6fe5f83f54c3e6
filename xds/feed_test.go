package xds

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/shuntmesh/shunt/mesh"
)

// startFeed runs a feed for s; applied receives each Apply's error.
func startFeed(t *testing.T, s *Server) (*Feed, chan error, func()) {
	t.Helper()
	f := s.NewFeed()
	applied := make(chan error, 100)
	f.OnApply = func(_ time.Duration, err error) { applied <- err }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	started := false
	start := func() {
		started = true
		go func() { f.Run(ctx); close(done) }()
	}
	t.Cleanup(func() {
		cancel()
		if started {
			<-done
		}
	})
	return f, applied, start
}

// served renders what s serves.
func served(t *testing.T, s *Server) string {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	return renderResources(t, s.model.resources())
}

func wantServed(t *testing.T, s *Server, want *mesh.State) {
	t.Helper()
	r, err := Translate(want, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got, exp := served(t, s), renderResources(t, r); got != exp {
		t.Fatalf("served configuration differs from the expected state:\n%s", diffLines(exp, got))
	}
}

// TestFeedCoalesces: changes enqueued while the feed is busy are merged
// (last version of each service wins, deletions and re-additions in
// order) and applied as one change; the caller may reuse what it passed.
func TestFeedCoalesces(t *testing.T) {
	s, _ := newRawServer(t, Config{}, &mesh.State{})
	f, applied, start := startFeed(t, s)
	st := smallState()
	f.Enqueue(Change{Services: st.Services, Replace: true})
	web := st.Services[0]
	web.Backends = slices.Clone(web.Backends)
	web.Backends[0].Weight = 9
	f.Enqueue(Change{Services: []mesh.Service{web}})
	web.Backends[0].Weight = 5 // reused by the caller after Enqueue: must not leak in
	f.Enqueue(Change{Delete: []string{"legacy"}})
	f.Enqueue(Change{Delete: []string{"kube-system/dns:dns"}})
	f.Enqueue(Change{Services: []mesh.Service{st.Services[2]}}) // dns back
	start()
	if err := <-applied; err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-applied:
		t.Fatalf("a second Apply (%v): the changes were not coalesced", err)
	default:
	}
	want := smallState()
	want.Services[0].Backends[0].Weight = 9
	want.Services = slices.DeleteFunc(want.Services, func(s mesh.Service) bool { return s.Name == "legacy" })
	wantServed(t, s, want)

	// Later changes are deltas again.
	f.Enqueue(Change{Delete: []string{"default/db:pg"}})
	if err := <-applied; err != nil {
		t.Fatal(err)
	}
	want.Services = slices.DeleteFunc(want.Services, func(s mesh.Service) bool { return s.Name == "default/db:pg" })
	wantServed(t, s, want)
}

// TestFeedRecovers: a refused change is counted and leaves the served
// configuration as it was; the next change is sent as a Replace of
// everything handed over, so the server converges.
func TestFeedRecovers(t *testing.T) {
	s, reg := newRawServer(t, Config{}, &mesh.State{})
	f, applied, start := startFeed(t, s)
	start()
	a := mesh.Service{Name: "a", Frontend: mesh.Frontend{Addr: ap("10.96.0.1:80"), Proto: mesh.TCP}, Backends: []mesh.Backend{{Addr: ap("10.0.0.1:80"), Weight: 1}}}
	b := a
	b.Name = "b" // same frontend
	f.Enqueue(Change{Services: []mesh.Service{a}, Replace: true})
	if err := <-applied; err != nil {
		t.Fatal(err)
	}
	f.Enqueue(Change{Services: []mesh.Service{b}})
	if err := <-applied; err == nil {
		t.Fatal("a second service on the same frontend was accepted")
	}
	wantServed(t, s, &mesh.State{Services: []mesh.Service{a}})
	if got := testMetric(t, reg, "shunt_xds_update_errors_total", ""); got != 1 {
		t.Errorf("update errors = %v, want 1", got)
	}
	// Deleting a alone would leave b unserved; the feed resends all it has.
	f.Enqueue(Change{Delete: []string{"a"}})
	if err := <-applied; err != nil {
		t.Fatal(err)
	}
	wantServed(t, s, &mesh.State{Services: []mesh.Service{b}})
}
