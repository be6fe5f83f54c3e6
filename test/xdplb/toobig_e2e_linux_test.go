package xdplb

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/shuntmesh/shunt/agent/xdp"
	"github.com/shuntmesh/shunt/mesh"
	"github.com/shuntmesh/shunt/test/harness"
)

func init() {
	harness.RegisterApp("sink", appSink)
	harness.RegisterApp("push", appPush)
}

// sink --listen ADDR:PORT --id ID: per TCP connection reads everything the
// client sends, then answers "ID SHA256HEX\n" and closes. Prints READY.
func appSink(args []string) int {
	return tcpServerApp("sink", args, nil, nil, func(c net.Conn, id string) {
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			return
		}
		fmt.Fprintf(c, "%s %s\n", id, hex.EncodeToString(h.Sum(nil)))
	})
}

// push --target ADDR:PORT --bytes N: connects, sends N deterministic bytes,
// half-closes and checks the digest the sink answers; prints
// {"backend":..., "ok":bool, "error":...}.
func appPush(args []string) int {
	return tcpClientApp("push", args, func(c *net.TCPConn, n int) (string, error) {
		data := bulkData(n)
		if _, err := c.Write(data); err != nil {
			return "", fmt.Errorf("send: %w", err)
		}
		if err := c.CloseWrite(); err != nil {
			return "", err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return "", fmt.Errorf("answer: %w", err)
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return "", fmt.Errorf("answer %q", line)
		}
		if sum := sha256.Sum256(data); f[1] != hex.EncodeToString(sum[:]) {
			return f[0], fmt.Errorf("the sink received other bytes than the %d sent", n)
		}
		return f[0], nil
	})
}

// TestLoadBalancerSendsTooBig: the load balancer's link has MTU 1500, like
// the client's, so the client's full-size packets do not fit once
// encapsulated. The load balancer answers them with ICMP frag-needed /
// packet-too-big itself, the client's socket lowers its segment size, and
// a 2 MB upload completes for every dispatch and family (without the
// answer it stalls: the oversized frames are dropped on the way out).
func TestLoadBalancerSendsTooBig(t *testing.T) {
	c := newLBCluster(t)
	node := c.env.Node().NetNSName()
	ipRun(t, "-n", node, "link", "set", "dev", c.lbPod.HostVeth(), "mtu", "1500")
	ipRun(t, "-n", c.lbPod.NetNSName(), "link", "set", "dev", "eth0", "mtu", "1500")
	for i, p := range c.backends {
		pr := p.Start(harness.ProcOpts{}, "sink", "--id", fmt.Sprintf("be%d", i), "--listen", ":9001")
		if err := pr.WaitReady(); err != nil {
			t.Fatal(err)
		}
	}
	v4, v6 := c.backendsOf(9001, false, false), c.backendsOf(9001, true, false)
	c.sync([]xdp.Service{
		{Frontend: ap("10.96.0.50:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPIP, Backends: v4},
		{Frontend: ap("10.96.0.51:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.Geneve, Backends: v4},
		{Frontend: ap("10.96.0.52:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPOption, Backends: v4},
		{Frontend: ap("[fd00:96::50]:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPIP, Backends: v6},
		{Frontend: ap("[fd00:96::51]:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.Geneve, Backends: v6},
		{Frontend: ap("[fd00:96::52]:80"), Proto: mesh.TCP, Mode: mesh.DSR, Dispatch: mesh.IPOption, Backends: v6},
	})
	for _, vip := range []string{"10.96.0.50:80", "10.96.0.51:80", "10.96.0.52:80", "[fd00:96::50]:80", "[fd00:96::51]:80", "[fd00:96::52]:80"} {
		// Forget path MTUs learnt by the previous upload.
		ipRun(t, "-n", c.client.NetNSName(), "-4", "route", "flush", "cache")
		ipRun(t, "-n", c.client.NetNSName(), "-6", "route", "flush", "cache")
		lbBefore := c.lbCounters()
		out, err := c.client.Run(harness.ProcOpts{Timeout: time.Minute}, "push", "--target", vip, "--bytes", "2000000", "--timeout", "15s")
		if err != nil {
			t.Fatalf("push %s: %v\n%s", vip, err, out)
		}
		var res struct {
			Backend string `json:"backend"`
			OK      bool   `json:"ok"`
			Error   string `json:"error"`
		}
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatalf("push output %q: %v", out, err)
		}
		lb := delta(c.lbCounters(), lbBefore)
		t.Logf("%s: %+v; load balancer %v", vip, res, lb)
		if !res.OK {
			t.Errorf("upload to %s failed: %s", vip, res.Error)
		}
		if lb["tx_too_big"] == 0 {
			t.Errorf("%s: the load balancer sent no ICMP too-big: %v", vip, lb)
		}
		if lb["drop_too_big"] != 0 || lb["pass_malformed"] != 0 || lb["drop_encap"] != 0 {
			t.Errorf("%s: load balancer %v", vip, lb)
		}
	}
}
