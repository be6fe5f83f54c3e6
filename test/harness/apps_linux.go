package harness

import (
	"bufio"
	"bytes"
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Helper apps run when the test binary is re-executed with SHUNT_HARNESS_APP.
// They use only the standard library and x/sys/unix, and never io.Copy
// between sockets.

var (
	appsMu sync.RWMutex
	apps   = map[string]func(args []string) int{
		"serve":   appServe,
		"connect": appConnect,
		"stream":  appStream,
		"info":    appInfo,
		"pause":   appPause,
	}
)

// RegisterApp adds a helper app the test binary can be re-executed as (from
// an init function or before Main, in the test package).
func RegisterApp(name string, fn func(args []string) int) {
	appsMu.Lock()
	defer appsMu.Unlock()
	apps[name] = fn
}

func lookupApp(name string) (func([]string) int, bool) {
	appsMu.RLock()
	defer appsMu.RUnlock()
	fn, ok := apps[name]
	return fn, ok
}

// RunApp runs helper app name with args and returns its exit code.
func RunApp(name string, args []string) int {
	fn, ok := lookupApp(name)
	if !ok {
		fmt.Fprintf(os.Stderr, "harness: unknown app %q\n", name)
		return 2
	}
	return fn(args)
}

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "4"
	}
	return "6"
}

// formatSockaddr prints a socket address exactly as the kernel reported it
// (v4-mapped v6 addresses stay mapped).
func formatSockaddr(sa unix.Sockaddr) string {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)).String()
	case *unix.SockaddrInet6:
		a := netip.AddrFrom16(sa.Addr)
		if sa.ZoneId != 0 {
			a = a.WithZone(strconv.FormatUint(uint64(sa.ZoneId), 10))
		}
		return netip.AddrPortFrom(a, uint16(sa.Port)).String()
	case nil:
		return "?"
	default:
		return fmt.Sprintf("%T", sa)
	}
}

// sockNames returns getsockname() and getpeername() of a socket.
func sockNames(c syscall.Conn) (local, peer string) {
	local, peer = "?", "?"
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		if sa, err := unix.Getsockname(int(fd)); err == nil {
			local = formatSockaddr(sa)
		}
		if sa, err := unix.Getpeername(int(fd)); err == nil {
			peer = formatSockaddr(sa)
		}
	})
	return
}

// appError is an error label of the apps that is not an errno.
type appError string

func (e appError) Error() string { return string(e) }

// ErrName labels an error for the JSON results: the errno name when there
// is one ("ECONNREFUSED", "EPERM", "ETIMEDOUT", ...), "TIMEOUT" for the
// app's own per-attempt deadline, "EOF" for a connection closed early,
// "BAD_REPLY"/"ECHO_MISMATCH" for wrong data, else the error text.
func ErrName(err error) string {
	var en syscall.Errno
	if errors.As(err, &en) {
		if s := unix.ErrnoName(en); s != "" {
			return s
		}
		return "errno " + strconv.Itoa(int(en))
	}
	var ne net.Error
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() {
		return "TIMEOUT"
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return "EOF"
	}
	var ae appError
	if errors.As(err, &ae) {
		return string(ae)
	}
	return err.Error()
}

// ---- serve ----

// serve --id ID --listen ADDR:PORT [--listen ...] --proto tcp|udp
//
// TCP: per connection writes "ID <remote> <local>\n" then echoes until EOF.
// UDP: answers each datagram with "ID <remote> <local>\n" where local is the
// datagram's destination address (IP_PKTINFO), and sends the reply from it.
// IPv6 listeners are v6-only, so list 0.0.0.0:P and [::]:P for both
// families. Prints "LISTEN <proto> <addr>" per socket, then "READY".
func appServe(args []string) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	id := fs.String("id", "server", "id sent in every reply")
	proto := fs.String("proto", "tcp", "tcp or udp")
	var listens stringList
	fs.Var(&listens, "listen", "ADDR:PORT to listen on (repeatable; [::] is v6 only)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if len(listens) == 0 || (*proto != "tcp" && *proto != "udp") {
		fmt.Fprintln(os.Stderr, "serve: need --listen and --proto tcp|udp")
		return 2
	}
	ctx, stop := signalContext()
	defer stop()
	for _, l := range listens {
		ap, err := netip.ParseAddrPort(l)
		if err != nil {
			fmt.Fprintf(os.Stderr, "serve: bad --listen %q: %v\n", l, err)
			return 2
		}
		network := *proto + family(ap.Addr())
		switch *proto {
		case "tcp":
			ln, err := net.ListenTCP(network, net.TCPAddrFromAddrPort(ap))
			if err != nil {
				fmt.Fprintf(os.Stderr, "serve: listen %s %s: %v\n", network, ap, err)
				return 1
			}
			fmt.Printf("LISTEN tcp %s\n", ln.Addr())
			go acceptLoop(*id, ln)
		case "udp":
			c, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(ap))
			if err != nil {
				fmt.Fprintf(os.Stderr, "serve: listen %s %s: %v\n", network, ap, err)
				return 1
			}
			if err := enablePktinfo(c, ap.Addr().Is4()); err != nil {
				fmt.Fprintf(os.Stderr, "serve: pktinfo: %v\n", err)
				return 1
			}
			fmt.Printf("LISTEN udp %s\n", c.LocalAddr())
			go udpLoop(*id, c, ap.Addr().Is4())
		}
	}
	fmt.Println("READY")
	<-ctx.Done()
	return 0
}

func acceptLoop(id string, ln *net.TCPListener) {
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			fmt.Fprintf(os.Stderr, "serve: accept: %v\n", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go serveTCPConn(id, c)
	}
}

func serveTCPConn(id string, c *net.TCPConn) {
	defer c.Close()
	local, remote := sockNames(c)
	if _, err := fmt.Fprintf(c, "%s %s %s\n", id, remote, local); err != nil {
		return
	}
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func enablePktinfo(c *net.UDPConn, v4 bool) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		if v4 {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
		}
	})
	return errors.Join(err, serr)
}

// pktinfoDst extracts the destination address of a datagram from its
// IP_PKTINFO / IPV6_PKTINFO control message.
func pktinfoDst(oob []byte) (netip.Addr, bool) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return netip.Addr{}, false
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_PKTINFO && len(m.Data) >= unix.SizeofInet4Pktinfo:
			// struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
			return netip.AddrFrom4([4]byte(m.Data[8:12])), true
		case m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_PKTINFO && len(m.Data) >= unix.SizeofInet6Pktinfo:
			// struct in6_pktinfo { in6_addr addr; unsigned ifindex; }
			return netip.AddrFrom16([16]byte(m.Data[0:16])), true
		}
	}
	return netip.Addr{}, false
}

func udpLoop(id string, c *net.UDPConn, v4 bool) {
	bound := c.LocalAddr().(*net.UDPAddr).AddrPort()
	buf := make([]byte, 64<<10)
	oob := make([]byte, 1024)
	for {
		_, oobn, _, src, err := c.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		local := bound
		var roob []byte
		if dst, ok := pktinfoDst(oob[:oobn]); ok {
			local = netip.AddrPortFrom(dst, bound.Port())
			if !dst.IsMulticast() && dst != netip.IPv4Unspecified() && dst != netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
				if v4 {
					roob = unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: dst.As4()})
				} else {
					roob = unix.PktInfo6(&unix.Inet6Pktinfo{Addr: dst.As16()})
				}
			}
		}
		reply := fmt.Sprintf("%s %s %s\n", id, src, local)
		if _, _, err := c.WriteMsgUDPAddrPort([]byte(reply), roob, src); err != nil {
			fmt.Fprintf(os.Stderr, "serve: reply to %s: %v\n", src, err)
		}
	}
}

// ---- connect ----

// ConnectResult is the JSON object the connect app prints.
type ConnectResult struct {
	OK   int `json:"ok"`
	Fail int `json:"fail"`
	// Errors counts failures by ErrName ("ECONNREFUSED", "EPERM", "TIMEOUT", ...).
	Errors map[string]int `json:"errors"`
	// Backends counts the server ids (first word of the reply).
	Backends map[string]int `json:"backends"`
	// Peers counts getpeername() of the client socket (TCP, connected UDP).
	Peers map[string]int `json:"peers"`
	// Sources counts the reply's source address as returned by recvfrom
	// (unconnected UDP).
	Sources map[string]int `json:"sources"`
	// Locals counts getsockname() of the client socket.
	Locals map[string]int `json:"locals"`
	// Remotes counts the client address as the server saw it (second word
	// of the reply); ServerLocals the server's local address (third word).
	Remotes      map[string]int `json:"remotes"`
	ServerLocals map[string]int `json:"server_locals"`
}

func (r ConnectResult) String() string {
	b, _ := json.Marshal(r)
	return string(b)
}

type connectCfg struct {
	target  netip.AddrPort
	proto   string
	udpMode string
	timeout time.Duration
	echo    int
	source  netip.Addr
	payload []byte
}

type attemptResult struct {
	id, peer, source, local string
	remote, serverLocal     string
}

// connect --target ADDR:PORT --proto tcp|udp [--udp connected|unconnected]
// [--count N] [--timeout 2s] [--interval 0] [--duration D] [--echo BYTES]
// [--source ADDR] [--payload STR]
//
// Prints one ConnectResult JSON object at the end. --count defaults to 1,
// or unlimited with --duration; the loop also ends on SIGTERM/SIGINT.
func appConnect(args []string) int {
	fs := flag.NewFlagSet("connect", flag.ContinueOnError)
	target := fs.String("target", "", "ADDR:PORT")
	proto := fs.String("proto", "tcp", "tcp or udp")
	udpMode := fs.String("udp", "connected", "connected or unconnected")
	count := fs.Int("count", 0, "attempts (default 1, unlimited with --duration)")
	timeout := fs.Duration("timeout", 2*time.Second, "per-attempt timeout")
	interval := fs.Duration("interval", 0, "pause between attempts")
	duration := fs.Duration("duration", 0, "loop for this long")
	echo := fs.Int("echo", 0, "TCP: also send this many random bytes and verify the echo")
	source := fs.String("source", "", "local address to bind")
	payload := fs.String("payload", "x", "UDP payload")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	cfg := connectCfg{proto: *proto, udpMode: *udpMode, timeout: *timeout, echo: *echo, payload: []byte(*payload)}
	var err error
	if cfg.target, err = netip.ParseAddrPort(*target); err != nil {
		fmt.Fprintf(os.Stderr, "connect: bad --target %q: %v\n", *target, err)
		return 2
	}
	if *source != "" {
		if cfg.source, err = netip.ParseAddr(*source); err != nil {
			fmt.Fprintf(os.Stderr, "connect: bad --source: %v\n", err)
			return 2
		}
	}
	if cfg.proto != "tcp" && cfg.proto != "udp" || cfg.udpMode != "connected" && cfg.udpMode != "unconnected" {
		fmt.Fprintln(os.Stderr, "connect: --proto tcp|udp, --udp connected|unconnected")
		return 2
	}
	ctx, stop := signalContext()
	defer stop()
	if *duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *duration)
		defer cancel()
	}
	n := *count
	if n <= 0 && *duration <= 0 {
		n = 1
	}
	res := ConnectResult{Errors: map[string]int{}, Backends: map[string]int{}, Peers: map[string]int{},
		Sources: map[string]int{}, Locals: map[string]int{}, Remotes: map[string]int{}, ServerLocals: map[string]int{}}
	for i := 0; n <= 0 || i < n; i++ {
		if ctx.Err() != nil {
			break
		}
		a, err := connectOnce(ctx, cfg)
		switch {
		case err != nil && ended(ctx):
			// interrupted by SIGTERM or the end of --duration: not counted
		case err != nil:
			res.Fail++
			res.Errors[ErrName(err)]++
			if res.Fail <= 10 {
				fmt.Fprintf(os.Stderr, "connect: attempt %d: %v\n", i+1, err)
			}
		default:
			res.OK++
			res.Backends[a.id]++
			if a.peer != "" {
				res.Peers[a.peer]++
			}
			if a.source != "" {
				res.Sources[a.source]++
			}
			res.Locals[a.local]++
			res.Remotes[a.remote]++
			res.ServerLocals[a.serverLocal]++
		}
		if *interval > 0 && (n <= 0 || i+1 < n) {
			select {
			case <-ctx.Done():
			case <-time.After(*interval):
			}
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return 1
	}
	return 0
}

// ended reports whether ctx is done or its deadline has passed (the dialer's
// own timer for the same deadline may fire before ctx's).
func ended(ctx context.Context) bool {
	if ctx.Err() != nil {
		return true
	}
	dl, ok := ctx.Deadline()
	return ok && !time.Now().Before(dl)
}

// deadlineOn sets c's deadline to now+d and to "now" when ctx ends.
func deadlineOn(ctx context.Context, c interface{ SetDeadline(time.Time) error }, d time.Duration) (stop func() bool) {
	_ = c.SetDeadline(time.Now().Add(d))
	return context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
}

func firstWord(b []byte) (string, error) {
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "", appError("BAD_REPLY")
	}
	return f[0], nil
}

// parseReply splits a serve reply "ID <remote> <local>".
func (a *attemptResult) parseReply(b []byte) error {
	f := strings.Fields(string(b))
	if len(f) != 3 {
		return appError("BAD_REPLY")
	}
	a.id, a.remote, a.serverLocal = f[0], f[1], f[2]
	return nil
}

func connectOnce(ctx context.Context, cfg connectCfg) (attemptResult, error) {
	var a attemptResult
	fam := family(cfg.target.Addr())
	d := net.Dialer{Timeout: cfg.timeout}
	if cfg.proto == "udp" && cfg.udpMode == "unconnected" {
		laddr := &net.UDPAddr{}
		if cfg.source.IsValid() {
			laddr.IP = cfg.source.AsSlice()
		}
		pc, err := net.ListenUDP("udp"+fam, laddr)
		if err != nil {
			return a, err
		}
		defer pc.Close()
		defer deadlineOn(ctx, pc, cfg.timeout)()
		if _, err := pc.WriteToUDPAddrPort(cfg.payload, cfg.target); err != nil {
			return a, err
		}
		buf := make([]byte, 64<<10)
		n, from, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return a, err
		}
		a.local, _ = sockNames(pc)
		a.source = from.String()
		return a, a.parseReply(buf[:n])
	}
	if cfg.source.IsValid() {
		if cfg.proto == "tcp" {
			d.LocalAddr = &net.TCPAddr{IP: cfg.source.AsSlice()}
		} else {
			d.LocalAddr = &net.UDPAddr{IP: cfg.source.AsSlice()}
		}
	}
	var c net.Conn
	var err error
	if cfg.target.Addr().Is4In6() {
		c, err = dialMapped(cfg.proto, cfg.target, cfg.timeout)
	} else {
		c, err = d.DialContext(ctx, cfg.proto+fam, cfg.target.String())
	}
	if err != nil {
		return a, err
	}
	defer c.Close()
	defer deadlineOn(ctx, c, cfg.timeout)()
	a.local, a.peer = sockNames(c.(syscall.Conn))
	if cfg.proto == "udp" {
		if _, err := c.Write(cfg.payload); err != nil {
			return a, err
		}
		buf := make([]byte, 64<<10)
		n, err := c.Read(buf)
		if err != nil {
			return a, err
		}
		return a, a.parseReply(buf[:n])
	}
	br := bufio.NewReader(c)
	line, err := br.ReadBytes('\n')
	if err != nil {
		return a, err
	}
	if err := a.parseReply(line); err != nil {
		return a, err
	}
	if cfg.echo > 0 {
		data := make([]byte, cfg.echo)
		_, _ = crand.Read(data)
		werr := make(chan error, 1)
		go func() { _, err := c.Write(data); werr <- err }()
		got := make([]byte, len(data))
		_, rerr := io.ReadFull(br, got)
		if err := errors.Join(<-werr, rerr); err != nil {
			return a, err
		}
		if !bytes.Equal(got, data) {
			return a, appError("ECHO_MISMATCH")
		}
	}
	return a, nil
}

// dialMapped connects an IPv6 socket to a v4-mapped address (Go's net
// package only dials those from IPv4 sockets), as a dual-stack application
// does: what Shunt's connect6 translates in its v4-mapped path.
func dialMapped(proto string, target netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	typ := unix.SOCK_STREAM
	if proto == "udp" {
		typ = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(unix.AF_INET6, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	err = errors.Join(unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv))
	if err == nil {
		err = unix.Connect(fd, &unix.SockaddrInet6{Addr: target.Addr().As16(), Port: int(target.Port())})
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("connect %s: %w", target, err)
	}
	f := os.NewFile(uintptr(fd), "mapped")
	defer f.Close() // FileConn dups it
	return net.FileConn(f)
}

// ---- stream ----

// StreamResult is the JSON object the stream app prints.
type StreamResult struct {
	OK             bool   `json:"ok"`
	Backend        string `json:"backend"`
	Peer           string `json:"peer"`
	Local          string `json:"local"`
	Sent           int64  `json:"sent"`
	Received       int64  `json:"received"`
	SHA256Sent     string `json:"sha256_sent"`
	SHA256Received string `json:"sha256_received"`
	// Interrupted: SIGTERM/SIGINT ended the sending before --bytes.
	Interrupted bool   `json:"interrupted"`
	Error       string `json:"error,omitempty"`
}

// stream --target ADDR:PORT [--bytes N] [--chunk K] [--rate-pause D]
// [--timeout 10s] [--source ADDR]
//
// Connects to a TCP serve, reads the banner, sends N pseudo-random bytes in
// chunks (sleeping --rate-pause between chunks, to keep a connection busy
// for a while) while reading the echo concurrently, half-closes, reads to
// EOF and compares SHA-256 of both directions. SIGTERM/SIGINT ends the
// sending early but the result still verifies everything sent so far
// (Interrupted is then true). --timeout is an inactivity limit per read or
// write. Prints one StreamResult.
func appStream(args []string) int {
	fs := flag.NewFlagSet("stream", flag.ContinueOnError)
	target := fs.String("target", "", "ADDR:PORT of a TCP serve")
	total := fs.Int64("bytes", 1<<20, "bytes to send")
	chunk := fs.Int("chunk", 32<<10, "write size")
	pause := fs.Duration("rate-pause", 0, "sleep between chunks")
	timeout := fs.Duration("timeout", 10*time.Second, "inactivity timeout per read/write (and for the dial)")
	source := fs.String("source", "", "local address to bind")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ap, err := netip.ParseAddrPort(*target)
	if err != nil || *chunk <= 0 {
		fmt.Fprintf(os.Stderr, "stream: bad --target %q or --chunk\n", *target)
		return 2
	}
	ctx, stop := signalContext()
	defer stop()
	res := StreamResult{}
	err = func() error {
		d := net.Dialer{Timeout: *timeout}
		if *source != "" {
			s, err := netip.ParseAddr(*source)
			if err != nil {
				return err
			}
			d.LocalAddr = &net.TCPAddr{IP: s.AsSlice()}
		}
		conn, err := d.DialContext(ctx, "tcp"+family(ap.Addr()), ap.String())
		if err != nil {
			return err
		}
		c := conn.(*net.TCPConn)
		defer c.Close()
		res.Local, res.Peer = sockNames(c)
		br := bufio.NewReader(c)
		_ = c.SetReadDeadline(time.Now().Add(*timeout))
		line, err := br.ReadBytes('\n')
		if err != nil {
			return err
		}
		if res.Backend, err = firstWord(line); err != nil {
			return err
		}
		var seed [32]byte
		_, _ = crand.Read(seed[:])
		rng := rand.NewChaCha8(seed)
		hs := sha256.New()
		var sent int64
		werr := make(chan error, 1)
		go func() {
			buf := make([]byte, *chunk)
			for sent < *total && ctx.Err() == nil {
				n := int(min(int64(len(buf)), *total-sent))
				_, _ = rng.Read(buf[:n])
				_ = c.SetWriteDeadline(time.Now().Add(*timeout))
				w, err := c.Write(buf[:n])
				hs.Write(buf[:w])
				sent += int64(w)
				if err != nil {
					werr <- err
					return
				}
				if *pause > 0 && sent < *total {
					select {
					case <-ctx.Done():
					case <-time.After(*pause):
					}
				}
			}
			werr <- c.CloseWrite()
		}()
		hr := sha256.New()
		buf := make([]byte, 64<<10)
		var rerr error
		for {
			_ = c.SetReadDeadline(time.Now().Add(*timeout))
			n, err := br.Read(buf)
			hr.Write(buf[:n])
			res.Received += int64(n)
			if err == io.EOF {
				break
			}
			if err != nil {
				rerr = err
				c.Close() // unblock the writer
				break
			}
		}
		we := <-werr
		res.Sent = sent
		res.Interrupted = ctx.Err() != nil && sent < *total
		res.SHA256Sent = hex.EncodeToString(hs.Sum(nil))
		res.SHA256Received = hex.EncodeToString(hr.Sum(nil))
		if err := errors.Join(we, rerr); err != nil {
			return err
		}
		if res.Sent != res.Received || res.SHA256Sent != res.SHA256Received {
			return appError("ECHO_MISMATCH")
		}
		return nil
	}()
	if err != nil {
		res.Error = ErrName(err)
		fmt.Fprintf(os.Stderr, "stream: %v\n", err)
	} else {
		res.OK = true
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return 1
	}
	return 0
}

// ---- info, pause ----

// ProcInfo is what the info app reports about its own process.
type ProcInfo struct {
	PID         int      `json:"pid"`
	UID         int      `json:"uid"`
	GID         int      `json:"gid"`
	Groups      []int    `json:"groups"`
	Cgroup      string   `json:"cgroup"` // cgroup v2 path from /proc/self/cgroup ("0::" line)
	NetNS       string   `json:"netns"`  // readlink /proc/self/ns/net, e.g. "net:[4026532301]"
	NetNSCookie uint64   `json:"netns_cookie"`
	Addrs       []string `json:"addrs"` // interface addresses, "dev addr/len"
}

func appInfo(args []string) int {
	info := ProcInfo{PID: os.Getpid(), UID: os.Getuid(), GID: os.Getgid()}
	info.Groups, _ = os.Getgroups()
	if b, err := os.ReadFile("/proc/self/cgroup"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if p, ok := strings.CutPrefix(l, "0::"); ok {
				info.Cgroup = p
			}
		}
	}
	info.NetNS, _ = os.Readlink("/proc/self/ns/net")
	if fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err == nil {
		info.NetNSCookie, _ = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		unix.Close(fd)
	}
	if ifs, err := net.Interfaces(); err == nil {
		for _, ifc := range ifs {
			addrs, _ := ifc.Addrs()
			for _, a := range addrs {
				info.Addrs = append(info.Addrs, ifc.Name+" "+a.String())
			}
		}
	}
	sort.Strings(info.Addrs)
	if err := json.NewEncoder(os.Stdout).Encode(info); err != nil {
		return 1
	}
	return 0
}

// pause prints READY and sleeps until SIGTERM/SIGINT.
func appPause(args []string) int {
	ctx, stop := signalContext()
	defer stop()
	fmt.Println("READY")
	<-ctx.Done()
	return 0
}
