package k8s

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/shuntmesh/shunt/mesh"
)

// Istio's markers of an injected pod and its traffic annotations (on the
// pod), read with Istio's syntax: comma-separated lists, "*" for every
// destination in includeOutboundIPRanges, an empty includeOutboundIPRanges
// for none.
const (
	// IstioStatus is set by Istio's injector on every injected pod.
	IstioStatus = "sidecar.istio.io/status"
	// IstioProxyContainer is the name of Istio's sidecar container (a
	// regular container, or a native sidecar: an init container with
	// restartPolicy Always).
	IstioProxyContainer = "istio-proxy"
	// IstioInterceptionMode: REDIRECT (default), TPROXY or NONE (no
	// redirection: Shunt steers nothing either).
	IstioInterceptionMode        = "sidecar.istio.io/interceptionMode"
	IstioExcludeOutboundPorts    = "traffic.sidecar.istio.io/excludeOutboundPorts"
	IstioExcludeOutboundIPRanges = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
	IstioIncludeOutboundIPRanges = "traffic.sidecar.istio.io/includeOutboundIPRanges"
	IstioExcludeInboundPorts     = "traffic.sidecar.istio.io/excludeInboundPorts"
	// Istio annotations Shunt cannot honour: a pod using them is steered
	// without them, and the problem is reported.
	IstioIncludeOutboundPorts = "traffic.sidecar.istio.io/includeOutboundPorts"
	IstioIncludeInboundPorts  = "traffic.sidecar.istio.io/includeInboundPorts"
)

// Shunt's own sidecar annotations (pod), for proxies other than Istio's.
const (
	// AnnotationSidecar: "true" declares a sidecar proxy on a pod Istio
	// did not inject, "false" turns steering off for an injected one
	// (Istio's own iptables rules, if any, then redirect as before).
	AnnotationSidecar = "shunt.dev/sidecar"
	// AnnotationSidecarUID is the proxy's uid (its sockets are never
	// steered). Default: the istio-proxy container's runAsUser, else 1337.
	AnnotationSidecarUID = "shunt.dev/sidecar-uid"
	// AnnotationSidecarOutboundPort and AnnotationSidecarInboundPort are
	// the proxy's listeners (default 15001 and 15006).
	AnnotationSidecarOutboundPort = "shunt.dev/sidecar-outbound-port"
	AnnotationSidecarInboundPort  = "shunt.dev/sidecar-inbound-port"
)

// PodSidecar reads pod's sidecar proxy. A pod has one when Istio injected
// it (annotation sidecar.istio.io/status, or a container named
// istio-proxy) or shunt.dev/sidecar is "true", and shunt.dev/sidecar is not
// "false" and sidecar.istio.io/interceptionMode is not NONE. Its steering
// settings come from Istio's traffic annotations and Shunt's own.
//
// A value that cannot be read exactly (a bad port or range, too many of
// them, an unknown interception mode) leaves the pod without steering
// (nil): Shunt then changes nothing on the pod's path, rather than steer it
// differently from what the annotations ask. Each such value is a problem
// (reason "annotation"). includeOutboundPorts and a restricting
// includeInboundPorts are problems too, and ignored.
func PodSidecar(pod *corev1.Pod) (*mesh.Sidecar, []Problem) {
	ann := pod.Annotations
	var probs []Problem
	bad := func(k, format string, args ...any) {
		probs = append(probs, Problem{"annotation", fmt.Sprintf("%s: %s", k, fmt.Sprintf(format, args...))})
	}
	proxy := istioProxy(pod)
	_, injected := ann[IstioStatus]
	declared := injected || proxy != nil
	if v, ok := ann[AnnotationSidecar]; ok {
		switch strings.ToLower(strings.TrimSpace(v)) {
		case "true":
			declared = true
		case "false":
			return nil, nil
		default:
			bad(AnnotationSidecar, "unknown value %q (want true or false); ignored", v)
		}
	}
	if !declared {
		return nil, probs
	}
	refuse := func() (*mesh.Sidecar, []Problem) {
		probs = append(probs, Problem{"annotation", "sidecar steering left off for this pod (see the problems above)"})
		return nil, probs
	}
	if v, ok := ann[IstioInterceptionMode]; ok {
		switch strings.TrimSpace(v) {
		case "REDIRECT", "TPROXY":
		case "NONE":
			return nil, probs
		default:
			bad(IstioInterceptionMode, "unknown value %q (want REDIRECT, TPROXY or NONE)", v)
			return refuse()
		}
	}
	sc := &mesh.Sidecar{}
	ok := true
	if proxy != nil && proxy.SecurityContext != nil && proxy.SecurityContext.RunAsUser != nil {
		if u := *proxy.SecurityContext.RunAsUser; u > 0 && u <= 1<<32-1 {
			sc.UID = uint32(u)
		}
	}
	if v, set := ann[AnnotationSidecarUID]; set {
		u, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
		if err != nil || u == 0 {
			bad(AnnotationSidecarUID, "%q is not a uid above 0", v)
			ok = false
		} else {
			sc.UID = uint32(u)
		}
	}
	for _, a := range []struct {
		key  string
		port *uint16
	}{{AnnotationSidecarOutboundPort, &sc.OutboundPort}, {AnnotationSidecarInboundPort, &sc.InboundPort}} {
		if v, set := ann[a.key]; set {
			p, err := parsePort(v)
			if err != nil {
				bad(a.key, "%v", err)
				ok = false
				continue
			}
			*a.port = p
		}
	}
	if d := sc.WithDefaults(); d.OutboundPort == d.InboundPort {
		bad(AnnotationSidecarInboundPort, "inbound port %d is the outbound port", d.InboundPort)
		ok = false
	}
	for _, a := range []struct {
		key   string
		ports *[]uint16
	}{{IstioExcludeOutboundPorts, &sc.ExcludeOutboundPorts}, {IstioExcludeInboundPorts, &sc.ExcludeInboundPorts}} {
		v, set := ann[a.key]
		if !set {
			continue
		}
		ports, err := parsePorts(v)
		if err != nil {
			bad(a.key, "%v", err)
			ok = false
			continue
		}
		*a.ports = ports
	}
	if v, set := ann[IstioExcludeOutboundIPRanges]; set {
		cidrs, err := parseCIDRs(v)
		if err != nil {
			bad(IstioExcludeOutboundIPRanges, "%v", err)
			ok = false
		}
		sc.ExcludeOutboundCIDRs = cidrs
	}
	if v, set := ann[IstioIncludeOutboundIPRanges]; set && strings.TrimSpace(v) != "*" {
		cidrs, err := parseCIDRs(v)
		switch {
		case err != nil:
			bad(IstioIncludeOutboundIPRanges, "%v", err)
			ok = false
		case len(cidrs) == 0:
			// Istio: an empty list redirects no outbound traffic.
			sc.ExcludeOutboundCIDRs = append(sc.ExcludeOutboundCIDRs, netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0"))
		default:
			sc.IncludeOutboundCIDRs = cidrs
		}
	}
	for name, n := range map[string]int{
		IstioExcludeOutboundPorts: len(sc.ExcludeOutboundPorts), IstioExcludeInboundPorts: len(sc.ExcludeInboundPorts),
	} {
		if n > mesh.MaxSidecarPorts {
			bad(name, "%d ports, Shunt takes at most %d", n, mesh.MaxSidecarPorts)
			ok = false
		}
	}
	if n := len(sc.ExcludeOutboundCIDRs); n > mesh.MaxSidecarCIDRs {
		bad(IstioExcludeOutboundIPRanges, "%d ranges (with an empty %s: 2 more), Shunt takes at most %d", n, IstioIncludeOutboundIPRanges, mesh.MaxSidecarCIDRs)
		ok = false
	}
	if n := len(sc.IncludeOutboundCIDRs); n > mesh.MaxSidecarCIDRs {
		bad(IstioIncludeOutboundIPRanges, "%d ranges, Shunt takes at most %d", n, mesh.MaxSidecarCIDRs)
		ok = false
	}
	if !ok {
		return refuse()
	}
	if v, set := ann[IstioIncludeOutboundPorts]; set && strings.TrimSpace(v) != "" {
		bad(IstioIncludeOutboundPorts, "not supported by Shunt; ignored (those ports are steered only when the destination range is)")
	}
	if v, set := ann[IstioIncludeInboundPorts]; set && strings.TrimSpace(v) != "*" {
		bad(IstioIncludeInboundPorts, `only "*" is supported by Shunt; ignored (use %s)`, IstioExcludeInboundPorts)
	}
	return sc, probs
}

// istioProxy returns the istio-proxy container (regular, or a native
// sidecar init container), or nil.
func istioProxy(pod *corev1.Pod) *corev1.Container {
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == IstioProxyContainer {
			return &pod.Spec.Containers[i]
		}
	}
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		if c.Name == IstioProxyContainer && c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			return c
		}
	}
	return nil
}

func parsePort(s string) (uint16, error) {
	p, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil || p == 0 {
		return 0, fmt.Errorf("%q is not a port (1-65535)", s)
	}
	return uint16(p), nil
}

// parsePorts reads Istio's port list: comma-separated, spaces allowed, an
// empty value is an empty list. Duplicates are dropped.
func parsePorts(s string) ([]uint16, error) {
	var out []uint16
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	for _, f := range strings.Split(s, ",") {
		p, err := parsePort(f)
		if err != nil {
			return nil, err
		}
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}

// parseCIDRs reads Istio's range list: comma-separated CIDRs (host bits
// are cleared), spaces and empty elements allowed.
func parseCIDRs(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil || p.Addr().Zone() != "" {
			return nil, fmt.Errorf("%q is not a CIDR", f)
		}
		if p.Addr().Is4In6() {
			if p.Bits() < 96 {
				return nil, fmt.Errorf("%q mixes IPv4-mapped and IPv6 addresses", f)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		p = p.Masked()
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}
