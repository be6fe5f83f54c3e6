// Package bench holds Shunt's benchmark commands, run as
// `shuntctl bench connect` and `shuntctl bench update` (root only, nothing
// else needed but the shuntctl binary, iproute2, nsenter and iptables).
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
// Everything created (network namespaces shuntbench-<pid>*, cgroups
// <cgroup2>/shunt-bench-<pid>, bpffs /sys/fs/bpf/shunt-bench-<pid>, worker
// processes, a temporary folder) is removed when a run ends, fails or is
// interrupted; leftovers of a run that was killed are removed by the next.
package bench
