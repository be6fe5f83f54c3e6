// Package maglev builds Maglev consistent-hashing lookup tables (Eisenbud et
// al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI
// 2016) and defines the flow hash the datapath uses to index them.
//
// The package is pure and deterministic: it imports no kernel, Kubernetes or
// gRPC package, builds on any OS, and the same (backends, M, seed) always
// yields the same table on every node, whatever the order in which the
// backends were learned. [Table.Fingerprint] lets nodes prove that they agree.
//
// # Inputs
//
//   - Table size M: a prime from a fixed list (the Linux IPVS "mh" presets,
//     see [Sizes]); [DefaultSize] is 16381. Keep M >= 100 x the number of
//     backends ([RecommendSize]); that rule bounds the slot-count imbalance to
//     about 1%, it does not bound how many flows move on a backend change.
//   - Seed: 12 random bytes, standard base64 in configuration ([ParseSeed]).
//   - Backends: a stable Key (for example "10.0.0.1:80") and a Weight.
//     Weight 0 drains a backend: it stays in the table's backend list but
//     owns no slot, so no new flow hashes to it.
//
// # Algorithm
//
// Backends are sorted by Key (byte-wise, [strings.Compare]). That sort key is
// part of the on-the-wire contract between nodes and must never change:
// sorting by arrival order, or changing the Key format, silently gives nodes
// different tables. Slot values are indices into this sorted list.
//
// Each backend i with weight > 0 gets a permutation of the slots, computed on
// the fly from two Murmur3 hashes of its Key (see [Seed] for the seeds):
//
//	offset_i = murmur3_x86_32(Key, OffsetSeed) % M
//	skip_i   = murmur3_x86_32(Key, SkipSeed) % (M-1) + 1
//	perm_i(j) = (offset_i + j*skip_i) % M      j = 0, 1, 2, ...
//
// Because M is prime and 1 <= skip < M, every perm_i visits every slot. Only
// (next position, skip) is kept per backend, so memory is O(N) plus the table
// itself; no N x M permutation matrix is ever allocated.
//
// Weights use exact quotas plus weighted turns:
//
//  1. Quota. With W the sum of weights, backend i may own q_i slots where q_i
//     is floor(M*w_i/W) plus one for the M - sum(floor) backends with the
//     largest remainders (M*w_i mod W), ties to the lower sorted index
//     (largest-remainder apportionment). Hence every backend owns
//     floor(M*w_i/W) or ceil(M*w_i/W) slots: always within 1 of its exact
//     share, and equal weights differ by at most one slot.
//  2. Turns. Filling proceeds in rounds r = 1, 2, ... With wmax the largest
//     weight, backend i takes its k-th turn in round ceil(k*wmax/w_i), that
//     is, its accumulated weight r*w_i has reached k*wmax; within a round,
//     turns go in sorted-index order. On its turn a backend claims the first
//     still-free slot along its permutation. A backend stops taking turns
//     once it owns q_i slots; the table is full exactly when every backend
//     has reached its quota, since the quotas sum to M.
//
// With equal weights this is exactly the paper's round-robin population. The
// (round, index) order is realised by one of two interchangeable schedulers
// that yield identical tables (tests compare them with a literal
// round-by-round reference): a scan of all backends per round that has at
// least one turn, used while wmax is at most 4 times the mean weight, and a
// min-heap keyed by (round, index) for very uneven weights. Free slots are
// tracked in an M-bit bitmap while probing. A build allocates about 4*M bytes
// for the table plus M/8 bytes and O(N) state: roughly 0.35 MB and 2 ms for
// N=650, M=65521.
//
// A table with no backend of weight > 0 is valid and empty: [Build] returns
// it with a nil error, [Table.Empty] reports true and [Table.Lookup] returns
// [NoBackend]. Draining every backend is a normal state, not a failure; the
// datapath should then drop or reject new flows.
//
// # Flow hashing
//
// The datapath picks slot [FlowHash](tuple, seed.DatapathSeed()) % M.
// FlowHash is Linux's jhash2 over ten 32-bit words whose exact layout is
// documented on [FlowHash], so an eBPF C program reproduces it bit for bit.
package maglev
