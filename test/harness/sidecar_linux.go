package harness

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The sidecar app is a transparent TCP proxy in the role of Istio's Envoy:
// outbound listeners on loopback take the pod's redirected outbound
// connections and forward them to their original destination; inbound
// listeners take connections redirected to the pod's inbound port and forward
// them to 127.0.0.1 (or ::1) at the original destination port, as Envoy's
// inbound passthrough does. The original destination comes from
// getsockopt(SO_ORIGINAL_DST) (IPv6: IP6T_SO_ORIGINAL_DST), answered by
// netfilter after an iptables REDIRECT or by Shunt's cgroup getsockopt hook.
//
// It relays with explicit read/write loops, never io.Copy or splice between
// the two sockets (splice stalls on sockets in a sockmap), propagates
// half-closes (EOF on one side: shutdown(SHUT_WR) on the other; both done:
// close) and resets (a read or write error on one side: SO_LINGER 0 and close
// on both, so the other peer gets an RST).

func init() { RegisterApp("sidecar", appSidecar) }

// Sidecar defaults: Istio's ports and proxy uid/gid.
const (
	SidecarUID          = 1337
	SidecarOutboundPort = 15001
	SidecarInboundPort  = 15006
)

// soOriginalDst is SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and
// IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h): both 80.
const soOriginalDst = 80

// OriginalDst asks the kernel for the original destination of an accepted
// TCP socket: getsockopt(SOL_IP, SO_ORIGINAL_DST) for IPv4 sockets,
// getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) for IPv6 ones.
func OriginalDst(fd int, v6 bool) (netip.AddrPort, error) {
	var buf [unix.SizeofSockaddrInet6]byte
	l := uint32(len(buf))
	level := unix.SOL_IP
	if v6 {
		level = unix.SOL_IPV6
	}
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), soOriginalDst,
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return netip.AddrPort{}, e
	}
	port := binary.BigEndian.Uint16(buf[2:4])
	switch fam := *(*uint16)(unsafe.Pointer(&buf[0])); {
	case fam == unix.AF_INET && l >= unix.SizeofSockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port), nil
	case fam == unix.AF_INET6 && l >= unix.SizeofSockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])), port), nil
	default:
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST: family %d, length %d", fam, l)
	}
}

// SidecarStats are the sidecar app's counters (a "STATS <json>" line on
// SIGUSR1 and at exit).
type SidecarStats struct {
	OutboundAccepted uint64 `json:"outbound_accepted"`
	InboundAccepted  uint64 `json:"inbound_accepted"`
	// OrigDstOK counts answered SO_ORIGINAL_DST queries; OrigDstFailed the
	// connections closed because the query failed.
	OrigDstOK     uint64 `json:"orig_dst_ok"`
	OrigDstFailed uint64 `json:"orig_dst_failed"`
	// Loops counts connections closed because the original destination was
	// the sidecar's own listener (nothing redirected them).
	Loops      uint64 `json:"loops"`
	DialFailed uint64 `json:"dial_failed"`
	// BytesUp: accepted side → upstream; BytesDown: the reverse.
	BytesUp   uint64 `json:"bytes_up"`
	BytesDown uint64 `json:"bytes_down"`
	// HalfCloses counts EOFs passed on as shutdown(SHUT_WR); Resets the
	// connection pairs torn down with an RST after an error.
	HalfCloses uint64 `json:"half_closes"`
	Resets     uint64 `json:"resets"`
	Active     int64  `json:"active"`
	Closed     uint64 `json:"closed"`
}

type sidecarCounters struct {
	outboundAccepted, inboundAccepted, origDstOK, origDstFailed, loops, dialFailed atomic.Uint64
	bytesUp, bytesDown, halfCloses, resets, closed                                 atomic.Uint64
	active                                                                         atomic.Int64
}

func (c *sidecarCounters) snapshot() SidecarStats {
	return SidecarStats{
		OutboundAccepted: c.outboundAccepted.Load(), InboundAccepted: c.inboundAccepted.Load(),
		OrigDstOK: c.origDstOK.Load(), OrigDstFailed: c.origDstFailed.Load(), Loops: c.loops.Load(),
		DialFailed: c.dialFailed.Load(), BytesUp: c.bytesUp.Load(), BytesDown: c.bytesDown.Load(),
		HalfCloses: c.halfCloses.Load(), Resets: c.resets.Load(), Active: c.active.Load(), Closed: c.closed.Load(),
	}
}

type sidecarCfg struct {
	mode    string
	bufSize int
	dialTO  time.Duration
	ctr     *sidecarCounters
	// logConn, when set, prints each accepted connection's original
	// destination (--log-conns).
	logConn func(role string, orig netip.AddrPort)
}

// sidecar [--outbound ADDR:PORT]... [--inbound ADDR:PORT]... [--mode epoll|blocking]
// [--buf BYTES] [--dial-timeout D] [--log-conns]
//
// Defaults: outbound 127.0.0.1:15001 and [::1]:15001, inbound 0.0.0.0:15006
// and [::]:15006 (v6 listeners are v6-only). --mode epoll relays with Go's
// netpoller (a goroutine per direction); --mode blocking with raw blocking
// read/write syscalls (a thread per direction). Prints "LISTEN <role> <addr>"
// per listener, then "READY"; "STATS <json>" (SidecarStats) on SIGUSR1 and
// when it exits on SIGTERM/SIGINT; with --log-conns "CONN <role> <original
// destination>" per connection whose original destination it learned. Run it
// as uid/gid 1337.
func appSidecar(args []string) int {
	fs := flag.NewFlagSet("sidecar", flag.ContinueOnError)
	var outbound, inbound stringList
	fs.Var(&outbound, "outbound", "outbound listener ADDR:PORT (repeatable)")
	fs.Var(&inbound, "inbound", "inbound listener ADDR:PORT (repeatable)")
	mode := fs.String("mode", "epoll", "epoll (Go netpoller) or blocking (raw blocking syscalls)")
	bufSize := fs.Int("buf", 64<<10, "relay buffer per direction")
	dialTO := fs.Duration("dial-timeout", 10*time.Second, "upstream connect timeout (epoll mode)")
	logConns := fs.Bool("log-conns", false, "print CONN <role> <original destination> per connection")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *mode != "epoll" && *mode != "blocking" || *bufSize <= 0 {
		fmt.Fprintln(os.Stderr, "sidecar: --mode epoll|blocking, --buf > 0")
		return 2
	}
	if len(outbound) == 0 && len(inbound) == 0 {
		outbound = stringList{fmt.Sprintf("127.0.0.1:%d", SidecarOutboundPort), fmt.Sprintf("[::1]:%d", SidecarOutboundPort)}
		inbound = stringList{fmt.Sprintf("0.0.0.0:%d", SidecarInboundPort), fmt.Sprintf("[::]:%d", SidecarInboundPort)}
	}
	ctx, stop := signalContext()
	defer stop()
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	cfg := &sidecarCfg{mode: *mode, bufSize: *bufSize, dialTO: *dialTO, ctr: &sidecarCounters{}}
	var out sync.Mutex // one writer of stdout lines
	if *logConns {
		cfg.logConn = func(role string, orig netip.AddrPort) {
			out.Lock()
			fmt.Printf("CONN %s %s\n", role, orig)
			out.Unlock()
		}
	}
	printStats := func() {
		b, _ := json.Marshal(cfg.ctr.snapshot())
		out.Lock()
		fmt.Printf("STATS %s\n", b)
		out.Unlock()
	}
	for _, l := range append(append(stringList{}, outbound...), inbound...) {
		if _, err := netip.ParseAddrPort(l); err != nil {
			fmt.Fprintf(os.Stderr, "sidecar: bad listener %q: %v\n", l, err)
			return 2
		}
	}
	listen := func(list stringList, inb bool) error {
		for _, l := range list {
			ap := netip.MustParseAddrPort(l)
			fd, err := listenRaw(ap, *mode == "epoll")
			if err != nil {
				return fmt.Errorf("listen %s: %w", ap, err)
			}
			role := "outbound"
			if inb {
				role = "inbound"
			}
			fmt.Printf("LISTEN %s %s\n", role, ap)
			go cfg.acceptLoop(fd, ap, inb)
		}
		return nil
	}
	if err := errors.Join(listen(outbound, false), listen(inbound, true)); err != nil {
		fmt.Fprintf(os.Stderr, "sidecar: %v\n", err)
		return 1
	}
	fmt.Println("READY")
	for {
		select {
		case <-usr1:
			printStats()
		case <-ctx.Done():
			printStats()
			return 0
		}
	}
}

// listenRaw opens a TCP listener (v6 listeners v6-only); nonblocking for the
// epoll mode (it becomes a net.Listener), blocking otherwise.
func listenRaw(ap netip.AddrPort, nonblock bool) (int, error) {
	fam := unix.AF_INET
	if ap.Addr().Is6() {
		fam = unix.AF_INET6
	}
	typ := unix.SOCK_STREAM | unix.SOCK_CLOEXEC
	if nonblock {
		typ |= unix.SOCK_NONBLOCK
	}
	fd, err := unix.Socket(fam, typ, 0)
	if err != nil {
		return -1, err
	}
	err = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	if err == nil && fam == unix.AF_INET6 {
		err = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1)
	}
	if err == nil {
		err = unix.Bind(fd, sockaddrOf(ap))
	}
	if err == nil {
		err = unix.Listen(fd, 4096)
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func sockaddrOf(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

func addrPortOf(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

func (cfg *sidecarCfg) acceptLoop(lfd int, bound netip.AddrPort, inbound bool) {
	if cfg.mode == "epoll" {
		f := os.NewFile(uintptr(lfd), "listener")
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			fmt.Fprintf(os.Stderr, "sidecar: %s: %v\n", bound, err)
			os.Exit(1)
		}
		for {
			c, err := ln.(*net.TCPListener).AcceptTCP()
			if err != nil {
				fmt.Fprintf(os.Stderr, "sidecar: accept %s: %v\n", bound, err)
				time.Sleep(10 * time.Millisecond)
				continue
			}
			go cfg.handle(&netRelayConn{c: c}, bound, inbound)
		}
	}
	for {
		fd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
				continue
			}
			fmt.Fprintf(os.Stderr, "sidecar: accept %s: %v\n", bound, err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go cfg.handle(&rawRelayConn{sock: fd}, bound, inbound)
	}
}

// relayConn is one side of a relayed connection.
type relayConn interface {
	fd() (int, error)
	Read(p []byte) (int, error)
	WriteAll(p []byte) error
	CloseWrite() error
	// Reset arms an RST (SO_LINGER 0) and wakes any blocked reader; the RST
	// goes out at Close.
	Reset()
	Close() error
}

func (cfg *sidecarCfg) handle(down relayConn, bound netip.AddrPort, inbound bool) {
	ctr := cfg.ctr
	if inbound {
		ctr.inboundAccepted.Add(1)
	} else {
		ctr.outboundAccepted.Add(1)
	}
	fd, err := down.fd()
	if err != nil {
		down.Close()
		return
	}
	orig, err := OriginalDst(fd, bound.Addr().Is6())
	if err != nil {
		ctr.origDstFailed.Add(1)
		down.Close()
		return
	}
	ctr.origDstOK.Add(1)
	if cfg.logConn != nil {
		role := "outbound"
		if inbound {
			role = "inbound"
		}
		cfg.logConn(role, orig)
	}
	var target netip.AddrPort
	if inbound {
		if orig.Port() == bound.Port() {
			ctr.loops.Add(1)
			down.Close()
			return
		}
		lo := netip.AddrFrom4([4]byte{127, 0, 0, 1})
		if bound.Addr().Is6() {
			lo = netip.IPv6Loopback()
		}
		target = netip.AddrPortFrom(lo, orig.Port())
	} else {
		if sa, err := unix.Getsockname(fd); err == nil && addrPortOf(sa) == orig {
			ctr.loops.Add(1)
			down.Close()
			return
		}
		target = orig
	}
	up, err := cfg.dial(target)
	if err != nil {
		ctr.dialFailed.Add(1)
		// Like Envoy: an upstream that refuses shows up as a reset.
		down.Reset()
		down.Close()
		return
	}
	ctr.active.Add(1)
	relayPair(down, up, cfg.bufSize, ctr)
	ctr.active.Add(-1)
	ctr.closed.Add(1)
}

func (cfg *sidecarCfg) dial(target netip.AddrPort) (relayConn, error) {
	if cfg.mode == "epoll" {
		d := net.Dialer{Timeout: cfg.dialTO}
		c, err := d.Dial("tcp"+family(target.Addr()), target.String())
		if err != nil {
			return nil, err
		}
		return &netRelayConn{c: c.(*net.TCPConn)}, nil
	}
	fam := unix.AF_INET
	if target.Addr().Is6() {
		fam = unix.AF_INET6
	}
	fd, err := unix.Socket(fam, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	for {
		err = unix.Connect(fd, sockaddrOf(target))
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &rawRelayConn{sock: fd}, nil
}

// relayPair copies both directions until both ended, then closes both. An
// error on either side resets both connections.
func relayPair(a, b relayConn, bufSize int, ctr *sidecarCounters) {
	var resetOnce sync.Once
	reset := func() {
		resetOnce.Do(func() {
			ctr.resets.Add(1)
			a.Reset()
			b.Reset()
		})
	}
	var wg sync.WaitGroup
	pipe := func(src, dst relayConn, bytes *atomic.Uint64) {
		defer wg.Done()
		buf := make([]byte, bufSize)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				if werr := dst.WriteAll(buf[:n]); werr != nil {
					reset()
					return
				}
				bytes.Add(uint64(n))
			}
			if err == io.EOF {
				if dst.CloseWrite() != nil {
					reset()
					return
				}
				ctr.halfCloses.Add(1)
				return
			}
			if err != nil {
				reset()
				return
			}
		}
	}
	wg.Add(2)
	go pipe(a, b, &ctr.bytesUp)
	go pipe(b, a, &ctr.bytesDown)
	wg.Wait()
	a.Close()
	b.Close()
}

// netRelayConn relays with Go's netpoller.
type netRelayConn struct{ c *net.TCPConn }

func (n *netRelayConn) fd() (int, error) {
	rc, err := n.c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	err = rc.Control(func(f uintptr) { fd = int(f) })
	return fd, err
}

func (n *netRelayConn) Read(p []byte) (int, error) { return n.c.Read(p) }
func (n *netRelayConn) WriteAll(p []byte) error {
	_, err := n.c.Write(p)
	return err
}
func (n *netRelayConn) CloseWrite() error { return n.c.CloseWrite() }
func (n *netRelayConn) Reset() {
	_ = n.c.SetLinger(0)
	_ = n.c.Close() // wakes the other direction's reader; RST now
}
func (n *netRelayConn) Close() error { return n.c.Close() }

// rawRelayConn relays with blocking syscalls on a raw fd.
type rawRelayConn struct {
	sock   int
	mu     sync.Mutex
	closed bool
}

func (r *rawRelayConn) fd() (int, error) { return r.sock, nil }

func (r *rawRelayConn) Read(p []byte) (int, error) {
	for {
		n, err := unix.Read(r.sock, p)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return 0, err
		case n == 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

func (r *rawRelayConn) WriteAll(p []byte) error {
	for len(p) > 0 {
		n, err := unix.Write(r.sock, p)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

func (r *rawRelayConn) CloseWrite() error { return unix.Shutdown(r.sock, unix.SHUT_WR) }

// Reset sets SO_LINGER 0 and wakes a reader blocked on the socket with
// shutdown(SHUT_RD) (which sends nothing); the RST leaves at Close. A writer
// blocked on a full send buffer is woken with SHUT_RDWR a second later.
func (r *rawRelayConn) Reset() {
	_ = unix.SetsockoptLinger(r.sock, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	_ = unix.Shutdown(r.sock, unix.SHUT_RD)
	time.AfterFunc(time.Second, func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		if !r.closed {
			_ = unix.Shutdown(r.sock, unix.SHUT_RDWR)
		}
	})
}

func (r *rawRelayConn) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	return unix.Close(r.sock)
}

// ---- control from tests ----

// SidecarOpts configures StartSidecar.
type SidecarOpts struct {
	// Mode is "epoll" (default) or "blocking".
	Mode string
	// Outbound and Inbound listeners; both empty = the Istio defaults
	// (127.0.0.1:15001, [::1]:15001, 0.0.0.0:15006, [::]:15006).
	Outbound, Inbound []netip.AddrPort
	// UID/GID of the proxy (default 1337/1337).
	UID, GID uint32
}

// Sidecar is a running sidecar app.
type Sidecar struct {
	*Proc
	mu sync.Mutex // one Stats call at a time
}

// StartSidecar starts the sidecar app in the pod as uid/gid 1337 (or
// opts.UID/GID) and waits until it listens.
func (p *Pod) StartSidecar(opts SidecarOpts) (*Sidecar, error) {
	p.env.t.Helper()
	if opts.UID == 0 {
		opts.UID = SidecarUID
	}
	if opts.GID == 0 {
		opts.GID = opts.UID
	}
	args := []string{}
	if opts.Mode != "" {
		args = append(args, "--mode", opts.Mode)
	}
	for _, a := range opts.Outbound {
		args = append(args, "--outbound", a.String())
	}
	for _, a := range opts.Inbound {
		args = append(args, "--inbound", a.String())
	}
	pr := p.Start(ProcOpts{SetUser: true, UID: opts.UID, GID: opts.GID}, "sidecar", args...)
	if err := pr.WaitReady(); err != nil {
		return nil, err
	}
	return &Sidecar{Proc: pr}, nil
}

// Stats asks the sidecar for its counters (SIGUSR1) and returns them.
func (s *Sidecar) Stats() (SidecarStats, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	before := bytes.Count(s.Stdout(), []byte("STATS "))
	if err := s.Signal(syscall.SIGUSR1); err != nil {
		return SidecarStats{}, err
	}
	err := s.waitOut(defaultReadyTimeout, "STATS line", func(b []byte) bool {
		return bytes.Count(b, []byte("STATS ")) > before && bytes.HasSuffix(b, []byte("\n"))
	})
	if err != nil {
		return SidecarStats{}, err
	}
	return LastSidecarStats(s.Stdout())
}

// LastSidecarStats parses the last "STATS <json>" line of a sidecar's output.
func LastSidecarStats(out []byte) (SidecarStats, error) {
	var st SidecarStats
	i := bytes.LastIndex(out, []byte("STATS "))
	if i < 0 {
		return st, errors.New("no STATS line")
	}
	line, _, _ := bytes.Cut(out[i+len("STATS "):], []byte("\n"))
	if err := json.Unmarshal(line, &st); err != nil {
		return st, fmt.Errorf("STATS %q: %w", line, err)
	}
	return st, nil
}

// Connections reports the accepted outbound and inbound connections (see
// compat.Proxy).
func (s *Sidecar) Connections() (outbound, inbound uint64, err error) {
	st, err := s.Stats()
	return st.OutboundAccepted, st.InboundAccepted, err
}
