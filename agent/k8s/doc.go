// Package k8s is Shunt's Kubernetes source: shared informers on Services,
// EndpointSlices, Namespaces, this node's Pods and this node's Node, turned
// into the mesh model and handed to the agent as deltas of the source
// "kubernetes" (agent.Agent.Apply). It is the only package that imports
// client-go.
//
// # What is translated
//
// Every Service port becomes one mesh service per frontend: each ClusterIP
// (both families of a dual-stack service), each node address for a node
// port, each load balancer ingress IP (unless its ipMode is Proxy) and each
// external IP; headless and ExternalName services are ignored. Backends come
// from the EndpointSlices labelled kubernetes.io/service-name: the slice port
// with the service port's name and protocol gives the target port (named
// target ports are resolved per slice), ready endpoints are active, serving
// terminating ones are used only when no active one is left, weights are 1.
// internalTrafficPolicy: Local keeps the ClusterIP frontends to this node's
// endpoints. Annotations (DESIGN.md): shunt.dev/lb-algorithm,
// shunt.dev/forwarding-mode and Cilium's service.cilium.io equivalents
// (Shunt's win), shunt.dev/sockmap on a namespace or pod (the pod's wins).
// An unknown annotation value is logged, counted
// (shunt_k8s_rejected_total{reason="annotation"}) and ignored; an unusable
// port or frontend leaves out that mesh service only.
//
// # Enrollment
//
// A pod of this node is enrolled when its namespace has
// shunt.dev/enabled=true and the pod does not say false (or the pod itself
// says true), it is not on the host network and not finished. Its network
// namespace is found from its UID: the pod cgroup (kubelet's cgroupfs or
// systemd layout, in the cgroup v2 tree or a v1 hierarchy) → a process in it
// (cgroup.procs) → /proc/<pid>/ns/net, which the agent resolves to the netns
// cookie the datapath keys pods by. A pod whose sandbox has no process yet
// is retried.
//
// # Sidecars
//
// An enrolled pod gets sidecar steering (mesh.Pod.Sidecar) when Istio
// injected it (annotation sidecar.istio.io/status, or a container named
// istio-proxy, also as a native sidecar init container) or when
// shunt.dev/sidecar is "true"; shunt.dev/sidecar "false" and
// sidecar.istio.io/interceptionMode NONE turn it off. Istio's traffic
// annotations are honoured with Istio's syntax:
// traffic.sidecar.istio.io/excludeOutboundPorts, excludeOutboundIPRanges,
// includeOutboundIPRanges ("*": every destination, empty: none) and
// excludeInboundPorts. The proxy's uid is shunt.dev/sidecar-uid, else the
// istio-proxy container's runAsUser, else 1337; its listeners
// shunt.dev/sidecar-outbound-port and shunt.dev/sidecar-inbound-port (15001,
// 15006). A value that cannot be read exactly leaves the pod enrolled
// without steering, logged and counted
// (shunt_k8s_rejected_total{reason="annotation"}); includeOutboundPorts and
// a restricting includeInboundPorts are reported and ignored.
//
// # Changes and resilience
//
// Event handlers only mark keys dirty; one worker gathers the dirty keys for
// a short coalescing window, recomputes those services and pods from the
// informer caches and applies one delta, so an EndpointSlice change costs in
// proportion to its service. The first complete state after the caches sync
// is applied with Replace; later relists deliver updates for changed objects
// only (an update with an unchanged resourceVersion is ignored), so
// unchanged map entries are never rewritten. A watch error or an API server
// that is down changes nothing: the datapath keeps its pinned state and the
// informers reconcile when the API server is back. An agent started while
// the API server is down keeps the entries an earlier run pinned until this
// source has synced (agent pending sources).
package k8s
