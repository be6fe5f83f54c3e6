package bench

import (
	"testing"
	"time"
)

func TestXDSTable(t *testing.T) {
	ms := func(xs ...int) []time.Duration {
		var out []time.Duration
		for _, x := range xs {
			out = append(out, time.Duration(x)*time.Millisecond)
		}
		return out
	}
	got := XDSTable(XDSResult{Services: 3000, Backends: 30, Clients: 2, Delta: true,
		Translate: ms(300, 200, 400), Load: 900 * time.Millisecond, Apply: ms(1, 2),
		Receipts: ms(1, 2, 3, 4), AllReceived: ms(2, 4), CPUPerChange: 5 * time.Millisecond, HeapPerClient: 2048})
	want := `| services × endpoints | full translation (median; min–max) | initial load (Server.Update) | Apply per change p50 / p99 |
|---|---:|---:|---:|
| 3000 × 30 | 300.000 ms (200.000 ms–400.000 ms, 3 runs) | 900.000 ms | 1.000 ms / 2.000 ms |

| clients | changes | each client p50 | p99 | max | all clients p50 | p99 | max | server CPU / change | server heap / client |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| 2 delta | 2 | 2.000 ms | 4.000 ms | 4.000 ms | 2.000 ms | 4.000 ms | 4.000 ms | 5.000 ms | 2 KiB |
`
	if got != want {
		t.Errorf("XDSTable:\n%s\nwant:\n%s", got, want)
	}
}

func TestParseXDSEvent(t *testing.T) {
	ev, ok := parseXDSEvent("eds 7 1700000000000000001 1 outbound|80||svc-00001.bench.svc.cluster.local 10042")
	if !ok || ev.kind != "eds" || ev.client != 7 || ev.at.UnixNano() != 1700000000000000001 || ev.n != 1 ||
		ev.cluster != "outbound|80||svc-00001.bench.svc.cluster.local" || ev.port != 10042 {
		t.Fatalf("%+v %v", ev, ok)
	}
	if ev, ok := parseXDSEvent("ready"); !ok || ev.kind != "ready" {
		t.Fatalf("%+v", ev)
	}
}
