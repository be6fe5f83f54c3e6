package bench

import (
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"strings"

	"github.com/shuntmesh/shunt/agent"
)

// Address plan. Everything is in 127.0.0.0/8, which the kernel routes to
// lo in every network namespace: a server bound to 0.0.0.0 answers on all
// of it, so every backend of every service is a real listening server, and
// no packet can leave the namespace.
var (
	vipBase     = netip.MustParseAddr("127.96.0.0")  // service i: vipBase + 1 + i
	backendBase = netip.MustParseAddr("127.100.0.0") // backend k: backendBase + 1 + k
)

const (
	// VIPPort is the services' port. Nothing listens on it: a connection
	// that no datapath translated fails with ECONNREFUSED instead of being
	// counted.
	VIPPort = 80
	// BackendPort is where the servers listen (0.0.0.0).
	BackendPort = 8080
)

// addrAt returns base + off (IPv4).
func addrAt(base netip.Addr, off int) netip.Addr {
	b := base.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += uint32(off)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// VIP is service i's frontend.
func VIP(i int) netip.AddrPort { return netip.AddrPortFrom(addrAt(vipBase, 1+i), VIPPort) }

// Backend is the k-th backend address handed out.
func Backend(k int) netip.AddrPort {
	return netip.AddrPortFrom(addrAt(backendBase, 1+k), BackendPort)
}

// maxServices bounds the address plan: VIPs must stay below backendBase.
const maxServices = 4<<16 - 2

// ServiceSpec is one benchmark service.
type ServiceSpec struct {
	Name     string
	VIP      netip.AddrPort
	Backends []netip.AddrPort
}

// MakeServices returns n services with per backends each, all distinct.
// Backend addresses 0..n*per-1 are used; the caller may hand out further
// ones from n*per on.
func MakeServices(n, per int) []ServiceSpec {
	out := make([]ServiceSpec, n)
	for i := range out {
		s := ServiceSpec{Name: fmt.Sprintf("bench/svc-%05d", i), VIP: VIP(i), Backends: make([]netip.AddrPort, per)}
		for j := range s.Backends {
			s.Backends[j] = Backend(i*per + j)
		}
		out[i] = s
	}
	return out
}

// Config returns s as the agent's service configuration (TCP, weight 1).
func (s ServiceSpec) Config() agent.ServiceConfig {
	sc := agent.ServiceConfig{Name: s.Name, Frontend: s.VIP.String(), Protocol: "TCP"}
	for _, b := range s.Backends {
		sc.Backends = append(sc.Backends, agent.BackendConfig{Addr: b.String()})
	}
	return sc
}

// chainHash names a chain the way kube-proxy does: the first 16 characters
// of the base32 SHA-256 of what the chain stands for.
func chainHash(s string) string {
	sum := sha256.Sum256([]byte(s))
	return base32.StdEncoding.EncodeToString(sum[:])[:16]
}

// KubeProxyRules renders svcs as an iptables-restore input for the nat
// table in the shape kube-proxy's iptables mode gives it:
//
//	OUTPUT → KUBE-SERVICES: one rule per service (-d VIP -p tcp --dport),
//	         in the order of svcs, so the last service is matched last;
//	KUBE-SVC-<hash>: one rule per endpoint, -m statistic --mode random with
//	         probability 1/(n-i), the last one unconditional;
//	KUBE-SEP-<hash>: the hairpin mark (-s endpoint -j KUBE-MARK-MASQ) and the
//	         DNAT to the endpoint.
//
// Without --noflush, iptables-restore replaces the whole nat table with it.
// Only OUTPUT is hooked: the clients are local processes.
func KubeProxyRules(svcs []ServiceSpec) string {
	var chains, rules strings.Builder
	chains.WriteString("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n")
	chains.WriteString(":KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n")
	rules.WriteString("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n")
	rules.WriteString("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n")
	var svcRules, epRules strings.Builder
	for _, s := range svcs {
		svc := "KUBE-SVC-" + chainHash(s.Name+":tcp")
		fmt.Fprintf(&chains, ":%s - [0:0]\n", svc)
		fmt.Fprintf(&rules, "-A KUBE-SERVICES -d %s/32 -p tcp -m comment --comment \"%s cluster IP\" -m tcp --dport %d -j %s\n",
			s.VIP.Addr(), s.Name, s.VIP.Port(), svc)
		n := len(s.Backends)
		for i, b := range s.Backends {
			sep := "KUBE-SEP-" + chainHash(s.Name+":tcp:"+b.String())
			fmt.Fprintf(&chains, ":%s - [0:0]\n", sep)
			fmt.Fprintf(&svcRules, "-A %s -m comment --comment \"%s -> %s\"", svc, s.Name, b)
			if i < n-1 {
				fmt.Fprintf(&svcRules, " -m statistic --mode random --probability %.10f", 1/float64(n-i))
			}
			fmt.Fprintf(&svcRules, " -j %s\n", sep)
			fmt.Fprintf(&epRules, "-A %s -s %s/32 -m comment --comment \"%s\" -j KUBE-MARK-MASQ\n", sep, b.Addr(), s.Name)
			fmt.Fprintf(&epRules, "-A %s -p tcp -m comment --comment \"%s\" -m tcp -j DNAT --to-destination %s\n", sep, s.Name, b)
		}
	}
	return chains.String() + rules.String() + svcRules.String() + epRules.String() + "COMMIT\n"
}

// EmptyNAT is an iptables-restore input that leaves the nat table empty.
const EmptyNAT = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"
