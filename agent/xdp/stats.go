package xdp

import "github.com/shuntmesh/shunt/bpf"

// StatNames labels enum xlb_stat (bpf/lib/xdplb.h), in order. A test checks
// it against XLB_STAT_MAX.
var StatNames = []string{
	"pass_not_ip",
	"pass_malformed",
	"pass_not_vip",
	"pass_ip_options",
	"pass_fragment",
	"pass_ttl",
	"pass_bad_csum",
	"pass_icmp",
	"drop_no_backend",
	"drop_no_snat_port",
	"drop_no_node_addr",
	"drop_encap",
	"tx_ipip",
	"tx_geneve",
	"tx_opt",
	"tx_snat",
	"tx_snat_reply",
	"tx_icmp",
	"ct_hit",
	"ct_new",
	"ct_midflow",
	"ct_rst",
	"frag_first",
	"frag_later",
	"frag_unknown",
	"tx_too_big",
	"drop_too_big",
	"ct_evict",
	"ct_torn",
}

// DSRStatNames labels enum dsr_stat, in order; checked against DSR_STAT_MAX.
var DSRStatNames = []string{
	"in_ipip",
	"in_geneve",
	"in_opt",
	"in_icmp",
	"in_no_service",
	"in_malformed",
	"in_error",
	"out_revnat",
	"out_error",
	"revnat_full",
	"out_frag_first",
	"out_frag_later",
	"out_frag_unknown",
}

// Compile-time length checks (a test compares the names too).
var (
	_ = [1]int{}[len(StatNames)-int(bpf.XdplbXlbStatXLB_STAT_MAX)]
	_ = [1]int{}[len(DSRStatNames)-int(bpf.DsrDsrStatDSR_STAT_MAX)]
)
