package cli

import (
	"fmt"
	"io"

	"github.com/shuntmesh/shunt/agent/datapath"
	"github.com/shuntmesh/shunt/agent/xdp"
)

func cleanup(args []string, w io.Writer) error {
	fs := newFlags("cleanup")
	root := fs.String("bpffs-root", datapath.DefaultRoot, "")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	if err := xdp.Cleanup(*root); err != nil {
		return err
	}
	if err := datapath.Cleanup(*root); err != nil {
		return err
	}
	fmt.Fprintf(w, "removed every Shunt link and pin under %s\n", *root)
	return nil
}
