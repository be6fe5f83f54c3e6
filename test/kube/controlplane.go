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
// By default there is no kube-controller-manager: tests create the default
// ServiceAccount of their namespaces (Pods need it), their EndpointSlices,
// and force-delete pods. Options.Controllers runs kube-controller-manager
// with the controllers named, Options.Scheduler kube-scheduler (both built
// by `scripts/build-k8s.sh kube-controller-manager kube-scheduler`).
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
	"errors"
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

	"github.com/shuntmesh/shunt/test/harness"
)

// Options change how the control plane runs.
type Options struct {
	// ServiceCIDRs is --service-cluster-ip-range (default dual-stack
	// 10.96.0.0/16,fd00:96::/112).
	ServiceCIDRs string
	// ExtraArgs are added to kube-apiserver's command line.
	ExtraArgs []string
	// Dir holds certificates, kubeconfigs and logs (default: a new
	// temporary folder, removed by Close).
	Dir string
	// Controllers are the kube-controller-manager controllers to run
	// (its --controllers, e.g. "daemonset", "garbagecollector"); empty:
	// no controller manager runs. Needs `scripts/build-k8s.sh
	// kube-controller-manager`.
	Controllers []string
	// Scheduler runs kube-scheduler, which binds pods created without a
	// node (a DaemonSet's). Needs `scripts/build-k8s.sh kube-scheduler`.
	Scheduler bool
}

// ControlPlane is a running etcd + kube-apiserver.
type ControlPlane struct {
	dir     string // certs, kubeconfigs, logs
	ownDir  bool
	etcdDir string
	assets  string
	port    int
	args    []string

	mu        sync.Mutex
	etcd      *exec.Cmd
	apiserver *exec.Cmd
	// kube-controller-manager and kube-scheduler, when asked for.
	controllers []*exec.Cmd

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

// FindBinary returns the path of one of the control plane binaries, or an
// error saying how to build it.
func FindBinary(name string) (string, error) {
	dir, err := AssetsDir()
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, name)
	if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("%s missing in %s: run scripts/build-k8s.sh (CI does it first; a cold build takes about 11 minutes)", name, dir)
	}
	return p, nil
}

// Binary is FindBinary failing the test when the binary is missing (never
// skipping it).
func Binary(t testing.TB, name string) string {
	t.Helper()
	p, err := FindBinary(name)
	if err != nil {
		t.Fatalf("kube: %v", err)
	}
	return p
}

// Start runs etcd and kube-apiserver for a test and waits until the API
// server is ready. Both are killed by PID in t.Cleanup and their files
// removed. A missing binary fails the test.
func Start(t testing.TB, opts Options) *ControlPlane {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	cp, err := Launch(opts)
	if cp != nil {
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("kube-apiserver log tail:\n%s", cp.Tail("kube-apiserver.log"))
				for _, l := range []string{"kube-controller-manager.log", "kube-scheduler.log"} {
					if _, err := os.Stat(filepath.Join(cp.dir, l)); err == nil {
						t.Logf("%s tail:\n%s", l, cp.Tail(l))
					}
				}
			}
			cp.Close()
		})
	}
	if err != nil {
		t.Fatalf("kube: %v", err)
	}
	return cp
}

// Launch runs etcd and kube-apiserver and waits until the API server is
// ready. Close stops them (by PID) and removes their files. On error, the
// returned ControlPlane (when not nil) must still be closed.
func Launch(opts Options) (*ControlPlane, error) {
	if opts.ServiceCIDRs == "" {
		opts.ServiceCIDRs = "10.96.0.0/16,fd00:96::/112"
	}
	etcdBin, err := FindBinary("etcd")
	if err != nil {
		return nil, err
	}
	if _, err := FindBinary("kube-apiserver"); err != nil {
		return nil, err
	}
	cp := &ControlPlane{dir: opts.Dir}
	if cp.dir == "" {
		if cp.dir, err = os.MkdirTemp("", "shuntk8s-"); err != nil {
			return nil, err
		}
		cp.ownDir = true
	} else if err := os.MkdirAll(cp.dir, 0o700); err != nil {
		return nil, err
	}
	shm := "/dev/shm"
	if st, err := os.Stat(shm); err != nil || !st.IsDir() {
		shm = ""
	}
	// etcd on tmpfs: Debian's etcd 3.4 has no --unsafe-no-fsync.
	if cp.etcdDir, err = os.MkdirTemp(shm, "shuntk8s-etcd-"); err != nil {
		return cp, err
	}
	if err := cp.makeCerts(); err != nil {
		return cp, fmt.Errorf("certificates: %w", err)
	}
	clientPort, err1 := harness.FreePort()
	peerPort, err2 := harness.FreePort()
	cp.port, err = harness.FreePort()
	if err := errors.Join(err1, err2, err); err != nil {
		return cp, fmt.Errorf("no free port: %w", err)
	}
	if cp.AdminKubeconfig, err = cp.Kubeconfig("shunt-admin", "system:masters"); err != nil {
		return cp, err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	etcd := exec.Command(etcdBin, "--name", "shuntk8s", "--data-dir", filepath.Join(cp.etcdDir, "data"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "shuntk8s="+peerURL, "--log-level", "warn", "--logger", "zap",
		"--quota-backend-bytes", strconv.Itoa(4<<30))
	if err := cp.spawn(etcd, "etcd.log"); err != nil {
		return cp, fmt.Errorf("etcd: %w", err)
	}
	cp.mu.Lock()
	cp.etcd = etcd
	cp.mu.Unlock()
	if err := waitTCP(fmt.Sprintf("127.0.0.1:%d", clientPort), 30*time.Second); err != nil {
		return cp, fmt.Errorf("etcd did not come up: %w\n%s", err, cp.Tail("etcd.log"))
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
	if err := cp.StartAPIServerErr(); err != nil {
		return cp, err
	}
	if len(opts.Controllers) > 0 {
		if err := cp.startControllerManager(opts.Controllers); err != nil {
			return cp, err
		}
	}
	if opts.Scheduler {
		if err := cp.startScheduler(); err != nil {
			return cp, err
		}
	}
	return cp, nil
}

// startControllerManager runs kube-controller-manager with controllers,
// as a member of system:masters, no leader election, no serving port. It
// publishes the cluster CA (kube-root-ca.crt) for pods' ServiceAccount
// tokens when root-ca-cert-publisher runs.
func (cp *ControlPlane) startControllerManager(controllers []string) error {
	bin, err := FindBinary("kube-controller-manager")
	if err != nil {
		return err
	}
	kc, err := cp.Kubeconfig("system:kube-controller-manager", "system:masters")
	if err != nil {
		return err
	}
	return cp.startComponent(bin, "kube-controller-manager.log",
		"--kubeconfig="+kc, "--controllers="+strings.Join(controllers, ","),
		"--leader-elect=false", "--secure-port=0",
		"--root-ca-file="+filepath.Join(cp.dir, "ca.crt"), "--v=2")
}

// startScheduler runs kube-scheduler as a member of system:masters, no
// leader election, no serving port.
func (cp *ControlPlane) startScheduler() error {
	bin, err := FindBinary("kube-scheduler")
	if err != nil {
		return err
	}
	kc, err := cp.Kubeconfig("system:kube-scheduler", "system:masters")
	if err != nil {
		return err
	}
	return cp.startComponent(bin, "kube-scheduler.log", "--kubeconfig="+kc, "--leader-elect=false", "--secure-port=0", "--v=2")
}

// startComponent runs a control plane component that needs nothing but
// the API server; Close stops it.
func (cp *ControlPlane) startComponent(bin, logName string, args ...string) error {
	cmd := exec.Command(bin, args...)
	if err := cp.spawn(cmd, logName); err != nil {
		return fmt.Errorf("%s: %w", filepath.Base(bin), err)
	}
	cp.mu.Lock()
	cp.controllers = append(cp.controllers, cmd)
	cp.mu.Unlock()
	// A wrong flag ends it at once: give it a moment to fail visibly.
	time.Sleep(500 * time.Millisecond)
	if exited(cmd) {
		return fmt.Errorf("%s exited:\n%s", filepath.Base(bin), cp.Tail(logName))
	}
	return nil
}

// StartAPIServer (re)starts kube-apiserver with the same flags, port and
// certificates, and waits until it is ready; it fails the test (Start's)
// on error.
func (cp *ControlPlane) StartAPIServer(t testing.TB) {
	t.Helper()
	if err := cp.StartAPIServerErr(); err != nil {
		t.Fatalf("kube: %v", err)
	}
}

// StartAPIServerErr is StartAPIServer returning the error.
func (cp *ControlPlane) StartAPIServerErr() error {
	bin, err := FindBinary("kube-apiserver")
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, cp.args...)
	if err := cp.spawn(cmd, "kube-apiserver.log"); err != nil {
		return fmt.Errorf("kube-apiserver: %w", err)
	}
	cp.mu.Lock()
	cp.apiserver = cmd
	cp.mu.Unlock()
	deadline := time.Now().Add(90 * time.Second)
	ctx := context.Background()
	for {
		code, _, err := cp.Admin().raw(ctx, "GET", "/readyz", nil, "")
		if err == nil && code == http.StatusOK {
			break
		}
		if exited(cmd) || time.Now().After(deadline) {
			return fmt.Errorf("kube-apiserver not ready (%d, %v):\n%s", code, err, cp.Tail("kube-apiserver.log"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The API server creates the system namespaces itself, shortly after.
	for _, ns := range []string{"default", "kube-system"} {
		for {
			code, _, err := cp.Admin().raw(ctx, "GET", "/api/v1/namespaces/"+ns, nil, "")
			if err == nil && code == http.StatusOK {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("namespace %s not created by the API server (%d, %v)", ns, code, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return nil
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

// APIServerPID is the running kube-apiserver's process id (0: none).
func (cp *ControlPlane) APIServerPID() int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.apiserver == nil || cp.apiserver.Process == nil {
		return 0
	}
	return cp.apiserver.Process.Pid
}

// URL is the API server's address.
func (cp *ControlPlane) URL() string { return fmt.Sprintf("https://127.0.0.1:%d", cp.port) }

// Port is the API server's port on 127.0.0.1.
func (cp *ControlPlane) Port() int { return cp.port }

func (cp *ControlPlane) spawn(cmd *exec.Cmd, logName string) error {
	f, err := os.OpenFile(filepath.Join(cp.dir, logName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = f, f
	// Its own process group (a Ctrl-C reaches only the test or benchmark,
	// which stops it by PID). PDEATHSIG fires when the forking thread
	// ends: it is a thread locked to a goroutine that lives exactly as long
	// as the process, so the process dies with the test binary and never
	// earlier.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		err := cmd.Start()
		started <- err
		if err == nil {
			_ = cmd.Wait()
		}
		close(done)
	}()
	err = <-started
	f.Close()
	if err != nil {
		return err
	}
	doneChans.Store(cmd, done)
	return nil
}

var doneChans sync.Map // *exec.Cmd -> chan struct{} closed once reaped

func exited(cmd *exec.Cmd) bool {
	ch, ok := doneChans.Load(cmd)
	if !ok {
		return true
	}
	select {
	case <-ch.(chan struct{}):
		return true
	default:
		return false
	}
}

// stopProc stops a process started by spawn, by its PID: SIGTERM, then
// SIGKILL after 15 seconds, and waits until it is reaped.
func stopProc(cmd *exec.Cmd) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	ch, ok := doneChans.Load(cmd)
	if !ok {
		return
	}
	done := ch.(chan struct{})
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
	doneChans.Delete(cmd)
}

// Close stops the controller manager and the scheduler, kube-apiserver
// and etcd, and removes their files.
func (cp *ControlPlane) Close() {
	cp.mu.Lock()
	comps := cp.controllers
	cp.controllers = nil
	cp.mu.Unlock()
	for _, c := range comps {
		stopProc(c)
	}
	cp.StopAPIServer()
	cp.mu.Lock()
	etcd := cp.etcd
	cp.etcd = nil
	cp.mu.Unlock()
	stopProc(etcd)
	if cp.etcdDir != "" {
		_ = os.RemoveAll(cp.etcdDir)
	}
	if cp.ownDir {
		_ = os.RemoveAll(cp.dir)
	}
}

// Tail returns the last lines of one of the logs (etcd.log,
// kube-apiserver.log, kube-controller-manager.log, kube-scheduler.log).
func (cp *ControlPlane) Tail(name string) string {
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
	return nil
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
			panic(fmt.Sprintf("kube: admin cert: %v", err)) // written by Launch
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
