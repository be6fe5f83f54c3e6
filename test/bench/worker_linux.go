package bench

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The worker is the hidden `shuntctl bench worker client|server ...`: the
// processes a benchmark starts inside its network namespaces and cgroups.
// Both use blocking raw syscalls on a locked OS thread, so the numbers
// reflect the kernel path rather than Go's netpoller.

// ClientResult is what a client worker prints (one JSON line).
type ClientResult struct {
	// Tx counts the transactions of the measured interval, Elapsed its length.
	Tx      uint64        `json:"tx"`
	Elapsed time.Duration `json:"elapsedNs"`
	// Connects counts every connect() that succeeded, warm-up included.
	Connects uint64 `json:"connects"`
	// CPU is the process's user+system time during the measured interval.
	CPU time.Duration `json:"cpuNs"`
	// Cgroup is the worker's cgroup v2 path (/proc/self/cgroup), NetNS the
	// inode of its network namespace: checked by the runner.
	Cgroup string `json:"cgroup"`
	NetNS  uint64 `json:"netnsIno"`
	Err    string `json:"err,omitempty"`
}

// Rate is transactions per second over the measured interval.
func (r ClientResult) Rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Tx) / r.Elapsed.Seconds()
}

// Worker runs a worker command and returns its exit code.
func Worker(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "bench worker: want client, server, echo, sclient or proxy")
		return 2
	}
	var err error
	switch args[0] {
	case "client":
		err = clientMain(args[1:], stdout)
	case "server":
		err = serverMain(args[1:], stdout)
	case "echo":
		err = echoMain(args[1:], stdout)
	case "sclient":
		err = sclientMain(args[1:], stdout)
	case "proxy":
		err = proxyMain(args[1:], stdout)
	case "xds-clients":
		err = xdsClientsMain(args[1:], stdout)
	default:
		err = fmt.Errorf("unknown worker %q", args[0])
	}
	if err != nil {
		fmt.Fprintln(stderr, "bench worker:", err)
		return 1
	}
	return 0
}

// pinThread binds the calling (locked) OS thread to cpu; cpu < 0: no-op.
func pinThread(cpu int) error {
	if cpu < 0 {
		return nil
	}
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("pin to CPU %d: %w", cpu, err)
	}
	return nil
}

func sockaddr(ap netip.AddrPort) (unix.Sockaddr, error) {
	if !ap.Addr().Is4() {
		return nil, fmt.Errorf("%s: only IPv4 is supported", ap)
	}
	return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}, nil
}

func selfCgroup() string {
	b, _ := os.ReadFile("/proc/self/cgroup")
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			return p
		}
	}
	return ""
}

func selfNetNS() uint64 {
	var st unix.Stat_t
	if unix.Stat("/proc/self/ns/net", &st) != nil {
		return 0
	}
	return st.Ino
}

func cpuTime() time.Duration {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// retry runs a syscall again while it is interrupted by a signal.
func retry(f func() (int, error)) (int, error) {
	for {
		n, err := f()
		if !errors.Is(err, unix.EINTR) {
			return n, err
		}
	}
}

// connect is a blocking connect(2). A connect interrupted by a signal goes
// on in the background: wait for it and read its outcome.
func connect(fd int, sa unix.Sockaddr) error {
	err := unix.Connect(fd, sa)
	if !errors.Is(err, unix.EINTR) {
		return err
	}
	for {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		if _, err := retry(func() (int, error) { return unix.Poll(pfd, -1) }); err != nil {
			return err
		}
		if pfd[0].Revents != 0 {
			break
		}
	}
	soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if soerr != 0 {
		return unix.Errno(soerr)
	}
	return nil
}

// transaction is one TCP_CRR transaction: connect, send 1 byte, read 1
// byte back, close.
func transaction(sa unix.Sockaddr, buf []byte) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	if err := connect(fd, sa); err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	if _, err := retry(func() (int, error) { return unix.Write(fd, buf[:1]) }); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	n, err := retry(func() (int, error) { return unix.Read(fd, buf[:1]) })
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if n != 1 {
		return errors.New("read: connection closed without a reply")
	}
	return nil
}

// client is a client worker's transaction loop.
type client struct {
	sas   []unix.Sockaddr
	names []string
	next  int
	buf   []byte
	// connects counts every successful connect() of the process.
	connects uint64
}

// loop runs transactions for warm (unmeasured), then for dur (measured).
func (c *client) loop(warm, dur time.Duration) ClientResult {
	res := ClientResult{Cgroup: selfCgroup(), NetNS: selfNetNS()}
	start := time.Now()
	measureFrom := start.Add(warm)
	end := measureFrom.Add(dur)
	var cpu0 time.Duration
	measuring := warm <= 0
	if measuring {
		cpu0 = cpuTime()
	}
	for {
		now := time.Now()
		if !measuring && !now.Before(measureFrom) {
			measuring, start, cpu0 = true, now, cpuTime()
			end = now.Add(dur)
		}
		if measuring && !now.Before(end) {
			res.Elapsed = now.Sub(start)
			res.CPU = cpuTime() - cpu0
			break
		}
		i := c.next
		if err := transaction(c.sas[i], c.buf); err != nil {
			res.Err = fmt.Sprintf("%s after %d transactions: %v", c.names[i], c.connects, err)
			break
		}
		c.connects++
		if measuring {
			res.Tx++
		}
		if c.next++; c.next == len(c.sas) {
			c.next = 0
		}
	}
	res.Connects = c.connects
	return res
}

// clientMain runs the transaction loop once (--duration, --warmup), or with
// --control as often as told: each line "WARMUP DURATION" on standard input
// (Go durations) runs it once; each run prints one JSON line. It ends at the
// end of its input.
func clientMain(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	addrs := fs.String("addrs", "", "comma-separated IPv4:port list, used in turn")
	dur := fs.Duration("duration", 2*time.Second, "measured interval")
	warm := fs.Duration("warmup", 250*time.Millisecond, "unmeasured interval before it")
	cpu := fs.Int("cpu", -1, "CPU to run the client loop on (-1: any)")
	control := fs.Bool("control", false, "take runs from standard input")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c := &client{buf: make([]byte, 1)}
	for _, s := range strings.Split(*addrs, ",") {
		ap, err := netip.ParseAddrPort(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("--addrs: %w", err)
		}
		sa, err := sockaddr(ap)
		if err != nil {
			return err
		}
		c.sas = append(c.sas, sa)
		c.names = append(c.names, ap.String())
	}
	runtime.LockOSThread()
	if err := pinThread(*cpu); err != nil {
		return err
	}
	enc := json.NewEncoder(stdout)
	if !*control {
		return enc.Encode(c.loop(*warm, *dur))
	}
	return controlLoop(stdout, func(warm, dur time.Duration) (any, bool) {
		res := c.loop(warm, dur)
		return res, res.Err != ""
	})
}

// controlLoop runs once per line "WARMUP DURATION" (Go durations) on
// standard input and prints each result as one JSON line; it ends at the
// end of its input or after a failed run.
func controlLoop(stdout io.Writer, run func(warm, dur time.Duration) (result any, failed bool)) error {
	enc := json.NewEncoder(stdout)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) != 2 {
			return fmt.Errorf("control: want \"WARMUP DURATION\", got %q", in.Text())
		}
		w, err1 := time.ParseDuration(f[0])
		d, err2 := time.ParseDuration(f[1])
		if err := errors.Join(err1, err2); err != nil {
			return fmt.Errorf("control: %w", err)
		}
		res, failed := run(w, d)
		if err := enc.Encode(res); err != nil {
			return err
		}
		if failed {
			return nil
		}
	}
	return in.Err()
}

// serverMain accepts on 0.0.0.0:PORT with several threads; each connection:
// read 1 byte, write it back, close. It prints "ready" once listening and
// exits when its standard input closes (the benchmark ended or died) or on
// SIGTERM/SIGINT.
func serverMain(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	port := fs.Int("port", BackendPort, "TCP port to listen on (all addresses)")
	threads := fs.Int("threads", 2, "accepting threads")
	cpu := fs.Int("cpu", -1, "CPU to run the accepting threads on (-1: any)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := listen4(netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(*port)))
	if err != nil {
		return err
	}
	errc := make(chan error, *threads+2)
	for range *threads {
		go func() {
			buf := make([]byte, 1)
			errc <- acceptLoop(ln, *cpu, func(fd int) {
				if n, err := retry(func() (int, error) { return unix.Read(fd, buf) }); err == nil && n == 1 {
					retry(func() (int, error) { return unix.Write(fd, buf) })
				}
				unix.Close(fd)
			})
		}()
	}
	return waitStop(stdout, errc)
}

// acceptLoop accepts on ln from a locked OS thread pinned to cpu and hands
// each connection to serve, until accept fails.
func acceptLoop(ln, cpu int, serve func(fd int)) error {
	runtime.LockOSThread()
	if err := pinThread(cpu); err != nil {
		return err
	}
	for {
		fd, _, err := unix.Accept4(ln, unix.SOCK_CLOEXEC)
		if err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		serve(fd)
	}
}
