// Package kube runs a real Kubernetes control plane for tests: etcd (Debian
// etcd-server) and kube-apiserver built from the Go module proxy by
// scripts/build-k8s.sh, on loopback, with certificates made per test. It
// has a small REST client for the objects the tests create (the rule is
// that only agent/k8s imports client-go).
//
// The binaries come from $KUBEBUILDER_ASSETS when set, else from the cache
// scripts/build-k8s.sh fills: ${SHUNT_CACHE:-/var/cache/shunt}/k8s/<version>/,
// version taken from test/k8s/go.mod. Missing binaries fail the test (CI
// builds them first); they never skip it.
//
// There is no kube-controller-manager: tests create the default
// ServiceAccount of their namespaces (Pods need it), their EndpointSlices,
// and force-delete pods.
package kube

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Options change how the control plane runs.
type Options struct {
	// ServiceCIDRs is --service-cluster-ip-range (default dual-stack
	// 10.96.0.0/16,fd00:96::/112).
	ServiceCIDRs string
	// ExtraArgs are added to kube-apiserver's command line.
	ExtraArgs []string
}

// ControlPlane is a running etcd + kube-apiserver.
type ControlPlane struct {
	t       testing.TB
	dir     string // certs, kubeconfigs, logs
	etcdDir string
	assets  string
	port    int
	args    []string

	mu        sync.Mutex
	etcd      *exec.Cmd
	apiserver *exec.Cmd

	// CA is the cluster CA (PEM); it signed the serving and client certs.
	CA []byte
	// AdminKubeconfig authenticates as a member of system:masters.
	AdminKubeconfig string
	ca              *x509.Certificate
	caKey           *ecdsa.PrivateKey
	admin           *Client
}

// AssetsDir returns the folder holding kube-apiserver, etcd (and kubelet when
// built): $KUBEBUILDER_ASSETS, else the build-k8s.sh cache.
func AssetsDir() (string, error) {
	if d := os.Getenv("KUBEBUILDER_ASSETS"); d != "" {
		return d, nil
	}
	v, err := KubernetesVersion()
	if err != nil {
		return "", err
	}
	cache := os.Getenv("SHUNT_CACHE")
	if cache == "" {
		cache = "/var/cache/shunt"
	}
	return filepath.Join(cache, "k8s", v), nil
}

// KubernetesVersion is the k8s.io/kubernetes version test/k8s/go.mod pins.
func KubernetesVersion() (string, error) {
	_, file, _, _ := runtime.Caller(0)
	mod := filepath.Join(filepath.Dir(file), "..", "k8s", "go.mod")
	data, err := os.ReadFile(mod)
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(`(?m)^\s*(?:require\s+)?k8s\.io/kubernetes (v\d+\.\d+\.\d+)`).FindSubmatch(data)
	if m == nil {
		return "", fmt.Errorf("%s: no k8s.io/kubernetes requirement", mod)
	}
	return string(m[1]), nil
}

// Binary returns the path of one of the control plane binaries, failing the
// test when it is missing.
func Binary(t testing.TB, name string) string {
	t.Helper()
	dir, err := AssetsDir()
	if err != nil {
		t.Fatalf("kube: %v", err)
	}
	p := filepath.Join(dir, name)
	if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
		t.Fatalf("kube: %s missing in %s: run scripts/build-k8s.sh (CI does it first; a cold build takes about 11 minutes)", name, dir)
	}
	return p
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Start runs etcd and kube-apiserver and waits until the API server is
// ready. Both are killed by PID in t.Cleanup and their files removed.
func Start(t testing.TB, opts Options) *ControlPlane {
	t.Helper()
	if opts.ServiceCIDRs == "" {
		opts.ServiceCIDRs = "10.96.0.0/16,fd00:96::/112"
	}
	cp := &ControlPlane{t: t, dir: t.TempDir()}
	cp.assets, _ = AssetsDir()
	etcdBin := Binary(t, "etcd")
	Binary(t, "kube-apiserver") // fail early when missing
	shm := "/dev/shm"
	if st, err := os.Stat(shm); err != nil || !st.IsDir() {
		shm = ""
	}
	// etcd on tmpfs: Debian's etcd 3.4 has no --unsafe-no-fsync.
	d, err := os.MkdirTemp(shm, "shuntk8s-etcd-")
	if err != nil {
		t.Fatalf("kube: %v", err)
	}
	cp.etcdDir = d
	t.Cleanup(cp.stopAll)

	if err := cp.makeCerts(); err != nil {
		t.Fatalf("kube: certificates: %v", err)
	}
	clientPort, err1 := freePort()
	peerPort, err2 := freePort()
	cp.port, err = freePort()
	if err1 != nil || err2 != nil || err != nil {
		t.Fatalf("kube: no free port: %v %v %v", err1, err2, err)
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	etcd := exec.Command(etcdBin, "--name", "shuntk8s", "--data-dir", filepath.Join(cp.etcdDir, "data"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "shuntk8s="+peerURL, "--log-level", "warn", "--logger", "zap")
	if err := cp.spawn(etcd, "etcd.log"); err != nil {
		t.Fatalf("kube: etcd: %v", err)
	}
	cp.etcd = etcd
	if err := waitTCP(fmt.Sprintf("127.0.0.1:%d", clientPort), 30*time.Second); err != nil {
		t.Fatalf("kube: etcd did not come up: %v\n%s", err, cp.tail("etcd.log"))
	}

	c := func(n string) string { return filepath.Join(cp.dir, n) }
	cp.args = append([]string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(cp.port),
		"--cert-dir=" + cp.dir,
		"--tls-cert-file=" + c("serving.crt"), "--tls-private-key-file=" + c("serving.key"),
		"--client-ca-file=" + c("ca.crt"),
		"--service-account-issuer=https://127.0.0.1:" + strconv.Itoa(cp.port),
		"--service-account-key-file=" + c("sa.pub"),
		"--service-account-signing-key-file=" + c("sa.key"),
		"--service-cluster-ip-range=" + opts.ServiceCIDRs,
		"--authorization-mode=RBAC",
		// Loopback: the kubernetes Service's endpoints cannot point here.
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
	}, opts.ExtraArgs...)
	cp.StartAPIServer()
	return cp
}

// StartAPIServer (re)starts kube-apiserver with the same flags, port and
// certificates, and waits until it is ready.
func (cp *ControlPlane) StartAPIServer() {
	t := cp.t
	t.Helper()
	cmd := exec.Command(Binary(t, "kube-apiserver"), cp.args...)
	if err := cp.spawn(cmd, "kube-apiserver.log"); err != nil {
		t.Fatalf("kube: kube-apiserver: %v", err)
	}
	cp.mu.Lock()
	cp.apiserver = cmd
	cp.mu.Unlock()
	deadline := time.Now().Add(90 * time.Second)
	for {
		code, _, err := cp.Admin().raw(context.Background(), "GET", "/readyz", nil, "")
		if err == nil && code == http.StatusOK {
			break
		}
		if cmd.ProcessState != nil || time.Now().After(deadline) {
			t.Fatalf("kube: kube-apiserver not ready (%d, %v):\n%s", code, err, cp.tail("kube-apiserver.log"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The API server creates the system namespaces itself, shortly after.
	for _, ns := range []string{"default", "kube-system"} {
		for {
			code, _, err := cp.Admin().raw(context.Background(), "GET", "/api/v1/namespaces/"+ns, nil, "")
			if err == nil && code == http.StatusOK {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("kube: namespace %s not created by the API server (%d, %v)", ns, code, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// StopAPIServer stops kube-apiserver (SIGTERM, then SIGKILL) and waits for
// it; etcd keeps running.
func (cp *ControlPlane) StopAPIServer() {
	cp.mu.Lock()
	cmd := cp.apiserver
	cp.apiserver = nil
	cp.mu.Unlock()
	stopProc(cmd)
}

// URL is the API server's address.
func (cp *ControlPlane) URL() string { return fmt.Sprintf("https://127.0.0.1:%d", cp.port) }

func (cp *ControlPlane) spawn(cmd *exec.Cmd, logName string) error {
	f, err := os.OpenFile(filepath.Join(cp.dir, logName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = f, f
	// Its own process group; killed by PID (never by name).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	f.Close()
	if err != nil {
		return err
	}
	go func() { _ = cmd.Wait() }()
	return nil
}

func stopProc(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(15 * time.Second)
	for syscall.Kill(cmd.Process.Pid, 0) == nil && time.Now().Before(deadline) {
		if cmd.ProcessState != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
	for i := 0; i < 500 && cmd.ProcessState == nil; i++ {
		time.Sleep(10 * time.Millisecond)
	}
}

func (cp *ControlPlane) stopAll() {
	cp.StopAPIServer()
	cp.mu.Lock()
	etcd := cp.etcd
	cp.etcd = nil
	cp.mu.Unlock()
	stopProc(etcd)
	if cp.etcdDir != "" {
		_ = os.RemoveAll(cp.etcdDir)
	}
	if cp.t.Failed() {
		cp.t.Logf("kube-apiserver log tail:\n%s", cp.tail("kube-apiserver.log"))
	}
}

func (cp *ControlPlane) tail(name string) string {
	data, _ := os.ReadFile(filepath.Join(cp.dir, name))
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

func waitTCP(addr string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---- certificates and kubeconfigs ----

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}

func keyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

var serial = struct {
	sync.Mutex
	n int64
}{n: 1}

func (cp *ControlPlane) sign(tmpl *x509.Certificate) (certPEM, keyPEM_ []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial.Lock()
	serial.n++
	tmpl.SerialNumber = big.NewInt(serial.n)
	serial.Unlock()
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(24 * time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, cp.ca, &key.PublicKey, cp.caKey)
	if err != nil {
		return nil, nil, err
	}
	kp, err := keyPEM(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), kp, nil
}

func (cp *ControlPlane) makeCerts() error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "shunt-test-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	cp.ca, err = x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	cp.caKey = caKey
	cp.CA = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	if err := os.WriteFile(filepath.Join(cp.dir, "ca.crt"), cp.CA, 0o600); err != nil {
		return err
	}
	crt, key, err := cp.sign(&x509.Certificate{
		Subject: pkix.Name{CommonName: "kube-apiserver"}, DNSNames: []string{"localhost", "kubernetes", "kubernetes.default"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(cp.dir, "serving.crt"), crt, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(cp.dir, "serving.key"), key, 0o600); err != nil {
		return err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	kp, err := keyPEM(saKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(cp.dir, "sa.key"), kp, 0o600); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(cp.dir, "sa.pub"), "PUBLIC KEY", pub); err != nil {
		return err
	}
	cp.AdminKubeconfig, err = cp.Kubeconfig("shunt-admin", "system:masters")
	return err
}

// Kubeconfig writes a kubeconfig for user (client certificate CN) in groups
// (O) and returns its path. A ServiceAccount is user
// "system:serviceaccount:<ns>:<name>" in group "system:serviceaccounts".
func (cp *ControlPlane) Kubeconfig(user string, groups ...string) (string, error) {
	crt, key, err := cp.sign(&x509.Certificate{
		Subject: pkix.Name{CommonName: user, Organization: groups}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return "", err
	}
	name := strings.NewReplacer(":", "_", "/", "_").Replace(user)
	base := filepath.Join(cp.dir, name)
	if err := os.WriteFile(base+".crt", crt, 0o600); err != nil {
		return "", err
	}
	if err := os.WriteFile(base+".key", key, 0o600); err != nil {
		return "", err
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, `apiVersion: v1
kind: Config
clusters:
- name: shunt-test
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
    client-certificate: %s
    client-key: %s
contexts:
- name: shunt-test
  context: {cluster: shunt-test, user: %s}
current-context: shunt-test
`, cp.URL(), filepath.Join(cp.dir, "ca.crt"), name, base+".crt", base+".key", name)
	path := base + ".kubeconfig"
	return path, os.WriteFile(path, b.Bytes(), 0o600)
}

// Admin returns a client authenticated as a cluster admin.
func (cp *ControlPlane) Admin() *Client {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.admin == nil {
		cert, err := tls.LoadX509KeyPair(filepath.Join(cp.dir, "shunt-admin.crt"), filepath.Join(cp.dir, "shunt-admin.key"))
		if err != nil {
			cp.t.Fatalf("kube: admin cert: %v", err)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(cp.CA)
		cp.admin = &Client{base: cp.URL(), http: &http.Client{
			Timeout:   30 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}, MaxIdleConnsPerHost: 64},
		}}
	}
	return cp.admin
}
