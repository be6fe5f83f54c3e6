package ociimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

var testFiles = []File{
	{Path: "/usr/local/bin/tool", Mode: 0o755, Data: []byte("#!/bin/true\n")},
	{Path: "/etc/tool/config.yaml", Data: []byte("a: 1\n")},
}

// readArchive reads an OCI layout archive into name -> content.
func readArchive(t *testing.T, data []byte) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = b
	}
}

func blob(t *testing.T, files map[string][]byte, d v1.Descriptor) []byte {
	t.Helper()
	b, ok := files["blobs/sha256/"+d.Digest.Encoded()]
	if !ok {
		t.Fatalf("blob %s missing", d.Digest)
	}
	if digest.FromBytes(b) != d.Digest || int64(len(b)) != d.Size {
		t.Fatalf("blob %s: digest %s, size %d (want %d)", d.Digest, digest.FromBytes(b), len(b), d.Size)
	}
	return b
}

// The archive is a valid OCI image layout whose every blob matches its
// descriptor, and the layer holds the files with their modes and parents.
func TestWriteReadBack(t *testing.T) {
	var buf bytes.Buffer
	md, err := Write(&buf, Config{Name: "docker.io/shunt/tool:1.2", Entrypoint: []string{"/usr/local/bin/tool"}}, testFiles)
	if err != nil {
		t.Fatal(err)
	}
	files := readArchive(t, buf.Bytes())
	var layout v1.ImageLayout
	if err := json.Unmarshal(files["oci-layout"], &layout); err != nil || layout.Version != "1.0.0" {
		t.Fatalf("oci-layout: %s %v", files["oci-layout"], err)
	}
	var idx v1.Index
	if err := json.Unmarshal(files["index.json"], &idx); err != nil || len(idx.Manifests) != 1 {
		t.Fatalf("index.json: %s %v", files["index.json"], err)
	}
	md0 := idx.Manifests[0]
	if md0.Digest != md || md0.Annotations[AnnotationImageName] != "docker.io/shunt/tool:1.2" || md0.Annotations[v1.AnnotationRefName] != "1.2" {
		t.Errorf("manifest descriptor %+v", md0)
	}
	var man v1.Manifest
	if err := json.Unmarshal(blob(t, files, md0), &man); err != nil || len(man.Layers) != 1 || man.MediaType != v1.MediaTypeImageManifest {
		t.Fatalf("manifest %+v %v", man, err)
	}
	var img v1.Image
	if err := json.Unmarshal(blob(t, files, man.Config), &img); err != nil {
		t.Fatal(err)
	}
	if img.OS != "linux" || img.Architecture == "" || len(img.Config.Entrypoint) != 1 || len(img.RootFS.DiffIDs) != 1 {
		t.Errorf("config %+v", img)
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob(t, files, man.Layers[0])))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if digest.FromBytes(raw) != img.RootFS.DiffIDs[0] {
		t.Errorf("diff ID %s, uncompressed layer %s", img.RootFS.DiffIDs[0], digest.FromBytes(raw))
	}
	var got []string
	tr := tar.NewReader(bytes.NewReader(raw))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		got = append(got, fmt.Sprintf("%s %o %d %q", h.Name, h.Mode, h.Uid, b))
	}
	want := []string{
		`etc/ 755 0 ""`, `etc/tool/ 755 0 ""`, `etc/tool/config.yaml 644 0 "a: 1\n"`,
		`usr/ 755 0 ""`, `usr/local/ 755 0 ""`, `usr/local/bin/ 755 0 ""`, `usr/local/bin/tool 755 0 "#!/bin/true\n"`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("layer:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestReproducibleAndBadInput(t *testing.T) {
	var a, b bytes.Buffer
	cfg := Config{Name: "docker.io/shunt/tool:1"}
	if _, err := Write(&a, cfg, testFiles); err != nil {
		t.Fatal(err)
	}
	if _, err := Write(&b, cfg, []File{testFiles[1], testFiles[0]}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("the same files (in another order) gave different archives")
	}
	for _, tc := range []struct {
		name  string
		cfg   Config
		files []File
	}{
		{"no name", Config{}, testFiles},
		{"relative path", cfg, []File{{Path: "bin/x", Data: []byte("x")}}},
		{"twice", cfg, []File{testFiles[0], testFiles[0]}},
		{"file and folder", cfg, []File{{Path: "/a", Data: []byte("x")}, {Path: "/a/b", Data: []byte("y")}}},
		{"no content", cfg, []File{{Path: "/a"}}},
		{"no files", cfg, nil},
	} {
		if _, err := Write(io.Discard, tc.cfg, tc.files); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
}

// TestImportIntoContainerd: a real containerd (Debian's, private root,
// state and socket, killed by PID) imports the archive with `ctr images
// import` under the image's name, its content checks complete, and the
// static program in it runs from the unpacked image.
func TestImportIntoContainerd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (containerd)")
	}
	containerd, err := exec.LookPath("containerd")
	if err != nil {
		t.Fatalf("containerd not found (scripts/install-deps.sh installs it): %v", err)
	}
	ctr, err := exec.LookPath("ctr")
	if err != nil {
		t.Fatalf("ctr not found: %v", err)
	}
	dir := t.TempDir()
	hello := filepath.Join(dir, "hello")
	build := exec.Command("go", "build", "-o", hello, "./testdata/hello")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build hello: %v\n%s", err, out)
	}
	const name = "docker.io/shunt/hello:test"
	archive := filepath.Join(dir, "hello.tar")
	if _, err := WriteFile(archive, Config{Name: name, Entrypoint: []string{"/hello"}}, []File{{Path: "/hello", Mode: 0o755, Source: hello}}); err != nil {
		t.Fatal(err)
	}

	sock := filepath.Join(dir, "c.sock")
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[plugins."io.containerd.internal.v1.opt"]
  path = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, sock+".ttrpc", filepath.Join(dir, "opt"))
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	cmd := exec.Command(containerd, "--config", filepath.Join(dir, "config.toml"))
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	run := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(ctr, append([]string{"--address", sock, "--namespace", "shunt-test"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ctr %s: %v\n%s\ncontainerd log:\n%s", strings.Join(args, " "), err, out, log.String())
		}
		return string(out)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if err := exec.Command(ctr, "--address", sock, "version").Run(); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not come up:\n%s", log.String())
		}
	}

	run("images", "import", "--snapshotter", "native", archive)
	if out := run("images", "ls", "-q"); strings.TrimSpace(out) != name {
		t.Fatalf("images after import: %q, want %s", out, name)
	}
	if out := run("images", "check"); !strings.Contains(out, "complete (2/2)") {
		t.Errorf("images check:\n%s", out)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	run("images", "mount", "--snapshotter", "native", name, mnt)
	defer run("images", "unmount", mnt)
	out, err := exec.Command(filepath.Join(mnt, "hello"), "from", "the", "image").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "hello from "+filepath.Join(mnt, "hello")+": from the image") {
		t.Errorf("running the image's program: %v %q", err, out)
	}
}
