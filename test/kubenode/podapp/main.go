//go:build linux

// Command podapp is the program of the test pods' image (test/kubenode): the
// harness helper apps (serve, connect, stream, info, pause, sidecar) as a
// static binary, run as `podapp <app> [args]`. The apps use only the
// standard library and x/sys/unix, and never io.Copy between sockets.
package main

import (
	"fmt"
	"os"

	"github.com/shuntmesh/shunt/test/harness"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: podapp <serve|connect|stream|info|pause|sidecar> [args]")
		os.Exit(2)
	}
	os.Exit(harness.RunApp(os.Args[1], os.Args[2:]))
}
