package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// DefaultRoot is the default bpffs folder for Shunt's pins.
const DefaultRoot = "/sys/fs/bpf/shunt"

// Config is the datapath part of the agent's configuration.
type Config struct {
	// Root is the bpffs folder holding pins. Default DefaultRoot.
	Root string `json:"bpffsRoot,omitempty"`
	// Cgroup is the cgroup v2 folder the programs attach to. Required
	// (the agent fills in the cgroup v2 root by default).
	Cgroup string `json:"cgroup,omitempty"`
	// Capacities of the maps (entries).
	MaxServices uint32 `json:"maxServices,omitempty"`
	MaxSlots    uint32 `json:"maxSlots,omitempty"`
	MaxRevNAT   uint32 `json:"maxRevNAT,omitempty"`
	MaxPods     uint32 `json:"maxPods,omitempty"`
	// MaxSockets bounds the accelerated sockets (sockhash) and the
	// original-destination records of steered connections.
	MaxSockets uint32 `json:"maxSockets,omitempty"`
	// RedirectQueueBytes is how much an accelerated socket may have
	// waiting in its peer's queue before sends take TCP (back-pressure);
	// the peer's receive buffer counts when larger. Default 4 MiB, or the
	// maximum of net.ipv4.tcp_rmem when that is smaller.
	RedirectQueueBytes uint32 `json:"redirectQueueBytes,omitempty"`
}

// Defaults for Config.
const (
	DefaultMaxServices = 65536
	DefaultMaxSlots    = 1 << 20
	DefaultMaxRevNAT   = 1 << 18
	DefaultMaxPods     = 16384
	DefaultMaxSockets  = 1 << 17
	// DefaultRedirectQueueBytes bounds the memory a redirected stream may
	// hold beyond what TCP would (per accelerated socket).
	DefaultRedirectQueueBytes = 4 << 20
)

// WithDefaults returns c with empty fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.Root == "" {
		c.Root = DefaultRoot
	}
	if c.MaxServices == 0 {
		c.MaxServices = DefaultMaxServices
	}
	if c.MaxSlots == 0 {
		c.MaxSlots = DefaultMaxSlots
	}
	if c.MaxRevNAT == 0 {
		c.MaxRevNAT = DefaultMaxRevNAT
	}
	if c.MaxPods == 0 {
		c.MaxPods = DefaultMaxPods
	}
	if c.MaxSockets == 0 {
		c.MaxSockets = DefaultMaxSockets
	}
	if c.RedirectQueueBytes == 0 {
		c.RedirectQueueBytes = min(DefaultRedirectQueueBytes, tcpRmemMax())
	}
	return c
}

// tcpRmemMax reads the largest TCP receive buffer of the agent's network
// namespace (the third field of net.ipv4.tcp_rmem).
func tcpRmemMax() uint32 {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_rmem")
	if err != nil {
		return DefaultRedirectQueueBytes
	}
	f := strings.Fields(string(b))
	if len(f) != 3 {
		return DefaultRedirectQueueBytes
	}
	n, err := strconv.ParseUint(f[2], 10, 32)
	if err != nil || n < 64<<10 {
		return DefaultRedirectQueueBytes
	}
	return uint32(n)
}

// Validate reports the first invalid field.
func (c Config) Validate() error {
	if c.Cgroup == "" {
		return errors.New("datapath.cgroup: must be set")
	}
	if !filepath.IsAbs(c.Root) {
		return fmt.Errorf("datapath.bpffsRoot: %q is not an absolute path", c.Root)
	}
	if c.MaxServices < 1 || c.MaxServices > 1<<20 {
		return fmt.Errorf("datapath.maxServices: %d out of range 1..%d", c.MaxServices, 1<<20)
	}
	if c.MaxSlots < 16 || c.MaxSlots > 1<<26 {
		return fmt.Errorf("datapath.maxSlots: %d out of range 16..%d", c.MaxSlots, 1<<26)
	}
	if c.MaxRevNAT < 1024 || c.MaxRevNAT > 1<<26 {
		return fmt.Errorf("datapath.maxRevNAT: %d out of range 1024..%d", c.MaxRevNAT, 1<<26)
	}
	if c.RedirectQueueBytes < 64<<10 || c.RedirectQueueBytes > 1<<30 {
		return fmt.Errorf("datapath.redirectQueueBytes: %d out of range %d..%d", c.RedirectQueueBytes, 64<<10, 1<<30)
	}
	if c.MaxPods < 16 || c.MaxPods > 1<<20 {
		return fmt.Errorf("datapath.maxPods: %d out of range 16..%d", c.MaxPods, 1<<20)
	}
	if c.MaxSockets < 1024 || c.MaxSockets > 1<<24 {
		return fmt.Errorf("datapath.maxSockets: %d out of range 1024..%d", c.MaxSockets, 1<<24)
	}
	return nil
}
