package harness

import (
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// HAProxyOpts configures an haproxy sidecar. Zero values take the defaults.
type HAProxyOpts struct {
	// OutboundPort (default 15001) listens on 127.0.0.1; InboundPort
	// (default 15006) on 0.0.0.0. IPv4 only: see HAProxySidecarConfig.
	OutboundPort, InboundPort uint16
	// NoInbound omits the inbound listener.
	NoInbound bool
	// MaxConn is haproxy's global maxconn (default 4096).
	MaxConn int
	// UID/GID of the process (default 1337/1337).
	UID, GID uint32
}

func (o HAProxyOpts) withDefaults() HAProxyOpts {
	if o.OutboundPort == 0 {
		o.OutboundPort = SidecarOutboundPort
	}
	if o.InboundPort == 0 {
		o.InboundPort = SidecarInboundPort
	}
	if o.MaxConn == 0 {
		o.MaxConn = 4096
	}
	if o.UID == 0 {
		o.UID = SidecarUID
	}
	if o.GID == 0 {
		o.GID = o.UID
	}
	return o
}

// HAProxySidecarConfig returns an haproxy configuration for the sidecar role
// in TCP mode, with its admin socket at adminSock:
//
//   - frontend outbound on 127.0.0.1:<OutboundPort>, backend with the single
//     server "0.0.0.0" and no port: haproxy connects to the connection's
//     original destination address and port. On Linux it reads them with
//     getsockopt(SO_ORIGINAL_DST) on the accepted socket (haproxy's
//     sock_inet_get_dst, IPv4 only: for IPv6 sockets haproxy 2.6 uses
//     getsockname, which would point back at the listener, so there is no
//     IPv6 listener);
//   - frontend inbound on 0.0.0.0:<InboundPort>, backend server 127.0.0.1
//     with no port: the original destination port on loopback (Envoy's
//     inbound passthrough).
//
// No "option splice-*": haproxy relays with recv/send.
func HAProxySidecarConfig(o HAProxyOpts, adminSock string) string {
	o = o.withDefaults()
	var b strings.Builder
	w := func(f string, a ...any) { fmt.Fprintf(&b, f+"\n", a...) }
	w("global")
	w("\tmaxconn %d", o.MaxConn)
	w("\tstats socket %s mode 600 level admin", adminSock)
	w("")
	w("defaults")
	w("\tmode tcp")
	w("\ttimeout connect 5s")
	w("\ttimeout client 5m")
	w("\ttimeout server 5m")
	w("")
	w("frontend outbound")
	w("\tbind 127.0.0.1:%d", o.OutboundPort)
	w("\tdefault_backend original_dst")
	w("")
	w("backend original_dst")
	w("\tserver original 0.0.0.0")
	if !o.NoInbound {
		w("")
		w("frontend inbound")
		w("\tbind 0.0.0.0:%d", o.InboundPort)
		w("\tdefault_backend inbound_passthrough")
		w("")
		w("backend inbound_passthrough")
		w("\tserver local 127.0.0.1")
	}
	return b.String()
}

// HAProxy is an haproxy sidecar running in a pod.
type HAProxy struct {
	*Proc
	Dir       string // holds haproxy.cfg and the admin socket
	AdminSock string
}

// StartHAProxySidecar writes HAProxySidecarConfig to a directory owned by the
// proxy's uid (removed at cleanup), starts `haproxy -db -f <cfg>` in the pod
// as uid/gid 1337, and waits until its admin socket answers.
func (p *Pod) StartHAProxySidecar(o HAProxyOpts) (*HAProxy, error) {
	p.env.t.Helper()
	o = o.withDefaults()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "shunt-haproxy-")
	if err != nil {
		return nil, err
	}
	p.env.t.Cleanup(func() { os.RemoveAll(dir) })
	if err := errors.Join(os.Chmod(dir, 0o755), os.Chown(dir, int(o.UID), int(o.GID))); err != nil {
		return nil, err
	}
	h := &HAProxy{Dir: dir, AdminSock: filepath.Join(dir, "admin.sock")}
	cfg := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(HAProxySidecarConfig(o, h.AdminSock)), 0o644); err != nil {
		return nil, err
	}
	h.Proc = p.StartCmd(ProcOpts{SetUser: true, UID: o.UID, GID: o.GID}, bin, "-db", "-f", cfg)
	deadline := time.Now().Add(defaultReadyTimeout)
	for {
		_, err := h.Command("show info")
		if err == nil {
			return h, nil
		}
		select {
		case <-h.Done():
			return nil, fmt.Errorf("haproxy exited: %v; output: %s %s", h.exitError(), tail(h.Stdout()), tail(h.Stderr()))
		default:
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("haproxy: admin socket not answering after %v: %v; stderr: %s", defaultReadyTimeout, err, tail(h.Stderr()))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Command runs one admin socket command and returns the answer.
func (h *HAProxy) Command(cmd string) (string, error) {
	c, err := net.DialTimeout("unix", h.AdminSock, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

// HAProxyStat is one row of `show stat`.
type HAProxyStat struct {
	Proxy, Server string // pxname, svname (FRONTEND, BACKEND or a server name)
	Total         uint64 // stot: sessions so far
	Current       uint64 // scur
	ConnErrors    uint64 // econ: failed connections to a server
}

// Stats returns `show stat` rows.
func (h *HAProxy) Stats() ([]HAProxyStat, error) {
	out, err := h.Command("show stat")
	if err != nil {
		return nil, err
	}
	out = strings.TrimPrefix(strings.TrimSpace(out), "# ")
	recs, err := csv.NewReader(strings.NewReader(out)).ReadAll()
	if err != nil || len(recs) < 1 {
		return nil, fmt.Errorf("show stat: %v: %q", err, out)
	}
	col := map[string]int{}
	for i, name := range recs[0] {
		col[name] = i
	}
	num := func(r []string, name string) uint64 {
		if i, ok := col[name]; ok && i < len(r) {
			v, _ := strconv.ParseUint(r[i], 10, 64)
			return v
		}
		return 0
	}
	var rows []HAProxyStat
	for _, r := range recs[1:] {
		if len(r) < 2 {
			continue
		}
		rows = append(rows, HAProxyStat{Proxy: r[0], Server: r[1], Total: num(r, "stot"), Current: num(r, "scur"), ConnErrors: num(r, "econ")})
	}
	return rows, nil
}

// Connections reports the sessions accepted by the outbound and inbound
// frontends (see compat.Proxy).
func (h *HAProxy) Connections() (outbound, inbound uint64, err error) {
	rows, err := h.Stats()
	if err != nil {
		return 0, 0, err
	}
	for _, r := range rows {
		if r.Server != "FRONTEND" {
			continue
		}
		switch r.Proxy {
		case "outbound":
			outbound = r.Total
		case "inbound":
			inbound = r.Total
		}
	}
	return outbound, inbound, nil
}
