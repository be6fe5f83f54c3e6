package kubenode

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A test binary killed while its node ran leaves the kubelet's sysctls and
// its private folder (with the record of the machine before it). The next
// CheckHost puts the sysctls back and removes the folder before it takes
// its own snapshot, so the reaping is not mistaken for the traces of the
// test it wraps (CI once failed on exactly that: kernel.panic 10 -> 1
// "left" by a test that had only reaped a killed run).
func TestCheckHostReapsKilledRun(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("kubenode: writing sysctls needs root")
		}
		t.Skip("kubenode: writing sysctls needs root")
	}
	const key = "kernel/panic" // one the kubelet writes (10)
	path := filepath.Join("/proc/sys", key)
	unlock, err := lockNodes()
	if err != nil {
		t.Fatal(err)
	}
	// A real killed run first (this test's record would otherwise hold
	// its kubelet's values as the machine's).
	reapStale(t.Logf)
	orig, err := os.ReadFile(path)
	if err != nil {
		unlock()
		t.Fatal(err)
	}
	want := strings.TrimSpace(string(orig))
	t.Cleanup(func() { _ = os.WriteFile(path, orig, 0) })

	// The killed run: its record says the machine had want; its kubelet
	// then wrote another value.
	before, err := TakeHostSnapshot()
	if err != nil {
		unlock()
		t.Fatal(err)
	}
	dir := filepath.Join(os.TempDir(), "shunt-kubenode-"+randID())
	t.Cleanup(func() { os.RemoveAll(dir) })
	data, _ := json.Marshal(before)
	changed := "10"
	if want == changed {
		changed = "11"
	}
	err = os.Mkdir(dir, 0o700)
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, hostRecord), data, 0o600)
	}
	if err == nil {
		err = os.WriteFile(path, []byte(changed), 0)
	}
	unlock()
	if err != nil {
		t.Fatal(err)
	}

	ran := false
	CheckHost(t, "after-kill", func(t *testing.T) { ran = true })
	if !ran {
		t.Fatal("CheckHost did not run its test")
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if g := strings.TrimSpace(string(got)); g != want {
		t.Errorf("%s = %s after CheckHost, want %s as the killed run's record says", key, g, want)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("the killed run's folder %s is still there (%v)", dir, err)
	}
}
