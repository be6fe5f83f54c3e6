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
// It is chosen below the machine's ephemeral range (ip_local_port_range),
// not by listening on port 0: a port of that range can become the source
// port of any outgoing connection between the check and the server's bind
// (this suite makes thousands), and the server then fails with "address
// already in use" (seen in CI). Below the range only another server can
// take it: the port is random among 16,384, checked by binding it, and
// never handed out twice by one process.
func FreePort() (int, error) { return FreePortOn("127.0.0.1") }

// FreePortOn is FreePort for a server on another local address.
func FreePortOn(addr string) (int, error) {
	lo, hi := portWindow()
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

// portWindow is [lo, hi): the 16,384 ports below the ephemeral range (or
// 16384-32767 when the range cannot be read or leaves no room).
func portWindow() (lo, hi int) {
	lo, hi = 16384, 32768
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return lo, hi
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return lo, hi
	}
	first, err := strconv.Atoi(f[0])
	if err != nil || first-16384 < 1024 {
		return lo, hi
	}
	return first - 16384, first
}
