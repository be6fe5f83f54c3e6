package xds

import (
	"net/netip"
	"testing"

	"google.golang.org/grpc"
)

// Test helpers for the external tests (package xds_test), which may import
// the agent.

const (
	TestNodeID = testNodeID
	EchoName   = echoName
)

func XDSSocket() string                                  { return xdsSocket }
func SetTestHook(s *Server, h func(*Resources))          { s.setTestHook(h) }
func RandomLB(r *Resources)                              { randomLB(r) }
func StartBackends(t *testing.T, n int) []netip.AddrPort { return startBackends(t, n) }
func DialEcho(t *testing.T) *grpc.ClientConn             { return dialEcho(t) }
func WaitSpread(t *testing.T, c *grpc.ClientConn, want ...netip.AddrPort) {
	t.Helper()
	waitSpread(t, c, want...)
}
func AssertOnly(t *testing.T, c *grpc.ClientConn, want ...netip.AddrPort) {
	t.Helper()
	assertOnly(t, c, want...)
}
func WaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitFor(t, what, cond)
}

type LogRecorder = logRecorder

func (r *logRecorder) Count(substr string) int { return r.count(substr) }
