package k8s

import (
	"encoding/json"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// PodSidecar: Istio's markers and traffic annotations, Shunt's own, and
// every kind of bad value, as the mesh.Sidecar (JSON) the pod gets and the
// problems reported.
func TestPodSidecar(t *testing.T) {
	injected := map[string]string{IstioStatus: `{"containers":["istio-proxy"]}`}
	with := func(extra map[string]string) map[string]string {
		m := map[string]string{}
		for k, v := range injected {
			m[k] = v
		}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	uid := func(u int64) *corev1.SecurityContext { return &corev1.SecurityContext{RunAsUser: &u} }
	always := corev1.ContainerRestartPolicyAlways
	for _, tc := range []struct {
		name  string
		ann   map[string]string
		cs    []corev1.Container
		init  []corev1.Container
		want  string // JSON of the sidecar, "nil" for none
		probs []string
	}{
		{name: "no sidecar", want: "nil"},
		{name: "traffic annotations without a sidecar are ignored", ann: map[string]string{IstioExcludeOutboundPorts: "x"}, want: "nil"},
		{name: "istio status annotation", ann: injected, want: `{}`},
		{name: "istio-proxy container, its runAsUser", cs: []corev1.Container{{Name: "app"}, {Name: "istio-proxy", SecurityContext: uid(1234)}}, want: `{"uid":1234}`},
		{name: "native sidecar istio-proxy", init: []corev1.Container{{Name: "istio-proxy", RestartPolicy: &always}}, want: `{}`},
		{name: "istio-proxy init container that is not a sidecar", init: []corev1.Container{{Name: "istio-proxy"}}, want: "nil"},
		{name: "shunt.dev/sidecar true with ports and uid", ann: map[string]string{AnnotationSidecar: "true", AnnotationSidecarUID: "2000", AnnotationSidecarOutboundPort: "16001", AnnotationSidecarInboundPort: " 16006"},
			want: `{"uid":2000,"outboundPort":16001,"inboundPort":16006}`},
		{name: "shunt.dev/sidecar false wins over istio", ann: with(map[string]string{AnnotationSidecar: "false"}), want: "nil"},
		{name: "interception mode NONE", ann: with(map[string]string{IstioInterceptionMode: "NONE"}), want: "nil"},
		{name: "interception mode TPROXY", ann: with(map[string]string{IstioInterceptionMode: "TPROXY"}), want: `{}`},
		{name: "all traffic annotations", ann: with(map[string]string{
			IstioExcludeOutboundPorts:    "9090, 5432,9090",
			IstioExcludeInboundPorts:     "15020",
			IstioExcludeOutboundIPRanges: "10.96.0.10/32,fd00::1/128, 192.168.1.7/16",
			IstioIncludeOutboundIPRanges: "10.0.0.0/8,,fd00::/8",
		}), want: `{"excludeOutboundPorts":[9090,5432],"excludeOutboundCIDRs":["10.96.0.10/32","fd00::1/128","192.168.0.0/16"],"includeOutboundCIDRs":["10.0.0.0/8","fd00::/8"],"excludeInboundPorts":[15020]}`},
		{name: "include * is everything", ann: with(map[string]string{IstioIncludeOutboundIPRanges: "*"}), want: `{}`},
		{name: "include empty is nothing", ann: with(map[string]string{IstioIncludeOutboundIPRanges: "", IstioExcludeOutboundIPRanges: "10.1.0.0/16"}),
			want: `{"excludeOutboundCIDRs":["10.1.0.0/16","0.0.0.0/0","::/0"]}`},
		{name: "empty port lists", ann: with(map[string]string{IstioExcludeOutboundPorts: "", IstioExcludeInboundPorts: " "}), want: `{}`},
		{name: "bad port", ann: with(map[string]string{IstioExcludeOutboundPorts: "80,http"}), want: "nil",
			probs: []string{`annotation: traffic.sidecar.istio.io/excludeOutboundPorts: "http" is not a port`, "sidecar steering left off"}},
		{name: "port 0", ann: with(map[string]string{IstioExcludeInboundPorts: "0"}), want: "nil",
			probs: []string{`excludeInboundPorts: "0" is not a port`, "left off"}},
		{name: "port out of range", ann: with(map[string]string{IstioExcludeOutboundPorts: "65536"}), want: "nil", probs: []string{"65536", "left off"}},
		{name: "bad range", ann: with(map[string]string{IstioExcludeOutboundIPRanges: "10.0.0.0/33"}), want: "nil", probs: []string{`"10.0.0.0/33" is not a CIDR`, "left off"}},
		{name: "include * mixed with a range", ann: with(map[string]string{IstioIncludeOutboundIPRanges: "*,10.0.0.0/8"}), want: "nil", probs: []string{`"*" is not a CIDR`, "left off"}},
		{name: "too many ports", ann: with(map[string]string{IstioExcludeOutboundPorts: "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17"}), want: "nil", probs: []string{"17 ports, Shunt takes at most 16", "left off"}},
		{name: "too many ranges with an empty include", ann: with(map[string]string{IstioIncludeOutboundIPRanges: "",
			IstioExcludeOutboundIPRanges: "10.0.0.0/24,10.0.1.0/24,10.0.2.0/24,10.0.3.0/24,10.0.4.0/24,10.0.5.0/24,10.0.6.0/24,10.0.7.0/24,10.0.8.0/24,10.0.9.0/24,10.0.10.0/24,10.0.11.0/24,10.0.12.0/24,10.0.13.0/24,10.0.14.0/24"}),
			want: "nil", probs: []string{"17 ranges", "left off"}},
		{name: "bad interception mode", ann: with(map[string]string{IstioInterceptionMode: "EBPF"}), want: "nil", probs: []string{`unknown value "EBPF"`, "left off"}},
		{name: "bad uid", ann: with(map[string]string{AnnotationSidecarUID: "0"}), want: "nil", probs: []string{`"0" is not a uid above 0`, "left off"}},
		{name: "same ports", ann: with(map[string]string{AnnotationSidecarInboundPort: "15001"}), want: "nil", probs: []string{"inbound port 15001 is the outbound port", "left off"}},
		{name: "bad shunt.dev/sidecar is ignored", ann: with(map[string]string{AnnotationSidecar: "maybe"}), want: `{}`, probs: []string{`shunt.dev/sidecar: unknown value "maybe"`}},
		{name: "unsupported include ports are reported", ann: with(map[string]string{IstioIncludeOutboundPorts: "5432", IstioIncludeInboundPorts: "8080"}), want: `{}`,
			probs: []string{"includeOutboundPorts: not supported", "includeInboundPorts: only"}},
		{name: "include inbound * is fine", ann: with(map[string]string{IstioIncludeInboundPorts: "*"}), want: `{}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := &corev1.Pod{}
			pod.Annotations = tc.ann
			pod.Spec.Containers, pod.Spec.InitContainers = tc.cs, tc.init
			sc, probs := PodSidecar(pod)
			got := "nil"
			if sc != nil {
				b, err := json.Marshal(sc)
				if err != nil {
					t.Fatal(err)
				}
				got = string(b)
			}
			if got != tc.want {
				t.Errorf("sidecar %s, want %s", got, tc.want)
			}
			if len(probs) != len(tc.probs) {
				t.Fatalf("problems %v, want %d: %v", probs, len(tc.probs), tc.probs)
			}
			for i, p := range probs {
				if p.Reason != "annotation" || !strings.Contains(p.String(), tc.probs[i]) {
					t.Errorf("problem %d: %q, want reason annotation containing %q", i, p, tc.probs[i])
				}
			}
		})
	}
}

// An enrolled pod carries its sidecar; a pod that is not enrolled is not
// even looked at (no problems for its annotations).
func TestPodEnrollmentSidecar(t *testing.T) {
	ns := &corev1.Namespace{}
	ns.Labels = map[string]string{LabelEnabled: "true"}
	pod := &corev1.Pod{}
	pod.Annotations = map[string]string{IstioStatus: "{}", IstioExcludeOutboundPorts: "9090"}
	e, probs := PodEnrollment(ns, pod)
	if !e.Enrolled || e.Sidecar == nil || len(e.Sidecar.ExcludeOutboundPorts) != 1 || len(probs) != 0 {
		t.Errorf("enrolled: %+v %+v %v", e, e.Sidecar, probs)
	}
	pod.Annotations[IstioExcludeOutboundPorts] = "bad"
	e, probs = PodEnrollment(nil, pod)
	if e.Enrolled || e.Sidecar != nil || len(probs) != 0 {
		t.Errorf("not enrolled: %+v %v", e, probs)
	}
}
