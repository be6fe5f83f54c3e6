package ops

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// HelmVersion is the helm.sh/helm/v4 version test/helm/go.mod pins.
func HelmVersion() (string, error) {
	data, err := os.ReadFile(filepath.Join(Root(), "test", "helm", "go.mod"))
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(`(?m)^\s*(?:require\s+)?helm\.sh/helm/v4 (v\d+\.\d+\.\d+)`).FindSubmatch(data)
	if m == nil {
		return "", fmt.Errorf("test/helm/go.mod: no helm.sh/helm/v4 requirement")
	}
	return string(m[1]), nil
}

// Helm is the helm binary scripts/build-helm.sh built from the Go module
// proxy (${SHUNT_CACHE:-/var/cache/shunt}/helm/<version>/helm), with its
// configuration, cache and data folders private to the test.
type Helm struct {
	Bin string
	Env []string
}

// NewHelm finds helm, failing the test (never skipping it) when it was not
// built.
func NewHelm(t testing.TB) *Helm {
	t.Helper()
	v, err := HelmVersion()
	if err != nil {
		t.Fatal(err)
	}
	cache := os.Getenv("SHUNT_CACHE")
	if cache == "" {
		cache = "/var/cache/shunt"
	}
	bin := filepath.Join(cache, "helm", v, "helm")
	if st, err := os.Stat(bin); err != nil || st.Mode()&0o111 == 0 {
		t.Fatalf("helm %s missing at %s: run scripts/build-helm.sh (make deps does)", v, bin)
	}
	home := t.TempDir()
	return &Helm{Bin: bin, Env: append(os.Environ(),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"), "HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"))}
}

// Run runs helm with args and returns its standard output.
func (h *Helm) Run(args ...string) ([]byte, error) {
	var out, errb bytes.Buffer
	cmd := exec.Command(h.Bin, args...)
	cmd.Env, cmd.Stdout, cmd.Stderr = h.Env, &out, &errb
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("helm %s: %v: %s%s", strings.Join(args, " "), err, errb.String(), out.String())
	}
	return out.Bytes(), nil
}

// Object is one rendered manifest: its kind, name and YAML.
type Object struct {
	Kind, Name, Namespace string
	YAML                  []byte
}

// SplitManifests splits helm's multi-document output into objects.
func SplitManifests(out []byte) ([]Object, error) {
	var objs []Object
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(out), -1) {
		var meta struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			return nil, fmt.Errorf("manifest does not parse: %w\n%s", err, doc)
		}
		if meta.Kind == "" {
			if strings.TrimSpace(stripComments(doc)) != "" {
				return nil, fmt.Errorf("manifest without kind:\n%s", doc)
			}
			continue
		}
		objs = append(objs, Object{Kind: meta.Kind, Name: meta.Metadata.Name, Namespace: meta.Metadata.Namespace, YAML: []byte(doc)})
	}
	return objs, nil
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}
