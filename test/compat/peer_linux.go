package compat

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
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

	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/test/harness"
)

// The two helper apps of the suite (the test binary re-executed by the
// harness): compat-server and compat-client.
func init() {
	harness.RegisterApp("compat-server", appServer)
	harness.RegisterApp("compat-client", appClient)
}

// ConnResult is what one end reports about one connection (a line
// "RESULT <json>" on the app's stdout).
type ConnResult struct {
	ID   string `json:"id"`
	Role string `json:"role"` // client or server
	OK   bool   `json:"ok"`
	// Error is the first failure, as the application saw it.
	Error          string `json:"error,omitempty"`
	Sent           int64  `json:"sent"`
	Received       int64  `json:"received"`
	SHA256Sent     string `json:"sha256_sent"`
	SHA256Received string `json:"sha256_received"`
	// EndedBy, for the reading end of an aborted connection, is how the
	// reset showed: "ECONNRESET" or "EOF"; "ABORT" for the end that reset.
	EndedBy string `json:"ended_by,omitempty"`
	// Signals sent to the end's I/O thread, EINTR returns it retried.
	Signals int64 `json:"signals,omitempty"`
	EINTR   int64 `json:"eintr,omitempty"`
	// BlockedAfter: IONonblock writers, payload bytes the kernel accepted
	// before the first EAGAIN (-1: never blocked).
	BlockedAfter int64 `json:"blocked_after"`
	// Buffered: IONonblock writers facing a sleeping reader, the payload
	// bytes accepted during the first 3/4 of the reader's sleep: all of
	// them wait in buffers (kernel, proxies) for the reader.
	Buffered int64 `json:"buffered,omitempty"`
	// RcvlowatTimeouts: IORcvlowat reads woken only by their receive
	// timeout while the data was queued (see rcvlowatTimeout).
	RcvlowatTimeouts int64         `json:"rcvlowat_timeouts,omitempty"`
	Elapsed          time.Duration `json:"elapsed"`
}

const (
	headerMagic = "SHCP"
	maxHeader   = 64 << 10
	ioChunk     = 256 << 10
	abortPause  = 100 * time.Millisecond
)

// endpoint runs one end of one connection.
type endpoint struct {
	spec   *Spec
	role   string
	side   Side
	conn   ioConn
	start  time.Time
	report func(ConnResult)

	sendS, recvS *rand.ChaCha8
	chunks       *rand.Rand
	hs, hr       hash.Hash
	wbuf, rbuf   []byte
	exp          []byte

	sent, received atomic.Int64
	lastProgress   atomic.Int64
	phase          atomic.Pointer[string]
	eintr          atomic.Int64
	wake           atomic.Pointer[func()]
	windowStarted  bool
	windowClosed   atomic.Bool
	buffered       atomic.Int64
	sig            *signaler
	signalsSent    int64
	raw            *rawConn
	endedBy        string
	finished       atomic.Bool
	finishMu       sync.Mutex
	barrier        *barrier
}

func newEndpoint(spec *Spec, role string, report func(ConnResult)) *endpoint {
	// Buffers as large as the largest message, up to ioChunk (1000
	// connections of small messages must stay small).
	size := max(64, min(ioChunk, max(spec.Req.Max, spec.Resp.Max, spec.Trailer, spec.Duplex, spec.AbortBytes)))
	e := &endpoint{spec: spec, role: role, start: time.Now(), report: report,
		hs: sha256.New(), hr: sha256.New(),
		wbuf: make([]byte, size), rbuf: make([]byte, size), exp: make([]byte, size)}
	out, in := byte(dirC2S), byte(dirS2C)
	e.side = spec.Client
	if role == "server" {
		out, in = in, out
		e.side = spec.Server
	}
	e.sendS, e.recvS = stream(spec.Seed, out), stream(spec.Seed, in)
	e.chunks = rand.New(rand.NewPCG(spec.Seed, uint64(out)))
	e.touch()
	e.setPhase("connecting")
	return e
}

func (e *endpoint) touch() { e.lastProgress.Store(time.Now().UnixNano()) }

func (e *endpoint) setPhase(s string) { e.phase.Store(&s) }

// attach puts the connection into the end's I/O style.
func (e *endpoint) attach(tc *net.TCPConn) error {
	defer func() {
		if e.conn != nil {
			w := e.conn.Wake
			e.wake.Store(&w)
		}
	}()
	if e.side.IO == IOEpoll || e.side.IO == "" {
		e.conn = &epollConn{c: tc}
		return nil
	}
	fd, err := detach(tc)
	if err != nil {
		return err
	}
	rc, err := newRawConn(fd, e.side.IO, e.side.Signals, &e.eintr, e.touch)
	if err != nil {
		unix.Close(fd)
		return err
	}
	e.raw, e.conn = rc, rc
	return nil
}

// finish reports the result once (from the exchange or the watchdog).
func (e *endpoint) finish(err error) {
	e.finishMu.Lock()
	defer e.finishMu.Unlock()
	if e.finished.Load() {
		return
	}
	e.finished.Store(true)
	r := ConnResult{ID: e.spec.ID, Role: e.role, OK: err == nil, Sent: e.sent.Load(), Received: e.received.Load(),
		Signals: e.signalsSent, EINTR: e.eintr.Load(), BlockedAfter: -1, Elapsed: time.Since(e.start)}
	if err != nil {
		// From the watchdog, the exchange may still be running: the hashes
		// and the rest of its state are not read.
		r.Error = err.Error()
	} else {
		r.SHA256Sent, r.SHA256Received = hex.EncodeToString(e.hs.Sum(nil)), hex.EncodeToString(e.hr.Sum(nil))
		r.EndedBy = e.endedBy
		if e.raw != nil {
			r.RcvlowatTimeouts = e.raw.lowatRescued
		}
		if e.raw != nil && e.side.IO == IONonblock {
			r.BlockedAfter = e.raw.blockedAfter
			r.Buffered = e.buffered.Load()
			if !e.windowClosed.Load() {
				r.Buffered = e.raw.written.Load() // all written before the window ended
			}
		}
	}
	if e.barrier != nil {
		e.barrier.arriveAs(e)
	}
	e.report(r)
}

// watch fails the connection when it makes no progress for the stall bound,
// then wakes whatever is blocked.
func (e *endpoint) watch(done <-chan struct{}) {
	stall := e.spec.stall()
	t := time.NewTicker(stall / 40)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			idle := time.Since(time.Unix(0, e.lastProgress.Load()))
			if idle < stall {
				continue
			}
			e.finish(anomaly(fmt.Sprintf("STALL: no progress for %v while %s (sent %d, received %d)",
				stall, *e.phase.Load(), e.sent.Load(), e.received.Load())))
			if w := e.wake.Load(); w != nil {
				(*w)()
			}
			return
		}
	}
}

// run drives the exchange on the calling goroutine (locked to its thread
// for the raw styles, so signals reach it) and reports.
func (e *endpoint) run(exchange func() error) {
	done := make(chan struct{})
	defer close(done)
	go e.watch(done)
	if e.side.IO != IOEpoll {
		// Signals target this thread; it ends with the goroutine.
		runtime.LockOSThread()
	}
	e.sig = startSignals(e.side.Signals)
	err := exchange()
	e.signalsSent = e.sig.halt()
	if e.conn != nil {
		if cerr := e.conn.Close(); err == nil && cerr != nil && e.endedBy == "" {
			err = fmt.Errorf("close: %w", cerr)
		}
	}
	e.finish(err)
}

// startWindow: an IONonblock writer whose peer sleeps before reading
// records how much it got accepted during 3/4 of that sleep.
func (e *endpoint) startWindow() {
	peer := e.spec.Server
	if e.role == "server" {
		peer = e.spec.Client
	}
	if e.windowStarted || e.raw == nil || e.side.IO != IONonblock || peer.SleepBeforeRead <= 0 {
		return
	}
	e.windowStarted = true
	raw := e.raw
	time.AfterFunc(peer.SleepBeforeRead*3/4, func() {
		e.buffered.Store(raw.written.Load())
		e.windowClosed.Store(true)
	})
}

func (e *endpoint) send(n int) error {
	if n > 0 {
		e.startWindow()
	}
	for n > 0 {
		k := min(n, len(e.wbuf))
		if e.spec.Chunk.Max > 0 {
			k = min(k, e.spec.Chunk.draw(e.chunks))
		}
		_, _ = e.sendS.Read(e.wbuf[:k])
		if err := e.conn.Write(e.wbuf[:k]); err != nil {
			return fmt.Errorf("%s write: %w", e.side, err)
		}
		e.hs.Write(e.wbuf[:k])
		e.sent.Add(int64(k))
		e.touch()
		n -= k
	}
	return nil
}

// errEOF is a premature end of stream.
type errEOF struct{ got, want int }

func (x errEOF) Error() string { return fmt.Sprintf("EOF after %d of %d bytes", x.got, x.want) }

func (e *endpoint) recv(n int) error {
	for got := 0; got < n; {
		k := min(n-got, len(e.rbuf))
		m, err := e.conn.Read(e.rbuf[:k])
		if m > 0 {
			if err := e.check(e.rbuf[:m]); err != nil {
				return err
			}
			got += m
		}
		if err == io.EOF {
			return errEOF{got, n}
		}
		if err != nil {
			return fmt.Errorf("%s read: %w", e.side, err)
		}
	}
	return nil
}

// check compares received bytes with the stream and accounts for them.
func (e *endpoint) check(b []byte) error {
	exp := e.exp[:len(b)]
	_, _ = e.recvS.Read(exp)
	if !bytes.Equal(b, exp) {
		i := 0
		for i < len(b) && b[i] == exp[i] {
			i++
		}
		return anomaly(fmt.Sprintf("data corrupted at stream offset %d", e.received.Load()+int64(i)))
	}
	e.hr.Write(b)
	e.received.Add(int64(len(b)))
	e.touch()
	return nil
}

func (e *endpoint) expectEOF() error {
	m, err := e.conn.Read(e.rbuf[:64])
	if m > 0 {
		return anomaly(fmt.Sprintf("%d unexpected bytes where EOF was due", m))
	}
	if err == io.EOF {
		return nil
	}
	if err == nil {
		return anomaly("read returned 0 bytes without EOF")
	}
	return fmt.Errorf("%s read at EOF: %w", e.side, err)
}

func (e *endpoint) think() {
	if e.spec.Think > 0 {
		time.Sleep(e.spec.Think)
		e.touch()
	}
}

func (e *endpoint) sleepBeforeRead() {
	if d := e.side.SleepBeforeRead; d > 0 {
		e.setPhase("sleeping before reading (slow reader)")
		// Sleeping is not a stall.
		for end := time.Now().Add(d); time.Now().Before(end); {
			time.Sleep(min(time.Until(end), e.spec.stall()/4))
			e.touch()
		}
	}
}

// resetSeen classifies how a reader saw the peer's reset: nil if it is an
// acceptable ending (ECONNRESET or EOF, after a prefix of the stream).
func (e *endpoint) resetSeen(err error) error {
	var eof errEOF
	switch {
	case err == nil:
		return anomaly("the peer's reset was not seen: the whole message arrived")
	case errors.Is(err, syscall.ECONNRESET):
		e.endedBy = "ECONNRESET"
		return nil
	case errors.As(err, &eof):
		e.endedBy = "EOF"
		return nil
	}
	return err
}

func (e *endpoint) abort() error {
	e.endedBy = "ABORT"
	time.Sleep(abortPause)
	return e.conn.Abort()
}

func (e *endpoint) duplex() error {
	n := e.spec.Duplex
	werr := make(chan error, 1)
	go func() {
		err := e.send(n)
		if err == nil {
			err = e.conn.CloseWrite()
		}
		werr <- err
	}()
	e.setPhase("duplex: reading")
	err := e.recv(n)
	if err == nil {
		err = e.expectEOF()
	}
	if err != nil {
		e.conn.Wake()
	}
	return errors.Join(err, <-werr)
}

func (e *endpoint) clientExchange() error {
	s := e.spec
	if s.Duplex > 0 {
		return e.duplex()
	}
	p := s.Plan()
	for i := range s.Rounds {
		e.think()
		if s.Abort == "client" && i == s.AbortRound {
			e.setPhase(fmt.Sprintf("round %d: sending before the reset", i))
			if err := e.send(s.AbortBytes); err != nil {
				return err
			}
			return e.abort()
		}
		e.setPhase(fmt.Sprintf("round %d/%d: sending request (%d B)", i, s.Rounds, p.Req[i]))
		if err := e.send(p.Req[i]); err != nil {
			return err
		}
		if i == 0 {
			e.sleepBeforeRead()
		}
		e.setPhase(fmt.Sprintf("round %d/%d: reading response (%d B)", i, s.Rounds, p.Resp[i]))
		err := e.recv(p.Resp[i])
		if s.Abort == "server" && i == s.AbortRound {
			return e.resetSeen(err)
		}
		if err != nil {
			return err
		}
		if i == 0 && e.barrier != nil {
			e.setPhase("waiting for all connections to finish round 0")
			e.barrier.arriveAs(e)
			e.barrier.wait(e.touch)
		}
	}
	e.setPhase("half-closing")
	if err := e.conn.CloseWrite(); err != nil {
		return fmt.Errorf("shutdown(SHUT_WR): %w", err)
	}
	e.setPhase(fmt.Sprintf("reading the trailer (%d B) after the half-close", s.Trailer))
	if err := e.recv(s.Trailer); err != nil {
		return err
	}
	e.setPhase("reading EOF")
	return e.expectEOF()
}

func (e *endpoint) serverExchange() error {
	s := e.spec
	if s.Duplex > 0 {
		return e.duplex()
	}
	p := s.Plan()
	for i := range s.Rounds {
		if i == 0 {
			e.sleepBeforeRead()
		}
		e.setPhase(fmt.Sprintf("round %d/%d: reading request (%d B)", i, s.Rounds, p.Req[i]))
		err := e.recv(p.Req[i])
		if s.Abort == "client" && i == s.AbortRound {
			return e.resetSeen(err)
		}
		if err != nil {
			return err
		}
		e.think()
		if s.Abort == "server" && i == s.AbortRound {
			e.setPhase(fmt.Sprintf("round %d: sending before the reset", i))
			if err := e.send(s.AbortBytes); err != nil {
				return err
			}
			return e.abort()
		}
		e.setPhase(fmt.Sprintf("round %d/%d: sending response (%d B)", i, s.Rounds, p.Resp[i]))
		if err := e.send(p.Resp[i]); err != nil {
			return err
		}
	}
	e.setPhase("reading the client's EOF (half-close)")
	if err := e.expectEOF(); err != nil {
		return err
	}
	e.setPhase(fmt.Sprintf("sending the trailer (%d B)", s.Trailer))
	return e.send(s.Trailer)
}

// barrier holds connections until all have arrived (or failed).
type barrier struct {
	mu      sync.Mutex
	n       int
	arrived map[*endpoint]bool
	all     chan struct{}
}

func newBarrier(n int) *barrier {
	return &barrier{n: n, arrived: map[*endpoint]bool{}, all: make(chan struct{})}
}

func (b *barrier) arriveAs(e *endpoint) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.arrived[e] {
		return
	}
	b.arrived[e] = true
	if len(b.arrived) == b.n {
		close(b.all)
	}
}

func (b *barrier) wait(tick func()) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-b.all:
			return
		case <-t.C:
			tick()
		}
	}
}

// ---- wire header ----

func writeHeader(w io.Writer, s *Spec) error {
	body, err := json.Marshal(s)
	if err != nil {
		return err
	}
	hdr := make([]byte, 8, 8+len(body))
	copy(hdr, headerMagic)
	binary.BigEndian.PutUint32(hdr[4:], uint32(len(body)))
	_, err = w.Write(append(hdr, body...))
	return err
}

func readHeader(r io.Reader) (*Spec, error) {
	var hdr [8]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	n := binary.BigEndian.Uint32(hdr[4:])
	if string(hdr[:4]) != headerMagic || n > maxHeader {
		return nil, fmt.Errorf("bad header %q", hdr)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	var s Spec
	if err := json.Unmarshal(body, &s); err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	return &s, nil
}

// ---- apps ----

type resultPrinter struct{ mu sync.Mutex }

func (p *resultPrinter) print(r ConnResult) {
	b, _ := json.Marshal(r)
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Printf("RESULT %s\n", b)
}

// compat-server --listen ADDR:PORT [--listen ...]
//
// Accepts connections, reads each one's Spec header and runs the server end
// of it. Prints "READY" once listening and one "RESULT <json>" per
// connection.
func appServer(args []string) int {
	fs := flag.NewFlagSet("compat-server", flag.ContinueOnError)
	var listens []string
	fs.Func("listen", "ADDR:PORT (repeatable; [::] is v6 only)", func(s string) error { listens = append(listens, s); return nil })
	if err := fs.Parse(args); err != nil || len(listens) == 0 {
		fmt.Fprintln(os.Stderr, "compat-server: need --listen")
		return 2
	}
	if err := setupSignals(); err != nil {
		fmt.Fprintf(os.Stderr, "compat-server: %v\n", err)
		return 1
	}
	out := &resultPrinter{}
	for _, l := range listens {
		ap, err := netip.ParseAddrPort(l)
		if err != nil {
			fmt.Fprintf(os.Stderr, "compat-server: bad --listen %q\n", l)
			return 2
		}
		network := "tcp4"
		if ap.Addr().Is6() {
			network = "tcp6"
		}
		ln, err := net.ListenTCP(network, net.TCPAddrFromAddrPort(ap))
		if err != nil {
			fmt.Fprintf(os.Stderr, "compat-server: %v\n", err)
			return 1
		}
		go func() {
			for {
				c, err := ln.AcceptTCP()
				if err != nil {
					fmt.Fprintf(os.Stderr, "compat-server: accept: %v\n", err)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				go serveConn(c, out)
			}
		}()
	}
	fmt.Println("READY")
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	<-ctx.Done()
	return 0
}

func serveConn(tc *net.TCPConn, out *resultPrinter) {
	_ = tc.SetReadDeadline(time.Now().Add(DefaultStall))
	spec, err := readHeader(tc)
	if err != nil {
		out.print(ConnResult{ID: "?" + tc.RemoteAddr().String(), Role: "server", Error: err.Error(), BlockedAfter: -1})
		tc.Close()
		return
	}
	_ = tc.SetReadDeadline(time.Time{})
	e := newEndpoint(spec, "server", out.print)
	e.run(func() error {
		if err := e.attach(tc); err != nil {
			return err
		}
		return e.serverExchange()
	})
}

// compat-client --target ADDR:PORT --spec JSON [--conns N]
//
// Runs N connections of the Spec at once (ids <id>#<i>, seeds seed+i; with
// N > 1 all of them finish round 0 before any goes on), prints one
// "RESULT <json>" per connection, then "DONE".
func appClient(args []string) int {
	fs := flag.NewFlagSet("compat-client", flag.ContinueOnError)
	target := fs.String("target", "", "ADDR:PORT")
	specJSON := fs.String("spec", "", "Spec as JSON")
	conns := fs.Int("conns", 1, "connections at once")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ap, err := netip.ParseAddrPort(*target)
	var spec Spec
	if err == nil {
		err = json.Unmarshal([]byte(*specJSON), &spec)
	}
	if err != nil || *conns < 1 {
		fmt.Fprintf(os.Stderr, "compat-client: bad --target, --spec or --conns: %v\n", err)
		return 2
	}
	if err := setupSignals(); err != nil {
		fmt.Fprintf(os.Stderr, "compat-client: %v\n", err)
		return 1
	}
	out := &resultPrinter{}
	var wg sync.WaitGroup
	var bar *barrier
	if *conns > 1 {
		bar = newBarrier(*conns)
	}
	for i := range *conns {
		s := spec
		if *conns > 1 {
			s.ID = spec.ID + "#" + strconv.Itoa(i)
			s.Seed = spec.Seed + uint64(i)
		}
		wg.Add(1)
		e := newEndpoint(&s, "client", func(r ConnResult) { out.print(r); wg.Done() })
		e.barrier = bar
		go e.run(func() error {
			network := "tcp4"
			if ap.Addr().Is6() {
				network = "tcp6"
			}
			d := net.Dialer{Timeout: s.stall()}
			c, err := d.Dial(network, ap.String())
			if err != nil {
				return fmt.Errorf("connect: %w", err)
			}
			e.touch()
			tc := c.(*net.TCPConn)
			if err := writeHeader(tc, &s); err != nil {
				tc.Close()
				return fmt.Errorf("header: %w", err)
			}
			if err := e.attach(tc); err != nil {
				return err
			}
			return e.clientExchange()
		})
	}
	// Every connection reports exactly once (the watchdog reports stuck
	// ones), so this returns even if a thread stays blocked in the kernel.
	wg.Wait()
	fmt.Println("DONE")
	return 0
}
