package xdp

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/shuntmesh/shunt/bpf"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/mesh/maglev"
)

// Config is the north-south load balancer part of the agent's
// configuration (the `xdp:` section of shunt.yaml).
type Config struct {
	// Devices run the load balancer (xdplb, XDP). Services with algorithm
	// maglev are balanced on them. Empty: no load balancer on this node.
	Devices []string `json:"devices,omitempty"`
	// DSRDevices run the backend side of DSR (dsr, tc ingress + egress):
	// decapsulation and reply rewriting for local backends.
	DSRDevices []string `json:"dsrDevices,omitempty"`
	// Mode is the XDP attach mode: native (default; falls back to generic
	// with a warning when the driver refuses) or generic.
	Mode string `json:"mode,omitempty"`
	// Seed is the cluster-wide Maglev seed: standard base64 of exactly 12
	// bytes (head -c12 /dev/urandom | base64 -w0). Every node must use the
	// same. Required when Devices is set.
	Seed string `json:"seed,omitempty"`
	// TableSize is the Maglev table size M, one of the preset primes
	// (maglev.Sizes); default 16381. Keep M >= 100 x backends per service.
	TableSize uint32 `json:"tableSize,omitempty"`
	// NodeAddr and NodeAddr6 are the node's addresses: the outer source of
	// encapsulated packets and the source of SNATed ones. A service needs
	// the one of each family it uses.
	NodeAddr  string `json:"nodeAddr,omitempty"`
	NodeAddr6 string `json:"nodeAddr6,omitempty"`
	// SNATPorts is the node port range for SNAT, "LO-HI" (default
	// 61000-65535, above Linux's default ephemeral range).
	SNATPorts string `json:"snatPorts,omitempty"`
	// Conntrack selects the kind of LRU of the SNAT and DSR reverse-NAT
	// maps: "percpu" (per-CPU LRU lists, BPF_F_NO_COMMON_LRU; the
	// default) or "shared" (one LRU list with per-CPU free-list caches).
	// With "percpu" each CPU evicts its own entries once it holds
	// maxFlows/CPUs of them. (The conntrack itself is a table of Shunt's
	// own, shared by all CPUs: see bpf/lib/xdplb.h and the README.)
	Conntrack string `json:"conntrack,omitempty"`
	// Capacities.
	MaxServices uint32 `json:"maxServices,omitempty"`
	MaxBackends uint32 `json:"maxBackends,omitempty"`
	// MaxFlows sizes the IPv4 and the IPv6 conntrack (each holds maxFlows
	// flows with room to spare, see CTSets), the SNAT map and the DSR
	// reverse-NAT map.
	MaxFlows uint32 `json:"maxFlows,omitempty"`
	// NetNS is the network namespace the devices are in (a path such as
	// /run/netns/x); default: the agent's own.
	NetNS string `json:"netns,omitempty"`
}

// Defaults.
const (
	DefaultSNATLo      = 61000
	DefaultSNATHi      = 65535
	DefaultMaxServices = 4096
	DefaultMaxBackends = 65536
	DefaultMaxFlows    = 262144
)

// CTSets is the number of sets of each conntrack table (lb_ct4, lb_ct6)
// for maxFlows flows: the power of 2 at or above maxFlows / 2, so a table
// has at least twice maxFlows places (4 flows a set, XLB_CT_WAYS). A flow
// may go to either of two sets; with half the places taken, a new flow
// finds both full about once in 100,000 inserts (it then evicts the flow
// of the eight seen least recently), and a full table holds about 1.85 x
// maxFlows flows. Entries do not expire: finished flows fill the table
// until they are replaced, as in an LRU. A set is 128 bytes in lb_ct4 and 256 in lb_ct6: 64 and
// 128 bytes per flow of maxFlows.
func CTSets(maxFlows uint32) uint32 {
	ways := uint32(bpf.XdplbXlbCtGeometryXLB_CT_WAYS)
	n := uint32(1)
	for n*ways < 2*maxFlows {
		n <<= 1
	}
	return n
}

// Params is a validated Config in parsed form.
type Params struct {
	Seed           maglev.Seed
	TableSize      uint32
	Node4, Node6   netip.Addr
	SNATLo, SNATHi uint16
	Generic        bool
	PerCPULRU      bool
	MaxServices    uint32
	MaxBackends    uint32
	MaxFlows       uint32
}

// Enabled reports whether any device runs a program of this package.
func (c Config) Enabled() bool { return len(c.Devices) > 0 || len(c.DSRDevices) > 0 }

func fieldErr(field, format string, a ...any) error {
	return &mesh.FieldError{Field: "xdp." + field, Msg: fmt.Sprintf(format, a...)}
}

// Validate reports the first invalid field (as a *mesh.FieldError).
func (c Config) Validate() error {
	_, err := c.Parse()
	return err
}

// Parse validates c and returns it with defaults applied.
func (c Config) Parse() (Params, error) {
	p := Params{TableSize: maglev.DefaultSize, SNATLo: DefaultSNATLo, SNATHi: DefaultSNATHi, PerCPULRU: true,
		MaxServices: DefaultMaxServices, MaxBackends: DefaultMaxBackends, MaxFlows: DefaultMaxFlows}
	for _, list := range []struct {
		name string
		devs []string
	}{{"devices", c.Devices}, {"dsrDevices", c.DSRDevices}} {
		seen := map[string]bool{}
		for i, d := range list.devs {
			if d == "" || len(d) > 15 || strings.ContainsAny(d, "/ \t") {
				return p, fieldErr(fmt.Sprintf("%s[%d]", list.name, i), "%q is not an interface name", d)
			}
			if seen[d] {
				return p, fieldErr(fmt.Sprintf("%s[%d]", list.name, i), "duplicate device %q", d)
			}
			seen[d] = true
		}
	}
	switch c.Mode {
	case "", "native":
	case "generic":
		p.Generic = true
	default:
		return p, fieldErr("mode", "unknown XDP mode %q (want native or generic)", c.Mode)
	}
	if c.Seed == "" {
		if len(c.Devices) > 0 {
			return p, fieldErr("seed", "required with devices: the same 12-byte base64 seed on every node (head -c12 /dev/urandom | base64 -w0)")
		}
	} else {
		seed, err := maglev.ParseSeed(c.Seed)
		if err != nil {
			return p, fieldErr("seed", "%v", err)
		}
		p.Seed = seed
	}
	if c.TableSize != 0 {
		if err := maglev.ValidateSize(c.TableSize); err != nil {
			return p, fieldErr("tableSize", "%v", err)
		}
		p.TableSize = c.TableSize
	}
	if c.NodeAddr != "" {
		a, err := netip.ParseAddr(c.NodeAddr)
		if err != nil || !a.Is4() || a.IsUnspecified() {
			return p, fieldErr("nodeAddr", "%q is not an IPv4 address", c.NodeAddr)
		}
		p.Node4 = a
	}
	if c.NodeAddr6 != "" {
		a, err := netip.ParseAddr(c.NodeAddr6)
		if err != nil || !a.Is6() || a.Is4In6() || a.IsUnspecified() || a.Zone() != "" {
			return p, fieldErr("nodeAddr6", "%q is not an IPv6 address", c.NodeAddr6)
		}
		p.Node6 = a
	}
	if c.SNATPorts != "" {
		lo, hi, ok := strings.Cut(c.SNATPorts, "-")
		l, err1 := strconv.ParseUint(lo, 10, 16)
		h, err2 := strconv.ParseUint(hi, 10, 16)
		if !ok || err1 != nil || err2 != nil || l == 0 || h < l {
			return p, fieldErr("snatPorts", "%q is not a port range LO-HI with 1 <= LO <= HI <= 65535", c.SNATPorts)
		}
		p.SNATLo, p.SNATHi = uint16(l), uint16(h)
	}
	switch c.Conntrack {
	case "", "percpu":
	case "shared":
		p.PerCPULRU = false
	default:
		return p, fieldErr("conntrack", "unknown LRU kind %q (want percpu or shared)", c.Conntrack)
	}
	for _, v := range []struct {
		name     string
		val      uint32
		dst      *uint32
		min, max uint32
	}{
		{"maxServices", c.MaxServices, &p.MaxServices, 1, 1 << 16},
		{"maxBackends", c.MaxBackends, &p.MaxBackends, 16, 1 << 16}, // conntrack entries hold 16-bit ids
		{"maxFlows", c.MaxFlows, &p.MaxFlows, 1024, 1 << 26},
	} {
		if v.val == 0 {
			continue
		}
		if v.val < v.min || v.val > v.max {
			return p, fieldErr(v.name, "%d out of range %d..%d", v.val, v.min, v.max)
		}
		*v.dst = v.val
	}
	return p, nil
}
