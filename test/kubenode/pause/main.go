// Command pause is the sandbox ("pause") image of the test node
// (test/kubenode): it holds the pod's namespaces and sleeps until SIGTERM or
// SIGINT. It is a static binary, so the image is one file.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
