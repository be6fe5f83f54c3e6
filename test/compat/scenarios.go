package compat

import "time"

// Scenario is one row of the matrix: a connection Spec (client and server
// behaviour), how many connections run it at once, and extra checks.
type Scenario struct {
	Name string
	Spec Spec
	// Conns connections run the Spec at once (default 1).
	Conns int
	// Backpressure: the end writing with IONonblock faces a reader that
	// sleeps first; it must get EAGAIN, and no more than what the TCP
	// connections on the path can hold may be accepted while the reader
	// sleeps. Run sizes the message (BackpressureLimit).
	Backpressure bool
	// Heavy: large transfers or many connections, meant to run once per
	// configuration.
	Heavy bool
}

func (s Scenario) conns() int { return max(s.Conns, 1) }

// Sizes and limits of the catalogue.
const (
	// BackpressureSleep is how long a back-pressure scenario's reader
	// sleeps before reading.
	BackpressureSleep = 4 * time.Second
	// BackpressureSlack is added to the buffering limit, and the writer
	// sends BackpressureSlack more than the limit.
	BackpressureSlack = 16 << 20
)

// rr is the base exchange: 24 request/response rounds of 1 B…64 KiB
// requests and 1 B…256 KiB responses, written in pieces of 512 B…32 KiB,
// with a 2 ms pause before each message so that the reader is blocked in
// read when the bytes (and signals) come, then the client's half-close and
// a 32 KiB trailer read to EOF.
func rr(client, server Side) Spec {
	return Spec{Rounds: 24, Req: Sizes{1, 64 << 10}, Resp: Sizes{1, 256 << 10}, Trailer: 32 << 10,
		Think: 2 * time.Millisecond, Chunk: Sizes{512, 32 << 10}, Client: client, Server: server}
}

var epoll = Side{IO: IOEpoll}

// styles are the I/O styles run on one end against an epoll peer, named as
// in the matrix.
var styles = []struct {
	name string
	side Side
}{
	{"blocking", Side{IO: IOBlocking}},
	{"blocking-sigrestart", Side{IO: IOBlocking, Signals: SigRestart}},
	{"blocking-signorestart", Side{IO: IOBlocking, Signals: SigNoRestart}},
	{"peek", Side{IO: IOPeek}},
	{"waitall", Side{IO: IOWaitAll}},
	{"fionread", Side{IO: IOFionread}},
	{"rcvlowat", Side{IO: IORcvlowat}},
	{"splice", Side{IO: IOSplice}},
	{"sendfile", Side{IO: IOSendfile}},
	{"zerowrite", Side{IO: IOZeroWrite}},
}

// All returns the whole catalogue. Names end in /client or /server for the
// end (the application under test) that behaves as named; the other end is
// a Go netpoller application.
//
//   - epoll: both ends Go netpoller.
//   - <style>/<end>: the base exchange (rr) with that end in the style (see
//     the IO* constants; -sigrestart/-signorestart add a signal every
//     millisecond to the end's I/O thread, with and without SA_RESTART).
//   - halfclose: a 1 MiB request, shutdown(SHUT_WR), a 1 MiB reply read to
//     EOF; both ends blocking.
//   - rst-blocking/<end>, rst-epoll/<end>: the other end resets the
//     connection (SO_LINGER 0) in the middle of a message; <end>, reading
//     in that style, must get ECONNRESET or EOF, promptly, after a prefix
//     of the stream.
//   - backpressure/<end>: <end> writes nonblocking while the other end
//     sleeps 4 s before reading: the writer must get EAGAIN, and what it
//     got accepted during 3 s of that sleep must fit in the path's TCP
//     buffers (see BackpressureLimit; 16 MiB more than that is sent).
//   - sizes-1B-8MiB (heavy): 12 rounds of 1 B…8 MiB messages both ways.
//   - duplex-8MiB (heavy): both ends send 8 MiB at once.
//   - conns-1000 (heavy): 1000 connections open at once.
func All() []Scenario {
	out := []Scenario{{Name: "epoll", Spec: rr(epoll, epoll)}}
	for _, end := range []string{"client", "server"} {
		for _, st := range styles {
			sc := Scenario{Name: st.name + "/" + end}
			if end == "client" {
				sc.Spec = rr(st.side, epoll)
			} else {
				sc.Spec = rr(epoll, st.side)
			}
			out = append(out, sc)
		}
	}
	blocking := Side{IO: IOBlocking}
	out = append(out, Scenario{Name: "halfclose", Spec: Spec{Rounds: 1, Req: Sizes{1 << 20, 1 << 20}, Trailer: 1 << 20,
		Client: blocking, Server: blocking}})
	for _, end := range []string{"client", "server"} {
		for _, reader := range []Side{blocking, epoll} {
			s := Spec{Rounds: 4, Req: Sizes{64 << 10, 64 << 10}, Resp: Sizes{64 << 10, 64 << 10}, Trailer: 1,
				Think: 2 * time.Millisecond, AbortRound: 2, AbortBytes: 16 << 10, Client: epoll, Server: epoll}
			if end == "client" {
				s.Abort, s.Client = "server", reader
			} else {
				s.Abort, s.Server = "client", reader
			}
			out = append(out, Scenario{Name: "rst-" + reader.IO + "/" + end, Spec: s})
		}
	}
	for _, end := range []string{"client", "server"} {
		writer := Side{IO: IONonblock}
		slow := Side{IO: IOEpoll, SleepBeforeRead: BackpressureSleep}
		s := Spec{Rounds: 1, Req: Sizes{1, 1}, Resp: Sizes{1, 1}, Client: writer, Server: slow}
		if end == "client" {
			s.Req = Sizes{-1, -1} // sized by Run
		} else {
			s.Resp = Sizes{-1, -1}
			s.Client, s.Server = slow, writer
		}
		out = append(out, Scenario{Name: "backpressure/" + end, Spec: s, Backpressure: true})
	}
	out = append(out,
		Scenario{Name: "sizes-1B-8MiB", Heavy: true, Spec: Spec{Rounds: 12, Req: Sizes{1, 8 << 20}, Resp: Sizes{1, 8 << 20},
			Trailer: 8 << 20, Client: epoll, Server: epoll}},
		Scenario{Name: "duplex-8MiB", Heavy: true, Spec: Spec{Duplex: 8 << 20, Client: epoll, Server: epoll}},
		// The servers idle while all clients finish round 0: a longer
		// liveness bound.
		Scenario{Name: "conns-1000", Heavy: true, Conns: 1000, Spec: Spec{Rounds: 2, Req: Sizes{1, 1024}, Resp: Sizes{1, 1024},
			Trailer: 16, Client: epoll, Server: epoll, Stall: 30 * time.Second}},
	)
	return out
}

// Light is All without the heavy scenarios.
func Light() []Scenario {
	var out []Scenario
	for _, s := range All() {
		if !s.Heavy {
			out = append(out, s)
		}
	}
	return out
}

// Select returns the scenarios of all whose names are listed, in the
// catalogue's order.
func Select(all []Scenario, names ...string) []Scenario {
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	var out []Scenario
	for _, s := range all {
		if want[s.Name] {
			out = append(out, s)
		}
	}
	return out
}
