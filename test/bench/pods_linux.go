package bench

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
)

// Pods of the sidecar benchmark: network namespaces joined to one node
// namespace by veth pairs, the way a CNI plugin such as Calico wires pods on
// a node: the pod has ADDR/32 on eth0 and a default route via the link-local
// next hop 169.254.1.1, which the node holds on lo and answers ARP for; the
// node routes ADDR/32 to the pod's veth and forwards between pods.

// podGateway is the pods' next hop, held by the node namespace.
var podGateway = netip.MustParseAddr("169.254.1.1")

// podBase is the first pod address; pod n (1, 2, ...) gets podBase + n.
var podBase = netip.MustParseAddr("10.77.0.0")

// benchPod is one pod: a network namespace with eth0 to the node.
type benchPod struct {
	name   string     // e.g. "on-go-client"
	netns  string     // path /run/netns/shuntbench-<id>-<name>
	ip     netip.Addr // on eth0
	cgroup string     // the pod's cgroup folder; its processes go below it
}

// addNode creates the node namespace shuntbench-<id>-node: lo up with the
// pods' next hop, IPv4 forwarding on.
func (e *env) addNode() (string, error) {
	ns, err := e.addNetNS("node")
	if err != nil {
		return "", err
	}
	if err := ipBatch(ns, [][]string{{"addr", "add", podGateway.String() + "/32", "dev", "lo"}}); err != nil {
		return "", err
	}
	if err := run(nil, "nsenter", "--net="+ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"); err != nil {
		return "", err
	}
	return ns, nil
}

// addPod creates pod n (1..250) named name in namespace
// shuntbench-<id>-<name>, wired to the node namespace node, with its cgroup
// at parent/name.
func (e *env) addPod(node string, n int, name, parent string) (*benchPod, error) {
	if n < 1 || n > 250 {
		return nil, fmt.Errorf("pod index %d out of range 1..250", n)
	}
	ns, err := e.addNetNS(name)
	if err != nil {
		return nil, err
	}
	p := &benchPod{name: name, netns: ns, ip: addrAt(podBase, n), cgroup: filepath.Join(parent, name)}
	if err := os.MkdirAll(p.cgroup, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup: %w", err)
	}
	// Created from the node namespace with the peer placed straight into
	// the pod's: the machine's own namespace never sees either end. Deleting
	// the pod's namespace deletes the pair.
	veth := fmt.Sprintf("sb%s-%d", e.id, n) // ≤ 15 bytes: pids have ≤ 7 digits
	ip := p.ip.String()
	if err := ipBatch(node, [][]string{
		{"link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", filepath.Base(ns)},
		{"link", "set", veth, "up"},
		{"route", "add", ip + "/32", "dev", veth, "scope", "link"},
	}); err != nil {
		return nil, err
	}
	if err := ipBatch(ns, [][]string{
		{"link", "set", "eth0", "up"},
		{"addr", "add", ip + "/32", "dev", "eth0"},
		{"route", "add", podGateway.String() + "/32", "dev", "eth0", "scope", "link"},
		{"route", "add", "default", "via", podGateway.String(), "dev", "eth0", "src", ip},
	}); err != nil {
		return nil, err
	}
	return p, nil
}

// ipBatch runs `ip -batch -` in the namespace at path ns.
func ipBatch(ns string, cmds [][]string) error {
	var b strings.Builder
	for _, c := range cmds {
		b.WriteString(strings.Join(c, " ") + "\n")
	}
	return run(strings.NewReader(b.String()), "ip", "-n", filepath.Base(ns), "-batch", "-")
}

// role returns the cgroup for one process role of the pod (client-t1,
// proxy, server, ...), created on first use.
func (p *benchPod) role(name string) (string, error) {
	dir := filepath.Join(p.cgroup, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cgroup: %w", err)
	}
	return dir, nil
}
