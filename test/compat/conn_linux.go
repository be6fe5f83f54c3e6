package compat

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ioConn is one end's socket, driven in one I/O style.
type ioConn interface {
	// Read reads at most len(p) bytes; io.EOF at the end of the stream.
	Read(p []byte) (int, error)
	// Write writes all of p.
	Write(p []byte) error
	CloseWrite() error
	// Abort resets the connection: SO_LINGER 0, then close.
	Abort() error
	Close() error
	// Wake unblocks whatever is blocked on the socket (after a stall).
	Wake()
}

// anomaly is behaviour an application would not expect from the kernel.
type anomaly string

func (a anomaly) Error() string { return string(a) }

// ---- Go netpoller ----

type epollConn struct{ c *net.TCPConn }

func (e *epollConn) Read(p []byte) (int, error) { return e.c.Read(p) }
func (e *epollConn) Write(p []byte) error {
	_, err := e.c.Write(p)
	return err
}
func (e *epollConn) CloseWrite() error { return e.c.CloseWrite() }
func (e *epollConn) Abort() error {
	return errors.Join(e.c.SetLinger(0), e.c.Close())
}
func (e *epollConn) Close() error { return e.c.Close() }
func (e *epollConn) Wake()        { _ = e.c.SetDeadline(time.Now()) }

// ---- raw file descriptor ----

// rcvlowatTimeout is the IORcvlowat style's SO_RCVTIMEO. Plain TCP has a
// wakeup gap with SO_RCVLOWAT and blocking reads: a read that copied part
// of the low-water mark and then sleeps is only woken when a whole
// low-water mark of new data is queued (tcp_data_ready compares the bytes
// not yet copied with sk_rcvlowat), so when the sender has nothing more to
// send the read never returns. An application with a receive timeout gets
// its data when the timeout wakes the read; the style's reader does the
// same and counts such reads (ConnResult.RcvlowatTimeouts).
const rcvlowatTimeout = time.Second

const (
	rcvlowatMax = 16 << 10
	pipeChunk   = 64 << 10 // default pipe capacity
	pollSlice   = 200      // ms per poll(2) call; the stall watchdog bounds the total
)

type rawConn struct {
	fd      int
	io      string
	signals string
	eintr   *atomic.Int64
	woken   atomic.Bool
	mu      sync.Mutex // fd closing vs Wake
	// progress is called after every system call that moved bytes.
	progress func()

	peekBuf      []byte
	lowat        int
	pipeR, pipeW int // IOSplice
	lowatRescued int64
	memfd        int // IOSendfile
	fileEnd      int64
	// IONonblock writer: payload bytes accepted, and how many before the
	// first EAGAIN (-1: none yet).
	written      atomic.Int64
	blockedAfter int64
}

// newRawConn takes over fd (a connected TCP socket) for style io.
func newRawConn(fd int, io, signals string, eintr *atomic.Int64, progress func()) (*rawConn, error) {
	c := &rawConn{fd: fd, io: io, signals: signals, eintr: eintr, progress: progress, pipeR: -1, pipeW: -1, memfd: -1, blockedAfter: -1}
	nonblock := io == IOFionread || io == IONonblock
	if err := unix.SetNonblock(fd, nonblock); err != nil {
		return nil, err
	}
	switch io {
	case IOSplice:
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			return nil, err
		}
		c.pipeR, c.pipeW = p[0], p[1]
	case IOSendfile:
		fd, err := unix.MemfdCreate("compat-sendfile", unix.MFD_CLOEXEC)
		if err != nil {
			return nil, err
		}
		c.memfd = fd
	case IOPeek:
		c.peekBuf = make([]byte, 256<<10)
	case IORcvlowat:
		tv := unix.NsecToTimeval(rcvlowatTimeout.Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// again applies the style's policy to a failed system call: true means
// retry it.
func (c *rawConn) again(op string, err error) (bool, error) {
	switch {
	case errors.Is(err, unix.EINTR):
		c.eintr.Add(1)
		switch c.signals {
		case SigNoRestart:
			return true, nil
		case SigRestart:
			return false, anomaly(op + ": EINTR although the signal handler has SA_RESTART")
		}
		return false, anomaly(op + ": EINTR without a signal")
	case errors.Is(err, unix.EAGAIN):
		return false, anomaly(op + ": EAGAIN on a blocking socket")
	}
	return false, fmt.Errorf("%s: %w", op, err)
}

func (c *rawConn) sysRead(fd int, p []byte, op string) (int, error) {
	for {
		n, err := unix.Read(fd, p)
		if err == nil {
			return n, nil
		}
		if retry, err := c.again(op, err); !retry {
			return 0, err
		}
	}
}

func (c *rawConn) sysRecv(p []byte, flags int, op string) (int, error) {
	for {
		n, _, err := unix.Recvfrom(c.fd, p, flags)
		if err == nil {
			return n, nil
		}
		if retry, err := c.again(op, err); !retry {
			return 0, err
		}
	}
}

func (c *rawConn) Read(p []byte) (int, error) {
	if c.woken.Load() {
		return 0, anomaly("woken after a stall")
	}
	n, err := c.read(p)
	if n > 0 {
		c.progress()
	}
	if err == nil && n == 0 && len(p) > 0 {
		err = io.EOF
	}
	return n, err
}

func (c *rawConn) read(p []byte) (int, error) {
	switch c.io {
	case IOPeek:
		peek := c.peekBuf[:min(len(p), len(c.peekBuf))]
		n, err := c.sysRecv(peek, unix.MSG_PEEK, "recv(MSG_PEEK)")
		if err != nil || n == 0 {
			return 0, err
		}
		m, err := c.sysRead(c.fd, p[:n], "read after MSG_PEEK")
		if err != nil {
			return 0, err
		}
		if m != n {
			return m, anomaly(fmt.Sprintf("read after MSG_PEEK of %d bytes returned %d", n, m))
		}
		if !bytes.Equal(p[:m], peek[:n]) {
			return m, anomaly("read returned other bytes than MSG_PEEK showed")
		}
		return m, nil
	case IOWaitAll:
		n, err := c.sysRecv(p, unix.MSG_WAITALL, "recv(MSG_WAITALL)")
		if err == nil && n > 0 && n < len(p) {
			return n, anomaly(fmt.Sprintf("short MSG_WAITALL read: %d of %d bytes", n, len(p)))
		}
		return n, err
	case IORcvlowat:
		want := min(rcvlowatMax, len(p))
		if want != c.lowat {
			if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, want); err != nil {
				return 0, fmt.Errorf("SO_RCVLOWAT: %w", err)
			}
			c.lowat = want
		}
		for {
			start := time.Now()
			n, err := unix.Read(c.fd, p)
			timedOut := time.Since(start) >= rcvlowatTimeout*9/10
			switch {
			case errors.Is(err, unix.EAGAIN) && timedOut:
				continue // SO_RCVTIMEO with nothing read: the watchdog bounds it
			case err != nil:
				if retry, err := c.again("read", err); !retry {
					return 0, err
				}
				continue
			case n > 0 && n < want:
				return n, anomaly(fmt.Sprintf("read returned %d bytes, below SO_RCVLOWAT %d", n, want))
			case n > 0 && timedOut:
				c.lowatRescued++ // the data was there; only the timeout woke the read
			}
			return n, nil
		}
	case IOSplice:
		n, err := c.spliceIn(min(len(p), pipeChunk))
		if err != nil || n == 0 {
			return 0, err
		}
		for got := 0; got < n; {
			m, err := c.sysRead(c.pipeR, p[got:n], "read(pipe)")
			if err != nil {
				return got, err
			}
			if m == 0 {
				return got, anomaly("pipe EOF")
			}
			got += m
		}
		return n, nil
	case IOFionread, IONonblock:
		for {
			if err := c.waitPoll(unix.POLLIN); err != nil {
				return 0, err
			}
			queued := -1
			if c.io == IOFionread {
				v, err := unix.IoctlGetInt(c.fd, unix.SIOCINQ) // == FIONREAD
				if err != nil {
					return 0, fmt.Errorf("ioctl(FIONREAD): %w", err)
				}
				queued = v
			}
			n, err := unix.Read(c.fd, p)
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				if queued > 0 {
					return 0, anomaly(fmt.Sprintf("FIONREAD %d but read(2) returned EAGAIN", queued))
				}
				continue // spurious readiness: wait again
			}
			if err != nil {
				return 0, fmt.Errorf("read: %w", err)
			}
			if n > 0 && queued == 0 {
				return n, anomaly(fmt.Sprintf("FIONREAD 0 after poll(POLLIN), yet read(2) returned %d bytes", n))
			}
			return n, nil
		}
	default: // IOBlocking, IOSendfile, IOZeroWrite
		return c.sysRead(c.fd, p, "read")
	}
}

func (c *rawConn) spliceIn(n int) (int, error) {
	for {
		m, err := unix.Splice(c.fd, nil, c.pipeW, nil, n, unix.SPLICE_F_MOVE)
		if err == nil {
			return int(m), nil
		}
		if retry, err := c.again("splice(socket→pipe)", err); !retry {
			return 0, err
		}
	}
}

// waitPoll waits until the socket is ready for events (nonblocking styles).
func (c *rawConn) waitPoll(events int16) error {
	for {
		if c.woken.Load() {
			return anomaly("woken after a stall")
		}
		fds := []unix.PollFd{{Fd: int32(c.fd), Events: events}}
		n, err := unix.Poll(fds, pollSlice)
		if errors.Is(err, unix.EINTR) || n == 0 {
			continue
		}
		if err != nil {
			return fmt.Errorf("poll: %w", err)
		}
		return nil
	}
}

func (c *rawConn) Write(p []byte) error {
	if c.woken.Load() {
		return anomaly("woken after a stall")
	}
	switch c.io {
	case IOSplice:
		for len(p) > 0 {
			chunk := p[:min(len(p), pipeChunk)]
			if err := c.writeAll(c.pipeW, chunk, "write(pipe)"); err != nil {
				return err
			}
			for left := len(chunk); left > 0; {
				m, err := unix.Splice(c.pipeR, nil, c.fd, nil, left, unix.SPLICE_F_MOVE)
				if err != nil {
					if retry, err := c.again("splice(pipe→socket)", err); !retry {
						return err
					}
					continue
				}
				left -= int(m)
				c.progress()
			}
			p = p[len(chunk):]
		}
		return nil
	case IOSendfile:
		// The stream is appended to the file, never overwritten: sendfile
		// queues references to the file's pages, which must not change
		// until the receiver has read them.
		off := c.fileEnd
		if _, err := unix.Pwrite(c.memfd, p, off); err != nil {
			return fmt.Errorf("pwrite(memfd): %w", err)
		}
		c.fileEnd += int64(len(p))
		for off < c.fileEnd {
			m, err := unix.Sendfile(c.fd, c.memfd, &off, int(c.fileEnd-off))
			if err != nil {
				if retry, err := c.again("sendfile", err); !retry {
					return err
				}
				continue
			}
			if m == 0 {
				return anomaly("sendfile returned 0")
			}
			c.progress()
		}
		return nil
	case IOZeroWrite:
		n, err := unix.Write(c.fd, p[:0])
		if err != nil || n != 0 {
			return anomaly(fmt.Sprintf("zero-length write returned %d, %v", n, err))
		}
		return c.writeAll(c.fd, p, "write")
	case IOFionread, IONonblock:
		for len(p) > 0 {
			n, err := unix.Write(c.fd, p)
			if errors.Is(err, unix.EAGAIN) {
				if c.blockedAfter < 0 {
					c.blockedAfter = c.written.Load()
				}
				if err := c.waitPoll(unix.POLLOUT); err != nil {
					return err
				}
				continue
			}
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				return fmt.Errorf("write: %w", err)
			}
			c.written.Add(int64(n))
			p = p[n:]
			c.progress()
		}
		return nil
	default:
		return c.writeAll(c.fd, p, "write")
	}
}

func (c *rawConn) writeAll(fd int, p []byte, op string) error {
	for len(p) > 0 {
		n, err := unix.Write(fd, p)
		if err != nil {
			if retry, err := c.again(op, err); !retry {
				return err
			}
			continue
		}
		p = p[n:]
		if fd == c.fd {
			c.progress()
		}
	}
	return nil
}

func (c *rawConn) CloseWrite() error { return unix.Shutdown(c.fd, unix.SHUT_WR) }

func (c *rawConn) Abort() error {
	err := unix.SetsockoptLinger(c.fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	return errors.Join(err, c.Close())
}

func (c *rawConn) Close() error {
	for _, fd := range []int{c.pipeR, c.pipeW, c.memfd} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	c.pipeR, c.pipeW, c.memfd = -1, -1, -1
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return nil
	}
	err := unix.Close(c.fd)
	c.fd = -1
	return err
}

// Wake shuts the socket down so that a blocked call returns (the socket is
// given up: it stalled).
func (c *rawConn) Wake() {
	c.woken.Store(true)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd >= 0 {
		_ = unix.Shutdown(c.fd, unix.SHUT_RDWR)
	}
}

// detach turns a Go TCP connection into a raw file descriptor: a duplicate
// is kept and the net.Conn closed (the socket stays open).
func detach(tc *net.TCPConn) (int, error) {
	rc, err := tc.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd := -1
	var derr error
	err = rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	})
	if err = errors.Join(err, derr); err != nil {
		return -1, err
	}
	if err := tc.Close(); err != nil {
		unix.Close(nfd)
		return -1, err
	}
	return nfd, nil
}
