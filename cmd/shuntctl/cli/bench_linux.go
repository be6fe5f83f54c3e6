package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shuntmesh/shunt/test/bench"
)

const benchUsage = `usage:
  shuntctl bench connect [--services 1,1000,10000] [--reps 5] [--duration 2s] [--slice 250ms] [--warmup 250ms]
                         [--backends 3] [--cpu N|-1] [--markdown]
      new-connection rate (TCP_CRR style) direct vs Shunt socket LB vs kube-proxy iptables
  shuntctl bench update [--services 3000] [--backends 30] [--updates 200] [--seed 1] [--markdown]
      agent.UpdateService latency on a large state
  shuntctl bench sidecar [--workloads rr1,rr4k,rr64k,stream,rr1x4] [--topologies 1,2] [--proxies haproxy,go]
                         [--reps 5] [--duration 1s] [--slice 250ms] [--warmup 250ms] [--cpu N|-1] [--quick] [--markdown]
      client → sidecar proxy (→ server's sidecar) → server: direct, Istio-style iptables REDIRECT,
      Shunt steering with sockmap off, auto and on; every byte verified, counters prove each path
      (workloads: rr<size>[x<conns>] request/response, stream[<size>]; sizes take a k suffix)
  shuntctl bench xdp [--reps 5] [--calls 20000] [--flows 100000] [--duration 2s] [--cpu N] [--batch 64]
                     [--no-throughput] [--realtime=true] [--markdown]
      XDP load balancer: ns/packet via BPF_PROG_TEST_RUN (hot flow, new flow into a filling and
      a full conntrack, many flows; the conntrack alone beside the kernel's LRU hash; memory latency),
      Mpps through veth vs kernel forwarding + iptables DNAT with the device under test on its
      own CPU and each stage's CPU time per packet
  shuntctl bench xds [--services 3000] [--backends 30] [--clients 100] [--changes 100] [--reps 5]
                     [--interval 20ms] [--delta] [--seed 1] [--markdown]
      xDS server: full translation, push latency of one service's endpoint change to N
      connected sidecar-like ADS clients, server memory per client (no root needed)
  shuntctl bench k8s [--services 3000] [--endpoints 30] [--updates 40] [--reps 5] [--seed 1]
                     [--shuntd PATH] [--markdown]
      Kubernetes source against a real kube-apiserver + etcd (scripts/build-k8s.sh):
      initial sync, shuntd RSS, EndpointSlice update -> map latency vs a full relist

All but xds need root and remove everything they create (network namespaces
shuntbench-* and shuntxdp-*, cgroups and bpffs folders shunt-bench-* and
shuntxdp-bench-*), also on Ctrl-C.
Progress goes to stderr, the report to stdout.
`

// benchCmd runs `shuntctl bench ...`. The hidden `bench worker` is the
// benchmark's own client and server processes.
func benchCmd(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, benchUsage)
		return errors.New("bench: want connect, update, sidecar, xdp, xds or k8s")
	}
	switch args[0] {
	case "worker":
		if code := bench.Worker(args[1:], stdout, stderr); code != 0 {
			os.Exit(code)
		}
		return nil
	case "connect":
		return benchConnect(args[1:], stdout, stderr)
	case "update":
		return benchUpdate(args[1:], stdout, stderr)
	case "sidecar":
		return benchSidecar(args[1:], stdout, stderr)
	case "xdp":
		return benchXDP(args[1:], stdout, stderr)
	case "xds":
		return benchXDS(args[1:], stdout, stderr)
	case "k8s":
		return benchK8s(args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, benchUsage)
		return nil
	}
	return fmt.Errorf("bench %s: unknown subcommand (want connect, update, sidecar, xdp, xds or k8s)", args[0])
}

func benchFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("bench "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, benchUsage) }
	return fs
}

// signalContext is cancelled by SIGINT/SIGTERM/SIGHUP. The signals stay
// caught until stop is called, so a second Ctrl-C does not interrupt the
// cleanup either.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
}

// interrupted turns the error of a cancelled run into a plain statement.
func interrupted(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return errors.New("bench: interrupted; everything it created was removed")
	}
	return err
}

func parseCounts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("--services: %q is not a positive integer", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func benchConnect(args []string, stdout, stderr io.Writer) error {
	fs := benchFlags("connect", stderr)
	services := fs.String("services", "1,1000,10000", "service counts N, comma-separated")
	reps := fs.Int("reps", 5, "repetitions per configuration")
	dur := fs.Duration("duration", 0, "measured time per configuration and repetition (default 2s)")
	warm := fs.Duration("warmup", 0, "unmeasured warm-up of each client (default 250ms)")
	slice := fs.Duration("slice", 0, "interleaving slice within a repetition (default 250ms; ≥ duration: none)")
	backends := fs.Int("backends", 3, "backends per service")
	cpu := fs.Int("cpu", runtime.NumCPU()-1, "CPU for the client and the servers (-1: not pinned)")
	md := fs.Bool("markdown", false, "print only the Markdown tables")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("bench connect: %w", err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench connect: unexpected argument %q", fs.Arg(0))
	}
	counts, err := parseCounts(*services)
	if err != nil {
		return fmt.Errorf("bench connect: %w", err)
	}
	ctx, stop := signalContext()
	defer stop()
	return interrupted(ctx, bench.RunConnect(ctx, bench.ConnectOptions{Services: counts, Reps: *reps, Duration: *dur, Warmup: *warm, Slice: *slice,
		Backends: *backends, CPU: *cpu, Markdown: *md, Log: stderr}, stdout))
}

func benchUpdate(args []string, stdout, stderr io.Writer) error {
	fs := benchFlags("update", stderr)
	services := fs.Int("services", 3000, "services")
	backends := fs.Int("backends", 30, "backends per service")
	updates := fs.Int("updates", 200, "UpdateService calls to time")
	seed := fs.Uint64("seed", 1, "seed of the random picks")
	md := fs.Bool("markdown", false, "print only the Markdown table")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("bench update: %w", err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench update: unexpected argument %q", fs.Arg(0))
	}
	ctx, stop := signalContext()
	defer stop()
	return interrupted(ctx, bench.RunUpdate(ctx, bench.UpdateOptions{Services: *services, Backends: *backends, Updates: *updates,
		Seed: *seed, Markdown: *md, Log: stderr}, stdout))
}

func benchSidecar(args []string, stdout, stderr io.Writer) error {
	fs := benchFlags("sidecar", stderr)
	workloads := fs.String("workloads", strings.Join(bench.DefaultWorkloads, ","), "workloads, comma-separated")
	topologies := fs.String("topologies", "1,2", "1: client → sidecar → server; 2: client → sidecar → sidecar → server")
	proxies := fs.String("proxies", "haproxy,go", "sidecar proxies, comma-separated")
	reps := fs.Int("reps", 0, "repetitions per configuration (default 5; --quick: 1)")
	dur := fs.Duration("duration", 0, "measured time per configuration and repetition (default 1s; --quick: 150ms)")
	slice := fs.Duration("slice", 0, "interleaving slice within a repetition (default 250ms)")
	warm := fs.Duration("warmup", 0, "unmeasured warm-up of each client (default 250ms)")
	cpu := fs.Int("cpu", runtime.NumCPU()-1, "CPU for every process of the benchmark (-1: not pinned)")
	quick := fs.Bool("quick", false, "one short repetition: checks every path, numbers mean little")
	md := fs.Bool("markdown", false, "print only the Markdown tables")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("bench sidecar: %w", err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench sidecar: unexpected argument %q", fs.Arg(0))
	}
	var topos []int
	for _, t := range splitList(*topologies) {
		n, err := strconv.Atoi(t)
		if err != nil {
			return fmt.Errorf("bench sidecar: --topologies: %q is not a number", t)
		}
		topos = append(topos, n)
	}
	ctx, stop := signalContext()
	defer stop()
	return interrupted(ctx, bench.RunSidecar(ctx, bench.SidecarOptions{Workloads: splitList(*workloads), Topologies: topos,
		Proxies: splitList(*proxies), Reps: *reps, Duration: *dur, Slice: *slice, Warmup: *warm, CPU: *cpu, Quick: *quick,
		Markdown: *md, Log: stderr}, stdout))
}

func benchXDP(args []string, stdout, stderr io.Writer) error {
	fs := benchFlags("xdp", stderr)
	reps := fs.Int("reps", 5, "interleaved repetitions")
	calls := fs.Int("calls", 20000, "test runs per scenario and repetition")
	flows := fs.Int("flows", 100000, "established flows of the many-flows scenario")
	dur := fs.Duration("duration", 2*time.Second, "each throughput measurement")
	cpu := fs.Int("cpu", runtime.NumCPU()-1, "CPU of the single-threaded runs and of the device under test (the generator runs on another)")
	batch := fs.Int("batch", 64, "live-frames batch size of the generator (at most 256)")
	noTput := fs.Bool("no-throughput", false, "skip the veth throughput part")
	md := fs.Bool("markdown", false, "print only the Markdown tables")
	rt := fs.Bool("realtime", true, "measuring threads SCHED_FIFO while they run (other load cannot preempt them)")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("bench xdp: %w", err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench xdp: unexpected argument %q", fs.Arg(0))
	}
	ctx, stop := signalContext()
	defer stop()
	return interrupted(ctx, bench.RunXDP(ctx, bench.XDPOptions{Reps: *reps, Calls: *calls, Flows: *flows, Duration: *dur, CPU: *cpu,
		Batch: *batch, SkipThroughput: *noTput, Realtime: *rt, Markdown: *md, Log: stderr}, stdout))
}

func benchXDS(args []string, stdout, stderr io.Writer) error {
	fs := benchFlags("xds", stderr)
	services := fs.Int("services", 3000, "services")
	backends := fs.Int("backends", 30, "endpoints per service")
	clients := fs.Int("clients", 100, "connected ADS clients")
	changes := fs.Int("changes", 100, "endpoint changes timed")
	reps := fs.Int("reps", 5, "full translations timed")
	interval := fs.Duration("interval", 20*time.Millisecond, "pause after every client ACKed a change")
	delta := fs.Bool("delta", false, "clients use delta ADS instead of state of the world")
	seed := fs.Uint64("seed", 1, "seed of the random picks")
	md := fs.Bool("markdown", false, "print only the Markdown tables")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("bench xds: %w", err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench xds: unexpected argument %q", fs.Arg(0))
	}
	ctx, stop := signalContext()
	defer stop()
	return interrupted(ctx, bench.RunXDS(ctx, bench.XDSOptions{Services: *services, Backends: *backends, Clients: *clients,
		Changes: *changes, Reps: *reps, Interval: *interval, Delta: *delta, Seed: *seed, Markdown: *md, Log: stderr}, stdout))
}

func benchK8s(args []string, stdout, stderr io.Writer) error {
	fs := benchFlags("k8s", stderr)
	services := fs.Int("services", 3000, "Services (one EndpointSlice each)")
	endpoints := fs.Int("endpoints", 30, "endpoints per Service")
	updates := fs.Int("updates", 40, "EndpointSlice updates timed per repetition")
	reps := fs.Int("reps", 5, "repetitions (relist + updates, alternating order)")
	seed := fs.Uint64("seed", 1, "seed of the random picks")
	shuntd := fs.String("shuntd", "", "shuntd binary (default: next to shuntctl, then $PATH)")
	md := fs.Bool("markdown", false, "print only the Markdown table")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("bench k8s: %w", err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench k8s: unexpected argument %q", fs.Arg(0))
	}
	ctx, stop := signalContext()
	defer stop()
	return interrupted(ctx, bench.RunK8s(ctx, bench.K8sOptions{Services: *services, Endpoints: *endpoints, Updates: *updates,
		Reps: *reps, Seed: *seed, Shuntd: *shuntd, Markdown: *md, Log: stderr}, stdout))
}
