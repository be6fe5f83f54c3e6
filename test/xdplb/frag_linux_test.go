package xdplb

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/test/harness"
)

func init() {
	harness.RegisterApp("bigudp", appBigUDP)
	harness.RegisterApp("bigudpget", appBigUDPGet)
}

// bigudp --listen ADDR:PORT (repeatable) --id ID: answers each UDP
// datagram "N" with one datagram "ID\n" + N deterministic bytes
// (bulkData). Prints READY.
func appBigUDP(args []string) int {
	fs := flag.NewFlagSet("bigudp", flag.ContinueOnError)
	id := fs.String("id", "bigudp", "")
	var listen []string
	fs.Func("listen", "ADDR:PORT", func(s string) error { listen = append(listen, s); return nil })
	if fs.Parse(args) != nil {
		return 2
	}
	for _, l := range listen {
		network := "udp4"
		if ap, err := netip.ParseAddrPort(l); err == nil && ap.Addr().Is6() {
			network = "udp6"
		}
		pc, err := net.ListenPacket(network, l)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				size, err := strconv.Atoi(string(buf[:n]))
				if err != nil || size < 0 || size > 60000 {
					continue
				}
				pc.WriteTo(append([]byte(*id+"\n"), bulkData(size)...), from)
			}
		}()
	}
	fmt.Println("READY")
	select {}
}

// bigUDPResult is what bigudpget prints.
type bigUDPResult struct {
	OK       int            `json:"ok"`
	Fail     int            `json:"fail"`
	Errors   []string       `json:"errors,omitempty"`
	Sources  map[string]int `json:"sources"`
	Backends map[string]int `json:"backends"`
}

// bigudpget --target ADDR:PORT --bytes N --count K: from an unconnected
// socket, K times: asks for N bytes and waits for the answer; an answer
// counts when it is whole (the kernel reassembled every fragment) and
// right. Prints a bigUDPResult.
func appBigUDPGet(args []string) int {
	fs := flag.NewFlagSet("bigudpget", flag.ContinueOnError)
	target := fs.String("target", "", "")
	n := fs.Int("bytes", 4000, "")
	count := fs.Int("count", 10, "")
	timeout := fs.Duration("timeout", 3*time.Second, "")
	if fs.Parse(args) != nil {
		return 2
	}
	res := bigUDPResult{Sources: map[string]int{}, Backends: map[string]int{}}
	fail := func(err error) {
		res.Fail++
		res.Errors = append(res.Errors, err.Error())
	}
	to, err := net.ResolveUDPAddr("udp", *target)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	pc, err := net.ListenUDP("udp", nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer pc.Close()
	want := bulkData(*n)
	buf := make([]byte, 65536)
	for i := 0; i < *count; i++ {
		if _, err := pc.WriteTo([]byte(strconv.Itoa(*n)), to); err != nil {
			fail(err)
			continue
		}
		pc.SetReadDeadline(time.Now().Add(*timeout))
		m, from, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			fail(err)
			continue
		}
		res.Sources[netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String()]++
		id, data, ok := bytes.Cut(buf[:m], []byte("\n"))
		if !ok || !bytes.Equal(data, want) {
			fail(fmt.Errorf("answer of %d bytes from %s is not the %d bytes asked for", m, from, *n))
			continue
		}
		res.Backends[string(id)]++
		res.OK++
	}
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

// TestFragmentedRepliesFromVIP: the backends' links have MTU 1500, so
// their 4000-byte UDP answers leave in three fragments each, of which only
// the first carries the ports. The client gets an answer only if its
// kernel reassembled the datagram, which needs every fragment from the
// same source: the VIP. DSR (each dispatch: the backend side rewrites) and
// SNAT (the load balancer rewrites), IPv4 and IPv6. The counters show every
// later fragment found its first fragment's record (Linux sends a
// datagram's fragments first to last).
func TestFragmentedRepliesFromVIP(t *testing.T) {
	c := newLBCluster(t)
	for i, p := range c.backends {
		ipRun(t, "-n", p.NetNSName(), "link", "set", "dev", "eth0", "mtu", "1500")
		pr := p.Start(harness.ProcOpts{}, "bigudp", "--id", fmt.Sprintf("be%d", i), "--listen", "0.0.0.0:7000", "--listen", "[::]:7000")
		if err := pr.WaitReady(); err != nil {
			t.Fatal(err)
		}
	}
	v4, v6 := c.backendsOf(7000, false, false), c.backendsOf(7000, true, false)
	svc := func(vip string, mode mesh.ForwardingMode, disp mesh.Dispatch, bs []xdp.Backend) xdp.Service {
		return xdp.Service{Frontend: ap(vip), Proto: mesh.UDP, Mode: mode, Dispatch: disp, Backends: bs}
	}
	c.sync([]xdp.Service{
		svc("10.96.0.60:7000", mesh.DSR, mesh.IPIP, v4),
		svc("10.96.0.61:7000", mesh.DSR, mesh.Geneve, v4),
		svc("10.96.0.62:7000", mesh.DSR, mesh.IPOption, v4),
		svc("10.96.0.63:7000", mesh.SNAT, "", v4),
		svc("[fd00:96::60]:7000", mesh.DSR, mesh.IPIP, v6),
		svc("[fd00:96::61]:7000", mesh.DSR, mesh.Geneve, v6),
		svc("[fd00:96::62]:7000", mesh.DSR, mesh.IPOption, v6),
		svc("[fd00:96::63]:7000", mesh.SNAT, "", v6),
	})
	const count = 10
	for _, tc := range []struct {
		name, vip string
		snat      bool
	}{
		{"ipip", "10.96.0.60:7000", false},
		{"geneve", "10.96.0.61:7000", false},
		{"ip option", "10.96.0.62:7000", false},
		{"snat", "10.96.0.63:7000", true},
		{"ip6ip6", "[fd00:96::60]:7000", false},
		{"geneve v6", "[fd00:96::61]:7000", false},
		{"destination option", "[fd00:96::62]:7000", false},
		{"snat v6", "[fd00:96::63]:7000", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lbBefore, dsrBefore := c.lbCounters(), c.dsrCounters()
			out, err := c.client.Run(harness.ProcOpts{Timeout: time.Minute}, "bigudpget", "--target", tc.vip, "--bytes", "4000", "--count", strconv.Itoa(count))
			if err != nil {
				t.Fatalf("bigudpget: %v\n%s", err, out)
			}
			var r bigUDPResult
			if err := json.Unmarshal(out, &r); err != nil {
				t.Fatalf("bigudpget output %q: %v", out, err)
			}
			lb, ds := delta(c.lbCounters(), lbBefore), delta(c.dsrCounters(), dsrBefore)
			t.Logf("%+v; load balancer %v; backends %v", r, lb, ds)
			if r.OK != count {
				t.Errorf("%d of %d answers of 4000 bytes arrived whole: %v", r.OK, count, r.Errors)
			}
			for src := range r.Sources {
				if src != tc.vip {
					t.Errorf("answers came from %s, want the VIP %s", src, tc.vip)
				}
			}
			// Three fragments per answer: the first and two later ones.
			first, later, unknown := ds["out_frag_first"], ds["out_frag_later"], ds["out_frag_unknown"]
			if tc.snat {
				first, later, unknown = lb["frag_first"], lb["frag_later"], lb["frag_unknown"]
			}
			if first != count || later != 2*count || unknown != 0 {
				t.Errorf("fragments rewritten: %d first, %d later, %d without record; want %d, %d, 0", first, later, unknown, count, 2*count)
			}
			if lb["pass_fragment"] != 0 || ds["out_error"] != 0 || ds["revnat_full"] != 0 {
				t.Errorf("load balancer passed %d fragments; backend errors %v", lb["pass_fragment"], ds)
			}
		})
	}
}
