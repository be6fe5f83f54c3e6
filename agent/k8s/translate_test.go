package k8s

import (
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shuntmesh/shunt/mesh"
)

func b(v bool) *bool { return &v }

func TestEndpointState(t *testing.T) {
	for _, tc := range []struct {
		ready, serving, terminating *bool
		want                        mesh.BackendState
		used                        bool
	}{
		{nil, nil, nil, mesh.Active, true}, // unknown means ready
		{b(true), nil, nil, mesh.Active, true},
		{b(false), nil, nil, "", false},
		{b(false), b(true), b(true), mesh.Terminating, true},
		{b(false), b(false), b(true), "", false},
		{b(true), b(true), b(true), mesh.Terminating, true}, // terminating wins over ready
		{nil, b(true), b(true), mesh.Terminating, true},
	} {
		got, used := endpointState(discoveryv1.EndpointConditions{Ready: tc.ready, Serving: tc.serving, Terminating: tc.terminating})
		if got != tc.want || used != tc.used {
			t.Errorf("ready=%v serving=%v terminating=%v: got %q %v, want %q %v", ptrStr(tc.ready), ptrStr(tc.serving), ptrStr(tc.terminating), got, used, tc.want, tc.used)
		}
	}
}

func ptrStr(p *bool) string {
	if p == nil {
		return "nil"
	}
	if *p {
		return "true"
	}
	return "false"
}

func TestServiceAnnotations(t *testing.T) {
	for _, tc := range []struct {
		ann   map[string]string
		alg   mesh.Algorithm
		mode  mesh.ForwardingMode
		probs int
	}{
		{nil, "", "", 0},
		{map[string]string{AnnotationLBAlgorithm: "Maglev", AnnotationForwardingMode: " DSR "}, mesh.Maglev, mesh.DSR, 0},
		{map[string]string{CiliumLBAlgorithm: "maglev", CiliumForwardingMode: "snat"}, mesh.Maglev, mesh.SNAT, 0},
		{map[string]string{AnnotationLBAlgorithm: "random", CiliumLBAlgorithm: "maglev"}, mesh.Random, "", 0},
		{map[string]string{AnnotationLBAlgorithm: "wrr", CiliumLBAlgorithm: "maglev"}, mesh.Maglev, "", 1},
		{map[string]string{AnnotationForwardingMode: "ipip", CiliumForwardingMode: "geneve"}, "", "", 2},
	} {
		alg, mode, probs := serviceAnnotations(tc.ann)
		if alg != tc.alg || mode != tc.mode || len(probs) != tc.probs {
			t.Errorf("%v: got %q %q %v, want %q %q and %d problems", tc.ann, alg, mode, probs, tc.alg, tc.mode, tc.probs)
		}
		for _, p := range probs {
			if p.Reason != "annotation" || !strings.Contains(p.Msg, "ignored") {
				t.Errorf("problem %+v", p)
			}
		}
	}
}

func TestPodEnrollment(t *testing.T) {
	ns := func(enabled string, ann map[string]string) *corev1.Namespace {
		n := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "n", Annotations: ann}}
		if enabled != "" {
			n.Labels = map[string]string{LabelEnabled: enabled}
		}
		return n
	}
	pod := func(label string, ann map[string]string, mut func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "n", Annotations: ann}}
		if label != "" {
			p.Labels = map[string]string{LabelEnabled: label}
		}
		if mut != nil {
			mut(p)
		}
		return p
	}
	for _, tc := range []struct {
		name     string
		ns       *corev1.Namespace
		pod      *corev1.Pod
		enrolled bool
		sockmap  mesh.SockmapMode
		probs    int
	}{
		{"namespace on", ns("true", nil), pod("", nil, nil), true, "", 0},
		{"namespace off", ns("", nil), pod("", nil, nil), false, "", 0},
		{"namespace other value", ns("yes", nil), pod("", nil, nil), false, "", 0},
		{"no namespace object", nil, pod("", nil, nil), false, "", 0},
		{"pod opts out", ns("true", nil), pod("false", nil, nil), false, "", 0},
		{"pod opts in", ns("", nil), pod("true", nil, nil), true, "", 0},
		{"bad pod label", ns("true", nil), pod("maybe", nil, nil), true, "", 1},
		{"host network", ns("true", nil), pod("", nil, func(p *corev1.Pod) { p.Spec.HostNetwork = true }), false, "", 0},
		{"finished", ns("true", nil), pod("", nil, func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }), false, "", 0},
		{"sockmap from namespace", ns("true", map[string]string{AnnotationSockmap: "off"}), pod("", nil, nil), true, mesh.SockmapOff, 0},
		{"pod sockmap wins", ns("true", map[string]string{AnnotationSockmap: "off"}), pod("", map[string]string{AnnotationSockmap: "On"}, nil), true, mesh.SockmapOn, 0},
		{"bad pod sockmap falls back", ns("true", map[string]string{AnnotationSockmap: "off"}), pod("", map[string]string{AnnotationSockmap: "fast"}, nil), true, mesh.SockmapOff, 1},
	} {
		e, probs := PodEnrollment(tc.ns, tc.pod)
		if e.Enrolled != tc.enrolled || e.Sockmap != tc.sockmap || len(probs) != tc.probs {
			t.Errorf("%s: got %+v %v, want enrolled=%v sockmap=%q and %d problems", tc.name, e, probs, tc.enrolled, tc.sockmap, tc.probs)
		}
	}
}

// A service whose backends do not fit the model is left out with a problem;
// the service's other frontends are unaffected.
func TestTranslateLeavesOutInvalid(t *testing.T) {
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "s", Namespace: "n"}, Spec: corev1.ServiceSpec{
		ClusterIP: "10.96.0.1", ClusterIPs: []string{"10.96.0.1"}, ExternalIPs: []string{"not-an-ip", "0.0.0.0"},
		Ports: []corev1.ServicePort{{Port: 80, Protocol: corev1.ProtocolTCP}},
	}}
	out, probs := TranslateService(ServiceInput{Service: svc})
	if len(out) != 1 || out[0].Frontend.Addr != netip.MustParseAddrPort("10.96.0.1:80") {
		t.Fatalf("services %+v", out)
	}
	if len(probs) != 2 {
		t.Fatalf("problems %v, want 2 (bad externalIP, unspecified frontend)", probs)
	}
	if out[0].Name != "n/s:80/tcp/clusterIP@10.96.0.1:80" {
		t.Errorf("name %q", out[0].Name)
	}
}
