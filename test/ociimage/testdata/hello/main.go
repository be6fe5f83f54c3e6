// Command hello is the program TestImportIntoContainerd puts in an image:
// it prints its arguments and where it runs from.
package main

import (
	"fmt"
	"os"
	"strings"
)

func main() {
	exe, _ := os.Executable()
	fmt.Printf("hello from %s: %s\n", exe, strings.Join(os.Args[1:], " "))
}
