// Package xdplb tests Shunt's north-south load balancer (bpf/xdplb.c) and
// its backend side (bpf/dsr.c) as the kernel runs them:
//
//   - packet fixtures through BPF_PROG_TEST_RUN (Katran style): input bytes,
//     byte-exact expected output, verdict and exact counter deltas. Inputs
//     are built with gopacket; expected outputs are built independently in
//     Go (full checksums, Maglev picks from mesh/maglev), so incremental
//     checksum updates and the flow hash of the C code are checked too;
//   - the Go-computed Maglev pick against the datapath's for 10,000 flows;
//   - a fuzz target: random frames never make the program fail, and the
//     verdict and output length stay sane;
//   - end to end in network namespaces: client -> load balancer (XDP on a
//     veth) -> three backends (tc decapsulation) -> replies straight to the
//     client from the VIP, with real TCP and UDP.
//
// The tests need root and fail (never skip) when a kernel feature is missing.
package xdplb
