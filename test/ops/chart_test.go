package ops

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"

	"github.com/shuntmesh/shunt/mesh/maglev"
	"github.com/shuntmesh/shunt/test/harness"
	"github.com/shuntmesh/shunt/test/kube"
)

// rendering is the chart rendered with one set of values, decoded.
type rendering struct {
	name     string
	objs     []Object
	ds       *appsv1.DaemonSet
	config   string // shunt.yaml of the ConfigMap
	seed     string // the Secret's seed
	rbac     *rbacv1.ClusterRole
	kinds    map[string]int
	monitors map[string]map[string]any // ServiceMonitor, PrometheusRule
	dash     string                    // the dashboard ConfigMap's JSON
}

const releaseNS = "shunt-system"

func render(t *testing.T, h *Helm, name string, valueFiles ...string) *rendering {
	t.Helper()
	args := []string{"template", "shunt", ChartDir, "--namespace", releaseNS}
	for _, f := range valueFiles {
		args = append(args, "--values", f)
	}
	out, err := h.Run(args...)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := SplitManifests(out)
	if err != nil {
		t.Fatal(err)
	}
	r := &rendering{name: name, objs: objs, kinds: map[string]int{}, monitors: map[string]map[string]any{}}
	for _, o := range objs {
		r.kinds[o.Kind]++
		// Every object decodes strictly into its Kubernetes type: a field
		// the API does not have is an error.
		var into any
		switch o.Kind {
		case "ServiceAccount":
			into = &corev1.ServiceAccount{}
		case "Service":
			into = &corev1.Service{}
		case "Secret":
			into = &corev1.Secret{}
		case "ConfigMap":
			into = &corev1.ConfigMap{}
		case "ClusterRole":
			r.rbac = &rbacv1.ClusterRole{}
			into = r.rbac
		case "ClusterRoleBinding":
			into = &rbacv1.ClusterRoleBinding{}
		case "Role":
			into = &rbacv1.Role{}
		case "RoleBinding":
			into = &rbacv1.RoleBinding{}
		case "DaemonSet":
			r.ds = &appsv1.DaemonSet{}
			into = r.ds
		case "ServiceMonitor", "PrometheusRule":
			m := map[string]any{}
			if err := yaml.Unmarshal(o.YAML, &m); err != nil {
				t.Fatalf("%s: %s %s: %v", name, o.Kind, o.Name, err)
			}
			r.monitors[o.Kind] = m
			continue
		default:
			t.Fatalf("%s: unexpected kind %s", name, o.Kind)
		}
		if err := yaml.UnmarshalStrict(o.YAML, into); err != nil {
			t.Errorf("%s: %s %s does not decode strictly: %v", name, o.Kind, o.Name, err)
		}
		switch v := into.(type) {
		case *corev1.Secret:
			r.seed = string(v.Data["seed"])
		case *corev1.ConfigMap:
			if c, ok := v.Data["shunt.yaml"]; ok {
				r.config = c
			}
			if d, ok := v.Data["shunt-dashboard.json"]; ok {
				r.dash = d
			}
		}
	}
	return r
}

func TestChartLint(t *testing.T) {
	h := NewHelm(t)
	for _, vf := range [][]string{nil, {"testdata/values-full.yaml"}, {"testdata/values-standalone.yaml"}} {
		args := []string{"lint", "--strict", ChartDir}
		for _, f := range vf {
			args = append(args, "--values", f)
		}
		if out, err := h.Run(args...); err != nil {
			t.Errorf("%v\n%s", err, out)
		}
	}
}

// The chart renders with its defaults and with non-default values into
// objects that decode strictly into their Kubernetes types; what it renders
// is what the agent needs: its configuration file and command line accepted
// by the real shuntd (-validate), the capabilities, mounts, probes and RBAC,
// the seed, and the same alert rules and dashboard as deploy/.
func TestChartRender(t *testing.T) {
	h := NewHelm(t)
	shuntd, _ := harness.AgentBinaries(t)
	full := render(t, h, "values-full", "testdata/values-full.yaml")
	for _, r := range []*rendering{
		render(t, h, "defaults"),
		full,
		render(t, h, "values-standalone", "testdata/values-standalone.yaml"),
	} {
		t.Run(r.name, func(t *testing.T) {
			k8s := r.name != "values-standalone"
			want := map[string]int{"ServiceAccount": 1, "Secret": 1, "ConfigMap": 1, "DaemonSet": 1}
			if k8s {
				want["ClusterRole"], want["ClusterRoleBinding"], want["Role"], want["RoleBinding"] = 1, 1, 1, 1
			}
			if r == full {
				want["ConfigMap"], want["Service"], want["ServiceMonitor"], want["PrometheusRule"] = 2, 1, 1, 1
			}
			if !reflect.DeepEqual(r.kinds, want) {
				t.Errorf("objects %v, want %v", r.kinds, want)
			}
			for _, o := range r.objs {
				namespaced := o.Kind != "ClusterRole" && o.Kind != "ClusterRoleBinding"
				if namespaced != (o.Namespace == releaseNS) {
					t.Errorf("%s %s: namespace %q", o.Kind, o.Name, o.Namespace)
				}
			}
			checkDaemonSet(t, r, k8s)
			checkAgentAccepts(t, shuntd, r)
			if _, err := maglev.ParseSeed(r.seed); err != nil {
				t.Errorf("seed %q: %v", r.seed, err)
			}
			if k8s {
				checkRBAC(t, r.rbac)
			}
		})
	}
	if full.seed != "bXktMTItYnl0ZXMh" {
		t.Errorf("values-full: seed %q, want the xdp.seed value", full.seed)
	}
	checkMonitoring(t, full)
}

func container(t *testing.T, r *rendering) corev1.Container {
	t.Helper()
	if r.ds == nil || len(r.ds.Spec.Template.Spec.Containers) != 1 {
		t.Fatalf("no DaemonSet with one container")
	}
	return r.ds.Spec.Template.Spec.Containers[0]
}

func checkDaemonSet(t *testing.T, r *rendering, k8s bool) {
	t.Helper()
	ps := r.ds.Spec.Template.Spec
	c := container(t, r)
	if !ps.HostNetwork || !ps.HostPID {
		t.Errorf("hostNetwork %v hostPID %v", ps.HostNetwork, ps.HostPID)
	}
	sc := c.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("security context %+v", sc)
	}
	if got := chartCapabilities(t, r); !slices.Equal(got, []string{"SYS_ADMIN", "SYS_PTRACE", "CHOWN"}) {
		t.Errorf("capabilities %v", got)
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet.Path != "/healthz" || c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Errorf("probes: liveness %+v readiness %+v", c.LivenessProbe, c.ReadinessProbe)
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	host := map[string]string{}
	for _, v := range ps.Volumes {
		if v.HostPath != nil {
			host[v.Name] = v.HostPath.Path
		}
	}
	// The node's folders: hostPaths (values-full moves them), mounted where
	// the agent expects them.
	want := map[string]string{"/sys/fs/bpf": "/sys/fs/bpf", "/sys/fs/cgroup": "/sys/fs/cgroup", "/run/shunt": "/run/shunt", "/var/lib/shunt": "/var/lib/shunt"}
	if r.name == "values-full" {
		want = map[string]string{"/sys/fs/bpf": "/run/bpffs", "/sys/fs/cgroup": "/run/cgroupfs", "/run/shunt": "/run/mesh-dataplane", "/var/lib/shunt": "/var/lib/mesh-dataplane"}
	}
	for path, src := range want {
		m, ok := mounts[path]
		if !ok || host[m.Name] != src {
			t.Errorf("%s: mount %+v from host %q, want host %s", path, m, host[m.Name], src)
		}
	}
	if p := mounts["/sys/fs/bpf"].MountPropagation; p == nil || *p != corev1.MountPropagationHostToContainer {
		t.Errorf("bpffs mount propagation %v", p)
	}
	env, values := map[string]string{}, map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			env[e.Name] = e.ValueFrom.FieldRef.FieldPath
		} else {
			values[e.Name] = e.Value
		}
	}
	if env["NODE_NAME"] != "spec.nodeName" || env["HOST_IP"] != "status.hostIP" {
		t.Errorf("downward API env %v", env)
	}
	// kubernetes.apiServer replaces the in-cluster address the kubelet sets.
	wantEnv := map[string]string{}
	if r.name == "values-full" {
		wantEnv = map[string]string{"KUBERNETES_SERVICE_HOST": "192.0.2.1", "KUBERNETES_SERVICE_PORT": "6443"}
	}
	if !maps.Equal(values, wantEnv) {
		t.Errorf("env %v, want %v", values, wantEnv)
	}
	hasKube := slices.Contains(c.Args, "-kubernetes") && slices.Contains(c.Args, "-node-name=$(NODE_NAME)") &&
		slices.Contains(c.Args, "-cleanup-on-uninstall="+releaseNS+"/"+r.ds.Name)
	if hasKube != k8s {
		t.Errorf("args %v: Kubernetes source %v, want %v", c.Args, hasKube, k8s)
	}
	if ps.ServiceAccountName == "" || r.ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType {
		t.Errorf("service account %q, update strategy %+v", ps.ServiceAccountName, r.ds.Spec.UpdateStrategy)
	}
	if ru := r.ds.Spec.UpdateStrategy.RollingUpdate; ru == nil || ru.MaxSurge == nil || ru.MaxSurge.IntValue() != 0 {
		t.Errorf("rolling update %+v: maxSurge must be 0 (two agents on a node exclude each other)", ru)
	}
}

// chartCapabilities returns the capabilities the DaemonSet adds.
func chartCapabilities(t *testing.T, r *rendering) []string {
	t.Helper()
	var out []string
	for _, c := range container(t, r).SecurityContext.Capabilities.Add {
		out = append(out, string(c))
	}
	return out
}

// agentArgs returns the container's arguments with the downward API
// variables and the pod's paths replaced for a run outside a pod.
func agentArgs(t *testing.T, r *rendering, configFile, seedFile, nodeName, hostIP string) []string {
	t.Helper()
	var out []string
	for _, a := range container(t, r).Args {
		a = strings.NewReplacer("$(NODE_NAME)", nodeName, "$(HOST_IP)", hostIP,
			"/etc/shunt/shunt.yaml", configFile, "/etc/shunt-seed/seed", seedFile).Replace(a)
		if strings.Contains(a, "$(") {
			t.Fatalf("argument %q uses an unknown variable", a)
		}
		out = append(out, a)
	}
	return out
}

// checkAgentAccepts runs the real shuntd -validate on the rendered
// configuration file with the DaemonSet's own arguments.
func checkAgentAccepts(t *testing.T, shuntd string, r *rendering) {
	t.Helper()
	dir := t.TempDir()
	cfg, seed := filepath.Join(dir, "shunt.yaml"), filepath.Join(dir, "seed")
	if err := os.WriteFile(cfg, []byte(r.config), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(seed, []byte(r.seed), 0o600); err != nil {
		t.Fatal(err)
	}
	args := append(agentArgs(t, r, cfg, seed, "node-1", "192.0.2.10"), "-validate")
	out, err := exec.Command(shuntd, args...).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "configuration ok") {
		t.Errorf("shuntd %s: %v: %s\nconfiguration:\n%s", strings.Join(args, " "), err, out, r.config)
	}
}

// checkRBAC: the chart's ClusterRole grants exactly what deploy/rbac.yaml
// grants (the tests of agent/k8s run the agent with that one).
func checkRBAC(t *testing.T, got *rbacv1.ClusterRole) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(Root(), "deploy", "rbac.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := SplitManifests(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if o.Kind != "ClusterRole" {
			continue
		}
		var want rbacv1.ClusterRole
		if err := yaml.UnmarshalStrict(o.YAML, &want); err != nil {
			t.Fatal(err)
		}
		if got == nil || !reflect.DeepEqual(got.Rules, want.Rules) {
			t.Errorf("chart ClusterRole rules %+v, deploy/rbac.yaml %+v", got, want.Rules)
		}
		for _, r := range want.Rules {
			if !slices.Equal(r.Verbs, []string{"get", "list", "watch"}) {
				t.Errorf("verbs %v: read-only means get, list, watch", r.Verbs)
			}
		}
		return
	}
	t.Fatal("deploy/rbac.yaml has no ClusterRole")
}

// checkMonitoring: the PrometheusRule carries the rules file (job selector
// rewritten; promtool accepts it), the ServiceMonitor names the job, the
// dashboard ConfigMap is the dashboard file.
func checkMonitoring(t *testing.T, r *rendering) {
	t.Helper()
	spec, _ := r.monitors["PrometheusRule"]["spec"].(map[string]any)
	data, err := yaml.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(data), `job="shunt"`) || !strings.Contains(string(data), `job="mesh-agents"`) {
		t.Errorf("PrometheusRule does not select the configured job")
	}
	f := filepath.Join(t.TempDir(), "rules.yaml")
	if err := os.WriteFile(f, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(Binary(t, "promtool"), "check", "rules", f).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules on the PrometheusRule's spec: %v\n%s", err, out)
	}
	orig, err := os.ReadFile(RulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var a, b any
	if err := yaml.Unmarshal([]byte(strings.ReplaceAll(string(orig), `job="shunt"`, `job="mesh-agents"`)), &a); err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, &b); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Error("the PrometheusRule's groups differ from deploy/prometheus/shunt-rules.yaml")
	}
	sm := fmt.Sprint(r.monitors["ServiceMonitor"])
	if !strings.Contains(sm, "replacement:mesh-agents") || !strings.Contains(sm, "targetLabel:job") {
		t.Errorf("ServiceMonitor does not set job=mesh-agents: %s", sm)
	}
	dash, err := os.ReadFile(DashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	if r.dash != string(dash) {
		t.Error("the dashboard ConfigMap differs from deploy/grafana/shunt-dashboard.json")
	}
	if !json.Valid([]byte(r.dash)) {
		t.Error("dashboard ConfigMap: invalid JSON")
	}
	if _, err := base64.StdEncoding.DecodeString(r.seed); err != nil {
		t.Error(err)
	}
}

// operatorVersion is the Prometheus Operator release whose
// CustomResourceDefinitions the install test serves: the chart's
// ServiceMonitor and PrometheusRule are validated by the API server against
// their real OpenAPI schemas.
const operatorVersion = "v0.85.0"

// operatorCRDs returns the Prometheus Operator's CRDs for ServiceMonitor and
// PrometheusRule, as its release ships them (example/prometheus-operator-crd
// of its Go module, fetched from the module proxy into the module cache).
func operatorCRDs(t *testing.T) []map[string]any {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	mod := "github.com/prometheus-operator/prometheus-operator@" + operatorVersion
	cmd := exec.Command(goBin, "mod", "download", "-json", mod)
	cmd.Dir = t.TempDir() // outside Shunt's module: its go.mod does not list it
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go mod download %s: %v %s", mod, err, out)
	}
	var dl struct{ Dir, Error string }
	if err := json.Unmarshal(out, &dl); err != nil || dl.Dir == "" {
		t.Fatalf("go mod download %s: %v %s %s", mod, err, dl.Error, out)
	}
	var crds []map[string]any
	for _, plural := range []string{"servicemonitors", "prometheusrules"} {
		b, err := os.ReadFile(filepath.Join(dl.Dir, "example", "prometheus-operator-crd", "monitoring.coreos.com_"+plural+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		var c map[string]any
		if err := yaml.Unmarshal(b, &c); err != nil {
			t.Fatalf("%s CRD: %v", plural, err)
		}
		crds = append(crds, c)
	}
	return crds
}

// The chart installs into a real kube-apiserver (which validates and admits
// every object), upgrades, uninstalls and reinstalls with helm itself: the
// Maglev seed is generated once and survives the upgrade, the uninstall and
// the reinstall; the agent's ServiceAccount may read and never write.
func TestChartInstall(t *testing.T) {
	h := NewHelm(t)
	cp := kube.Start(t, kube.Options{})
	kc := cp.Admin()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for _, c := range operatorCRDs(t) {
		if err := kc.Do(ctx, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", c, nil, ""); err != nil {
			t.Fatal(err)
		}
	}
	helm := func(args ...string) string {
		t.Helper()
		var out []byte
		var err error
		// A freshly created CRD takes a moment to be served.
		for i := 0; i < 60; i++ {
			if out, err = h.Run(append(args, "--kubeconfig", cp.AdminKubeconfig, "--namespace", releaseNS)...); err == nil || !strings.Contains(err.Error(), "no matches for kind") {
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		if err != nil {
			t.Fatal(err)
		}
		return string(out)
	}
	get := func(path string, out any) error { return kc.Do(ctx, "GET", path, nil, out, "") }
	ns := "/namespaces/" + releaseNS
	seedOf := func() string {
		t.Helper()
		var s corev1.Secret
		if err := get("/api/v1"+ns+"/secrets/shunt-maglev-seed", &s); err != nil {
			t.Fatal(err)
		}
		if _, err := maglev.ParseSeed(string(s.Data["seed"])); err != nil {
			t.Fatalf("seed in the cluster: %v", err)
		}
		return string(s.Data["seed"])
	}
	objects := []string{
		"/api/v1" + ns + "/serviceaccounts/shunt", "/api/v1" + ns + "/configmaps/shunt-config", "/api/v1" + ns + "/secrets/shunt-maglev-seed",
		"/apis/apps/v1" + ns + "/daemonsets/shunt", "/apis/rbac.authorization.k8s.io/v1/clusterroles/shunt",
		"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/shunt", "/api/v1" + ns + "/services/shunt-metrics",
		"/apis/monitoring.coreos.com/v1" + ns + "/servicemonitors/shunt", "/apis/monitoring.coreos.com/v1" + ns + "/prometheusrules/shunt",
		"/api/v1" + ns + "/configmaps/shunt-dashboard", "/apis/rbac.authorization.k8s.io/v1" + ns + "/roles/shunt",
		"/apis/rbac.authorization.k8s.io/v1" + ns + "/rolebindings/shunt",
	}
	monitoring := []string{"--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.grafanaDashboard.enabled=true"}

	helm(append([]string{"install", "shunt", ChartDir, "--create-namespace"}, monitoring...)...)
	// The schemas are enforced: a ServiceMonitor the operator would not
	// understand is refused (a schemaless CRD would take it).
	bad := map[string]any{"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
		"metadata": map[string]any{"name": "bad"},
		"spec":     map[string]any{"selector": map[string]any{}, "endpoints": []any{map[string]any{"port": "metrics", "interval": "thirty seconds"}}}}
	if err := kc.Do(ctx, "POST", "/apis/monitoring.coreos.com/v1"+ns+"/servicemonitors", bad, nil, ""); err == nil || !strings.Contains(err.Error(), "interval") {
		t.Errorf("a ServiceMonitor with interval %q: %v, want refused by the CRD's schema", "thirty seconds", err)
	}
	for _, p := range objects {
		if err := get(p, nil); err != nil {
			t.Errorf("after install: %v", err)
		}
	}
	seed := seedOf()
	var ds appsv1.DaemonSet
	if err := get("/apis/apps/v1"+ns+"/daemonsets/shunt", &ds); err != nil {
		t.Fatal(err)
	}
	if img := ds.Spec.Template.Spec.Containers[0].Image; img != "shunt/shuntd:0.1.0" {
		t.Errorf("image %s", img)
	}

	// The agent's identity reads what it watches and writes nothing.
	user := "system:serviceaccount:" + releaseNS + ":shunt"
	for _, tc := range []struct {
		group, resource, verb string
		allowed               bool
		namespace, name       string
	}{
		{"", "services", "watch", true, "", ""}, {"discovery.k8s.io", "endpointslices", "list", true, "", ""}, {"", "pods", "get", true, "", ""},
		{"", "namespaces", "watch", true, "", ""}, {"", "nodes", "get", true, "", ""},
		{"apps", "daemonsets", "watch", true, releaseNS, "shunt"}, // its own, for cleanupOnUninstall
		{"apps", "daemonsets", "get", false, releaseNS, "other"}, {"apps", "daemonsets", "update", false, releaseNS, "shunt"},
		{"", "configmaps", "create", false, "", ""}, {"", "services", "update", false, "", ""}, {"", "pods", "delete", false, "", ""},
		{"", "secrets", "get", false, releaseNS, ""},
	} {
		sar := map[string]any{"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": map[string]any{
			"user": user, "groups": []string{"system:serviceaccounts", "system:serviceaccounts:" + releaseNS},
			"resourceAttributes": map[string]any{"group": tc.group, "resource": tc.resource, "verb": tc.verb, "namespace": tc.namespace, "name": tc.name}}}
		var res struct {
			Status struct {
				Allowed bool `json:"allowed"`
			} `json:"status"`
		}
		if err := kc.Do(ctx, "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", sar, &res, ""); err != nil {
			t.Fatal(err)
		}
		if res.Status.Allowed != tc.allowed {
			t.Errorf("%s %s %s/%s: allowed %v", user, tc.verb, tc.group, tc.resource, res.Status.Allowed)
		}
	}

	// Upgrade to a new image: the DaemonSet's template changes, the seed
	// does not.
	helm(append([]string{"upgrade", "shunt", ChartDir, "--set", "image.tag=0.1.1"}, monitoring...)...)
	if err := get("/apis/apps/v1"+ns+"/daemonsets/shunt", &ds); err != nil {
		t.Fatal(err)
	}
	if img := ds.Spec.Template.Spec.Containers[0].Image; img != "shunt/shuntd:0.1.1" {
		t.Errorf("image after upgrade %s", img)
	}
	if s := seedOf(); s != seed {
		t.Errorf("upgrade changed the seed: %s -> %s", seed, s)
	}

	// Uninstall removes everything but the seed, which a reinstall reuses.
	helm("uninstall", "shunt")
	for _, p := range objects {
		err := get(p, nil)
		if strings.HasSuffix(p, "/secrets/shunt-maglev-seed") {
			if err != nil {
				t.Errorf("the seed Secret did not survive the uninstall: %v", err)
			}
			continue
		}
		if !kube.NotFound(err) {
			t.Errorf("after uninstall, %s: %v", p, err)
		}
	}
	helm("install", "shunt", ChartDir)
	if s := seedOf(); s != seed {
		t.Errorf("reinstall changed the seed: %s -> %s", seed, s)
	}
}

// Every value of values.yaml is documented in the chart's README table,
// and every value the table names exists.
func TestChartReadmeDocumentsEveryValue(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(ChartDir, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var vals map[string]any
	if err := yaml.Unmarshal(data, &vals); err != nil {
		t.Fatal(err)
	}
	// Maps handed to Kubernetes as they are: documented as one value.
	opaque := map[string]bool{"resources": true, "updateStrategy": true, "nodeSelector": true, "affinity": true,
		"podAnnotations": true, "podLabels": true, "metrics.serviceMonitor.labels": true, "metrics.prometheusRule.labels": true,
		"metrics.grafanaDashboard.labels": true}
	paths := map[string]bool{}
	var walk func(prefix string, v any)
	walk = func(prefix string, v any) {
		paths[prefix] = true
		m, ok := v.(map[string]any)
		if !ok || opaque[prefix] {
			return
		}
		for k, sub := range m {
			p := k
			if prefix != "" {
				p = prefix + "." + k
			}
			walk(p, sub)
		}
	}
	walk("", vals)
	readme, err := os.ReadFile(filepath.Join(ChartDir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, line := range strings.Split(string(readme), "\n") {
		if f := strings.Split(line, "|"); len(f) > 2 && strings.HasPrefix(strings.TrimSpace(f[1]), "`") {
			documented[strings.Trim(strings.TrimSpace(f[1]), "`")] = true
		}
	}
	for p := range paths {
		if p == "" {
			continue
		}
		if _, isMap := lookupValue(vals, p).(map[string]any); isMap && !opaque[p] && p != "config" {
			continue // documented through its leaves
		}
		if !documented[p] {
			t.Errorf("value %s is not in the README's table", p)
		}
	}
	for d := range documented {
		if strings.Contains(d, ".") && !paths[d] {
			t.Errorf("the README documents %s, which values.yaml does not have", d)
		}
	}
}

func lookupValue(m map[string]any, path string) any {
	var v any = m
	for _, k := range strings.Split(path, ".") {
		mm, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = mm[k]
	}
	return v
}
