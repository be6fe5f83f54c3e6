/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Shared layouts of the north-south load balancer: xdplb (XDP, on the
 * node's NICs) and dsr (tc, on the backends). This header is the one
 * definition: Go types are generated from it by bpf2go (-type), never
 * mirrored by hand.
 *
 * Changing any struct here changes the pinned map layout: bump
 * XLB_LAYOUT_VERSION; the agent refuses pinned maps of another version.
 *
 * Addresses are 16 bytes (__u32[4]) in network byte order; an IPv4 address
 * lives in addr[0] with addr[1..3] zero. Ports are network byte order.
 * Families are XLB_AF_INET / XLB_AF_INET6.
 */
#ifndef SHUNT_XDPLB_H
#define SHUNT_XDPLB_H

#include <linux/types.h>

enum xlb_layout {
	XLB_LAYOUT_VERSION = 4,
};

/* Slots of the counter arrays (lb_stats, dsr_stats): more than the
 * counters defined, so adding one does not change the pinned maps. */
enum xlb_stat_slots {
	XLB_STAT_SLOTS = 64,
};

enum xlb_family {
	XLB_AF_INET = 2,
	XLB_AF_INET6 = 10,
};

/* Well-known numbers of the dispatch encodings. */
enum xlb_wire {
	/* Geneve (RFC 8926): UDP port, and the option carrying the service.
	 * Class 0xfff0 is in the experimental range; the type has the
	 * critical bit set, so a Geneve endpoint that does not know it drops
	 * the packet instead of delivering it without the service. */
	XLB_GENEVE_PORT = 6081,
	XLB_GENEVE_OPT_CLASS = 0xfff0,
	XLB_GENEVE_OPT_TYPE = 0x81,
	/* IPv4 option carrying the service: RFC 4727 experimental option
	 * 158 (copy flag set, class 0, number 30), 8 bytes: type, length,
	 * port, IPv4 address. */
	XLB_IPOPT_TYPE = 0x9e,
	XLB_IPOPT_LEN = 8,
	/* IPv6: a Destination Options header with RFC 4727 experimental
	 * option 0x1e (skip if unknown) carrying port and IPv6 address;
	 * 24 bytes with padding. */
	XLB_IP6OPT_TYPE = 0x1e,
	XLB_IP6OPT_HDRLEN = 24,
	/* A packet that stays within this many bytes (the IPv4 datagram every
	 * host must accept) once encapsulated is not checked against the
	 * device MTU; a larger one is (bpf_check_mtu), and answered with ICMP
	 * frag-needed / packet-too-big if it does not fit. */
	XLB_MTU_CHECK_MIN = 576,
	/* The ICMP errors the LB sends quote the client's IP header and the
	 * first 8 bytes after it. */
	XLB_ICMP_QUOTE_L4 = 8,
};

/* lb_services key: a frontend. */
struct xlb_vip {
	__u32 addr[4];
	__u16 port;
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;
};

/* How a service forwards (struct xlb_service.mode). */
enum xlb_mode {
	XLB_MODE_DSR = 0,    /* backend answers the client directly */
	XLB_MODE_SNAT = 1,   /* LB rewrites source to the node address, replies come back through it */
	XLB_MODE_HYBRID = 2, /* TCP as DSR, UDP as SNAT */
};

/* How a DSR packet reaches its backend (struct xlb_service.dispatch). */
enum xlb_dispatch {
	XLB_DISPATCH_IPIP = 0,   /* IPIP / IP6IP6 / 4in6 / 6in4 to the backend's tunnel address; inner unchanged */
	XLB_DISPATCH_GENEVE = 1, /* Geneve to the tunnel address; inner DNATed to the backend, service in an option */
	XLB_DISPATCH_OPT = 2,    /* DNAT to the backend, service in an IPv4 option / IPv6 destination option */
};

/* struct xlb_service.flags. */
enum xlb_svc_flag {
	/* Client-IP session affinity: a new flow's Maglev slot comes from the
	 * hash of its 5-tuple with the client's port zeroed, so every flow
	 * of one client address goes to the same backend, on every load
	 * balancer with the same seed and backends, for as long as the
	 * table keeps that slot's owner. */
	XLB_SVC_CLIENT_IP = 1,
};

/* lb_services value. */
struct xlb_service {
	__u32 id;       /* index into lb_tables and lb_svc_stats */
	__u32 size;     /* Maglev table size M; 0 = no backend takes new flows */
	__u8 mode;      /* enum xlb_mode */
	__u8 dispatch;  /* enum xlb_dispatch */
	__u16 flags;    /* enum xlb_svc_flag */
	__u32 gen;      /* generation of the id, as in lb_svc_gen[id] */
};

/* lb_backends value (indexed by backend id) and part of a conntrack entry. */
struct xlb_backend {
	__u32 addr[4];   /* where the service's socket is: same family as the VIP */
	__u32 tunnel[4]; /* outer destination of IPIP/Geneve; may be another family (4in6) */
	__u16 port;
	__u8 family;
	__u8 tunnel_family;
	__u32 gen;       /* bumped when the id is given to another backend (conntrack entries hold its low 8 bits) */
};

/* A flow's 5-tuple: xdplb's parsed flow (client -> VIP), dsr_revnat key
 * (backend -> client, as the reply leaves). */
struct xlb_flow {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* An IPv4 flow as one key: the kernel LRU hash's key of lb_ct4 up to map
 * layout 3, kept for the benchmark's comparison (bench_lru_flow). */
struct xlb_flow4 {
	__u32 src;
	__u32 dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* What the LB does with a flow's packets (struct xlb_ct.action). */
enum xlb_action {
	XLB_ACT_IPIP = 0,
	XLB_ACT_GENEVE = 1,
	XLB_ACT_OPT = 2,
	XLB_ACT_SNAT = 3,
};

/* A flow's conntrack state as the program works with it: built from its
 * lb_ct4 / lb_ct6 entry (struct xlb_ct_tail) and the backend's lb_backends
 * entry, or from a new pick. */
struct xlb_ct {
	struct xlb_backend be;
	__u32 svc_id;
	__u32 be_id;     /* lb_backends / lb_backend_stats index (< 65536: maxBackends) */
	__u16 snat_port; /* SNAT: the node port of this flow (network order) */
	__u8 action;     /* enum xlb_action */
	__u8 pad;
	__u32 hash;      /* xlb_ct_hash (lib/ct.h): where the entry is, the flow's entropy */
	__u32 gen;       /* service generation, low 24 bits: the entry is stale unless lb_svc_gen[svc_id]'s match */
};

/* The conntrack (lb_ct4, lb_ct6) is a set-associative table in an array
 * map, shared by all CPUs: set (flow hash & (xlb_config.ct_sets - 1)) holds
 * up to XLB_CT_WAYS flows, and a new flow whose set is full replaces the
 * one seen least recently (counted, ct_evict). Entries do not expire: as in
 * an LRU, a finished flow's stays until it is replaced. An entry names its
 * backend by id and generation: an established flow keeps its backend when
 * the service's backends change, even when it is removed, until the id is
 * given to another backend (the agent hands out never-used ids first); then
 * the entry is stale and the flow picked again.
 *
 * No locks: two CPUs may write one way at once. check covers the rest of
 * the entry and the flow hash of its key, so an entry mixed from two
 * writes (or half written while it is read) fails the check and is taken
 * for a miss (counted, ct_torn). The reader checks a copy, never the entry
 * in place. seen is outside the check: a lost update only changes which
 * entry is replaced next. */
enum xlb_ct_geometry {
	XLB_CT_WAYS = 4,
};

struct xlb_ct_tail {
	__u16 sport;     /* key (network order) */
	__u16 dport;
	__u8 proto;      /* key; 0: the way is empty */
	__u8 action;     /* enum xlb_action */
	__u16 snat_port; /* network order */
	__u16 svc_id;
	__u16 be_id;
	__u32 gen;       /* low 24 bits: the service's generation; high 8: the backend's */
	__u32 seen;      /* jiffies (low 32 bits) at the flow's last packet */
	__u32 check;     /* xlb_ct_check(); 0: the way is empty */
};

struct xlb_ct_way4 {
	__u32 src;
	__u32 dst;
	struct xlb_ct_tail t;
};

struct xlb_ct_way6 {
	__u32 src[4];
	__u32 dst[4];
	struct xlb_ct_tail t;
	__u32 pad[2];
};

/* lb_ct4 / lb_ct6 value: one set, 128 and 256 bytes (2 and 4 cache lines). */
struct xlb_ct_set4 {
	struct xlb_ct_way4 way[XLB_CT_WAYS];
};

struct xlb_ct_set6 {
	struct xlb_ct_way6 way[XLB_CT_WAYS];
};

/* lb_snat key: a reply from a backend to the node address, as it arrives. */
struct xlb_snat_key {
	__u32 backend[4];
	__u16 backend_port;
	__u16 node_port;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* lb_snat value: who the reply is for. */
struct xlb_snat {
	__u32 client[4];
	__u32 vip[4];
	__u16 client_port;
	__u16 vip_port;
	__u32 svc_id;
	__u32 be_id;
	__u32 pad;
};

/* lb_frags / dsr_frags key: one fragmented datagram as it leaves the
 * backend (addresses before any rewriting) and its IP identification
 * (IPv4: 16 bits in network order; IPv6: the fragment header's 32 bits). */
struct xlb_frag_key {
	__u32 src[4];
	__u32 dst[4];
	__u32 id;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* lb_frags / dsr_frags value: what the first fragment's addresses became,
 * so the datagram's later fragments (which carry no ports) get the same. */
struct xlb_frag {
	__u32 src[4];
	__u32 dst[4];
	__u32 svc_id; /* lb_frags: for the per-service and per-backend counters */
	__u32 be_id;
};

/* lb_config[0]: node-wide settings, changeable at run time. */
struct xlb_config {
	__u32 seed;      /* Maglev datapath seed (maglev.Seed.DatapathSeed) */
	__u32 node4;     /* node IPv4: outer source, SNAT source; 0 = none */
	__u32 node6[4];  /* node IPv6; all zero = none */
	__u16 snat_lo;   /* SNAT node port range, host order, inclusive */
	__u16 snat_hi;
	__u32 flags;
	__u32 ct_sets;   /* sets of lb_ct4 and of lb_ct6: a power of 2; 0 = no conntrack */
};

/* lb_meta[0] / dsr_meta[0]: describes the pinned maps. */
struct xlb_meta {
	__u32 layout_version; /* XLB_LAYOUT_VERSION */
	__u32 gen_seq;        /* last service generation handed out (lb_meta) */
};

/* Per-service counters (per-CPU array indexed by service id). */
struct xlb_svc_stats {
	__u64 packets;    /* forwarded (any mode, incl. SNAT replies) */
	__u64 bytes;      /* frame bytes as received */
	__u64 flows;      /* new flows: a backend picked from the Maglev table */
	__u64 no_backend; /* dropped: empty table and no conntrack entry */
};

/* Per-backend counters (per-CPU array indexed by backend id). */
struct xlb_backend_stats {
	__u64 packets;
	__u64 bytes;
	__u64 flows;
};

/* Global counters (per-CPU array indexed by enum xlb_stat). Every packet
 * counts exactly one verdict (XLB_PASS_*, XLB_DROP_*, XLB_TX_*, wherever
 * they are in the list: new counters are appended); the XLB_EV_* events
 * are counted on top. The Go label table is checked
 * against XLB_STAT_MAX by a test. */
enum xlb_stat {
	XLB_PASS_NOT_IP = 0,   /* not IPv4/IPv6: ARP, LLDP, ... */
	XLB_PASS_MALFORMED,    /* truncated or invalid header: the kernel decides */
	XLB_PASS_NOT_VIP,      /* not for a service frontend nor a SNAT reply */
	XLB_PASS_IP_OPTIONS,   /* IPv4 options or IPv6 extension headers */
	XLB_PASS_FRAGMENT,     /* IPv4 or IPv6 fragment, other than of a SNAT reply */
	XLB_PASS_TTL,          /* TTL / hop limit <= 1 on a VIP packet */
	XLB_PASS_BAD_CSUM,     /* VIP packet with a wrong IPv4 header checksum */
	XLB_PASS_ICMP,         /* ICMP the LB does not handle (echo, ND, errors of non-VIP flows) */
	XLB_DROP_NO_BACKEND,   /* new flow to a service without backend */
	XLB_DROP_NO_SNAT_PORT, /* no free SNAT port for a new flow */
	XLB_DROP_NO_NODE_ADDR, /* encapsulation or SNAT needs a node address of that family */
	XLB_DROP_ENCAP,        /* the packet could not be grown */
	XLB_TX_IPIP,           /* DSR: IPIP / IP6IP6 / 4in6 / 6in4 */
	XLB_TX_GENEVE,         /* DSR: Geneve */
	XLB_TX_OPT,            /* DSR: IPv4 option / IPv6 destination option */
	XLB_TX_SNAT,           /* SNAT: client -> backend */
	XLB_TX_SNAT_REPLY,     /* SNAT: backend -> client (each fragment of a fragmented reply too) */
	XLB_TX_ICMP,           /* ICMP frag-needed / PTB sent on to the flow's backend (service dispatch, or translated for SNAT) */
	XLB_EV_CT_HIT,         /* conntrack entry used */
	XLB_EV_CT_NEW,         /* backend picked from the Maglev table, entry inserted */
	XLB_EV_CT_MIDFLOW,     /* ... for a TCP packet without SYN (conntrack lost or another LB) */
	XLB_EV_CT_RST,         /* conntrack entry removed after a TCP RST */
	XLB_EV_FRAG_FIRST,     /* first fragment of a SNAT reply rewritten, its record kept (lb_frags) */
	XLB_EV_FRAG_LATER,     /* later fragment of a SNAT reply rewritten from its record */
	XLB_EV_FRAG_UNKNOWN,   /* later fragment to the node address without record: passed */
	XLB_TX_TOO_BIG,        /* verdict: ICMP frag-needed / packet-too-big sent back to the client (encapsulated, its packet would exceed the device MTU) */
	XLB_DROP_TOO_BIG,      /* verdict: IPv4 without DF that would exceed the device MTU once encapsulated (cannot be fragmented here) */
	XLB_EV_CT_EVICT,       /* a new flow's entry replaced another flow's: its set was full */
	XLB_EV_CT_TORN,        /* an entry failed its check (two CPUs wrote it at once): taken for a miss */
	XLB_STAT_MAX,
};

/* ---- backend side (dsr) ---- */

/* dsr_services key: a service as it arrives on a backend in an IPIP packet
 * (inner destination) and the tunnel address the packet was sent to. */
struct dsr_svc_key {
	struct xlb_vip vip;
	__u32 tunnel[4];
	__u8 tunnel_family;
	__u8 pad[3];
};

/* dsr_services value: the local backend socket the VIP maps to. */
struct dsr_local {
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 pad;
};

/* dsr_revnat value: what a reply's source must become. */
struct dsr_orig {
	__u32 vip[4];
	__u16 port;
	__u16 pad;
};

/* Backend-side counters (per-CPU array indexed by enum dsr_stat). The Go
 * label table is checked against DSR_STAT_MAX by a test. */
enum dsr_stat {
	DSR_IN_IPIP = 0,      /* IPIP / IP6IP6 / 4in6 / 6in4 decapsulated and DNATed */
	DSR_IN_GENEVE,        /* Geneve decapsulated */
	DSR_IN_OPT,           /* service option read and stripped */
	DSR_IN_ICMP,          /* ICMP error for a DSR flow delivered to the backend (translated here for IPIP) */
	DSR_IN_NO_SERVICE,    /* tunnel packet for no known service: left alone */
	DSR_IN_MALFORMED,     /* encapsulation we cannot parse: left alone */
	DSR_IN_ERROR,         /* a helper failed: dropped */
	DSR_OUT_REVNAT,       /* reply source rewritten to the VIP */
	DSR_OUT_ERROR,        /* a helper failed on a reply: sent unchanged */
	DSR_REVNAT_FULL,      /* revnat or fragment record could not be written */
	DSR_OUT_FRAG_FIRST,   /* first fragment of a reply rewritten (also counted in out_revnat), record kept */
	DSR_OUT_FRAG_LATER,   /* later fragment of a reply rewritten from its record */
	DSR_OUT_FRAG_UNKNOWN, /* later fragment without record (not a DSR reply, or its first fragment unseen): sent unchanged */
	DSR_STAT_MAX,
};

#endif
