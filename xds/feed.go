package xds

import (
	"context"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/shuntmesh/shunt/mesh"
)

// Feed hands changes to a Server from a producer that must not wait: the
// agent notifies its subscribers with its own lock held. Enqueue merges a
// change into the pending one in proportion to the change's size and
// returns at once; Run applies the merged changes, in order, from one
// goroutine. Changes that arrive while one is being applied are coalesced
// (the last version of each service wins), so a burst costs one Apply and
// the server never serves a state older than what it was handed.
//
// A change the server refuses is logged and counted
// (shunt_xds_update_errors_total); the next change is then sent as a
// Replace of everything the feed was handed, so the server converges as
// soon as the producer's state is acceptable again.
type Feed struct {
	s    *Server
	wake chan struct{}

	mu      sync.Mutex
	replace bool                     // pending is the whole state
	pending map[string]*mesh.Service // nil: delete
	all     map[string]*mesh.Service // everything handed over, for recovery
	failed  bool

	// OnApply, when set before Run, is called after each Apply with how
	// long it took and its error (tests, benchmarks).
	OnApply func(took time.Duration, err error)
}

// NewFeed returns a feed for s; start it with Run.
func (s *Server) NewFeed() *Feed {
	return &Feed{s: s, wake: make(chan struct{}, 1), pending: map[string]*mesh.Service{}, all: map[string]*mesh.Service{}}
}

// Enqueue hands a change over. It copies what it keeps (the caller may
// reuse ch), never blocks on the server, and costs O(size of ch).
func (f *Feed) Enqueue(ch Change) {
	f.mu.Lock()
	if ch.Replace {
		f.replace = true
		f.pending = make(map[string]*mesh.Service, len(ch.Services))
	}
	for i := range ch.Services {
		s := ch.Services[i]
		s.Backends = slices.Clone(s.Backends)
		f.pending[s.Name] = &s
	}
	if !ch.Replace {
		for _, n := range ch.Delete {
			if f.replace {
				delete(f.pending, n)
			} else {
				f.pending[n] = nil
			}
		}
	}
	f.mu.Unlock()
	select {
	case f.wake <- struct{}{}:
	default: // already woken: the pending change is picked up with this one
	}
}

// Run applies pending changes until ctx is done.
func (f *Feed) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.wake:
		}
		ch, ok := f.take()
		if !ok {
			continue
		}
		t0 := time.Now()
		err := f.s.Apply(ch)
		took := time.Since(t0)
		f.mu.Lock()
		f.failed = err != nil
		f.mu.Unlock()
		if err != nil {
			f.s.met.updateErrors.Inc()
			f.s.log.Error("xds: change refused; the served configuration stays as it was until a later change is accepted",
				"services", len(ch.Services), "deletions", len(ch.Delete), "replace", ch.Replace, "err", err)
		}
		if f.OnApply != nil {
			f.OnApply(took, err)
		}
	}
}

// take turns the pending change into a Change and records it in f.all.
func (f *Feed) take() (Change, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.replace && len(f.pending) == 0 {
		return Change{}, false
	}
	if f.replace {
		f.all = f.pending
	} else {
		for n, s := range f.pending {
			if s == nil {
				delete(f.all, n)
			} else {
				f.all[n] = s
			}
		}
	}
	src, replace := f.pending, f.replace || f.failed
	if replace {
		src = f.all
	}
	var ch Change
	ch.Replace = replace
	for _, n := range slices.Sorted(maps.Keys(src)) {
		if s := src[n]; s != nil {
			ch.Services = append(ch.Services, *s)
		} else {
			ch.Delete = append(ch.Delete, n)
		}
	}
	f.replace, f.pending = false, map[string]*mesh.Service{}
	return ch, true
}
