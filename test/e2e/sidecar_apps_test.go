package e2e

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/shuntmesh/shunt/test/harness"
)

// Apps for the sidecar tests, run inside harness pods:
//
//   - origdst: a stand-in for a sidecar's listener. For every accepted
//     connection it asks getsockopt(SO_ORIGINAL_DST) (IP6T_SO_ORIGINAL_DST on
//     IPv6 sockets), sends "ORIG <addr:port>\n" (or "ORIG none <error>\n")
//     and then echoes everything until EOF with explicit read/write loops.
//   - ask: connects to --target, reads the ORIG line, sends --bytes random
//     bytes, half-closes, reads the echo to EOF and checks its SHA-256.
//     Prints "ORIG <x> PEER <getpeername> ECHO <n> OK".
func init() {
	harness.RegisterApp("origdst", origdstApp)
	harness.RegisterApp("ask", askApp)
}

func origdstApp(args []string) int {
	fs := flag.NewFlagSet("origdst", flag.ContinueOnError)
	var listens multiFlag
	fs.Var(&listens, "listen", "address to listen on (repeatable)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	for _, l := range listens {
		network := "tcp4"
		if strings.HasPrefix(l, "[") {
			network = "tcp6"
		}
		ln, err := net.Listen(network, l)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go serveOrigDst(c.(*net.TCPConn))
			}
		}()
	}
	fmt.Println("READY")
	select {}
}

func serveOrigDst(c *net.TCPConn) {
	defer c.Close()
	orig, err := originalDst(c)
	line := "ORIG " + orig.String() + "\n"
	if err != nil {
		line = "ORIG none " + err.Error() + "\n"
	}
	if _, err := c.Write([]byte(line)); err != nil {
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
			c.CloseWrite()
			return
		}
	}
}

// originalDst asks the kernel (and Shunt's getsockopt hook) for the
// connection's original destination, as Envoy's original_dst filter does.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	v6 := c.LocalAddr().(*net.TCPAddr).IP.To4() == nil
	var out netip.AddrPort
	var gerr error
	raw.Control(func(fd uintptr) {
		buf := make([]byte, 28)
		level, n := unix.SOL_IP, 16
		if v6 {
			level, n = unix.SOL_IPV6, 28
		}
		l := uint32(n)
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), 80 /* SO_ORIGINAL_DST */, uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
		if e != 0 {
			gerr = e
			return
		}
		port := binary.BigEndian.Uint16(buf[2:4])
		if binary.NativeEndian.Uint16(buf[0:2]) == unix.AF_INET {
			out = netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port)
		} else {
			out = netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])).Unmap(), port)
		}
	})
	return out, gerr
}

func askApp(args []string) int {
	fs := flag.NewFlagSet("ask", flag.ContinueOnError)
	target := fs.String("target", "", "address to connect to")
	n := fs.Int("bytes", 1<<20, "bytes to send and expect back")
	dur := fs.Duration("duration", 0, "send for this long instead (64 KiB chunks, 1 ms apart)")
	until := fs.String("until", "", "with --duration: stop early once this file exists")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	untilFile = *until
	if err := ask(*target, *n, *dur); err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	return 0
}

var untilFile string

func stopRequested() bool {
	if untilFile == "" {
		return false
	}
	_, err := os.Stat(untilFile)
	return err == nil
}

func ask(target string, n int, dur time.Duration) error {
	c, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		return err
	}
	tc := c.(*net.TCPConn)
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(20*time.Second + dur))
	r := bufio.NewReader(tc)
	line, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("read ORIG line: %w", err)
	}
	sent := sha256.New()
	var total int64
	werr := make(chan error, 1)
	go func() {
		werr <- func() error {
			if dur == 0 {
				data := make([]byte, n)
				rand.Read(data)
				sent.Write(data)
				total = int64(n)
				if _, err := tc.Write(data); err != nil {
					return err
				}
				return tc.CloseWrite()
			}
			chunk := make([]byte, 64<<10)
			for end := time.Now().Add(dur); time.Now().Before(end) && !stopRequested(); {
				rand.Read(chunk)
				sent.Write(chunk)
				total += int64(len(chunk))
				if _, err := tc.Write(chunk); err != nil {
					return err
				}
				time.Sleep(time.Millisecond)
			}
			return tc.CloseWrite()
		}()
	}()
	h := sha256.New()
	got, err := io.Copy(h, struct{ io.Reader }{r})
	if err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if got != total || !bytes.Equal(h.Sum(nil), sent.Sum(nil)) {
		return fmt.Errorf("echo: %d bytes, checksum mismatch=%v (sent %d)", got, !bytes.Equal(h.Sum(nil), sent.Sum(nil)), total)
	}
	if !strings.HasPrefix(line, "ORIG ") {
		return errors.New("no ORIG line: " + line)
	}
	fmt.Printf("%s PEER %s ECHO %d OK\n", strings.TrimSpace(line), tc.RemoteAddr(), got)
	return nil
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
