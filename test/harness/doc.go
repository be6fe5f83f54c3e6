// Package harness builds throw-away "pods" for privileged Shunt tests: network
// namespaces joined to a per-test "node" namespace by veth pairs, cgroup v2
// directories laid out like kubelet's systemd driver, a per-test bpffs
// directory, and real processes started inside them.
//
// # Use
//
// Test packages must call Main from TestMain, first thing, because helper
// apps are the test binary re-executed with SHUNT_HARNESS_APP set:
//
//	func TestMain(m *testing.M) { harness.Main(m) }
//
//	func TestX(t *testing.T) {
//		env := harness.New(t)               // cgroup, bpffs dir, node netns
//		a, b := env.NewPod("a"), env.NewPod("b")
//		srv := b.Start(harness.ProcOpts{}, "serve", "--id", "b", "--listen", "0.0.0.0:80", "--listen", "[::]:80")
//		if err := srv.WaitReady(); err != nil { t.Fatal(err) }
//		r, err := a.Connect(harness.ProcOpts{}, "--target", "10.244.1.2:80", "--count", "10")
//		...
//	}
//
// # What New and NewPod create (id = 4 random hex digits)
//
//   - cgroup <cgroup2 mount>/shunt-test-<id>/ (attach BPF programs here), with
//     node/ for processes of the node and, per pod,
//     kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<64 hex>.scope
//   - bpffs directory /sys/fs/bpf/shunt-test-<id>/ (bpffs is mounted if absent)
//   - netns shunt-<id>-node: lo up with 10.244.0.1, fd00:244:ffff::1 and the
//     pods' v4 next hop 169.254.1.1; ip_forward and IPv6 forwarding on; one
//     /32 and one /128 route per pod via its veth
//   - per pod n (1, 2, ... in creation order): netns shunt-<id>-<name>, veth
//     sh<id>-<n> (node side, carries fe80::1/64) <-> eth0 (pod side) with
//     10.244.1.<n>/32 and fd00:244::<n in hex>/128, default routes via
//     169.254.1.1 and fe80::1
//
// The machine's own network namespace is never modified: veths are created
// from the node namespace with their peer placed directly in the pod's, and
// sysctls are written from a thread that joined the target namespace. Traffic
// only flows between namespaces of the test. Environments are independent:
// parallel tests (and parallel test binaries) reuse the same addresses in
// separate node namespaces.
//
// # Processes
//
// Start/StartCmd/Run/Exec run `nsenter --net=/run/netns/<ns> [--setuid --setgid] -- prog`
// created with clone3(CLONE_INTO_CGROUP) into the pod's cgroup, so the
// process is in the cgroup from its first instruction and keeps the host
// mount namespace (/sys/fs/cgroup and /sys/fs/bpf stay visible). Helper apps:
// serve, connect, stream, info, pause (see apps_linux.go); RegisterApp adds
// more.
//
// # Sidecars
//
// Pod.StartSidecar runs the sidecar app (sidecar_linux.go), a transparent
// TCP proxy in Envoy's role, as uid/gid 1337: outbound 127.0.0.1:15001 and
// [::1]:15001 forward to the SO_ORIGINAL_DST destination, inbound 15006 to
// 127.0.0.1/::1 at the original port; read/write relays (Go netpoller or
// blocking syscalls), half-close and reset propagation, counters on
// SIGUSR1 (Sidecar.Stats). Pod.StartHAProxySidecar runs Debian's haproxy
// in the same role (HAProxySidecarConfig; IPv4 only). Pod.RedirectToSidecar
// installs Istio's iptables REDIRECT rules (IstioRules) in the pod.
//
// # Cleanup and leaks
//
// Everything is removed by t.Cleanup in reverse order, also when the test
// fails or panics: processes (SIGKILL by pidfd, then reaped), stragglers in
// the test's cgroup subtree only (cgroup.kill), veths and netns, cgroups depth
// first, the bpffs directory with its pins. Each Env owns a record
// /run/shunt-test/<id> ("<pid> <start time>") so FindLeaks/LeakCheck/Main can
// tell live environments of other test binaries from leftovers. A binary
// killed outright (SIGKILL, go test -timeout) cannot clean up; the next run
// warns, and SHUNT_HARNESS_REAP_STALE=1 removes leftovers of dead owners.
//
// The implementation is Linux only; on other systems the package is empty.
package harness
