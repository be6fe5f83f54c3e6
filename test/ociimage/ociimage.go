// Package ociimage turns a set of files into a one-layer container image,
// written as an OCI image layout archive (a tar of oci-layout, index.json
// and blobs/sha256/...), without a registry or a container engine. The
// archive is what `ctr images import` reads: the image gets the name given
// in Config.Name.
//
// `make image` uses it (through ./test/ociimage/mkimage) for shuntd's image
// (static shuntd and shuntctl); tests build their pods' images the same way.
// The output is reproducible: the same files and config give the same
// bytes (fixed timestamps and ownership, sorted entries).
package ociimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	_ "crypto/sha256" // go-digest's sha256 (it does not import it itself)
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

// File is one file of the image's layer.
type File struct {
	// Path is where the file is in the image (absolute, e.g.
	// /usr/local/bin/shuntd). Parent folders are created (mode 0755).
	Path string
	// Mode holds the permission bits (default 0644).
	Mode fs.FileMode
	// Data is the content; if nil, Source names a file to read it from.
	Data   []byte
	Source string
}

// Config describes the image.
type Config struct {
	// Name is the image's full reference, e.g. docker.io/shunt/shuntd:0.1.0
	// (the name kubelet resolves "shunt/shuntd:0.1.0" to).
	Name       string
	Entrypoint []string
	Cmd        []string
	Env        []string
	WorkingDir string
	User       string
	// OS and Architecture default to linux and the running GOARCH.
	OS, Architecture string
	// Created is the image's creation time (default: the Unix epoch, for
	// reproducible output); every file gets it as its modification time.
	Created time.Time
}

// AnnotationImageName is containerd's annotation naming an image in an
// archive (`ctr images import` creates the image under this name).
const AnnotationImageName = "io.containerd.image.name"

// Write writes the image as an OCI image layout archive to w and returns
// the manifest's digest.
func Write(w io.Writer, cfg Config, files []File) (digest.Digest, error) {
	if cfg.Name == "" || strings.ContainsAny(cfg.Name, " \t\n") {
		return "", fmt.Errorf("ociimage: invalid image name %q", cfg.Name)
	}
	if cfg.OS == "" {
		cfg.OS = "linux"
	}
	if cfg.Architecture == "" {
		cfg.Architecture = runtime.GOARCH
	}
	if cfg.Created.IsZero() {
		cfg.Created = time.Unix(0, 0).UTC()
	}
	layer, diffID, err := buildLayer(files, cfg.Created)
	if err != nil {
		return "", err
	}
	created := cfg.Created
	img := v1.Image{
		Created:  &created,
		Platform: v1.Platform{OS: cfg.OS, Architecture: cfg.Architecture},
		Config: v1.ImageConfig{
			Entrypoint: cfg.Entrypoint, Cmd: cfg.Cmd, Env: cfg.Env, WorkingDir: cfg.WorkingDir, User: cfg.User,
		},
		RootFS:  v1.RootFS{Type: "layers", DiffIDs: []digest.Digest{diffID}},
		History: []v1.History{{Created: &created, CreatedBy: "ociimage.Write", Comment: fmt.Sprintf("%d files", len(files))}},
	}
	cfgBlob, err := json.Marshal(img)
	if err != nil {
		return "", err
	}
	cfgDesc := v1.Descriptor{MediaType: v1.MediaTypeImageConfig, Digest: digest.FromBytes(cfgBlob), Size: int64(len(cfgBlob))}
	layerDesc := v1.Descriptor{MediaType: v1.MediaTypeImageLayerGzip, Digest: digest.FromBytes(layer), Size: int64(len(layer))}
	man := v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest, Config: cfgDesc, Layers: []v1.Descriptor{layerDesc}}
	manBlob, err := json.Marshal(man)
	if err != nil {
		return "", err
	}
	manDesc := v1.Descriptor{
		MediaType: v1.MediaTypeImageManifest, Digest: digest.FromBytes(manBlob), Size: int64(len(manBlob)),
		Platform:    &v1.Platform{OS: cfg.OS, Architecture: cfg.Architecture},
		Annotations: map[string]string{AnnotationImageName: cfg.Name, v1.AnnotationRefName: refName(cfg.Name)},
	}
	idx := v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex, Manifests: []v1.Descriptor{manDesc}}
	idxBlob, err := json.Marshal(idx)
	if err != nil {
		return "", err
	}
	layout, err := json.Marshal(v1.ImageLayout{Version: v1.ImageLayoutVersion})
	if err != nil {
		return "", err
	}

	tw := tar.NewWriter(w)
	mtime := cfg.Created
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}); err != nil {
			return "", err
		}
	}
	put := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: mtime, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	blob := func(d digest.Digest) string { return "blobs/" + d.Algorithm().String() + "/" + d.Encoded() }
	for _, e := range []struct {
		name string
		data []byte
	}{
		{v1.ImageLayoutFile, layout},
		{blob(cfgDesc.Digest), cfgBlob},
		{blob(layerDesc.Digest), layer},
		{blob(manDesc.Digest), manBlob},
		{v1.ImageIndexFile, idxBlob},
	} {
		if err := put(e.name, e.data); err != nil {
			return "", fmt.Errorf("ociimage: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return "", fmt.Errorf("ociimage: %w", err)
	}
	return manDesc.Digest, nil
}

// WriteFile writes the archive to path (through a temporary file renamed
// into place).
func WriteFile(path string, cfg Config, files []File) (digest.Digest, error) {
	f, err := os.CreateTemp(pathDir(path), ".ociimage-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	d, err := Write(f, cfg, files)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", err
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return "", err
	}
	return d, os.Rename(f.Name(), path)
}

func pathDir(p string) string {
	if d := path.Dir(p); d != "" {
		return d
	}
	return "."
}

// refName is the tag of a reference (what Docker puts in
// org.opencontainers.image.ref.name), or the whole name without one.
func refName(name string) string {
	if i := strings.LastIndexByte(name, ':'); i > strings.LastIndexByte(name, '/') {
		return name[i+1:]
	}
	return name
}

// buildLayer returns the gzipped layer tar and the digest of its
// uncompressed form (the diff ID).
func buildLayer(files []File, mtime time.Time) ([]byte, digest.Digest, error) {
	type entry struct {
		hdr  *tar.Header
		data []byte
	}
	entries := map[string]entry{}
	for _, f := range files {
		p := path.Clean(f.Path)
		if !path.IsAbs(p) || p == "/" {
			return nil, "", fmt.Errorf("ociimage: file path %q is not an absolute file path", f.Path)
		}
		name := strings.TrimPrefix(p, "/")
		if _, dup := entries[name]; dup {
			return nil, "", fmt.Errorf("ociimage: %s given twice", p)
		}
		data := f.Data
		if data == nil {
			if f.Source == "" {
				return nil, "", fmt.Errorf("ociimage: %s has neither data nor a source", p)
			}
			var err error
			if data, err = os.ReadFile(f.Source); err != nil {
				return nil, "", fmt.Errorf("ociimage: %w", err)
			}
		}
		mode := f.Mode.Perm()
		if mode == 0 {
			mode = 0o644
		}
		entries[name] = entry{hdr: &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: int64(mode), Size: int64(len(data)), ModTime: mtime, Format: tar.FormatPAX}, data: data}
		for d := path.Dir(name); d != "."; d = path.Dir(d) {
			dn := d + "/"
			if e, ok := entries[dn]; ok && e.hdr.Typeflag == tar.TypeDir {
				continue
			}
			if _, clash := entries[d]; clash {
				return nil, "", fmt.Errorf("ociimage: %s is a file and a folder", "/"+d)
			}
			entries[dn] = entry{hdr: &tar.Header{Typeflag: tar.TypeDir, Name: dn, Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}}
		}
	}
	if len(entries) == 0 {
		return nil, "", errors.New("ociimage: no files")
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names) // parents sort before their children
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, n := range names {
		e := entries[n]
		if err := tw.WriteHeader(e.hdr); err != nil {
			return nil, "", fmt.Errorf("ociimage: %w", err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, "", fmt.Errorf("ociimage: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, "", fmt.Errorf("ociimage: %w", err)
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz) // no name, zero mtime: reproducible
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return nil, "", err
	}
	if err := zw.Close(); err != nil {
		return nil, "", err
	}
	return gz.Bytes(), digest.FromBytes(raw.Bytes()), nil
}
