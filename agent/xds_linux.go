package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shuntmesh/shunt/xds"
)

// xdsRun is the agent's running xDS server.
type xdsRun struct {
	srv     *xds.Server
	feed    *xds.Feed
	cancel  context.CancelFunc
	done    chan struct{} // closed when the listeners stopped
	stopped atomic.Bool
}

// StartXDS starts the xDS server of the `xds:` section when it is enabled
// (a no-op otherwise): it listens (errors are returned now), and feeds the
// server from the desired state. The feed subscribes to the agent's
// changes (Subscribe): the server gets the whole state first, then every
// change with only the services it touched, so an endpoint change
// re-translates one service and wakes only the watchers of its endpoints.
// The subscriber only hands the change to the feed (O(size of the change)
// under the agent's lock); one goroutine applies it, coalescing bursts.
// Metrics go to reg (may be nil).
func (a *Agent) StartXDS(reg prometheus.Registerer) error {
	cfg := a.cfg.XDS
	if !cfg.Enabled {
		return nil
	}
	a.mu.Lock()
	running := a.xds != nil
	a.mu.Unlock()
	if running {
		return errors.New("xds: already started")
	}
	srv, err := xds.New(cfg.Config, a.log.With("component", "xds"), reg)
	if err != nil {
		return err
	}
	ls, err := srv.Listen()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	x := &xdsRun{srv: srv, feed: srv.NewFeed(), cancel: cancel, done: make(chan struct{})}
	go x.feed.Run(ctx)
	go func() {
		defer close(x.done)
		if err := srv.ServeAll(ls); err != nil {
			a.log.Error("xds server stopped", "err", err)
		}
	}()
	a.mu.Lock()
	a.xds = x
	a.mu.Unlock()
	a.Subscribe(func(d Delta) {
		if x.stopped.Load() {
			return
		}
		x.feed.Enqueue(xds.Change{Services: d.Services, Delete: d.DeleteServices, Replace: d.Replace})
	})
	var addrs []string
	for _, l := range ls {
		addrs = append(addrs, l.Addr().Network()+":"+l.Addr().String())
	}
	a.log.Info("xds server listening", "addrs", addrs)
	return nil
}

// StopXDS stops the xDS server (streams end; sidecars keep their last
// configuration and reconnect to the next agent).
func (a *Agent) StopXDS() {
	a.mu.Lock()
	x := a.xds
	a.xds = nil
	a.mu.Unlock()
	if x == nil {
		return
	}
	x.stopped.Store(true)
	x.cancel()
	x.srv.Stop()
	<-x.done
}

// XDSStatus reports the xDS server's connected nodes: per resource type
// what was sent, accepted, rejected (last NACK) and is pending.
func (a *Agent) XDSStatus() (xds.Status, error) {
	a.mu.Lock()
	x := a.xds
	a.mu.Unlock()
	if x == nil {
		return xds.Status{}, fmt.Errorf("the xDS server is not running (xds.enabled in %s): %w", DefaultConfigPath, ErrNotFound)
	}
	return x.srv.Status(), nil
}

// XDSServer returns the running xDS server (nil when none runs).
func (a *Agent) XDSServer() *xds.Server {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.xds == nil {
		return nil
	}
	return a.xds.srv
}

// handleXDSStatus is GET /v1/xds.
func (a *Agent) handleXDSStatus(w http.ResponseWriter, _ *http.Request) {
	st, err := a.XDSStatus()
	reply(w, st, err)
}
