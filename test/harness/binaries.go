package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

var (
	agentBinOnce sync.Once
	agentBinDir  string
	agentBinErr  error
)

// ModuleRoot is the folder of the Shunt module this harness belongs to.
func ModuleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// AgentBinaries builds the real shuntd and shuntctl of this module, once per
// test binary, and returns their paths. They live in a folder named after
// this process, which Main removes when the tests end (and sweeps if the
// process died).
func AgentBinaries(t testing.TB) (shuntd, shuntctl string) {
	t.Helper()
	agentBinOnce.Do(func() {
		me := selfOwner()
		dir := filepath.Join(os.TempDir(), fmt.Sprintf("%s%d-%d-agent", appBinPrefix, me.pid, me.start))
		if agentBinErr = os.MkdirAll(dir, 0o755); agentBinErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", dir+"/", "./cmd/shuntd", "./cmd/shuntctl")
		cmd.Dir = ModuleRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			agentBinErr = fmt.Errorf("go build: %v\n%s", err, out)
			return
		}
		agentBinDir = dir
	})
	if agentBinErr != nil {
		t.Fatal(agentBinErr)
	}
	return filepath.Join(agentBinDir, "shuntd"), filepath.Join(agentBinDir, "shuntctl")
}

func removeAgentBinaries() {
	if agentBinDir != "" {
		os.RemoveAll(agentBinDir)
	}
}
