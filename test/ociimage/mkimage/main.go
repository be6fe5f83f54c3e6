// Command mkimage writes a one-layer OCI image archive from files on disk
// (package ociimage), for `ctr images import`. `make image` runs it (scripts/build-image.sh):
//
//	mkimage -o bin/shuntd-image.tar -name docker.io/shunt/shuntd:0.1.0 \
//	    -entrypoint /usr/local/bin/shuntd \
//	    $tmp/shuntd=/usr/local/bin/shuntd:0755 $tmp/shuntctl=/usr/local/bin/shuntctl:0755
package main

import (
	"flag"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"github.com/shuntmesh/shunt/test/ociimage"
)

func main() {
	out := flag.String("o", "", "archive to write")
	name := flag.String("name", "", "image name, e.g. docker.io/shunt/shuntd:0.1.0")
	entrypoint := flag.String("entrypoint", "", "entrypoint (comma-separated argv)")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: mkimage -o ARCHIVE -name NAME [-entrypoint CMD[,ARG...]] SRC=/PATH[:MODE]...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *out == "" || *name == "" || flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	var files []ociimage.File
	for _, a := range flag.Args() {
		src, dst, ok := strings.Cut(a, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "mkimage: %q is not SRC=/PATH[:MODE]\n", a)
			os.Exit(2)
		}
		mode := fs.FileMode(0o644)
		if p, m, ok := strings.Cut(dst, ":"); ok {
			v, err := strconv.ParseUint(m, 8, 32)
			if err != nil {
				fmt.Fprintf(os.Stderr, "mkimage: mode %q: %v\n", m, err)
				os.Exit(2)
			}
			dst, mode = p, fs.FileMode(v)
		}
		files = append(files, ociimage.File{Path: dst, Mode: mode, Source: src})
	}
	cfg := ociimage.Config{Name: *name}
	if *entrypoint != "" {
		cfg.Entrypoint = strings.Split(*entrypoint, ",")
	}
	d, err := ociimage.WriteFile(*out, cfg, files)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
	fmt.Printf("%s: %s (manifest %s)\n", *out, *name, d)
}
