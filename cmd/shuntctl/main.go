// Command shuntctl controls a local shuntd over its unix socket.
package main

import (
	"fmt"
	"os"

	"github.com/shuntmesh/shunt/cmd/shuntctl/cli"
)

func main() {
	if err := cli.Run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "shuntctl:", err)
		os.Exit(1)
	}
}
