package datapath

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/cilium/ebpf"

	"github.com/shuntmesh/shunt/bpf"
)

// SelfTestResult is the outcome of the sockmap self-test on the running
// kernel.
type SelfTestResult struct {
	Passed bool            `json:"passed"`
	Checks []SelfTestCheck `json:"checks"`
}

// SelfTestCheck is one probe of the self-test.
type SelfTestCheck struct {
	Name   string `json:"name"`
	Passed bool   `json:"passed"`
	// Info probes describe a property without deciding the result.
	Info   bool   `json:"info,omitempty"`
	Detail string `json:"detail,omitempty"`
}

// selfTestStall bounds each probe: no progress for this long is a stall.
// It is a liveness bound, not a performance expectation.
const selfTestStall = 5 * time.Second

// SelfTest runs, on this kernel and with the loaded programs, the I/O
// patterns that `sockmap: auto` relies on for the sockets it accelerates (a
// proxy's: non-blocking epoll reads and writes, half-close, reset): a pair of
// loopback TCP sockets of the agent is put in the sockhash, every byte is
// checksummed and every probe is bounded (no stall). auto accelerates
// nothing unless this passes. Patterns auto never exposes to a sockhash
// (blocking reads interrupted by signals, FIONREAD, SO_RCVLOWAT, splice, ...)
// are the app-compatibility suite's business, not this test's.
func (d *Datapath) SelfTest() SelfTestResult {
	res := SelfTestResult{Passed: true}
	check := func(name string, fn func() error) {
		c := SelfTestCheck{Name: name, Passed: true}
		if err := fn(); err != nil {
			c.Passed, c.Detail = false, err.Error()
			res.Passed = false
		}
		res.Checks = append(res.Checks, c)
	}
	check("redirect: sizes 1 B .. 4 MiB both ways, checksummed", func() error {
		return d.withPair(func(a, b *net.TCPConn) error {
			before := d.globalStat(bpf.SockmeshShuntStatSTAT_MSG_REDIRECT)
			for _, n := range []int{1, 100, 4096, 65536, 1 << 20, 4 << 20} {
				if err := exchange(a, b, n); err != nil {
					return fmt.Errorf("%d bytes a->b: %w", n, err)
				}
				if err := exchange(b, a, n); err != nil {
					return fmt.Errorf("%d bytes b->a: %w", n, err)
				}
			}
			if d.globalStat(bpf.SockmeshShuntStatSTAT_MSG_REDIRECT) == before {
				return errors.New("no send was redirected: the sk_msg program is not attached to the sockhash")
			}
			return nil
		})
	})
	check("half-close: EOF after shutdown(SHUT_WR), reply still delivered", func() error {
		return d.withPair(func(a, b *net.TCPConn) error {
			req, rep := randBytes(70000), randBytes(50000)
			deadline(a, b)
			if _, err := a.Write(req); err != nil {
				return err
			}
			if err := a.CloseWrite(); err != nil {
				return err
			}
			got, err := io.ReadAll(b) // must end with EOF, not stall
			if err != nil {
				return fmt.Errorf("server read to EOF: %w", err)
			}
			if !bytes.Equal(got, req) {
				return fmt.Errorf("server got %d bytes, want %d (checksum mismatch)", len(got), len(req))
			}
			if _, err := b.Write(rep); err != nil {
				return err
			}
			b.CloseWrite()
			got, err = io.ReadAll(a)
			if err != nil {
				return fmt.Errorf("client read reply to EOF: %w", err)
			}
			if !bytes.Equal(got, rep) {
				return fmt.Errorf("client got %d bytes, want %d", len(got), len(rep))
			}
			return nil
		})
	})
	check("reset: the peer sees the RST promptly", func() error {
		return d.withPair(func(a, b *net.TCPConn) error {
			deadline(a, b)
			if err := exchange(a, b, 1000); err != nil {
				return err
			}
			a.SetLinger(0)
			a.Close()
			buf := make([]byte, 100)
			_, err := b.Read(buf)
			if err == nil {
				return errors.New("read after the peer's RST returned data")
			}
			if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("read after the peer's RST: %w (want ECONNRESET or EOF)", err)
		})
	})
	bp := d.backPressureProbe()
	res.Passed = res.Passed && bp.Passed
	res.Checks = append(res.Checks, bp)
	return res
}

// backPressureLimit bounds what a writer may queue towards a reader that
// does not read: the kernel gives redirected sends no back-pressure, so
// sk_msg sends through TCP once the peer's queue holds its receive buffer
// (at most tcp_rmem's maximum, 6 MiB by default), and TCP then blocks the
// writer (its send buffer, at most tcp_wmem's maximum, 4 MiB by default).
const backPressureLimit = 32 << 20

// backPressureProbe measures how much a writer can queue with a reader that
// does not read, then checks that every byte still arrives in order once
// the reader reads (the switch from redirect to TCP and back).
func (d *Datapath) backPressureProbe() SelfTestCheck {
	c := SelfTestCheck{Name: "back-pressure: the writer blocks while the reader sleeps, every byte arrives in order", Passed: true}
	err := d.withPair(func(a, b *net.TCPConn) error {
		a.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
		chunk := make([]byte, 1<<20)
		h := sha256.New()
		total := 0
		for total < 64<<20 {
			rand.Read(chunk)
			n, err := a.Write(chunk)
			h.Write(chunk[:n])
			total += n
			if err != nil {
				break
			}
		}
		c.Detail = fmt.Sprintf("%d KiB accepted before the writer blocked", total>>10)
		if total > backPressureLimit {
			return fmt.Errorf("%d KiB accepted without blocking (limit %d KiB): no back-pressure on redirected sockets", total>>10, backPressureLimit>>10)
		}
		deadline(a, b)
		got := sha256.New()
		if _, err := io.CopyN(got, onlyReader{b}, int64(total)); err != nil {
			return fmt.Errorf("read the %d KiB back: %w", total>>10, err)
		}
		if !bytes.Equal(got.Sum(nil), h.Sum(nil)) {
			return errors.New("bytes queued across the switch to TCP arrived out of order (checksum mismatch)")
		}
		// Redirects resume once TCP drained, and the stream stays whole.
		return exchange(a, b, 1<<20)
	})
	if err != nil {
		c.Passed, c.Detail = false, err.Error()
	}
	return c
}

func deadline(conns ...*net.TCPConn) {
	for _, c := range conns {
		c.SetDeadline(time.Now().Add(selfTestStall))
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// exchange writes n random bytes on w and reads them on r, concurrently,
// comparing checksums.
func exchange(w, r *net.TCPConn, n int) error {
	deadline(w, r)
	data := randBytes(n)
	errc := make(chan error, 1)
	go func() {
		_, err := w.Write(data)
		errc <- err
	}()
	h := sha256.New()
	if _, err := io.CopyN(h, onlyReader{r}, int64(n)); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if err := <-errc; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if want := sha256.Sum256(data); !bytes.Equal(h.Sum(nil), want[:]) {
		return errors.New("checksum mismatch")
	}
	return nil
}

// onlyReader hides WriteTo/ReadFrom so io.Copy cannot use splice.
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

// withPair makes a loopback TCP connection of the agent's own, puts both
// ends in the sockhash (keys as the programs compute them) and runs fn.
func (d *Datapath) withPair(fn func(a, b *net.TCPConn) error) error {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return err
	}
	defer ln.Close()
	a, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		return err
	}
	defer a.Close()
	b, err := ln.AcceptTCP()
	if err != nil {
		return err
	}
	defer b.Close()
	ns, err := socketNetNSCookie()
	if err != nil {
		return err
	}
	for _, c := range []*net.TCPConn{a, b} {
		if err := d.insertSocket(c, ns); err != nil {
			return err
		}
		defer d.objs.AccelSocks.Delete(sockKeyOf(c, ns))
	}
	// One byte each way: each end's first send makes it findable by its
	// peer (sockops does that for the sockets it inserts).
	for _, p := range [][2]*net.TCPConn{{a, b}, {b, a}, {a, b}} {
		if err := exchange(p[0], p[1], 1); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}
	return fn(a, b)
}

func sockKeyOf(c *net.TCPConn, ns uint64) *bpf.SockmeshSockKey {
	k := SockKey(c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort(), ns)
	return &k
}

func (d *Datapath) insertSocket(c *net.TCPConn, ns uint64) error {
	l := c.LocalAddr().(*net.TCPAddr).AddrPort()
	r := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	k := SockKey(l, r, ns)
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var perr error
	err = raw.Control(func(fd uintptr) {
		// The per-socket state first: sk_msg redirects only sends of
		// sockets that have it.
		if perr = d.objs.RedirState.Update(int32(fd), bpf.SockmeshRedirState{}, ebpf.UpdateNoExist); perr != nil {
			return
		}
		perr = d.objs.SockHash.Update(&k, uint64(fd), 0)
	})
	if err == nil {
		err = perr
	}
	if err != nil {
		return fmt.Errorf("insert socket in %s: %w", bpf.SockmeshMapSockHash, err)
	}
	return nil
}

// SockKey is the sockhash key of a TCP connection seen from its local end,
// as the programs compute it (loopback connections carry the netns cookie).
func SockKey(local, remote netip.AddrPort, netnsCookie uint64) bpf.SockmeshSockKey {
	l := MakeAddr(local, "")
	r := MakeAddr(remote, "")
	k := bpf.SockmeshSockKey{LocalIp: l.Ip, RemoteIp: r.Ip, LocalPort: l.Port, RemotePort: r.Port, Family: uint32(l.Family)}
	if remote.Addr().Unmap().IsLoopback() {
		k.Netns = netnsCookie
	}
	return k
}

func (d *Datapath) globalStat(i bpf.SockmeshShuntStat) uint64 {
	var per []uint64
	if err := d.objs.Stats.Lookup(uint32(i), &per); err != nil {
		return 0
	}
	var sum uint64
	for _, v := range per {
		sum += v
	}
	return sum
}
