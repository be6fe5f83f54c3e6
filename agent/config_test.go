package agent

import (
	"errors"
	"strings"
	"testing"

	"github.com/shuntmesh/shunt/mesh"
)

func TestParseConfigValid(t *testing.T) {
	c, err := ParseConfig([]byte(`
datapath:
  bpffsRoot: /sys/fs/bpf/x
  maxServices: 100
socketLB:
  hostNamespaceOnly: true
services:
  - name: web
    frontend: 10.96.0.10:80
    backends:
      - addr: 10.244.0.2:8080
      - addr: 10.244.0.3:8080
        weight: 0
  - name: dns
    frontend: "[fd00:96::a]:53"
    protocol: udp
    backends:
      - addr: "[fd00:244::2]:53"
        state: terminating
pods:
  - name: default/client
    netns: /run/netns/client
    socketLB: translate
`))
	if err != nil {
		t.Fatal(err)
	}
	st, err := c.State()
	if err != nil {
		t.Fatal(err)
	}
	if !c.SocketLB.HostNamespaceOnly || c.Datapath.MaxServices != 100 {
		t.Errorf("settings lost: %+v", c)
	}
	if len(st.Services) != 2 || st.Services[0].Backends[0].Weight != 1 || st.Services[0].Backends[1].Weight != 0 {
		t.Errorf("weights: absent must mean 1 and 0 must stay 0: %+v", st.Services[0].Backends)
	}
	if st.Services[1].Frontend.Proto != mesh.UDP || st.Services[1].Backends[0].State != mesh.Terminating {
		t.Errorf("dns service: %+v", st.Services[1])
	}
	if st.Pods[0].SocketLB != mesh.Translate {
		t.Errorf("pod: %+v", st.Pods[0])
	}
}

func TestConfigErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct{ yaml, field string }{
		{"servces: []", `unknown field "servces"`},
		{"services: [{name: a, frontend: 10.96.0.1:80, backends: [{addr: 1.2.3.4:80, wieght: 2}]}]", `unknown field "wieght"`},
		{"services: [{name: a, frontend: 10.96.0.1, backends: []}]", "services[0].frontend"},
		{"services: [{name: a, frontend: 10.96.0.1:80, backends: [{addr: nope}]}]", "services[0].backends[0].addr"},
		{"services: [{name: a, frontend: 10.96.0.1:80, backends: [{addr: '[::1]:80'}]}]", "services[0].backends[0]"},
		{"services: [{name: a, frontend: 10.96.0.1:80, backends: [{addr: 1.2.3.4:80, weight: 70000}]}]", "services[0].backends[0].weight"},
		{"services: [{name: a, frontend: 10.96.0.1:80, backends: [{addr: 1.2.3.4:80}, {addr: 1.2.3.4:80}]}]", "duplicate backend"},
		{"services: [{name: a, frontend: 10.96.0.1:80, backends: []}, {name: b, frontend: 10.96.0.1:80, backends: []}]", "services[1].frontend"},
		{"services: [{name: a, frontend: 10.96.0.1:80, backends: []}, {name: a, frontend: 10.96.0.2:80, backends: []}]", "services[1].name"},
		{"services: [{name: a, frontend: 10.96.0.1:80, protocol: sctp, backends: []}]", "services[0].protocol"},
		{"services: [{name: a, frontend: 10.96.0.1:80, backends: [{addr: 1.2.3.4:80, state: gone}]}]", "services[0].backends[0].state"},
		{"services: [{name: a, frontend: 10.96.0.1:80, algorithm: rr, backends: []}]", "services[0].algorithm"},
		{"pods: [{name: p}]", "pods[0].netns"},
		{"pods: [{name: p, netns: /x, socketLB: maybe}]", "pods[0].socketLB"},
		{"services: [{name: a, frontend: 10.96.0.1:80, backends: [}", "config"},
		{"datapath: {maxServices: -1}", "config"},
	} {
		c, err := ParseConfig([]byte(tc.yaml))
		if err == nil {
			c.Datapath.Cgroup = "/sys/fs/cgroup"
			c = c.WithDefaults()
			err = c.Validate()
		}
		if err == nil {
			t.Errorf("%s: accepted", tc.yaml)
			continue
		}
		if !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%s: error %q does not name %q", tc.yaml, err, tc.field)
		}
	}
}

func TestTooManyBackends(t *testing.T) {
	sc := ServiceConfig{Name: "big", Frontend: "10.96.0.1:80"}
	for i := 0; i <= mesh.MaxBackendsPerService; i++ {
		sc.Backends = append(sc.Backends, BackendConfig{Addr: "10." + itoa3(i) + ":80"})
	}
	_, err := sc.Service("service")
	var fe *mesh.FieldError
	if !errors.As(err, &fe) || fe.Field != "service.backends" {
		t.Fatalf("want a field error on service.backends, got %v", err)
	}
}

func itoa3(i int) string {
	return strings.Join([]string{num(i >> 16 & 255), num(i >> 8 & 255), num(i & 255)}, ".")
}

func num(i int) string {
	const d = "0123456789"
	if i < 10 {
		return d[i : i+1]
	}
	return num(i/10) + d[i%10:i%10+1]
}

func TestMergeOverlay(t *testing.T) {
	base := &mesh.State{Services: []mesh.Service{{Name: "a"}, {Name: "b"}}, Pods: []mesh.Pod{{Name: "p", NetNS: "/x"}}}
	o := Overlay{
		Services:        []ServiceConfig{{Name: "b", Frontend: "10.96.0.2:80"}, {Name: "c", Frontend: "10.96.0.3:80"}},
		DeletedServices: []string{"a"},
		DeletedPods:     []string{"p"},
	}
	st := merge(base, o)
	var names []string
	for _, s := range st.Services {
		names = append(names, s.Name)
	}
	if strings.Join(names, ",") != "b,c" || st.Services[0].Frontend.Addr.String() != "10.96.0.2:80" {
		t.Errorf("merge: %v %+v", names, st.Services)
	}
	if len(st.Pods) != 0 {
		t.Errorf("deleted pod kept: %+v", st.Pods)
	}
}

func TestKubernetesConfig(t *testing.T) {
	c, err := ParseConfig([]byte(`
kubernetes:
  kubeconfig: /etc/kube.conf
  nodeAddresses: [10.0.0.1, "fd00::1"]
`))
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("NODE_NAME", "node-a")
	c = c.WithDefaults()
	k := c.Kubernetes
	if k == nil || k.NodeName != "node-a" || k.PodSocketLB != "translate" || k.Coalesce != DefaultCoalesce || k.Kubeconfig != "/etc/kube.conf" {
		t.Fatalf("defaults: %+v", k)
	}
	if err := k.Validate(); err != nil {
		t.Fatal(err)
	}
	if c2, _ := ParseConfig([]byte("socketLB: {hostNamespaceOnly: true}")); c2.WithDefaults().Kubernetes != nil {
		t.Error("no kubernetes section must mean standalone")
	}
	for _, tc := range []struct {
		mut   func(*KubernetesConfig)
		field string
	}{
		{func(k *KubernetesConfig) { k.NodeAddresses = []string{"10.0.0.300"} }, "kubernetes.nodeAddresses[0]"},
		{func(k *KubernetesConfig) { k.PodSocketLB = "bypass" }, "kubernetes.podSocketLB"},
		{func(k *KubernetesConfig) { k.Coalesce = "2s" }, "kubernetes.coalesce"},
		{func(k *KubernetesConfig) { k.Coalesce = "soon" }, "kubernetes.coalesce"},
	} {
		bad := *k
		tc.mut(&bad)
		var fe *mesh.FieldError
		if err := bad.Validate(); !errors.As(err, &fe) || fe.Field != tc.field {
			t.Errorf("%+v: error %v, want one naming %s", bad, err, tc.field)
		}
	}
}
