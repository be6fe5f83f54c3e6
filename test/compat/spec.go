package compat

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"time"
)

// I/O styles of one end of a connection (Side.IO). Every style reads and
// writes exactly the bytes the exchange plans; what differs is the system
// calls and what they must not do.
const (
	// IOEpoll: Go's net.Conn (nonblocking socket, epoll netpoller).
	IOEpoll = "epoll"
	// IOBlocking: raw blocking read(2)/write(2) on one locked OS thread.
	// EAGAIN is a failure (a blocking socket never returns it), so is
	// EINTR unless the signals are "norestart".
	IOBlocking = "blocking"
	// IOPeek: blocking recv(MSG_PEEK), then read(2) of the peeked length,
	// which must return the same bytes.
	IOPeek = "peek"
	// IOWaitAll: blocking recv(MSG_WAITALL) for exactly the bytes still
	// due in the message; a short return is a failure.
	IOWaitAll = "waitall"
	// IOFionread: nonblocking; poll(POLLIN), then ioctl(FIONREAD), then
	// read(2): FIONREAD 0 while the read returns data is a failure.
	IOFionread = "fionread"
	// IORcvlowat: SO_RCVLOWAT = min(16 KiB, bytes still due); a blocking
	// read that returns fewer bytes (before EOF) is a failure.
	IORcvlowat = "rcvlowat"
	// IOSplice: reads splice(socket → pipe) then read the pipe; writes
	// write a pipe then splice(pipe → socket).
	IOSplice = "splice"
	// IOSendfile: writes with sendfile(2) from a memfd; blocking reads.
	IOSendfile = "sendfile"
	// IOZeroWrite: blocking, with a zero-length write(2) before every
	// write; it must return 0 and change nothing.
	IOZeroWrite = "zerowrite"
	// IONonblock: nonblocking; writes until EAGAIN, then poll(POLLOUT).
	// Records how many payload bytes the kernel accepted before the first
	// EAGAIN (back-pressure).
	IONonblock = "nonblock"
)

// Signal modes (Side.Signals): the end's I/O thread is sent a signal every
// SignalInterval while the exchange runs.
const (
	// SigRestart: SIGALRM, handler installed with SA_RESTART (what glibc's
	// signal() does): interrupted blocking calls restart, the app never
	// sees EINTR.
	SigRestart = "restart"
	// SigNoRestart: SIGUSR1, handler without SA_RESTART (sigaction
	// without the flag): interrupted calls return EINTR and are retried.
	SigNoRestart = "norestart"
)

// SignalInterval is how often a signalled I/O thread is interrupted.
const SignalInterval = time.Millisecond

// Side is what one end of a connection does.
type Side struct {
	IO      string `json:"io"`
	Signals string `json:"signals,omitempty"`
	// SleepBeforeRead: the end sleeps this long before its first read of
	// the exchange (a slow reader).
	SleepBeforeRead time.Duration `json:"sleep_before_read,omitempty"`
}

func (s Side) String() string {
	out := s.IO
	if s.Signals != "" {
		out += "+sig" + s.Signals
	}
	if s.SleepBeforeRead > 0 {
		out += "+sleep" + s.SleepBeforeRead.String()
	}
	return out
}

// Sizes is an inclusive size range; sizes are drawn log-uniformly in it.
type Sizes struct {
	Min int `json:"min"`
	Max int `json:"max"`
}

// Spec is one connection's exchange, known to both ends (the client sends it
// as the connection's header):
//
//	for each round i: client sends Req[i] bytes, server reads them,
//	                  server sends Resp[i] bytes, client reads them
//	client shutdown(SHUT_WR); server reads EOF
//	server sends Trailer bytes and closes; client reads them and EOF
//
// Sizes come from Seed; the bytes of each direction are a ChaCha8 stream
// seeded from Seed, so each end checks every byte it reads against the
// stream, and both report SHA-256 of what they sent and received.
type Spec struct {
	ID      string        `json:"id"`
	Seed    uint64        `json:"seed"`
	Rounds  int           `json:"rounds"`
	Req     Sizes         `json:"req"`
	Resp    Sizes         `json:"resp"`
	Trailer int           `json:"trailer"`
	Think   time.Duration `json:"think,omitempty"` // pause before each message, so the reader waits in read
	// Chunk, if set, splits every message into writes of sizes drawn from
	// it (applications write in pieces; the reader then sees the message
	// arrive in parts). Unset: writes of up to 256 KiB.
	Chunk  Sizes `json:"chunk,omitempty"`
	Client Side  `json:"client"`
	Server Side  `json:"server"`
	// Abort "client" or "server": that end, in round AbortRound, sends
	// AbortBytes of its message, waits 100 ms and resets the connection
	// (SO_LINGER 0 + close). The other end, reading, must see ECONNRESET
	// or EOF promptly, after a prefix of the stream.
	Abort      string `json:"abort,omitempty"`
	AbortRound int    `json:"abort_round,omitempty"`
	AbortBytes int    `json:"abort_bytes,omitempty"`
	// Duplex > 0 replaces the rounds: both ends send Duplex bytes at once
	// while reading, then half-close and read to EOF.
	Duplex int `json:"duplex,omitempty"`
	// Stall: no progress for this long is a failure (default 10 s).
	Stall time.Duration `json:"stall,omitempty"`
}

// DefaultStall is the liveness bound: an end that makes no progress for
// this long has stalled.
const DefaultStall = 10 * time.Second

func (s *Spec) stall() time.Duration {
	if s.Stall > 0 {
		return s.Stall
	}
	return DefaultStall
}

// Plan is the message sizes of a Spec.
type Plan struct {
	Req, Resp []int
}

// Plan draws the message sizes from the seed.
func (s *Spec) Plan() Plan {
	r := rand.New(rand.NewPCG(s.Seed, 0x5ee0))
	p := Plan{Req: make([]int, s.Rounds), Resp: make([]int, s.Rounds)}
	for i := range s.Rounds {
		p.Req[i] = s.Req.draw(r)
		p.Resp[i] = s.Resp.draw(r)
	}
	return p
}

func (z Sizes) draw(r *rand.Rand) int {
	if z.Max <= z.Min {
		return z.Min
	}
	lo, hi := math.Log(float64(z.Min)+1), math.Log(float64(z.Max)+1)
	v := int(math.Exp(lo+r.Float64()*(hi-lo))) - 1
	return min(max(v, z.Min), z.Max)
}

// Totals returns the bytes each direction carries when nothing is aborted.
func (s *Spec) Totals() (c2s, s2c int64) {
	if s.Duplex > 0 {
		return int64(s.Duplex), int64(s.Duplex)
	}
	p := s.Plan()
	for i := range p.Req {
		c2s += int64(p.Req[i])
		s2c += int64(p.Resp[i])
	}
	return c2s, s2c + int64(s.Trailer)
}

// Directions of the data streams.
const (
	dirC2S = 1
	dirS2C = 2
)

// stream returns the deterministic byte stream of one direction.
func stream(seed uint64, dir byte) *rand.ChaCha8 {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	key[8] = dir
	copy(key[9:], "shunt-compat")
	return rand.NewChaCha8(key)
}

// StreamBytes returns the first n bytes of a direction's stream (c2s true:
// client to server), e.g. to check a prefix a reader reported.
func StreamBytes(seed uint64, c2s bool, n int) []byte {
	dir := byte(dirS2C)
	if c2s {
		dir = dirC2S
	}
	b := make([]byte, n)
	_, _ = stream(seed, dir).Read(b)
	return b
}
