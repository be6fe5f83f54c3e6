package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/mesh"
)

// DefaultConfigPath is where shuntd reads its configuration.
const DefaultConfigPath = "/etc/shunt/shunt.yaml"

// Config is shuntd's configuration file (/etc/shunt/shunt.yaml). Every field
// is optional; see Defaults.
type Config struct {
	Datapath datapath.Config `json:"datapath"`
	// HostNetNS is the node's network namespace: its sockets are always
	// translated. Default: the agent's own (/proc/self/ns/net).
	HostNetNS string         `json:"hostNetNS,omitempty"`
	SocketLB  SocketLBConfig `json:"socketLB"`
	// APISocket is the unix socket shuntctl talks to.
	APISocket string `json:"apiSocket,omitempty"`
	// MetricsAddr serves /metrics and /healthz over TCP ("" disables; the
	// API socket serves them too).
	MetricsAddr string `json:"metricsAddr,omitempty"`
	// StateFile keeps run-time changes (shuntctl service/pod update and
	// delete) across agent restarts.
	StateFile string `json:"stateFile,omitempty"`
	// XDS is the xDS server for the node's sidecars.
	XDS XDSConfig `json:"xds"`
	// XDP is the north-south load balancer (XDP Maglev + DSR), off unless
	// devices are listed.
	XDP xdp.Config `json:"xdp,omitzero"`
	// Services and Pods are the standalone desired state.
	Services []ServiceConfig `json:"services,omitempty"`
	Pods     []mesh.Pod      `json:"pods,omitempty"`
	// Kubernetes, when present, adds the Kubernetes source (agent/k8s).
	// Without it shuntd runs standalone and never talks to a cluster.
	Kubernetes *KubernetesConfig `json:"kubernetes,omitempty"`
}

// SourceKubernetes is the source name of the Kubernetes informers.
const SourceKubernetes = "kubernetes"

// KubernetesConfig configures the Kubernetes source: the cluster's Services
// and EndpointSlices become mesh services, and this node's pods in namespaces
// labelled shunt.dev/enabled=true are enrolled.
type KubernetesConfig struct {
	// Kubeconfig is a kubeconfig file; empty means the in-cluster
	// configuration (service account of the agent's pod).
	Kubeconfig string `json:"kubeconfig,omitempty"`
	// NodeName is this node's name: pods are watched with
	// spec.nodeName=NodeName. Default: $NODE_NAME, else the host name.
	NodeName string `json:"nodeName,omitempty"`
	// NodeAddresses are the addresses NodePort frontends listen on. Default:
	// the InternalIP and ExternalIP addresses of the Node object.
	NodeAddresses []string `json:"nodeAddresses,omitempty"`
	// CgroupRoots are the cgroup hierarchies searched for a pod's cgroup
	// (kubelet's cgroupfs and systemd layouts). Default: the cgroup v2
	// mount, then on v1 and hybrid hosts the pids, memory and systemd
	// hierarchies under /sys/fs/cgroup.
	CgroupRoots []string `json:"cgroupRoots,omitempty"`
	// PodSocketLB is the socketLB mode of enrolled pods: translate (the
	// default: enrolled pods are balanced by Shunt even with
	// socketLB.hostNamespaceOnly) or inherit.
	PodSocketLB string `json:"podSocketLB,omitempty"`
	// Coalesce is how long events are gathered before one change is applied
	// when events keep coming (Go duration, default 2ms); after a quiet
	// spell the first event is applied at once.
	Coalesce string `json:"coalesce,omitempty"`
}

// DefaultCoalesce is KubernetesConfig.Coalesce's default.
const DefaultCoalesce = "2ms"

// WithDefaults fills empty fields; NodeName comes from $NODE_NAME or the
// host name.
func (k KubernetesConfig) WithDefaults() KubernetesConfig {
	if k.NodeName == "" {
		k.NodeName = os.Getenv("NODE_NAME")
	}
	if k.NodeName == "" {
		k.NodeName, _ = os.Hostname()
	}
	if k.PodSocketLB == "" {
		k.PodSocketLB = string(mesh.Translate)
	}
	if k.Coalesce == "" {
		k.Coalesce = DefaultCoalesce
	}
	return k
}

// Validate checks the fields that can be checked without a cluster.
func (k KubernetesConfig) Validate() error {
	if k.NodeName == "" {
		return &mesh.FieldError{Field: "kubernetes.nodeName", Msg: "must not be empty (set it, $NODE_NAME or a host name)"}
	}
	for i, a := range k.NodeAddresses {
		if _, err := netip.ParseAddr(a); err != nil {
			return &mesh.FieldError{Field: fmt.Sprintf("kubernetes.nodeAddresses[%d]", i), Msg: fmt.Sprintf("%q is not an IP address", a)}
		}
	}
	switch mesh.HostNSOnly(k.PodSocketLB) {
	case mesh.Translate, "inherit":
	default:
		return &mesh.FieldError{Field: "kubernetes.podSocketLB", Msg: fmt.Sprintf("unknown value %q (want translate or inherit)", k.PodSocketLB)}
	}
	if d, err := time.ParseDuration(k.Coalesce); err != nil || d < 0 || d > time.Second {
		return &mesh.FieldError{Field: "kubernetes.coalesce", Msg: fmt.Sprintf("%q is not a duration between 0 and 1s", k.Coalesce)}
	}
	return nil
}

// SocketLBConfig holds the socket LB settings.
type SocketLBConfig struct {
	// HostNamespaceOnly: only sockets of the node's network namespace are
	// translated; pods see the VIP (their sidecar or the kernel's rules
	// balance it) unless a pod overrides it with socketLB: translate.
	HostNamespaceOnly bool `json:"hostNamespaceOnly"`
}

// ServiceConfig is a service as written in YAML and sent by shuntctl.
type ServiceConfig struct {
	Name      string `json:"name"`
	Frontend  string `json:"frontend"`
	Protocol  string `json:"protocol,omitempty"`
	Algorithm string `json:"algorithm,omitempty"`
	Mode      string `json:"mode,omitempty"`
	Dispatch  string `json:"dispatch,omitempty"`
	// AffinityTimeoutSeconds > 0: a client (a pod, or the node) keeps its
	// backend while it connects again within this many seconds.
	AffinityTimeoutSeconds uint32          `json:"affinityTimeoutSeconds,omitempty"`
	Backends               []BackendConfig `json:"backends"`
}

// BackendConfig is one backend in YAML; an absent weight means 1.
type BackendConfig struct {
	Addr   string  `json:"addr"`
	Weight *uint32 `json:"weight,omitempty"`
	State  string  `json:"state,omitempty"`
	Name   string  `json:"name,omitempty"`
	// Tunnel is the XDP load balancer's encapsulation target for this
	// backend (default: its own address).
	Tunnel string `json:"tunnel,omitempty"`
}

// Defaults.
const (
	DefaultAPISocket   = "/run/shunt/shuntd.sock"
	DefaultMetricsAddr = "127.0.0.1:9967"
	DefaultStateFile   = "/var/lib/shunt/state.json"
	DefaultHostNetNS   = "/proc/self/ns/net"
)

// WithDefaults fills empty fields.
func (c Config) WithDefaults() Config {
	c.Datapath = c.Datapath.WithDefaults()
	if c.HostNetNS == "" {
		c.HostNetNS = DefaultHostNetNS
	}
	if c.APISocket == "" {
		c.APISocket = DefaultAPISocket
	}
	if c.StateFile == "" {
		c.StateFile = DefaultStateFile
	}
	c.XDS = c.XDS.WithDefaults()
	if c.Kubernetes != nil {
		k := c.Kubernetes.WithDefaults()
		c.Kubernetes = &k
	}
	return c
}

// ParseConfig parses YAML strictly: unknown fields are errors that name
// the field.
func ParseConfig(data []byte) (Config, error) {
	var c Config
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return c, fmt.Errorf("config: %w", err)
	}
	return c, nil
}

// LoadConfig reads and parses path. A missing default path is not an error.
func LoadConfig(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && path == DefaultConfigPath {
		return Config{}, nil
	}
	if err != nil {
		return Config{}, err
	}
	c, err := ParseConfig(data)
	if err != nil {
		return c, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// Validate checks the whole configuration, including its services.
func (c Config) Validate() error {
	if err := c.Datapath.Validate(); err != nil {
		return err
	}
	if err := c.XDS.Validate(); err != nil {
		return err
	}
	if err := c.XDP.Validate(); err != nil {
		return err
	}
	if c.Kubernetes != nil {
		if err := c.Kubernetes.Validate(); err != nil {
			return err
		}
	}
	_, err := c.State()
	return err
}

// State converts the configured services and pods into a validated model.
func (c Config) State() (*mesh.State, error) {
	st := &mesh.State{Pods: append([]mesh.Pod(nil), c.Pods...)}
	for i, sc := range c.Services {
		s, err := sc.Service(fmt.Sprintf("services[%d]", i))
		if err != nil {
			return nil, err
		}
		st.Services = append(st.Services, s)
	}
	if err := st.Validate(); err != nil {
		return nil, err
	}
	return st, nil
}

// Service converts and validates one service; prefix names it in errors.
func (sc ServiceConfig) Service(prefix string) (mesh.Service, error) {
	s := mesh.Service{Name: sc.Name, Algorithm: mesh.Algorithm(strings.ToLower(sc.Algorithm)), Mode: mesh.ForwardingMode(strings.ToLower(sc.Mode)),
		Dispatch: mesh.Dispatch(strings.ToLower(sc.Dispatch)), AffinityTimeout: sc.AffinityTimeoutSeconds}
	fe, err := netip.ParseAddrPort(sc.Frontend)
	if err != nil {
		return s, &mesh.FieldError{Field: prefix + ".frontend", Msg: fmt.Sprintf("%q is not ADDR:PORT (IPv6 as [ADDR]:PORT)", sc.Frontend)}
	}
	p, err := mesh.ParseProtocol(sc.Protocol)
	if err != nil {
		return s, &mesh.FieldError{Field: prefix + ".protocol", Msg: err.Error()}
	}
	s.Frontend = mesh.Frontend{Addr: fe, Proto: p}
	for j, bc := range sc.Backends {
		bp := fmt.Sprintf("%s.backends[%d]", prefix, j)
		a, err := netip.ParseAddrPort(bc.Addr)
		if err != nil {
			return s, &mesh.FieldError{Field: bp + ".addr", Msg: fmt.Sprintf("%q is not ADDR:PORT", bc.Addr)}
		}
		b := mesh.Backend{Addr: a, Weight: 1, State: mesh.BackendState(strings.ToLower(bc.State)), Name: bc.Name}
		if bc.Weight != nil {
			b.Weight = *bc.Weight
		}
		if bc.Tunnel != "" {
			if b.Tunnel, err = netip.ParseAddr(bc.Tunnel); err != nil {
				return s, &mesh.FieldError{Field: bp + ".tunnel", Msg: fmt.Sprintf("%q is not an IP address", bc.Tunnel)}
			}
		}
		s.Backends = append(s.Backends, b)
	}
	if err := s.Validate(prefix); err != nil {
		return s, err
	}
	return s, nil
}

// ServiceConfigOf converts a model service back to its config form.
func ServiceConfigOf(s mesh.Service) ServiceConfig {
	sc := ServiceConfig{Name: s.Name, Frontend: s.Frontend.Addr.String(), Protocol: string(s.Frontend.Proto), Algorithm: string(s.Algorithm), Mode: string(s.Mode), Dispatch: string(s.Dispatch),
		AffinityTimeoutSeconds: s.AffinityTimeout}
	for _, b := range s.Backends {
		w := b.Weight
		bc := BackendConfig{Addr: b.Addr.String(), Weight: &w, State: string(b.State), Name: b.Name}
		if b.Tunnel.IsValid() {
			bc.Tunnel = b.Tunnel.String()
		}
		sc.Backends = append(sc.Backends, bc)
	}
	return sc
}
