package k8s

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/shuntmesh/shunt/mesh"
)

// Labels and annotations Shunt reads (DESIGN.md, "Names").
const (
	// LabelEnabled opts a namespace in ("true"); on a pod, "false" opts it
	// out of an enabled namespace and "true" opts it in on its own.
	LabelEnabled = "shunt.dev/enabled"
	// AnnotationSockmap (namespace or pod; the pod's wins): auto, on, off.
	AnnotationSockmap = "shunt.dev/sockmap"
	// AnnotationLBAlgorithm (service): random or maglev.
	AnnotationLBAlgorithm = "shunt.dev/lb-algorithm"
	// AnnotationForwardingMode (service): snat, dsr or hybrid.
	AnnotationForwardingMode = "shunt.dev/forwarding-mode"
	// Cilium's service annotations, accepted too; Shunt's win when both
	// are set.
	CiliumLBAlgorithm    = "service.cilium.io/lb-algorithm"
	CiliumForwardingMode = "service.cilium.io/forwarding-mode"
)

// DefaultAffinityTimeout is Kubernetes' default sessionAffinity timeout.
const DefaultAffinityTimeout = 10800

// Problem is something in an object that Shunt could not use. The rest of
// the object is still used: a bad annotation falls back to the default, a
// bad port or frontend leaves out that one mesh service.
type Problem struct {
	// Reason is the metric label: annotation, port, service, conflict, pod.
	Reason string
	Msg    string
}

func (p Problem) String() string { return p.Reason + ": " + p.Msg }

// ServiceKey is the namespace/name key of a Service (and of the
// EndpointSlices that carry its kubernetes.io/service-name label).
func ServiceKey(ns, name string) string { return ns + "/" + name }

// ServiceName is the mesh service name of one frontend of a Kubernetes
// Service port: <ns>/<svc>:<port name or number>/<proto>/<kind>@<frontend>.
// It is unique across the cluster because the frontend is part of it.
func ServiceName(ns, svc string, sp *corev1.ServicePort, kind mesh.FrontendKind, fe netip.AddrPort) string {
	port := sp.Name
	if port == "" {
		port = strconv.Itoa(int(sp.Port))
	}
	return fmt.Sprintf("%s/%s:%s/%s/%s@%s", ns, svc, port, strings.ToLower(string(sp.Protocol)), kind, fe)
}

// PodName is the mesh pod name: <ns>/<pod>.
func PodName(ns, pod string) string { return ns + "/" + pod }

// ServiceInput is what one Kubernetes Service is translated from.
type ServiceInput struct {
	Service *corev1.Service
	// Slices are the EndpointSlices labelled with the service's name.
	Slices []*discoveryv1.EndpointSlice
	// NodeName is this node (internalTrafficPolicy: Local keeps the
	// endpoints on it).
	NodeName string
	// NodeAddrs are this node's addresses, the NodePort frontends.
	NodeAddrs []netip.Addr
}

// TranslateService turns a Service and its EndpointSlices into mesh services,
// one per frontend: each ClusterIP (both families when dual-stack), each node
// address for a node port, each load balancer ingress IP and external IP.
// Headless and ExternalName services have none. Every returned service is
// valid (mesh.Service.Validate); what had to be left out is in the problems.
// The result is sorted by name.
func TranslateService(in ServiceInput) ([]mesh.Service, []Problem) {
	svc := in.Service
	var probs []Problem
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil, nil
	}
	alg, mode, ap := serviceAnnotations(svc.Annotations)
	probs = append(probs, ap...)
	var affinity uint32
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		affinity = DefaultAffinityTimeout
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			affinity = uint32(max(*c.ClientIP.TimeoutSeconds, 0))
		}
	}
	families := map[bool]bool{} // is4 -> the service has this family
	var clusterIPs []netip.Addr
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 && svc.Spec.ClusterIP != "" {
		ips = []string{svc.Spec.ClusterIP}
	}
	for _, s := range ips {
		if s == corev1.ClusterIPNone || s == "" {
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			probs = append(probs, Problem{"service", fmt.Sprintf("clusterIP %q is not an IP address", s)})
			continue
		}
		a = a.Unmap()
		clusterIPs = append(clusterIPs, a)
		families[a.Is4()] = true
	}
	for _, f := range svc.Spec.IPFamilies {
		families[f == corev1.IPv4Protocol] = true
	}
	if len(clusterIPs) == 0 {
		// Headless (or not yet allocated): nothing to balance.
		return nil, probs
	}

	var out []mesh.Service
	for i := range svc.Spec.Ports {
		sp := &svc.Spec.Ports[i]
		proto, err := mesh.ParseProtocol(string(sp.Protocol))
		if err != nil {
			probs = append(probs, Problem{"port", fmt.Sprintf("port %s: protocol %s is not supported (TCP and UDP are)", portID(sp), sp.Protocol)})
			continue
		}
		origin := mesh.Origin{Namespace: svc.Namespace, Name: svc.Name, Port: sp.Name}
		if sp.AppProtocol != nil {
			origin.AppProtocol = *sp.AppProtocol
		}
		all := backendsFor(in.Slices, sp, "")
		local := all
		if p := svc.Spec.InternalTrafficPolicy; p != nil && *p == corev1.ServiceInternalTrafficPolicyLocal {
			local = backendsFor(in.Slices, sp, in.NodeName)
		}
		add := func(kind mesh.FrontendKind, addr netip.Addr, port uint16, bes map[bool][]mesh.Backend) {
			fe := netip.AddrPortFrom(addr, port)
			s := mesh.Service{
				Name:            ServiceName(svc.Namespace, svc.Name, sp, kind, fe),
				Frontend:        mesh.Frontend{Addr: fe, Proto: proto},
				Backends:        bes[addr.Is4()],
				Algorithm:       alg,
				Mode:            mode,
				Kind:            kind,
				AffinityTimeout: affinity,
				Origin:          origin,
			}
			if s.Backends == nil {
				s.Backends = []mesh.Backend{}
			}
			if err := s.Validate(s.Name); err != nil {
				probs = append(probs, Problem{"service", err.Error()})
				return
			}
			out = append(out, s)
		}
		for _, a := range clusterIPs {
			add(mesh.ClusterIP, a, uint16(sp.Port), local)
		}
		if sp.NodePort != 0 && (svc.Spec.Type == corev1.ServiceTypeNodePort || svc.Spec.Type == corev1.ServiceTypeLoadBalancer) {
			for _, a := range in.NodeAddrs {
				if families[a.Is4()] {
					add(mesh.NodePort, a, uint16(sp.NodePort), all)
				}
			}
		}
		if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
			for _, ing := range svc.Status.LoadBalancer.Ingress {
				if ing.IP == "" {
					continue // hostname-only ingress: nothing to match on
				}
				if ing.IPMode != nil && *ing.IPMode == corev1.LoadBalancerIPModeProxy {
					// The load balancer proxies: traffic must go through it.
					continue
				}
				a, err := netip.ParseAddr(ing.IP)
				if err != nil {
					probs = append(probs, Problem{"service", fmt.Sprintf("load balancer ingress %q is not an IP address", ing.IP)})
					continue
				}
				add(mesh.LoadBalancer, a.Unmap(), uint16(sp.Port), all)
			}
		}
		for _, s := range svc.Spec.ExternalIPs {
			a, err := netip.ParseAddr(s)
			if err != nil {
				probs = append(probs, Problem{"service", fmt.Sprintf("externalIP %q is not an IP address", s)})
				continue
			}
			add(mesh.ExternalIP, a.Unmap(), uint16(sp.Port), all)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, probs
}

func portID(sp *corev1.ServicePort) string {
	if sp.Name != "" {
		return sp.Name
	}
	return strconv.Itoa(int(sp.Port))
}

// backendsFor collects the endpoints of the slices for service port sp, by
// address family (true = IPv4). The target port is resolved per slice: the
// slice port with the service port's name and protocol (this is how named
// target ports reach Shunt). Ready endpoints are active; not ready but
// serving and terminating ones are terminating (used only when no active one
// is left); others are left out. An address listed twice keeps its best
// state. onNode, when set, keeps only endpoints on that node.
func backendsFor(slices []*discoveryv1.EndpointSlice, sp *corev1.ServicePort, onNode string) map[bool][]mesh.Backend {
	best := map[netip.AddrPort]mesh.Backend{}
	for _, sl := range slices {
		var is4 bool
		switch sl.AddressType {
		case discoveryv1.AddressTypeIPv4:
			is4 = true
		case discoveryv1.AddressTypeIPv6:
		default:
			continue // FQDN
		}
		port := -1
		for _, p := range sl.Ports {
			name, proto := "", corev1.ProtocolTCP
			if p.Name != nil {
				name = *p.Name
			}
			if p.Protocol != nil {
				proto = *p.Protocol
			}
			if name == sp.Name && proto == sp.Protocol && p.Port != nil {
				port = int(*p.Port)
				break
			}
		}
		if port <= 0 || port > 65535 {
			continue
		}
		for i := range sl.Endpoints {
			ep := &sl.Endpoints[i]
			if onNode != "" && (ep.NodeName == nil || *ep.NodeName != onNode) {
				continue
			}
			state, ok := endpointState(ep.Conditions)
			if !ok {
				continue
			}
			name := ""
			if ep.TargetRef != nil && ep.TargetRef.Kind == "Pod" {
				name = ep.TargetRef.Name
			}
			for _, s := range ep.Addresses {
				a, err := netip.ParseAddr(s)
				if err != nil || a.Unmap().Is4() != is4 {
					continue
				}
				ap := netip.AddrPortFrom(a.Unmap(), uint16(port))
				if cur, ok := best[ap]; ok && cur.State == mesh.Active {
					continue
				}
				best[ap] = mesh.Backend{Addr: ap, Weight: 1, State: state, Name: name}
			}
		}
	}
	out := map[bool][]mesh.Backend{}
	for _, b := range best {
		is4 := b.Addr.Addr().Is4()
		out[is4] = append(out[is4], b)
	}
	for _, bs := range out {
		mesh.SortBackends(bs)
	}
	return out
}

// endpointState maps EndpointSlice conditions to a backend state. A nil
// ready or serving condition means true (the API's "unknown").
func endpointState(c discoveryv1.EndpointConditions) (mesh.BackendState, bool) {
	ready := c.Ready == nil || *c.Ready
	serving := ready
	if c.Serving != nil {
		serving = *c.Serving
	}
	terminating := c.Terminating != nil && *c.Terminating
	switch {
	case ready && !terminating:
		return mesh.Active, true
	case serving:
		return mesh.Terminating, true
	}
	return "", false
}

// serviceAnnotations reads the algorithm and forwarding mode annotations:
// Shunt's first, then Cilium's. An unknown value is a problem and is
// ignored (the next annotation, or the default, applies).
func serviceAnnotations(ann map[string]string) (mesh.Algorithm, mesh.ForwardingMode, []Problem) {
	var probs []Problem
	var alg mesh.Algorithm
	for _, k := range []string{AnnotationLBAlgorithm, CiliumLBAlgorithm} {
		v, ok := ann[k]
		if !ok {
			continue
		}
		switch a := mesh.Algorithm(strings.ToLower(strings.TrimSpace(v))); a {
		case mesh.Random, mesh.Maglev:
			if alg == "" {
				alg = a
			}
		default:
			probs = append(probs, Problem{"annotation", fmt.Sprintf("%s: unknown value %q (want random or maglev); ignored", k, v)})
		}
	}
	var mode mesh.ForwardingMode
	for _, k := range []string{AnnotationForwardingMode, CiliumForwardingMode} {
		v, ok := ann[k]
		if !ok {
			continue
		}
		switch m := mesh.ForwardingMode(strings.ToLower(strings.TrimSpace(v))); m {
		case mesh.SNAT, mesh.DSR, mesh.Hybrid:
			if mode == "" {
				mode = m
			}
		default:
			probs = append(probs, Problem{"annotation", fmt.Sprintf("%s: unknown value %q (want snat, dsr or hybrid); ignored", k, v)})
		}
	}
	return alg, mode, probs
}

// Enrollment is the decision for one pod of this node.
type Enrollment struct {
	Enrolled bool
	// Why explains a pod left out (debug logs, tests).
	Why     string
	Sockmap mesh.SockmapMode
	// Sidecar is the pod's sidecar proxy (PodSidecar); nil: none, or its
	// traffic annotations could not be read.
	Sidecar *mesh.Sidecar
}

// PodEnrollment decides whether pod is enrolled: its namespace has
// shunt.dev/enabled=true and the pod does not say false, or the pod itself
// says true. Pods on the host network and finished pods are never enrolled.
// The sockmap mode comes from the pod's annotation, else the namespace's;
// an unknown value is a problem and is ignored.
func PodEnrollment(ns *corev1.Namespace, pod *corev1.Pod) (Enrollment, []Problem) {
	var probs []Problem
	e := Enrollment{}
	podLabel, podSet := pod.Labels[LabelEnabled]
	nsOn := ns != nil && ns.Labels[LabelEnabled] == "true"
	switch {
	case podSet && podLabel == "false":
		e.Why = "pod label " + LabelEnabled + "=false"
	case podSet && podLabel == "true":
		e.Enrolled = true
	case nsOn:
		e.Enrolled = true
	default:
		e.Why = "namespace not enabled"
	}
	if podSet && podLabel != "true" && podLabel != "false" {
		probs = append(probs, Problem{"pod", fmt.Sprintf("label %s=%q: want true or false; ignored", LabelEnabled, podLabel)})
	}
	if e.Enrolled && pod.Spec.HostNetwork {
		e.Enrolled, e.Why = false, "host network"
	}
	if e.Enrolled && (pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed) {
		e.Enrolled, e.Why = false, "pod finished"
	}
	if e.Enrolled {
		var sp []Problem
		e.Sidecar, sp = PodSidecar(pod)
		probs = append(probs, sp...)
	}
	for _, src := range []struct {
		what string
		ann  map[string]string
	}{{"pod", pod.Annotations}, {"namespace", nsAnnotations(ns)}} {
		v, ok := src.ann[AnnotationSockmap]
		if !ok {
			continue
		}
		switch m := mesh.SockmapMode(strings.ToLower(strings.TrimSpace(v))); m {
		case mesh.SockmapAuto, mesh.SockmapOn, mesh.SockmapOff:
			if e.Sockmap == "" {
				e.Sockmap = m
			}
		default:
			probs = append(probs, Problem{"annotation", fmt.Sprintf("%s annotation %s: unknown value %q (want auto, on or off); ignored", src.what, AnnotationSockmap, v)})
		}
	}
	return e, probs
}

func nsAnnotations(ns *corev1.Namespace) map[string]string {
	if ns == nil {
		return nil
	}
	return ns.Annotations
}
