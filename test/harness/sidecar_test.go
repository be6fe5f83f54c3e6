//go:build linux

package harness_test

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/shuntmesh/shunt/test/harness"
)

type proxy interface {
	Connections() (outbound, inbound uint64, err error)
}

// sidecarPods: client and server pods, each with a sidecar started by start
// and Istio's iptables REDIRECT rules, and a serve app in the server pod.
func sidecarPods(t *testing.T, start func(p *harness.Pod) proxy) (client, server *harness.Pod, cp, sp proxy) {
	e := harness.New(t)
	client, server = e.NewPod("client"), e.NewPod("server")
	cp, sp = start(client), start(server)
	for _, p := range []*harness.Pod{client, server} {
		if err := p.RedirectToSidecar(harness.RedirectOpts{}); err != nil {
			t.Fatal(err)
		}
	}
	startServers(t, server, harness.ProcOpts{})
	return client, server, cp, sp
}

func checkThroughProxies(t *testing.T, client, server *harness.Pod, cp, sp proxy, addrs []netip.Addr) {
	t.Helper()
	const n = 4 << 20
	for _, a := range addrs {
		target := netip.AddrPortFrom(a, tcpPort).String()
		r, err := client.Stream(harness.ProcOpts{}, "--target", target, "--bytes", strconv.Itoa(n))
		if err != nil {
			t.Fatal(err)
		}
		if !r.OK || r.Sent != n || r.Received != n || r.SHA256Sent != r.SHA256Received || r.Backend != "server" {
			t.Errorf("stream to %s: %+v", target, r)
		}
		// The app still sees the original destination as its peer.
		if r.Peer != target {
			t.Errorf("stream to %s: getpeername %s", target, r.Peer)
		}
	}
	out, _, err := cp.Connections()
	if err != nil {
		t.Fatal(err)
	}
	_, in, err := sp.Connections()
	if err != nil {
		t.Fatal(err)
	}
	if out != uint64(len(addrs)) || in != uint64(len(addrs)) {
		t.Errorf("client sidecar accepted %d outbound, server sidecar %d inbound; want %d each", out, in, len(addrs))
	}
}

// TestSidecarRedirect: the Go sidecar with Istio's iptables rules in both
// pods relays v4 and v6 streams byte for byte, in both relay modes.
func TestSidecarRedirect(t *testing.T) {
	for _, mode := range []string{"epoll", "blocking"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			var sidecars []*harness.Sidecar
			client, server, cp, sp := sidecarPods(t, func(p *harness.Pod) proxy {
				s, err := p.StartSidecar(harness.SidecarOpts{Mode: mode})
				if err != nil {
					t.Fatal(err)
				}
				sidecars = append(sidecars, s)
				return s
			})
			checkThroughProxies(t, client, server, cp, sp, []netip.Addr{server.IPv4(), server.IPv6()})
			for i, s := range sidecars {
				st, err := s.Stats()
				if err != nil {
					t.Fatal(err)
				}
				if st.OrigDstOK != 2 || st.OrigDstFailed != 0 || st.Loops != 0 || st.DialFailed != 0 || st.Resets != 0 ||
					st.BytesUp < 4<<20 || st.BytesDown < 4<<20 || st.HalfCloses != 4 || st.Closed != 2 || st.Active != 0 {
					t.Errorf("sidecar %d: %+v", i, st)
				}
			}
		})
	}
}

// TestSidecarNotRedirected: a connection that reaches the outbound listener
// without a redirect is closed and counted, not looped.
func TestSidecarNotRedirected(t *testing.T) {
	t.Parallel()
	e := harness.New(t)
	p := e.NewPod("p")
	s, err := p.StartSidecar(harness.SidecarOpts{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := p.Connect(harness.ProcOpts{}, "--target", "127.0.0.1:15001", "--count", "2")
	if err != nil {
		t.Fatal(err)
	}
	if r.OK != 0 {
		t.Errorf("connect to the bare listener succeeded: %v", r)
	}
	st, err := s.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.OutboundAccepted != 2 || st.OrigDstFailed+st.Loops != 2 || st.OrigDstOK != st.Loops {
		t.Errorf("stats: %+v", st)
	}
}

// TestHAProxySidecar: haproxy (Debian) as uid 1337 with the generated
// configuration and Istio's iptables rules relays v4 streams byte for byte.
func TestHAProxySidecar(t *testing.T) {
	t.Parallel()
	client, server, cp, sp := sidecarPods(t, func(p *harness.Pod) proxy {
		h, err := p.StartHAProxySidecar(harness.HAProxyOpts{})
		if err != nil {
			t.Fatal(err)
		}
		return h
	})
	checkThroughProxies(t, client, server, cp, sp, []netip.Addr{server.IPv4()})
}

func TestIstioRules(t *testing.T) {
	r := harness.IstioRules(harness.RedirectOpts{ExcludeInboundPorts: []uint16{22}}, true)
	for _, want := range []string{
		"-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN\n",
		"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n",
		"-A ISTIO_OUTPUT ! -d ::1/128 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT\n",
		"-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n",
		"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n",
	} {
		if !strings.Contains(r, want) {
			t.Errorf("rules lack %q:\n%s", want, r)
		}
	}
}
