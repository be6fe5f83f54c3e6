package kubenode

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"sort"
	"strings"
	"time"
)

// Image is a one-layer container image of a few static files, written as an
// OCI image layout archive (the format `ctr images import` reads). It needs
// no registry and no base image: the files are static Go binaries.
type Image struct {
	// Name is the full reference, e.g. "shunt.dev/app:v1".
	Name string
	// Files make up the single layer. Parent folders are added.
	Files []ImageFile
	// Entrypoint is the image's default command.
	Entrypoint []string
	// Env is the image's environment ("K=V").
	Env []string
}

// ImageFile is one regular file of an image.
type ImageFile struct {
	Path string // absolute, e.g. "/app"
	Mode int64  // e.g. 0o755
	Data []byte
}

// OCI media types and annotations (image-spec v1).
const (
	mediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar"
	// AnnotationRefName is the tag part of the name (OCI).
	annotationRefName = "org.opencontainers.image.ref.name"
	// annotationImageName is containerd's full image name annotation,
	// which its importer uses as is.
	annotationImageName = "io.containerd.image.name"
)

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

type manifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Config        descriptor   `json:"config"`
	Layers        []descriptor `json:"layers"`
}

type index struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Manifests     []descriptor `json:"manifests"`
}

type imageConfig struct {
	Created      string `json:"created"`
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
	Config       struct {
		Entrypoint []string `json:"Entrypoint,omitempty"`
		Env        []string `json:"Env,omitempty"`
	} `json:"config"`
	RootFS struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

// epoch is every entry's modification time: archives are reproducible.
var epoch = time.Unix(0, 0).UTC()

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// layer returns the uncompressed layer tar: the files, their parent
// folders and the folders a runtime mounts over (/dev, /proc, /sys, /etc,
// /tmp).
func (img Image) layer() ([]byte, error) {
	dirs := map[string]int64{"dev/": 0o755, "proc/": 0o555, "sys/": 0o555, "etc/": 0o755, "tmp/": 0o1777}
	for _, f := range img.Files {
		p := strings.TrimPrefix(f.Path, "/")
		if p == "" || strings.HasSuffix(p, "/") || strings.Contains(p, "..") {
			return nil, fmt.Errorf("image %s: bad file path %q", img.Name, f.Path)
		}
		for i := strings.IndexByte(p, '/'); i >= 0; i = next(p, i) {
			if _, ok := dirs[p[:i+1]]; !ok {
				dirs[p[:i+1]] = 0o755
			}
		}
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	names := make([]string, 0, len(dirs))
	for d := range dirs {
		names = append(names, d)
	}
	sort.Strings(names)
	for _, d := range names {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: dirs[d], ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	files := append([]ImageFile(nil), img.Files...)
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	for _, f := range files {
		h := &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(f.Path, "/"), Mode: f.Mode, Size: int64(len(f.Data)), ModTime: epoch, Format: tar.FormatPAX}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.Data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// next returns the index of the next '/' in p after i, or -1.
func next(p string, i int) int {
	j := strings.IndexByte(p[i+1:], '/')
	if j < 0 {
		return -1
	}
	return i + 1 + j
}

// WriteOCIArchive writes the image as an OCI image layout in a tar stream:
// oci-layout, index.json (naming the image with containerd's
// io.containerd.image.name annotation and the OCI ref name) and the blobs
// (manifest, config, one uncompressed layer), for this machine's
// architecture.
func (img Image) WriteOCIArchive(w io.Writer) error {
	_, tag, ok := splitTag(img.Name)
	if !ok {
		return fmt.Errorf("image name %q: want <repository>:<tag>", img.Name)
	}
	layer, err := img.layer()
	if err != nil {
		return err
	}
	var cfg imageConfig
	cfg.Created = epoch.Format(time.RFC3339)
	cfg.Architecture, cfg.OS = runtime.GOARCH, "linux"
	cfg.Config.Entrypoint, cfg.Config.Env = img.Entrypoint, img.Env
	cfg.RootFS.Type = "layers"
	cfg.RootFS.DiffIDs = []string{digestOf(layer)} // uncompressed: digest == diff id
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	man := manifest{
		SchemaVersion: 2, MediaType: mediaTypeManifest,
		Config: descriptor{MediaType: mediaTypeConfig, Digest: digestOf(cfgJSON), Size: int64(len(cfgJSON))},
		Layers: []descriptor{{MediaType: mediaTypeLayer, Digest: digestOf(layer), Size: int64(len(layer))}},
	}
	manJSON, err := json.Marshal(man)
	if err != nil {
		return err
	}
	idx := index{SchemaVersion: 2, MediaType: mediaTypeIndex, Manifests: []descriptor{{
		MediaType: mediaTypeManifest, Digest: digestOf(manJSON), Size: int64(len(manJSON)),
		Annotations: map[string]string{annotationImageName: img.Name, annotationRefName: tag},
		Platform:    &platform{Architecture: runtime.GOARCH, OS: "linux"},
	}}}
	idxJSON, err := json.Marshal(idx)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(w)
	add := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
	}
	for _, e := range []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", idxJSON},
		{blobPath(man.Config.Digest), cfgJSON},
		{blobPath(man.Layers[0].Digest), layer},
		{blobPath(idx.Manifests[0].Digest), manJSON},
	} {
		if err := add(e.name, e.data); err != nil {
			return err
		}
	}
	return tw.Close()
}

func blobPath(digest string) string { return "blobs/sha256/" + strings.TrimPrefix(digest, "sha256:") }

// splitTag splits "repo/name:tag" (a registry port's colon is not a tag).
func splitTag(ref string) (repo, tag string, ok bool) {
	i := strings.LastIndexByte(ref, ':')
	if i <= 0 || strings.Contains(ref[i:], "/") || i == len(ref)-1 {
		return "", "", false
	}
	return ref[:i], ref[i+1:], true
}
