// Package pins removes a bpffs folder of pinned objects that an agent left
// behind, detaching the programs linked under it first.
package pins

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// RemoveDir detaches every link pinned in dir/links, then removes dir and
// everything pinned below it. It refuses while an agent holds dir's lock
// (the flock every agent takes on its folder). A missing dir is not an error.
func RemoveDir(dir string) error {
	f, err := os.Open(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("%s is locked: stop shuntd first", dir)
	}
	var errs []error
	linkDir := filepath.Join(dir, "links")
	entries, _ := os.ReadDir(linkDir)
	for _, e := range entries {
		p := filepath.Join(linkDir, e.Name())
		l, err := link.LoadPinnedLink(p, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("open link %s: %w", p, err))
			continue
		}
		if err := l.Unpin(); err != nil {
			errs = append(errs, err)
		}
		l.Close() // last reference: detaches
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
