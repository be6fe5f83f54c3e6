// Package kubenode runs a real Kubernetes node for tests: Debian's
// containerd and runc, the CNI bridge plugin, and the kubelet built by
// scripts/build-k8s.sh, joined to a control plane from test/kube. Pods are
// real: the kubelet asks containerd (CRI) for sandboxes and containers, runc
// puts them in kubelet's cgroupfs layout, the bridge plugin gives them an
// address. Images are made here from static Go binaries (podapp, pause) as
// one-layer OCI archives and imported with ctr; pods use
// imagePullPolicy: Never, so nothing is downloaded.
//
// # What Start creates (id = 6 random hex digits) and removes
//
//   - a private folder /tmp/shunt-kubenode-<id>/ with containerd's config,
//     root, state and socket, runc's state, the CNI configuration and
//     host-local IPAM data, the kubelet's config, root, certificates, volume
//     plugin folder and pod logs, and the images;
//   - cgroup shunt-kubenode-<id> in every hierarchy (cgroup v2 and each v1
//     one on hybrid hosts): it is the kubelet's cgroupRoot, so pods live in
//     <hierarchy>/shunt-kubenode-<id>/kubepods/<qos>/pod<UID>/<container>,
//     the kubelet's cgroupfs layout below a root of the test's own; containerd
//     and the kubelet run in its "node" child (cgroup v2);
//   - the bridge shuntk8s0 with 10.88.77.1/24, the node IP; pods get
//     10.88.77.10-250 from host-local and only the on-link route of that
//     subnet (no default route: a Service VIP is unreachable from a pod
//     unless something translates it, as no kube-proxy runs).
//
// Cleanup (t.Cleanup, also after a failure) deletes this node's pods and
// waits for the kubelet to stop them, stops the kubelet and containerd by
// PID, removes what is left of tasks and containers with ctr, kills what
// remains in the node's cgroup subtree only, unmounts every mount under the
// private folder (the kubelet's rshared bind of its root, sandbox /dev/shm,
// network namespaces, container root filesystems), removes the cgroups, the
// bridge and its veths, restores the sysctls the kubelet and the CNI plugin
// write (vm.overcommit_memory, vm.panic_on_oom, kernel.panic,
// kernel.panic_on_oops, kernel.keys.root_maxkeys/root_maxbytes, IP
// forwarding), removes the host paths they create outside the private folder
// when they did not exist before (/var/lib/kubelet for the device plugin
// socket, /var/lib/cni for libcni's cache, /var/log/containers,
// /run/containerd for the shims' sockets) and finally the folder.
// HostTrace reports what a node leaves behind, for tests of this cleanup.
//
// The kubelet runs with failCgroupV1: false (hybrid hosts), cgroupDriver:
// cgroupfs, makeIPTablesUtilChains: false (it adds no iptables rule), no
// static pods, x509 client authentication, and authenticates to the API
// server as system:node:<name> in system:masters (there is no node
// authorizer). containerd runs with restrict_oom_score_adj = true, runc with
// cgroupfs (SystemdCgroup = false), the apparmor profile off, network
// namespaces under its state folder and the pause image made here as the
// sandbox image. Nodes are serialized across test binaries with a lock on the
// Kubernetes binaries' cache folder (the bridge name and subnet are fixed).
//
// By default there is no kube-controller-manager: tests create the default
// ServiceAccount of their namespaces (kube.Client.Namespace), the
// EndpointSlices (Node.EndpointSlice, from the pods' addresses and Ready
// conditions) and force-delete pods (Node.DeletePod). Pods do not mount a
// ServiceAccount token (no kube-root-ca.crt ConfigMap is published). A test
// that needs controllers (a DaemonSet, garbage collection) asks test/kube
// for kube-controller-manager and kube-scheduler (kube.Options.Controllers,
// Scheduler), as TestDaemonSetOnRealNode does for the Helm chart.
//
// For a pod that mounts node folders with HostToContainer propagation
// (containerd requires a shared source), SharedBPFFS mounts a bpffs of the
// node's own and SharedCgroup2 a bind of the machine's cgroup v2 hierarchy,
// both shared and in the private folder (unmounted by the cleanup). Tests
// wrap the nodes they start in CheckHost, which holds the machine's node
// lock while it compares the machine before and after.
//
// As root, missing binaries or kernel features fail the test, never skip it;
// without root it skips (and fails when $CI is set), as test/harness does.
package kubenode
