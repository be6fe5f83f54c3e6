package kubenode

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"strings"
	"testing"
)

// The archive is a valid OCI image layout: every blob's name is its
// sha256, the index names the image (containerd's annotation and the OCI
// ref name), the manifest points at the config and the layer, the config's
// diff id is the (uncompressed) layer's digest, the layer holds the file
// with its parent folders; writing twice gives the same bytes.
func TestImageArchive(t *testing.T) {
	img := Image{Name: "shunt.dev/x/app:v2", Entrypoint: []string{"/bin/app"}, Env: []string{"A=1"},
		Files: []ImageFile{{Path: "/bin/app", Mode: 0o755, Data: []byte("binary")}}}
	var a, b bytes.Buffer
	if err := img.WriteOCIArchive(&a); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteOCIArchive(&b); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("two writes differ")
	}
	files := map[string][]byte{}
	tr := tar.NewReader(&a)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		files[h.Name] = data
	}
	for name, data := range files {
		if hexd, ok := strings.CutPrefix(name, "blobs/sha256/"); ok && hexd != "" {
			s := sha256.Sum256(data)
			if hex.EncodeToString(s[:]) != hexd {
				t.Errorf("blob %s has another digest", name)
			}
		}
	}
	var idx index
	if err := json.Unmarshal(files["index.json"], &idx); err != nil || len(idx.Manifests) != 1 {
		t.Fatalf("index.json: %v %s", err, files["index.json"])
	}
	d := idx.Manifests[0]
	if d.Annotations[annotationImageName] != img.Name || d.Annotations[annotationRefName] != "v2" || d.MediaType != mediaTypeManifest {
		t.Errorf("index entry %+v", d)
	}
	var man manifest
	if err := json.Unmarshal(files[blobPath(d.Digest)], &man); err != nil || len(man.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	var cfg imageConfig
	if err := json.Unmarshal(files[blobPath(man.Config.Digest)], &cfg); err != nil {
		t.Fatal(err)
	}
	if len(cfg.RootFS.DiffIDs) != 1 || cfg.RootFS.DiffIDs[0] != man.Layers[0].Digest || cfg.Config.Entrypoint[0] != "/bin/app" || cfg.OS != "linux" {
		t.Errorf("config %+v", cfg)
	}
	layer := files[blobPath(man.Layers[0].Digest)]
	if int64(len(layer)) != man.Layers[0].Size {
		t.Errorf("layer size %d, manifest says %d", len(layer), man.Layers[0].Size)
	}
	var names []string
	lr := tar.NewReader(bytes.NewReader(layer))
	for {
		h, err := lr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Name == "bin/app" {
			data, _ := io.ReadAll(lr)
			if string(data) != "binary" || h.Mode != 0o755 {
				t.Errorf("bin/app: %q mode %o", data, h.Mode)
			}
		}
	}
	if got := strings.Join(names, " "); got != "bin/ dev/ etc/ proc/ sys/ tmp/ bin/app" {
		t.Errorf("layer entries %s", got)
	}
	if err := (Image{Name: "no-tag"}).WriteOCIArchive(io.Discard); err == nil {
		t.Error("a name without a tag was accepted")
	}
}
