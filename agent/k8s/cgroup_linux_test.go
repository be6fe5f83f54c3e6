package k8s

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// The pod cgroup is found in every kubelet layout (cgroupfs and systemd
// drivers, each QoS class) under any of the roots, and the process's
// network namespace is returned. The tree here is plain folders with
// cgroup.procs files; the process is this test.
func TestFindPodNetNSLayouts(t *testing.T) {
	const uid = "0c9a7d4e-1b2c-4d5e-8f90-123456789abc"
	self := strconv.Itoa(os.Getpid())
	for _, rel := range podCgroupDirs(uid) {
		t.Run(rel, func(t *testing.T) {
			other, root := t.TempDir(), t.TempDir()
			container := filepath.Join(root, rel, "cri-containerd-abc.scope")
			if err := os.MkdirAll(container, 0o755); err != nil {
				t.Fatal(err)
			}
			// The pod cgroup itself holds no process (v2: only leaves do).
			if err := os.WriteFile(filepath.Join(root, rel, "cgroup.procs"), nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(container, "cgroup.procs"), []byte(self+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			ref, err := findPodNetNS([]string{other, root}, uid)
			if err != nil {
				t.Fatal(err)
			}
			if want := fmt.Sprintf("/proc/%s/ns/net", self); ref.path != want || !ref.stillValid() {
				t.Errorf("got %+v, want %s", ref, want)
			}
		})
	}
	if _, err := findPodNetNS([]string{t.TempDir()}, uid); err != ErrNoProcess {
		t.Errorf("no cgroup: %v, want ErrNoProcess", err)
	}
}
