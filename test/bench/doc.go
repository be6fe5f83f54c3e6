// Package bench holds Shunt's benchmark commands, run as
// `shuntctl bench connect`, `shuntctl bench update` and `shuntctl bench
// sidecar` (root only, nothing else needed but the shuntctl binary,
// iproute2, nsenter and iptables; haproxy for the sidecar benchmark, perf
// optionally).
//
// connect measures the new-connection rate (netperf TCP_CRR style: connect,
// send 1 byte, read 1 byte back, close; one client loop, one stream) for
// three configurations side by side at each service count N:
//
//   - direct: the client connects straight to the backends;
//   - shunt: the client connects to a service VIP and Shunt's connect4 hook
//     (loaded with agent.New, N services in one reconcile) translates it;
//   - iptables: kube-proxy-style KUBE-SERVICES → KUBE-SVC → KUBE-SEP DNAT
//     chains in the nat table, the measured VIP last in KUBE-SERVICES.
//
// Clients and servers are the shuntctl binary re-executed (`shuntctl bench
// worker ...`) through nsenter inside network namespaces the benchmark
// creates, placed into their cgroup from the first instruction with
// clone3(CLONE_INTO_CGROUP). Only loopback addresses (127.0.0.0/8) inside
// those namespaces are used. Configurations are interleaved within each
// repetition (the order rotates) and the median of the repetitions is
// reported.
//
// update measures agent.UpdateService latency on a large state.
//
// sidecar measures a client app → sidecar proxy → server app chain, and
// client → sidecar → the server pod's sidecar → server, with haproxy and a
// Go proxy as the sidecar (uid 1337), over persistent connections
// (request/response and stream, see Workload), for: direct (no proxy),
// Istio-style iptables REDIRECT, and Shunt's connect4 steering with sockmap
// off, auto and on (Shunt loaded in-process with agent.New, pods enrolled
// with Agent.Apply). Pods are network namespaces wired to a node namespace
// by veth pairs; every configuration and proxy has its own pods, so all of
// them run interleaved in one process tree. Every received byte is
// checked, and after each workload the counters must show the path each
// configuration claims (Shunt's per-pod counters, iptables REDIRECT hits,
// bytes forwarded by each proxy) or the run fails: a fast but wrong
// configuration cannot win. Besides rates and latency percentiles it
// reports what a transaction costs (CPU time of the path and of the
// proxies, proxy wake-ups, proxy system calls counted with perf when
// present), which is what bounds the gain.
//
// Everything created (network namespaces shuntbench-<pid>*, cgroups
// <cgroup2>/shunt-bench-<pid>, bpffs /sys/fs/bpf/shunt-bench-<pid>, worker
// processes, a temporary folder) is removed when a run ends, fails or is
// interrupted; leftovers of a run that was killed are removed by the next.
package bench
