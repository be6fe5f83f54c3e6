package harness

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// FreePort returns a TCP port on 127.0.0.1 for a server a test starts
// (etcd, kube-apiserver, a kubelet, Prometheus, an agent's metrics).
//
// It is chosen below both the machine's ephemeral range
// (ip_local_port_range) and Kubernetes' NodePort range (30000-32767), not
// by listening on port 0: a port of the ephemeral range can become the
// source port of any outgoing connection between the check and the
// server's bind (this suite makes thousands), and the server then fails
// with "address already in use" (seen in CI); a NodePort-range port could
// be a Service's node port that a test expects nothing to listen on. In
// the window only another server can take it: the port is random, checked
// by binding it, and never handed out twice by one process (two test
// binaries may still race for one, rarely).
func FreePort() (int, error) { return FreePortOn("127.0.0.1") }

// FreePortOn is FreePort for a server on another local address ("": on
// every address).
func FreePortOn(addr string) (int, error) {
	lo, hi, err := portWindow()
	if err != nil {
		return 0, err
	}
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 200 {
		p := lo + rand.IntN(hi-lo)
		if portsGiven[p] {
			continue
		}
		l, err := net.Listen("tcp", net.JoinHostPort(addr, strconv.Itoa(p)))
		if err != nil {
			continue
		}
		l.Close()
		portsGiven[p] = true
		return p, nil
	}
	return 0, fmt.Errorf("no free port in %d-%d on %s", lo, hi-1, addr)
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{}
)

// portWindow is [lo, hi): from 10000 up to the ephemeral range or the
// NodePort range, whichever starts first.
func portWindow() (lo, hi int, err error) {
	lo, hi = 10000, 30000
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, 0, err
	}
	f := strings.Fields(string(b))
	first := 0
	if len(f) == 2 {
		first, err = strconv.Atoi(f[0])
	}
	if len(f) != 2 || err != nil {
		return 0, 0, fmt.Errorf("ip_local_port_range %q: %v", b, err)
	}
	hi = min(hi, first)
	if hi-lo < 1000 {
		return 0, 0, fmt.Errorf("no port window: the ephemeral range starts at %d", first)
	}
	return lo, hi, nil
}
