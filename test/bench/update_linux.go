package bench

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"path/filepath"
	"runtime"
	"slices"
	"time"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/mesh"
)

// UpdateOptions configures RunUpdate.
type UpdateOptions struct {
	Services int    // default 3000
	Backends int    // per service, default 30
	Updates  int    // default 200
	Seed     uint64 // picks of services and backends (default 1)
	Markdown bool
	Log      io.Writer
}

func (o UpdateOptions) withDefaults() UpdateOptions {
	o.Services = cmp.Or(o.Services, 3000)
	o.Backends = cmp.Or(o.Backends, 30)
	o.Updates = cmp.Or(o.Updates, 200)
	o.Seed = cmp.Or(o.Seed, 1)
	return o
}

// TargetUpdateP99 is the goal for one UpdateService call's p99 latency.
const TargetUpdateP99 = 10 * time.Millisecond

// RunUpdate loads Services × Backends through agent.New into a throwaway
// cgroup and bpffs folder, then times Updates agent.UpdateService calls,
// each replacing one backend of a random service. The call returns after
// the maps are written; the maps are checked against the expected state at
// the end. Everything created is removed before it returns.
func RunUpdate(ctx context.Context, opts UpdateOptions, out io.Writer) (err error) {
	opts = opts.withDefaults()
	if opts.Services < 1 || opts.Services > maxServices {
		return fmt.Errorf("services: %d out of range 1..%d", opts.Services, maxServices)
	}
	if opts.Backends < 1 || opts.Backends > 4096 {
		return fmt.Errorf("backends: %d out of range 1..4096", opts.Backends)
	}
	if opts.Updates < 1 {
		return errors.New("updates: must be at least 1")
	}
	e, err := newEnv(opts.Log)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := e.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleanup: %w", cerr))
		}
	}()
	cg, err := e.subCgroup("update")
	if err != nil {
		return err
	}
	svcs := MakeServices(opts.Services, opts.Backends)
	cfg := agent.Config{
		Datapath:    datapath.Config{Root: e.bpffs, Cgroup: cg},
		APISocket:   filepath.Join(e.tmp, "shuntd.sock"),
		StateFile:   filepath.Join(e.tmp, "state.json"),
		MetricsAddr: "",
	}
	if opts.Services > datapath.DefaultMaxServices {
		cfg.Datapath.MaxServices = uint32(opts.Services)
	}
	if slots := (opts.Services + 1) * opts.Backends; slots > datapath.DefaultMaxSlots {
		cfg.Datapath.MaxSlots = uint32(slots)
	}
	for _, s := range svcs {
		cfg.Services = append(cfg.Services, s.Config())
	}
	logf(opts.Log, "loading %d services × %d backends into cgroup %s, bpffs %s", opts.Services, opts.Backends, cg, e.bpffs)
	runtime.GC()
	t0 := time.Now()
	a, err := agent.New(cfg, nil, nil)
	res := UpdateResult{Services: opts.Services, Backends: opts.Backends, Load: time.Since(t0)}
	if err != nil {
		return fmt.Errorf("initial load: %w", err)
	}
	defer a.Close() // before e.close's bpffs cleanup (deferred earlier, runs later)
	cfg.Services = nil

	rng := rand.New(rand.NewPCG(opts.Seed, opts.Seed^0x5eed))
	next := opts.Services * opts.Backends // next unused backend address
	for i := range opts.Updates {
		if err := ctx.Err(); err != nil {
			return err
		}
		s := &svcs[rng.IntN(len(svcs))]
		s.Backends[rng.IntN(len(s.Backends))] = Backend(next)
		next++
		sc := s.Config()
		t := time.Now()
		err := a.UpdateService(sc)
		res.Latencies = append(res.Latencies, time.Since(t))
		if err != nil {
			return fmt.Errorf("update %d (%s): %w", i+1, s.Name, err)
		}
	}
	if err := verifyMaps(a.Datapath(), svcs); err != nil {
		return err
	}
	logf(opts.Log, "maps hold exactly the expected %d services after %d updates", len(svcs), opts.Updates)

	if !opts.Markdown {
		fmt.Fprintf(out, "agent.UpdateService latency, one backend of a random service replaced per call (seed %d); %s, kernel %s.\n\n",
			opts.Seed, shuntVersion(), kernelRelease())
	}
	fmt.Fprint(out, UpdateTable(res))
	if !opts.Markdown {
		p99 := Percentile(res.Latencies, 99)
		fmt.Fprintf(out, "\np99 %s (target ≤ %s: %s)\n", FormatDuration(p99), FormatDuration(TargetUpdateP99), verdict(p99 <= TargetUpdateP99))
	}
	return nil
}

// verifyMaps checks, reading the kernel maps (not the agent's copy), that
// they hold exactly svcs: each frontend with its backends (one slot each,
// weights are 1), nothing else.
func verifyMaps(dp *datapath.Datapath, svcs []ServiceSpec) error {
	loaded, err := dp.ReadServices()
	if err != nil {
		return fmt.Errorf("read maps back: %w", err)
	}
	if len(loaded) != len(svcs) {
		return fmt.Errorf("maps hold %d services, want %d", len(loaded), len(svcs))
	}
	for _, s := range svcs {
		ls, ok := loaded[datapath.MakeAddr(s.VIP, mesh.TCP)]
		if !ok {
			return fmt.Errorf("service %s (%s) missing from the maps", s.Name, s.VIP)
		}
		got := make([]netip.AddrPort, len(ls.Slots))
		for i, a := range ls.Slots {
			got[i] = datapath.AddrPort(a)
		}
		want := slices.Clone(s.Backends)
		slices.SortFunc(got, netip.AddrPort.Compare)
		slices.SortFunc(want, netip.AddrPort.Compare)
		if !slices.Equal(got, want) {
			return fmt.Errorf("service %s: maps hold slots %v, want backends %v", s.Name, got, want)
		}
	}
	return nil
}
