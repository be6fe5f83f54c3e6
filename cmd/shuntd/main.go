// Command shuntd is Shunt's node agent: it loads the sockmesh eBPF programs,
// keeps the kernel maps in line with the desired state (configuration file,
// shuntctl, Kubernetes) and serves the local API and metrics.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/shuntmesh/shunt/agent"
	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/agent/k8s"
	"github.com/shuntmesh/shunt/agent/xdp"
)

func newKubeSource(kc agent.KubernetesConfig, a *agent.Agent, log *slog.Logger, reg prometheus.Registerer) (*k8s.Source, error) {
	k8s.RouteKlog(log)
	rc, err := k8s.RESTConfig(kc.Kubeconfig)
	if err != nil {
		return nil, err
	}
	return k8s.New(kc, rc, a, log, reg)
}

// cleanupAfterUninstall removes the whole datapath and the state file once
// the agent's handles are closed: what `shuntctl cleanup` does.
func cleanupAfterUninstall(cfg agent.Config, log *slog.Logger) error {
	log.Info("the agent's DaemonSet was deleted (uninstall): detaching every program, removing the pins and the state file")
	if err := xdp.Cleanup(cfg.Datapath.Root); err != nil {
		return err
	}
	if err := datapath.Cleanup(cfg.Datapath.Root); err != nil {
		return err
	}
	if err := os.Remove(cfg.StateFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func main() {
	configPath := flag.String("config", agent.DefaultConfigPath, "configuration file (YAML)")
	cgroup := flag.String("cgroup", "", "cgroup v2 folder to attach to (default: the cgroup v2 root)")
	bpffs := flag.String("bpffs-root", "", "bpffs folder for pins (default /sys/fs/bpf/shunt)")
	apiSocket := flag.String("api-socket", "", "unix socket for shuntctl (default "+agent.DefaultAPISocket+")")
	metricsAddr := flag.String("metrics-addr", agent.DefaultMetricsAddr, "TCP address for /metrics and /healthz (empty: off)")
	stateFile := flag.String("state-file", "", "file keeping run-time changes (default "+agent.DefaultStateFile+")")
	hostNetNS := flag.String("host-netns", "", "network namespace whose sockets count as the node's (default: the agent's)")
	hostOnly := flag.Bool("host-namespace-only", false, "translate only the node's own sockets (overrides the file when set)")
	logLevel := flag.String("log-level", "info", "debug, info, warn or error")
	validate := flag.Bool("validate", false, "validate the configuration and exit")
	kube := flag.Bool("kubernetes", false, "enable the Kubernetes source with the in-cluster configuration (also enabled by -kubeconfig or a kubernetes: section)")
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig file of the cluster (enables the Kubernetes source)")
	nodeName := flag.String("node-name", "", "this node's name in the cluster (default $NODE_NAME, else the host name)")
	ownerDS := flag.String("cleanup-on-uninstall", "", "NAMESPACE/NAME of the DaemonSet running this agent (needs the Kubernetes source): when shuntd stops after that DaemonSet was deleted, it detaches every program and removes every pin and the state file; a restart or an upgrade leaves them")
	seedFile := flag.String("xdp-seed-file", "", "file holding xdp.seed, the cluster-wide Maglev seed (e.g. a mounted Secret; overrides the file's)")
	nodeAddr := flag.String("xdp-node-addr", "", "this node's address for XDP encapsulation and SNAT: sets xdp.nodeAddr or xdp.nodeAddr6 by its family when the file leaves it empty")
	flag.Parse()

	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintln(os.Stderr, "shuntd: -log-level:", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))

	cfg, err := agent.LoadConfig(*configPath)
	if err != nil {
		log.Error("configuration", "err", err)
		os.Exit(1)
	}
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *cgroup != "" {
		cfg.Datapath.Cgroup = *cgroup
	}
	if *bpffs != "" {
		cfg.Datapath.Root = *bpffs
	}
	if *apiSocket != "" {
		cfg.APISocket = *apiSocket
	}
	if set["metrics-addr"] || cfg.MetricsAddr == "" {
		cfg.MetricsAddr = *metricsAddr
	}
	if *stateFile != "" {
		cfg.StateFile = *stateFile
	}
	if *hostNetNS != "" {
		cfg.HostNetNS = *hostNetNS
	}
	if set["host-namespace-only"] {
		cfg.SocketLB.HostNamespaceOnly = *hostOnly
	}
	if (*kube || *kubeconfig != "" || *nodeName != "") && cfg.Kubernetes == nil {
		cfg.Kubernetes = &agent.KubernetesConfig{}
	}
	if *seedFile != "" {
		seed, err := os.ReadFile(*seedFile)
		if err != nil {
			log.Error("-xdp-seed-file", "err", err)
			os.Exit(1)
		}
		cfg.XDP.Seed = strings.TrimSpace(string(seed))
	}
	if *nodeAddr != "" {
		a, err := netip.ParseAddr(*nodeAddr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "shuntd: -xdp-node-addr:", err)
			os.Exit(2)
		}
		if a.Unmap().Is4() && cfg.XDP.NodeAddr == "" {
			cfg.XDP.NodeAddr = a.Unmap().String()
		} else if !a.Unmap().Is4() && cfg.XDP.NodeAddr6 == "" {
			cfg.XDP.NodeAddr6 = a.String()
		}
	}
	if cfg.Kubernetes != nil {
		if *kubeconfig != "" {
			cfg.Kubernetes.Kubeconfig = *kubeconfig
		}
		if *nodeName != "" {
			cfg.Kubernetes.NodeName = *nodeName
		}
	}
	if *validate {
		if cfg.Datapath.Cgroup == "" { // what agent.New does: the cgroup v2 root
			root, err := agent.CgroupV2Root()
			if err != nil {
				fmt.Fprintln(os.Stderr, "shuntd: invalid configuration:", err)
				os.Exit(1)
			}
			cfg.Datapath.Cgroup = root
		}
		if err := cfg.WithDefaults().Validate(); err != nil {
			fmt.Fprintln(os.Stderr, "shuntd: invalid configuration:", err)
			os.Exit(1)
		}
		fmt.Println("configuration ok")
		return
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a, err := agent.New(cfg, log, reg)
	if err != nil {
		log.Error("start", "err", err)
		os.Exit(1)
	}
	if err := a.StartXDS(reg); err != nil { // no-op unless xds.enabled
		log.Error("start xds server", "err", err)
		a.Close()
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var kubeDone chan error
	var owner *k8s.OwnerWatch
	if kc := a.Config().Kubernetes; kc != nil {
		src, err := newKubeSource(*kc, a, log, reg)
		if err != nil {
			log.Error("kubernetes", "err", err)
			a.Close()
			os.Exit(1)
		}
		kubeDone = make(chan error, 1)
		go func() { kubeDone <- src.Run(ctx) }()
		log.Info("kubernetes source started", "node", kc.NodeName, "kubeconfig", kc.Kubeconfig)
		if *ownerDS != "" {
			ns, name, _ := strings.Cut(*ownerDS, "/")
			if owner, err = k8s.WatchOwner(ctx, kc.Kubeconfig, ns, name, log); err != nil {
				log.Error("-cleanup-on-uninstall", "err", err)
				a.Close()
				os.Exit(1)
			}
		}
	} else if *ownerDS != "" {
		log.Error("-cleanup-on-uninstall needs the Kubernetes source (-kubernetes or -kubeconfig)")
		a.Close()
		os.Exit(2)
	}
	log.Info("shuntd running", "api", a.Config().APISocket, "metrics", a.Config().MetricsAddr, "xds", a.Config().XDS.Enabled)
	err = a.Run(ctx, reg)
	stop()
	a.StopXDS()
	if kubeDone != nil {
		if kerr := <-kubeDone; kerr != nil && err == nil {
			err = kerr
		}
	}
	a.Close() // programs stay attached through their pinned links
	if owner != nil && owner.Gone() {
		if cerr := cleanupAfterUninstall(a.Config(), log); cerr != nil {
			log.Error("cleanup after uninstall", "err", cerr)
			os.Exit(1)
		}
		log.Info("shuntd stopped and removed the datapath")
		return
	}
	if err != nil {
		log.Error("run", "err", err)
		os.Exit(1)
	}
	if owner != nil && !owner.Seen() {
		log.Warn("the agent's DaemonSet was never seen (RBAC?): could not tell an uninstall from a restart", "daemonset", *ownerDS)
	}
	log.Info("shuntd stopped; datapath left attached (shuntctl cleanup removes it)")
}
