package xds

import (
	"testing"

	"github.com/shuntmesh/shunt/test/harness"
)

// runTests runs the tests through the harness, which the privileged
// end-to-end test with the agent needs (pure tests are unaffected).
func runTests(m *testing.M) { harness.Main(m) }
