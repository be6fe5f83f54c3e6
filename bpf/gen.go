// Package bpf holds Shunt's eBPF programs (C sources in this folder, shared
// layouts in lib/shunt.h) and the Go bindings bpf2go generates from them.
// The generated *_bpfel.go and *_bpfel.o files are committed so a clone
// builds without clang; CI regenerates them and fails on a diff.
//
// It exposes specs and generated types only; loading, attaching and pinning
// live in agent/datapath.
package bpf

//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type shunt_addr -type svc_value -type slot_key -type revnat_key -type pod_info -type shunt_config -type shunt_meta -type svc_stats -type sidecar_cfg -type shunt_cidr -type local_ip_key -type local_ip -type sock_key -type pod_stats Sockmesh sockmesh.c

// LayoutVersion is SHUNT_LAYOUT_VERSION from lib/shunt.h: the version of the
// pinned map layout.
const LayoutVersion = uint32(SockmeshShuntLayoutSHUNT_LAYOUT_VERSION)

// xdplb (XDP load balancer) and dsr (its backend side, tc) share
// lib/xdplb.h. Enums are generated from the `__unused_*` constants in the C
// files (bpf2go refuses a -type that is generated anyway).
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type xlb_vip -type xlb_service -type xlb_backend -type xlb_ct_tail -type xlb_ct_way4 -type xlb_ct_way6 -type xlb_ct_set4 -type xlb_ct_set6 -type xlb_snat_key -type xlb_snat -type xlb_config -type xlb_meta -type xlb_svc_stats -type xlb_backend_stats -type xlb_frag_key -type xlb_frag Xdplb xdplb.c

//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type dsr_svc_key -type dsr_local -type dsr_orig -type xlb_flow -type xlb_vip -type xlb_meta -type xlb_frag_key -type xlb_frag Dsr dsr.c

// XDPLayoutVersion is XLB_LAYOUT_VERSION from lib/xdplb.h: the version of
// the pinned map layout of xdplb and dsr.
const XDPLayoutVersion = uint32(XdplbXlbLayoutXLB_LAYOUT_VERSION)

// xdpbench: generator and sink programs of `shuntctl bench xdp`.
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -target bpfel -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -type bench_frame -type bench_state Xdpbench xdpbench.c
