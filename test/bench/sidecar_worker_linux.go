package bench

import (
	"bufio"
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
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The sidecar benchmark's workers (`shuntctl bench worker echo|sclient|proxy`):
//
//   - echo: the server app; blocking syscalls, one locked OS thread per
//     connection (see sidecar.go for what goes over the wire);
//   - sclient: the client app, request/response or stream over persistent
//     connections, every received byte checked;
//   - proxy: the Go sidecar proxy: per accepted connection it asks
//     SO_ORIGINAL_DST where the connection was going, dials that, and relays
//     with one goroutine per direction doing plain Read/Write loops on
//     net.TCPConn (Go's netpoller: non-blocking sockets and epoll, as a
//     real Go proxy does). No io.Copy: between two TCP connections it
//     uses splice(2), which never sees bytes that sockmap redirected.

// errCorrupt marks a verification failure.
var errCorrupt = errors.New("data mismatch")

// blockingIO wraps a blocking socket: whole reads and writes, retried on
// EINTR and on EAGAIN — which a blocking socket returns spuriously on this
// kernel once it is in a sockmap (counted, see MISSION-NOTES).
type blockingIO struct {
	fd     int
	eagain atomic.Uint64
}

// retry runs a blocking syscall again while it fails with EINTR or EAGAIN.
func (b *blockingIO) retry(f func() (int, error)) (int, error) {
	for {
		n, err := f()
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN):
			b.eagain.Add(1)
			continue
		}
		return n, err
	}
}

// read is one read of up to len(p) bytes (0: end of stream).
func (b *blockingIO) read(p []byte) (int, error) {
	n, err := b.retry(func() (int, error) { return unix.Read(b.fd, p) })
	if err != nil {
		return 0, fmt.Errorf("read: %w", err)
	}
	return n, nil
}

func (b *blockingIO) readFull(p []byte) error {
	for len(p) > 0 {
		n, err := b.read(p)
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrUnexpectedEOF
		}
		p = p[n:]
	}
	return nil
}

func (b *blockingIO) writeAll(p []byte) error {
	for len(p) > 0 {
		n, err := b.retry(func() (int, error) { return unix.Write(b.fd, p) })
		if err != nil {
			return fmt.Errorf("write: %w", err)
		}
		p = p[n:]
	}
	return nil
}

// ---- echo server ----

// echoMain listens on 0.0.0.0:PORT and serves each connection on its own
// locked OS thread. It prints "ready" once listening and exits when its
// standard input closes or on SIGTERM/SIGINT.
func echoMain(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("echo", flag.ContinueOnError)
	port := fs.Int("port", BackendPort, "TCP port to listen on (all addresses)")
	id := fs.String("id", "", "name sent in the hello")
	maxSize := fs.Int("max-size", 64<<10, "largest stream chunk expected")
	cpu := fs.Int("cpu", -1, "CPU to run on (-1: any)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := listen4(netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(*port)))
	if err != nil {
		return err
	}
	pool := PayloadPool(*maxSize)
	hello := Hello(*id)
	errc := make(chan error, 3)
	go func() {
		errc <- acceptLoop(ln, *cpu, func(fd int) { go serveEcho(fd, *cpu, hello, pool) })
	}()
	return waitStop(stdout, errc)
}

// waitStop prints "ready" and waits for the end of standard input, a
// signal or an error.
func waitStop(stdout io.Writer, errc chan error) error {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		io.Copy(io.Discard, os.Stdin)
		errc <- nil
	}()
	go func() {
		<-sig
		errc <- nil
	}()
	fmt.Fprintln(stdout, "ready")
	return <-errc
}

func listen4(ap netip.AddrPort) (int, error) {
	ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.SetsockoptInt(ln, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return -1, err
	}
	sa, err := sockaddr(ap)
	if err != nil {
		return -1, err
	}
	if err := unix.Bind(ln, sa); err != nil {
		return -1, fmt.Errorf("bind %s: %w", ap, err)
	}
	if err := unix.Listen(ln, 4096); err != nil {
		return -1, err
	}
	return ln, nil
}

func serveEcho(fd, cpu int, hello, pool []byte) {
	runtime.LockOSThread()
	defer unix.Close(fd)
	if pinThread(cpu) != nil {
		return
	}
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	c := &blockingIO{fd: fd}
	if c.writeAll(hello) != nil {
		return
	}
	var mode [1]byte
	if c.readFull(mode[:]) != nil {
		return
	}
	switch mode[0] {
	case modeRR:
		buf := make([]byte, 256<<10)
		for {
			n, err := c.read(buf)
			if err != nil || n == 0 {
				return
			}
			if c.writeAll(buf[:n]) != nil {
				return
			}
		}
	case modeStream:
		sinkStream(c, pool)
	}
}

// sinkStream reads and checks chunks; the size is the first chunk's: the
// client announces it in 4 bytes after the mode byte.
func sinkStream(c *blockingIO, pool []byte) {
	var hdr [4]byte
	if c.readFull(hdr[:]) != nil {
		return
	}
	size := int(binary.LittleEndian.Uint32(hdr[:]))
	if size < streamHeader || size > len(pool) {
		return
	}
	chunk := make([]byte, size)
	var next uint64
	bad := false
	var ack [8]byte
	for {
		if c.readFull(chunk) != nil {
			return
		}
		seq := binary.LittleEndian.Uint64(chunk)
		marker := seq&streamMarker != 0
		if seq&^streamMarker != next || !bytes.Equal(chunk[streamHeader:], pool[streamHeader:size]) {
			bad = true
		}
		next++
		if marker {
			v := next
			if bad {
				v = StreamCorrupt
			}
			binary.LittleEndian.PutUint64(ack[:], v)
			if c.writeAll(ack[:]) != nil || bad {
				return
			}
		}
	}
}

// ---- client ----

// SidecarClientResult is what an sclient prints per run (one JSON line).
type SidecarClientResult struct {
	// Tx counts the transactions (request/response) or chunks (stream) of
	// the measured interval, Bytes their payload bytes (one way), Elapsed
	// its length; Hist their latencies (request/response).
	Tx      uint64        `json:"tx"`
	Bytes   uint64        `json:"bytes"`
	Elapsed time.Duration `json:"elapsedNs"`
	Hist    Hist          `json:"hist,omitempty"`
	// RunTx counts every transaction or chunk of the run, warm-up included.
	RunTx uint64 `json:"runTx"`
	// Since the start, all connections: bytes sent and received, bytes
	// verified (received bytes compared with what was expected, or stream
	// bytes the server acknowledged as checked), connections made,
	// spurious EAGAINs.
	Sent     uint64 `json:"sent"`
	Recv     uint64 `json:"recv"`
	Verified uint64 `json:"verified"`
	Connects uint64 `json:"connects"`
	EAGAIN   uint64 `json:"eagain"`
	Cgroup   string `json:"cgroup"`
	NetNS    uint64 `json:"netnsIno"`
	Err      string `json:"err,omitempty"`
}

// scConn is one persistent client connection.
type scConn struct {
	io               *blockingIO
	k                uint64 // transactions or chunks so far
	acked            uint64 // stream: chunks the server has verified
	sent, recv, veri uint64
}

type scClient struct {
	target    netip.AddrPort
	expect    []byte
	w         Workload
	cpu       int
	pool      []byte
	conns     []*scConn
	connected uint64
}

// sclientMain connects on its first run and keeps its connections; each
// line "WARMUP DURATION" on standard input runs once and prints a JSON line.
func sclientMain(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("sclient", flag.ContinueOnError)
	target := fs.String("target", "", "IPv4:port the app connects to")
	expect := fs.String("expect", "", "id of the echo server that must answer")
	workload := fs.String("workload", "rr1", "workload (rr<size>[x<conns>] or stream[<size>])")
	cpu := fs.Int("cpu", -1, "CPU to run on (-1: any)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ap, err := netip.ParseAddrPort(*target)
	if err != nil {
		return fmt.Errorf("--target: %w", err)
	}
	w, err := ParseWorkload(*workload)
	if err != nil {
		return err
	}
	c := &scClient{target: ap, expect: Hello(*expect), w: w, cpu: *cpu, pool: PayloadPool(w.Size)}
	runtime.LockOSThread()
	if err := pinThread(*cpu); err != nil {
		return err
	}
	return controlLoop(stdout, func(warm, dur time.Duration) (any, bool) {
		res := c.run(warm, dur)
		return res, res.Err != ""
	})
}

func (c *scClient) run(warm, dur time.Duration) SidecarClientResult {
	res := SidecarClientResult{Cgroup: selfCgroup(), NetNS: selfNetNS()}
	var err error
	if c.conns == nil {
		err = c.connect()
	}
	if err == nil {
		if c.w.Stream {
			err = c.stream(warm, dur, &res)
		} else {
			err = c.rr(warm, dur, &res)
		}
	}
	for _, s := range c.conns {
		res.Sent += s.sent
		res.Recv += s.recv
		res.Verified += s.veri
		res.EAGAIN += s.io.eagain.Load()
	}
	res.Connects = c.connected
	if err != nil {
		res.Err = fmt.Sprintf("%s to %s: %v", c.w.Name, c.target, err)
	}
	return res
}

func (c *scClient) connect() error {
	sa, err := sockaddr(c.target)
	if err != nil {
		return err
	}
	for range c.w.Conns {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		if err := connect(fd, sa); err != nil {
			unix.Close(fd)
			return fmt.Errorf("connect: %w", err)
		}
		c.connected++
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		s := &scConn{io: &blockingIO{fd: fd}}
		c.conns = append(c.conns, s)
		hello := make([]byte, helloSize)
		if err := s.io.readFull(hello); err != nil {
			return fmt.Errorf("hello: %w", err)
		}
		s.recv += helloSize
		if !bytes.Equal(hello, c.expect) {
			return fmt.Errorf("hello %q, want %q: %w (reached the wrong server)", bytes.TrimRight(hello, "\x00"), bytes.TrimRight(c.expect, "\x00"), errCorrupt)
		}
		s.veri += helloSize
		mode := []byte{modeRR}
		if c.w.Stream {
			mode = binary.LittleEndian.AppendUint32([]byte{modeStream}, uint32(c.w.Size))
		}
		if err := s.io.writeAll(mode); err != nil {
			return err
		}
		s.sent += uint64(len(mode))
	}
	return nil
}

// rr runs request/response transactions on every connection in parallel
// (one locked OS thread each) until warm+dur has passed.
func (c *scClient) rr(warm, dur time.Duration, res *SidecarClientResult) error {
	start := time.Now()
	from, end := start.Add(warm), start.Add(warm+dur)
	type part struct {
		tx   uint64
		all  uint64
		hist Hist
		last time.Time
		err  error
	}
	parts := make([]part, len(c.conns))
	var wg sync.WaitGroup
	for i, s := range c.conns {
		wg.Add(1)
		do := func() {
			defer wg.Done()
			p := &parts[i]
			p.hist = Hist{}
			size := c.w.Size
			resp := make([]byte, size)
			for {
				t0 := time.Now()
				if !t0.Before(end) {
					return
				}
				off := RROffset(s.k)
				req := c.pool[off : off+size]
				if p.err = s.io.writeAll(req); p.err != nil {
					return
				}
				s.sent += uint64(size)
				if p.err = s.io.readFull(resp); p.err != nil {
					return
				}
				s.recv += uint64(size)
				t1 := time.Now()
				if !bytes.Equal(resp, req) {
					p.err = fmt.Errorf("transaction %d: answer differs from the request: %w", s.k, errCorrupt)
					return
				}
				s.veri += uint64(size)
				s.k++
				p.all++
				if !t0.Before(from) {
					p.tx++
					p.hist.Add(t1.Sub(t0))
					p.last = t1
				}
			}
		}
		if len(c.conns) == 1 {
			do() // this goroutine's thread is locked and pinned already
			continue
		}
		go func() {
			runtime.LockOSThread()
			if err := pinThread(c.cpu); err != nil {
				parts[i].err = err
				wg.Done()
				return
			}
			do()
		}()
	}
	wg.Wait()
	res.Hist = Hist{}
	var last time.Time
	for _, p := range parts {
		if p.err != nil {
			return p.err
		}
		res.Tx += p.tx
		res.RunTx += p.all
		res.Hist.Merge(p.hist)
		if p.last.After(last) {
			last = p.last
		}
	}
	res.Bytes = res.Tx * uint64(c.w.Size)
	if res.Tx > 0 {
		res.Elapsed = last.Sub(from)
	}
	return nil
}

// stream writes chunks for warm, syncs, writes for dur and syncs again:
// the measured interval ends when the server has checked every byte.
func (c *scClient) stream(warm, dur time.Duration, res *SidecarClientResult) error {
	s := c.conns[0]
	chunk := make([]byte, c.w.Size)
	copy(chunk, c.pool[:c.w.Size])
	send := func(until time.Time) (uint64, error) {
		var n uint64
		for {
			last := !time.Now().Before(until)
			v := s.k
			if last {
				v |= streamMarker
			}
			binary.LittleEndian.PutUint64(chunk, v)
			if err := s.io.writeAll(chunk); err != nil {
				return n, err
			}
			s.sent += uint64(len(chunk))
			s.k++
			n++
			if last {
				break
			}
		}
		var ack [8]byte
		if err := s.io.readFull(ack[:]); err != nil {
			return n, fmt.Errorf("ack: %w", err)
		}
		s.recv += 8
		got := binary.LittleEndian.Uint64(ack[:])
		if got == StreamCorrupt {
			return n, fmt.Errorf("server found a corrupt chunk before chunk %d: %w", s.k, errCorrupt)
		}
		if got != s.k {
			return n, fmt.Errorf("server verified %d chunks, %d were sent: %w", got, s.k, errCorrupt)
		}
		// The ack and every chunk up to it are checked now.
		s.veri += 8 + (got-s.acked)*uint64(len(chunk))
		s.acked = got
		return n, nil
	}
	if warm > 0 {
		n, err := send(time.Now().Add(warm))
		res.RunTx += n
		if err != nil {
			return err
		}
	}
	t0 := time.Now()
	n, err := send(t0.Add(dur))
	res.RunTx += n
	if err != nil {
		return err
	}
	res.Elapsed = time.Since(t0)
	res.Tx = n
	res.Bytes = n * uint64(len(chunk))
	return nil
}

// ---- Go proxy ----

// ProxyStats are the Go proxy's counters (one JSON line per "stats").
type ProxyStats struct {
	Conns       uint64 `json:"conns"`
	OrigDstFail uint64 `json:"origdstFail"`
	DialFail    uint64 `json:"dialFail"`
	Reads       uint64 `json:"reads"`
	Writes      uint64 `json:"writes"`
	Bytes       uint64 `json:"bytes"` // forwarded, both directions
	Loops       uint64 `json:"loops"` // connections to itself refused
}

type proxyCounters struct {
	conns, origFail, dialFail, reads, writes, bytes, loops atomic.Uint64
}

func (c *proxyCounters) snapshot() ProxyStats {
	return ProxyStats{Conns: c.conns.Load(), OrigDstFail: c.origFail.Load(), DialFail: c.dialFail.Load(),
		Reads: c.reads.Load(), Writes: c.writes.Load(), Bytes: c.bytes.Load(), Loops: c.loops.Load()}
}

// proxyMain accepts on every --listen address and forwards each
// connection to its original destination. It prints "ready", answers each
// "stats" line on standard input with a JSON line, and exits at the end of
// its input.
func proxyMain(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	var listens []string
	fs.Func("listen", "IPv4:port to accept on (repeatable)", func(s string) error { listens = append(listens, s); return nil })
	cpu := fs.Int("cpu", -1, "CPU to run on (-1: any)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if len(listens) == 0 {
		return errors.New("--listen: at least one address")
	}
	if *cpu >= 0 {
		runtime.GOMAXPROCS(1)
		if err := pinProcess(*cpu); err != nil {
			return err
		}
	}
	var ctr proxyCounters
	errc := make(chan error, len(listens))
	for _, l := range listens {
		ln, err := net.Listen("tcp4", l)
		if err != nil {
			return err
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					errc <- err
					return
				}
				go proxyConn(c.(*net.TCPConn), &ctr)
			}
		}()
	}
	fmt.Fprintln(stdout, "ready")
	go func() {
		in := bufio.NewScanner(os.Stdin)
		enc := json.NewEncoder(stdout)
		for in.Scan() {
			enc.Encode(ctr.snapshot())
		}
		errc <- nil
	}()
	return <-errc
}

func proxyConn(c *net.TCPConn, ctr *proxyCounters) {
	defer c.Close()
	ctr.conns.Add(1)
	orig, err := OriginalDst(c)
	if err != nil {
		ctr.origFail.Add(1)
		return
	}
	if l := c.LocalAddr().(*net.TCPAddr).AddrPort(); orig.Port() == l.Port() && (orig.Addr().IsLoopback() || orig.Addr() == l.Addr().Unmap()) {
		ctr.loops.Add(1) // not redirected: forwarding would connect to itself
		return
	}
	u, err := net.DialTCP("tcp4", nil, net.TCPAddrFromAddrPort(orig))
	if err != nil {
		ctr.dialFail.Add(1)
		return
	}
	defer u.Close()
	done := make(chan struct{})
	go func() {
		relay(u, c, ctr)
		close(done)
	}()
	relay(c, u, ctr)
	<-done
}

// relay copies src to dst with plain Read/Write calls until src ends, then
// half-closes dst.
func relay(dst, src *net.TCPConn, ctr *proxyCounters) {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			ctr.reads.Add(1)
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
			ctr.writes.Add(1)
			ctr.bytes.Add(uint64(n))
		}
		if err != nil {
			break
		}
	}
	dst.CloseWrite()
}

// OriginalDst asks for an accepted IPv4 connection's original destination
// with getsockopt(SOL_IP, SO_ORIGINAL_DST): answered by netfilter after an
// iptables REDIRECT, or by Shunt's getsockopt hook after its steering.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var out netip.AddrPort
	var gerr error
	err = raw.Control(func(fd uintptr) {
		var sa unix.RawSockaddrInet4
		l := uint32(unsafe.Sizeof(sa))
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_IP, unix.SO_ORIGINAL_DST,
			uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&l)), 0)
		if e != 0 {
			gerr = fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", e)
			return
		}
		if sa.Family != unix.AF_INET {
			gerr = fmt.Errorf("SO_ORIGINAL_DST: family %d", sa.Family)
			return
		}
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		out = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
	})
	return out, errors.Join(err, gerr)
}

// pinProcess binds every thread of the process to cpu; threads created
// later inherit it from their creator.
func pinProcess(cpu int) error {
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	var set unix.CPUSet
	set.Set(cpu)
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if err := unix.SchedSetaffinity(tid, &set); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("pin thread %d to CPU %d: %w", tid, cpu, err)
		}
	}
	return nil
}
