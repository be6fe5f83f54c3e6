//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* xdplb: Shunt's north-south L4 load balancer, an XDP program on the node's
 * NICs.
 *
 * A packet to a service frontend (VIP, port, protocol) is sent on to one of
 * the service's backends and bounced out of the interface it came in on
 * (XDP_TX, MAC addresses swapped: back to the router that sent it):
 *
 *   - The backend is chosen by Maglev consistent hashing: slot
 *     flow_hash(5-tuple, seed) % M of the service's lookup table, the same
 *     hash and tables as mesh/maglev. A conntrack entry (lib/ct.h: a
 *     set-associative table of Shunt's own) keeps an established flow on
 *     its backend whatever happens to the service's backend set afterwards.
 *   - DSR (the backend answers the client directly): IPIP / IP6IP6 / 4in6 /
 *     6in4 with the inner packet unchanged; Geneve (UDP 6081) with the
 *     inner packet DNATed to the backend and the service in a Geneve
 *     option; or DNAT with the service in an IPv4 option (IPv6: a
 *     destination option). The backend side (dsr.c) undoes each.
 *   - SNAT: source rewritten to the node address and a port, destination to
 *     the backend; the backend's replies come back here and are rewritten to
 *     VIP -> client (lb_snat). Hybrid: TCP as DSR, UDP as SNAT.
 *   - An ICMP "fragmentation needed" / ICMPv6 "packet too big" about a VIP
 *     flow goes to that flow's backend (hashing the embedded tuple reversed),
 *     IPIP-encapsulated.
 *
 * Everything else goes to the kernel (XDP_PASS) untouched: non-IP (ARP),
 * fragments, IPv4 options / IPv6 extension headers, TTL <= 1, malformed or
 * truncated headers, a bad IPv4 header checksum, and packets for no
 * frontend. Every packet counts exactly one verdict in lb_stats.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/xdplb.h"
#include "lib/flowhash.h"
#include "lib/ct.h"
#include "lib/csum.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "xdplb composes header words for little-endian BPF"
#endif

char __license[] SEC("license") = "Dual BSD/GPL";

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define IP_MF_ 0x2000
#define IP_OFFSET_ 0x1fff
#define IP_DF_ 0x4000
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define IPPROTO_DSTOPTS_ 60
#define SNAT_PROBES 16

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct xlb_vip);
	__type(value, struct xlb_service);
	__uint(max_entries, 16384);
} lb_services SEC(".maps");

/* One Maglev table per service: slot -> backend id. Inner maps of any
 * preset size may coexist (BPF_F_INNER_MAP); a new table is built in a new
 * map and swapped in with one update of lb_tables, so a packet sees either
 * the old or the new table, never a half-written one. */
struct maglev_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 16381);
	__uint(map_flags, BPF_F_INNER_MAP);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__array(values, struct maglev_table);
} lb_tables SEC(".maps");

/* lb_svc_gen[service id]: the generation of the service holding the id
 * (0: none). An established flow (conntrack hit) is forwarded without
 * looking its frontend up again, as long as its entry's generation is still
 * the service's: deleting a service (or giving its id to another) makes its
 * entries stale at once. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 16384);
} lb_svc_gen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct xlb_backend);
	__uint(max_entries, 65536);
} lb_backends SEC(".maps");

/* Conntrack, one set-associative table per family (lib/ct.h, design in
 * lib/xdplb.h): an array of sets, sized by the agent (xlb_config.ct_sets). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct xlb_ct_set4);
	__uint(max_entries, 65536);
} lb_ct4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct xlb_ct_set6);
	__uint(max_entries, 65536);
} lb_ct6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct xlb_snat_key);
	__type(value, struct xlb_snat);
	__uint(max_entries, 262144);
} lb_snat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct xlb_config);
	__uint(max_entries, 1);
} lb_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct xlb_meta);
	__uint(max_entries, 1);
} lb_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct xlb_svc_stats);
	__uint(max_entries, 16384);
} lb_svc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct xlb_backend_stats);
	__uint(max_entries, 65536);
} lb_be_stats SEC(".maps");

/* Fragmented SNAT replies: the first fragment's rewrite, for the
 * datagram's later fragments (deleted with the last one). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct xlb_frag_key);
	__type(value, struct xlb_frag);
	__uint(max_entries, 16384);
} lb_frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, XLB_STAT_SLOTS);
} lb_stats SEC(".maps");

_Static_assert((int)XLB_STAT_MAX <= (int)XLB_STAT_SLOTS, "lb_stats has room for every counter");

/* Force BTF for the types Go needs that no map names. */
const enum xlb_stat __unused_xlb_stat __attribute__((unused));
const enum xlb_mode __unused_xlb_mode __attribute__((unused));
const enum xlb_dispatch __unused_xlb_dispatch __attribute__((unused));
const enum xlb_action __unused_xlb_action __attribute__((unused));
const enum xlb_layout __unused_xlb_layout __attribute__((unused));
const enum xlb_family __unused_xlb_family __attribute__((unused));
const enum xlb_wire __unused_xlb_wire __attribute__((unused));
const enum xlb_stat_slots __unused_xlb_stat_slots __attribute__((unused));
const enum xlb_svc_flag __unused_xlb_svc_flag __attribute__((unused));
const enum xlb_ct_geometry __unused_xlb_ct_geometry __attribute__((unused));
/* no map holds these: named here for their Go types */
const struct xlb_ct __unused_xlb_ct __attribute__((unused));
const struct xlb_flow __unused_xlb_flow __attribute__((unused));

/* linux/icmp.h pulls in libc headers: the few ICMP definitions used here. */
#define ICMP_DEST_UNREACH_ 3
#define ICMP_FRAG_NEEDED_ 4
struct icmphdr_ {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 rest;
};

struct vlanhdr {
	__be16 tci;
	__be16 proto;
};

struct geneve_opt_hdr {
	__be16 opt_class;
	__u8 type;
	__u8 length; /* low 5 bits: data length in 4-byte words */
};

struct genevehdr_ {
	__u8 ver_optlen; /* version (2 bits) | options length in 4-byte words (6 bits) */
	__u8 flags;      /* O (0x80) | C (0x40): critical options present */
	__be16 proto;
	__u8 vni[3];
	__u8 rsvd;
};

/* pkt is what parsing learnt about a packet. */
struct pkt {
	struct xlb_flow flow; /* client -> VIP */
	__u32 ports;          /* raw first 4 bytes of L4 (flow hash word 8) */
	__u32 ip_len;         /* IP datagram length: header + payload */
	__u32 frame_len;      /* bytes as received, for counters */
	__u32 frag_id;        /* fragments: IPv4 identification / IPv6 fragment header identification */
	__u8 vlan;            /* one 802.1Q / 802.1ad tag */
	__u8 tcp_flags;
	__u8 tos;             /* IPv4 TOS / IPv6 traffic class */
	__u8 frag;            /* enum frag_kind */
	__u8 more;            /* fragments: more fragments follow */
};

/* struct pkt.frag. An IPv6 fragment has its fragment header (8 bytes) right
 * after the IPv6 header; the first fragment's L4 header follows it. */
enum frag_kind {
	FRAG_NONE = 0,
	FRAG_FIRST = 1, /* offset 0, more fragments: carries the L4 header */
	FRAG_LATER = 2, /* offset > 0: no L4 header */
};

struct frag6hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset (8-byte units) << 3 | M */
	__be32 id;
};

/* LB_CONTINUE: parsed a TCP/UDP packet, go on with lb_l4 (also: a check
 * found nothing to do, go on); LB_FRAG: parsed a fragment, go on with
 * snat_frag (a single call site each keeps one copy of that code in the
 * program). */
#define LB_CONTINUE -1
#define LB_FRAG -2

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&lb_stats, &idx);

	if (v)
		*v += 1;
}

static __always_inline int verdict(__u32 stat, int action)
{
	stat_inc(stat);
	return action;
}

static __always_inline void svc_count(__u32 id, __u32 bytes, int new_flow)
{
	struct xlb_svc_stats *s = bpf_map_lookup_elem(&lb_svc_stats, &id);

	if (!s)
		return;
	s->packets++;
	s->bytes += bytes;
	if (new_flow)
		s->flows++;
}

static __always_inline void be_count(__u32 id, __u32 bytes, int new_flow)
{
	struct xlb_backend_stats *s = bpf_map_lookup_elem(&lb_be_stats, &id);

	if (!s)
		return;
	s->packets++;
	s->bytes += bytes;
	if (new_flow)
		s->flows++;
}

/* ct_get, ct_set, ct_del: the conntrack entry of flow f (hash: its flow
 * hash), in the table of its family. The empty asm keeps clang from merging the two map lookups into
 * one with the map chosen before it: the verifier inlines a lookup only
 * when every path to a call site passes the same map. */
#define ct_keep_apart(v) asm volatile("" : "+r"(v))

/* CT_SETS looks up the two sets of the flow whose xlb_ct_hash is hash in
 * map (a conntrack table of cfg's size): a macro, so each use is a call
 * site of its own map. */
#define CT_SETS(map, cfg, hash, s1, s2)                                        \
	do {                                                                   \
		__u32 m_ = (cfg)->ct_sets - 1, i1_ = (hash) & m_, i2_ = ct_set2(hash) & m_; \
		s1 = bpf_map_lookup_elem(&(map), &i1_);                        \
		s2 = bpf_map_lookup_elem(&(map), &i2_);                        \
		ct_keep_apart(s1);                                             \
		ct_keep_apart(s2);                                             \
	} while (0)

/* ct_get fills ct from the flow's valid entry and its backend; -1: none.
 * The caller checks the service generation (ct_live). */
static __always_inline int ct_get(const struct xlb_config *cfg, const struct xlb_flow *f, __u32 hash, struct xlb_ct *ct)
{
	struct xlb_ct_tail t;
	struct xlb_backend *be;
	__u32 be_id;
	int way;

	if (!cfg->ct_sets)
		return -1;
	if (f->family == XLB_AF_INET) {
		struct xlb_ct_set4 *s1, *s2;

		CT_SETS(lb_ct4, cfg, hash, s1, s2);
		if (!s1 || !s2)
			return -1;
		way = ct_find4(s1, s2, f, hash, &t);
		if (way >= 0)
			ct_touch(way < XLB_CT_WAYS ? &s1->way[way & (XLB_CT_WAYS - 1)].t
						   : &s2->way[way & (XLB_CT_WAYS - 1)].t, ct_now());
	} else {
		struct xlb_ct_set6 *s1, *s2;

		CT_SETS(lb_ct6, cfg, hash, s1, s2);
		if (!s1 || !s2)
			return -1;
		way = ct_find6(s1, s2, f, hash, &t);
		if (way >= 0)
			ct_touch(way < XLB_CT_WAYS ? &s1->way[way & (XLB_CT_WAYS - 1)].t
						   : &s2->way[way & (XLB_CT_WAYS - 1)].t, ct_now());
	}
	if (way == CT_TORN)
		stat_inc(XLB_EV_CT_TORN);
	if (way < 0)
		return -1;
	be_id = t.be_id;
	be = bpf_map_lookup_elem(&lb_backends, &be_id);
	if (!be || (__u8)be->gen != t.gen >> 24)
		return -1; /* the id went to another backend since: stale */
	ct->be = *be;
	ct->svc_id = t.svc_id;
	ct->be_id = be_id;
	ct->snat_port = t.snat_port;
	ct->action = t.action;
	ct->pad = 0;
	ct->hash = hash;
	ct->gen = t.gen & XLB_CT_GEN_MASK;
	return 0;
}

/* ct_live reports whether ct's service still has the generation of the
 * entry (low 24 bits: the agent never hands out a generation whose are 0). */
static __always_inline int ct_live(const struct xlb_ct *ct)
{
	__u32 *gen = bpf_map_lookup_elem(&lb_svc_gen, &ct->svc_id);

	return gen && ct->gen && (*gen & XLB_CT_GEN_MASK) == ct->gen;
}

/* ct_set writes ct (ct->hash: the flow's xlb_ct_hash) as its entry. */
static __always_inline void ct_set(const struct xlb_config *cfg, const struct xlb_flow *f, const struct xlb_ct *ct)
{
	int evict;

	if (!cfg->ct_sets)
		return;
	if (f->family == XLB_AF_INET) {
		struct xlb_ct_set4 *s1, *s2;

		CT_SETS(lb_ct4, cfg, ct->hash, s1, s2);
		if (!s1 || !s2)
			return;
		evict = ct_put4(s1, s2, f, ct);
	} else {
		struct xlb_ct_set6 *s1, *s2;

		CT_SETS(lb_ct6, cfg, ct->hash, s1, s2);
		if (!s1 || !s2)
			return;
		evict = ct_put6(s1, s2, f, ct);
	}
	if (evict)
		stat_inc(XLB_EV_CT_EVICT);
}

/* ct_del empties the flow's entry. */
static __always_inline void ct_del(const struct xlb_config *cfg, const struct xlb_flow *f, __u32 hash)
{
	if (!cfg->ct_sets)
		return;
	if (f->family == XLB_AF_INET) {
		struct xlb_ct_set4 *s1, *s2;

		CT_SETS(lb_ct4, cfg, hash, s1, s2);
		if (s1 && s2)
			ct_clear4(s1, s2, f);
	} else {
		struct xlb_ct_set6 *s1, *s2;

		CT_SETS(lb_ct6, cfg, hash, s1, s2);
		if (s1 && s2)
			ct_clear6(s1, s2, f);
	}
}

static __always_inline __u32 l2_len(const struct pkt *p)
{
	return p->vlan ? sizeof(struct ethhdr) + sizeof(struct vlanhdr) : sizeof(struct ethhdr);
}

/* macs_swapped writes to dst (12 bytes) the two MAC addresses at src
 * swapped: dst's destination is src's source and the other way round. dst
 * may be src. Word loads and stores: packet data needs no alignment where
 * XDP runs natively (the verifier enforces it only for strict-alignment
 * architectures). */
static __always_inline void macs_swapped(void *dst, const void *src)
{
	__u32 d4 = *(const __u32 *)src;
	__u16 d2 = *(const __u16 *)(src + 4);
	__u32 s4 = *(const __u32 *)(src + 6);
	__u16 s2 = *(const __u16 *)(src + 10);

	*(__u32 *)dst = s4;
	*(__u16 *)(dst + 4) = s2;
	*(__u32 *)(dst + 6) = d4;
	*(__u16 *)(dst + 10) = d2;
}

/* tx bounces the (rewritten) frame back to where it came from. */
static __always_inline int tx(struct xdp_md *ctx, __u32 stat)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	macs_swapped(eth, eth);
	return verdict(stat, XDP_TX);
}

/* tx_built bounces a frame whose MAC addresses were already swapped. */
static __always_inline int tx_built(__u32 stat)
{
	return verdict(stat, XDP_TX);
}

/* ---- rewriting addresses in place (DNAT, SNAT, reverse SNAT) ---- */

/* rewrite sets the destination (and, with src != 0, the source) address
 * and port of the packet, updating the IPv4 header and TCP/UDP checksums
 * incrementally. Addresses are 4 words, ports network order. A first
 * fragment is rewritten like a whole datagram (its L4 checksum covers the
 * whole datagram, so the incremental update holds); a later fragment has
 * only its addresses (the ports are in the first). */
static __always_inline int rewrite(struct xdp_md *ctx, const struct pkt *p, const __u32 *saddr, __u16 sport,
				   const __u32 *daddr, __u16 dport, int src)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 diff = 0;
	__u16 *ports, *check;
	void *l4;

	if (p->flow.family == XLB_AF_INET) {
		struct iphdr *ip = data + l2_len(p);

		if ((void *)(ip + 1) > end)
			return -1;
		if (src) {
			diff = csum_diff4(diff, ip->saddr, saddr[0]);
			ip->saddr = saddr[0];
		}
		diff = csum_diff4(diff, ip->daddr, daddr[0]);
		ip->daddr = daddr[0];
		ip->check = csum_apply(ip->check, diff);
		l4 = ip + 1;
	} else {
		struct ipv6hdr *ip6 = data + l2_len(p);
		__u32 *a;

		if ((void *)(ip6 + 1) > end)
			return -1;
		if (src) {
			a = ip6->saddr.in6_u.u6_addr32;
#pragma unroll
			for (int i = 0; i < 4; i++) {
				diff = csum_diff4(diff, a[i], saddr[i]);
				a[i] = saddr[i];
			}
		}
		a = ip6->daddr.in6_u.u6_addr32;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			diff = csum_diff4(diff, a[i], daddr[i]);
			a[i] = daddr[i];
		}
		l4 = ip6 + 1;
		if (p->frag)
			l4 += sizeof(struct frag6hdr);
	}
	if (p->frag == FRAG_LATER)
		return 0;
	ports = l4;
	if ((void *)(ports + 2) > end)
		return -1;
	if (src) {
		diff = csum_diff2(diff, ports[0], sport);
		ports[0] = sport;
	}
	diff = csum_diff2(diff, ports[1], dport);
	ports[1] = dport;
	if (p->flow.proto == IPPROTO_TCP) {
		check = l4 + offsetof(struct tcphdr, check);
		if ((void *)(check + 1) > end)
			return -1;
		*check = csum_apply(*check, diff);
	} else {
		check = l4 + offsetof(struct udphdr, check);
		if ((void *)(check + 1) > end)
			return -1;
		/* IPv4 UDP without checksum stays without; a computed 0 is
		 * sent as 0xffff (RFC 768). */
		if (*check || p->flow.family == XLB_AF_INET6) {
			__u16 c = csum_apply(*check, diff);
			*check = c ? c : 0xffff;
		}
	}
	return 0;
}

/* ---- encapsulation ---- */

/* push grows the packet by len bytes right after the L2 header: the
 * Ethernet header (and VLAN tag) move to the new front, with the MAC
 * addresses swapped and proto (host order) as the new EtherType. */
static __always_inline int push(struct xdp_md *ctx, const struct pkt *p, int len, __u16 proto)
{
	void *data, *end, *old;

	if (bpf_xdp_adjust_head(ctx, -len))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	old = data + len; /* where the L2 header is now */
	if (old + sizeof(struct ethhdr) + sizeof(struct vlanhdr) > end)
		return -1;
	macs_swapped(data, old);
	if (p->vlan) {
		/* EtherType 802.1Q/802.1ad and the tag stay; the tag's
		 * protocol becomes the outer one */
		*(__u32 *)(data + 12) = *(__u32 *)(old + 12);
		*(__be16 *)(data + 16) = bpf_htons(proto);
	} else {
		*(__be16 *)(data + 12) = bpf_htons(proto);
	}
	return 0;
}

/* outer_ip writes an outer IPv4 or IPv6 header at l3 (checked by the
 * caller to hold 40 bytes for IPv6, 20 for IPv4). payload is the length
 * after the outer header. */
static __always_inline void outer_ip(void *l3, const struct pkt *p, const struct xlb_config *cfg,
				     const struct xlb_backend *be, __u32 payload, __u8 proto, __u32 hash)
{
	if (be->tunnel_family == XLB_AF_INET6) {
		struct ipv6hdr *o = l3;

		/* version 6, traffic class from the inner packet, flow
		 * label from the flow hash (entropy for ECMP / RSS) */
		*(__be32 *)o = bpf_htonl(6 << 28 | (__u32)p->tos << 20 | (hash & 0xfffff));
		o->payload_len = bpf_htons(payload);
		o->nexthdr = proto;
		o->hop_limit = 64;
		__builtin_memcpy(&o->saddr, cfg->node6, 16);
		__builtin_memcpy(&o->daddr, be->tunnel, 16);
	} else {
		/* Written as five words (this file is built for little-endian
		 * BPF only): version/IHL, TOS, total length; id 0, DF; TTL 64,
		 * protocol, checksum; source; destination. The checksum is
		 * summed from the same words. */
		__u32 *w = l3;
		__u32 w0 = bpf_htons(0x4500 | p->tos) | (__u32)bpf_htons(payload + sizeof(struct iphdr)) << 16;
		__u32 w1 = (__u32)bpf_htons(IP_DF_) << 16;
		__u32 w2 = bpf_htons(64 << 8 | proto);
		__u64 sum = (__u64)w0 + w1 + w2 + cfg->node4 + be->tunnel[0];

		w[0] = w0;
		w[1] = w1;
		w[2] = w2 | (__u32)(__u16)~csum_fold64(sum) << 16;
		w[3] = cfg->node4;
		w[4] = be->tunnel[0];
	}
}

static __always_inline int have_node_addr(const struct xlb_config *cfg, __u8 family)
{
	if (family == XLB_AF_INET6)
		return (cfg->node6[0] | cfg->node6[1] | cfg->node6[2] | cfg->node6[3]) != 0;
	return cfg->node4 != 0;
}

/* encap_ipip: IPIP (4in4), 6in4, IP6IP6 (6in6) or 4in6 by the families of
 * the tunnel address and of the packet. The inner packet is unchanged. */
static __always_inline int encap_ipip(struct xdp_md *ctx, const struct pkt *p, const struct xlb_config *cfg,
				      const struct xlb_backend *be, __u32 hash, __u32 stat)
{
	int v6 = be->tunnel_family == XLB_AF_INET6;
	__u32 olen = v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
	__u8 inner = p->flow.family == XLB_AF_INET ? IPPROTO_IPIP : IPPROTO_IPV6;
	void *data, *end, *l3;

	if (!have_node_addr(cfg, be->tunnel_family))
		return verdict(XLB_DROP_NO_NODE_ADDR, XDP_DROP);
	if (push(ctx, p, olen, v6 ? ETH_P_IPV6 : ETH_P_IP))
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	l3 = data + l2_len(p);
	if (l3 + sizeof(struct ipv6hdr) > end)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	outer_ip(l3, p, cfg, be, p->ip_len, inner, hash);
	return verdict(stat, XDP_TX);
}

/* encap_geneve: outer IP / UDP 6081 / Geneve with one option holding the
 * service (VIP vip, port vport), protocol type IPv4 or IPv6 (no inner
 * Ethernet). The inner packet must already be DNATed to the backend. */
static __always_inline int encap_geneve(struct xdp_md *ctx, const struct pkt *p, const struct xlb_config *cfg,
					const struct xlb_backend *be, __u32 hash, const __u32 *vip, __u16 vport,
					__u32 stat)
{
	int v6 = be->tunnel_family == XLB_AF_INET6;
	int svc6 = p->flow.family == XLB_AF_INET6;
	__u32 iplen = v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
	__u32 optdata = svc6 ? 20 : 8; /* address, port, 2 bytes padding */
	__u32 glen = sizeof(struct genevehdr_) + sizeof(struct geneve_opt_hdr) + optdata;
	__u32 udplen = sizeof(struct udphdr) + glen + p->ip_len;
	struct genevehdr_ *g;
	struct geneve_opt_hdr *o;
	struct udphdr *u;
	void *data, *end, *l3;
	__u32 *od;

	if (!have_node_addr(cfg, be->tunnel_family))
		return verdict(XLB_DROP_NO_NODE_ADDR, XDP_DROP);
	if (push(ctx, p, iplen + sizeof(struct udphdr) + glen, v6 ? ETH_P_IPV6 : ETH_P_IP))
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	l3 = data + l2_len(p);
	if (l3 + sizeof(struct ipv6hdr) > end)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	outer_ip(l3, p, cfg, be, udplen, IPPROTO_UDP, hash);
	u = l3 + iplen;
	g = (void *)(u + 1);
	o = (void *)(g + 1);
	od = (void *)(o + 1);
	if ((void *)od + 20 > end)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	/* Source port from the flow hash: entropy for ECMP and RSS. The UDP
	 * checksum is zero (RFC 6935/6936 for tunnels over IPv6). */
	u->source = bpf_htons(0xc000 | (hash & 0x3fff));
	u->dest = bpf_htons(XLB_GENEVE_PORT);
	u->len = bpf_htons(udplen);
	u->check = 0;
	g->ver_optlen = (sizeof(struct geneve_opt_hdr) + optdata) / 4;
	g->flags = 0x40; /* C: a critical option is present */
	g->proto = bpf_htons(svc6 ? ETH_P_IPV6 : ETH_P_IP);
	g->vni[0] = g->vni[1] = g->vni[2] = 0;
	g->rsvd = 0;
	o->opt_class = bpf_htons(XLB_GENEVE_OPT_CLASS);
	o->type = XLB_GENEVE_OPT_TYPE;
	o->length = optdata / 4;
	if (svc6) {
		od[0] = vip[0];
		od[1] = vip[1];
		od[2] = vip[2];
		od[3] = vip[3];
		od[4] = (__u32)vport; /* port, then 2 bytes of zero padding */
	} else {
		od[0] = vip[0];
		od[1] = (__u32)vport;
	}
	return verdict(stat, XDP_TX);
}

/* insert_opt4 inserts the 8-byte option carrying the service (VIP vip,
 * port vport) after the IPv4 header of a packet already DNATed to the
 * backend. */
static __always_inline int insert_opt4(struct xdp_md *ctx, const struct pkt *p, const __u32 *vip, __u16 vport,
				       __u32 stat)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr eth, *e;
	struct vlanhdr vh = {}, *v;
	struct {
		struct iphdr ip;
		__u8 type, len;
		__be16 port;
		__be32 addr;
	} h;
	__u32 l2 = l2_len(p);
	void *l3;

	if (data + sizeof(eth) + sizeof(vh) + sizeof(struct iphdr) > end && p->vlan)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	if (data + sizeof(eth) + sizeof(struct iphdr) > end)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	__builtin_memcpy(&eth, data, sizeof(eth));
	if (p->vlan) {
		__builtin_memcpy(&vh, data + sizeof(eth), sizeof(vh));
		__builtin_memcpy(&h.ip, data + sizeof(eth) + sizeof(vh), sizeof(h.ip));
	} else {
		__builtin_memcpy(&h.ip, data + sizeof(eth), sizeof(h.ip));
	}
	h.ip.ihl = 7;
	h.ip.tot_len = bpf_htons(bpf_ntohs(h.ip.tot_len) + XLB_IPOPT_LEN);
	h.ip.check = 0;
	h.type = XLB_IPOPT_TYPE;
	h.len = XLB_IPOPT_LEN;
	h.port = vport;
	h.addr = vip[0];
	{
		__u16 *w = (__u16 *)&h;
		__u32 s = 0;
#pragma unroll
		for (int i = 0; i < 14; i++)
			s += w[i];
		h.ip.check = (__u16)~csum_fold(s);
	}
	if (bpf_xdp_adjust_head(ctx, -XLB_IPOPT_LEN))
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	e = data;
	if ((void *)(e + 1) > end)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	__builtin_memcpy(e->h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(e->h_source, eth.h_dest, ETH_ALEN);
	e->h_proto = eth.h_proto;
	if (p->vlan) {
		v = (void *)(e + 1);
		if ((void *)(v + 1) > end)
			return verdict(XLB_DROP_ENCAP, XDP_DROP);
		*v = vh;
	}
	l3 = data + l2;
	if (l3 + sizeof(h) > end)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	__builtin_memcpy(l3, &h, sizeof(h));
	return verdict(stat, XDP_TX);
}

/* insert_opt6 inserts a 24-byte Destination Options header carrying the
 * service (VIP vip, port vport) after the IPv6 header of a packet already
 * DNATed to the backend. */
static __always_inline int insert_opt6(struct xdp_md *ctx, const struct pkt *p, const __u32 *vip, __u16 vport,
				       __u32 stat)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr eth, *e;
	struct vlanhdr vh = {}, *v;
	struct {
		struct ipv6hdr ip;
		__u8 nexthdr, hdrlen;
		__u8 type, len;
		__be16 port;
		__be32 addr[4];
		__u8 padn, padlen;
	} __attribute__((packed)) h;
	__u32 l2 = l2_len(p);
	void *l3;

	if (data + sizeof(eth) + sizeof(vh) + sizeof(struct ipv6hdr) > end && p->vlan)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	if (data + sizeof(eth) + sizeof(struct ipv6hdr) > end)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	__builtin_memcpy(&eth, data, sizeof(eth));
	if (p->vlan) {
		__builtin_memcpy(&vh, data + sizeof(eth), sizeof(vh));
		__builtin_memcpy(&h.ip, data + sizeof(eth) + sizeof(vh), sizeof(h.ip));
	} else {
		__builtin_memcpy(&h.ip, data + sizeof(eth), sizeof(h.ip));
	}
	h.nexthdr = h.ip.nexthdr;
	h.hdrlen = XLB_IP6OPT_HDRLEN / 8 - 1;
	h.type = XLB_IP6OPT_TYPE;
	h.len = 18;
	h.port = vport;
	__builtin_memcpy(h.addr, vip, 16);
	h.padn = 1; /* PadN with 0 bytes of data */
	h.padlen = 0;
	h.ip.nexthdr = IPPROTO_DSTOPTS_;
	h.ip.payload_len = bpf_htons(bpf_ntohs(h.ip.payload_len) + XLB_IP6OPT_HDRLEN);
	if (bpf_xdp_adjust_head(ctx, -XLB_IP6OPT_HDRLEN))
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	e = data;
	if ((void *)(e + 1) > end)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	__builtin_memcpy(e->h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(e->h_source, eth.h_dest, ETH_ALEN);
	e->h_proto = eth.h_proto;
	if (p->vlan) {
		v = (void *)(e + 1);
		if ((void *)(v + 1) > end)
			return verdict(XLB_DROP_ENCAP, XDP_DROP);
		*v = vh;
	}
	l3 = data + l2;
	if (l3 + sizeof(h) > end)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	__builtin_memcpy(l3, &h, sizeof(h));
	return verdict(stat, XDP_TX);
}

/* ---- ICMP "too big" for packets that would not fit once encapsulated ---- */

/* icmp_reply reshapes the packet for an ICMP error in front of its own IP
 * header: hdr bytes (the new IP and ICMP headers) are made room for, the L2
 * header moves to the front with the MAC addresses swapped (push, proto the
 * EtherType), and only quote bytes of the packet's IP datagram are kept. It
 * returns the new IP header (hdr + quote bytes readable), 0 on failure. */
static __always_inline __u32 *icmp_reply(struct xdp_md *ctx, const struct pkt *p, __u32 hdr, __u32 quote, __u16 proto)
{
	void *data, *end;
	__u32 l2 = l2_len(p), *w;
	long cut;

	if (push(ctx, p, hdr, proto))
		return 0;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	cut = (long)(end - data) - (long)(l2 + hdr + quote);
	if (cut < 0 || (cut && bpf_xdp_adjust_tail(ctx, (int)-cut)))
		return 0;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	w = data + l2;
	if ((void *)w + hdr + quote > end)
		return 0;
	return w;
}

/* frag_needed4 turns the client's IPv4 packet into an ICMP "fragmentation
 * needed" (type 3, code 4) with next-hop MTU mtu, from the node address back
 * to the client: the headers go in front of the packet's own IP header,
 * which with the 8 bytes after it is the quote, and the rest is cut off. A
 * packet without DF cannot be fragmented here: dropped and counted. */
static __always_inline int frag_needed4(struct xdp_md *ctx, const struct pkt *p, const struct xlb_config *cfg, __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	const __u32 hdr = sizeof(struct iphdr) + sizeof(struct icmphdr_);
	const __u32 quote = sizeof(struct iphdr) + XLB_ICMP_QUOTE_L4;
	__u32 *w, w0, w2, w5, w6;
	struct iphdr *ip = data + l2_len(p);
	__u64 sum;
	__u8 tos;

	if ((void *)(ip + 1) > end)
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	if (!(ip->frag_off & bpf_htons(IP_DF_)))
		return verdict(XLB_DROP_TOO_BIG, XDP_DROP);
	if (!cfg->node4)
		return verdict(XLB_DROP_NO_NODE_ADDR, XDP_DROP);
	/* as Linux: the TOS bits of the packet, precedence "internetwork
	 * control" */
	tos = (ip->tos & 0x1e) | 0xc0;
	w = icmp_reply(ctx, p, hdr, quote, ETH_P_IP);
	if (!w)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	/* IPv4 header: 5 words (id 0, no DF, TTL 64, ICMP) */
	w0 = bpf_htons(0x4500 | tos) | (__u32)bpf_htons(hdr + quote) << 16;
	w2 = bpf_htons(64 << 8 | IPPROTO_ICMP);
	sum = (__u64)w0 + w2 + cfg->node4 + p->flow.src[0];
	w[0] = w0;
	w[1] = 0;
	w[2] = w2 | (__u32)(__u16)~csum_fold64(sum) << 16;
	w[3] = cfg->node4;
	w[4] = p->flow.src[0];
	/* ICMP: type, code, checksum; unused, next-hop MTU; then the quote
	 * (words 7..13, already in place) */
	w5 = ICMP_DEST_UNREACH_ | ICMP_FRAG_NEEDED_ << 8;
	w6 = (__u32)bpf_htons(mtu > 0xffff ? 0xffff : mtu) << 16;
	sum = (__u64)w5 + w6;
#pragma unroll
	for (int i = 7; i < 14; i++)
		sum += w[i];
	w[5] = w5 | (__u32)(__u16)~csum_fold64(sum) << 16;
	w[6] = w6;
	return tx_built(XLB_TX_TOO_BIG);
}

/* packet_too_big6 turns the client's IPv6 packet into an ICMPv6 "packet too
 * big" with MTU mtu (at least 1280) from the node address back to the
 * client, quoting its IPv6 header and the 8 bytes after it. */
static __always_inline int packet_too_big6(struct xdp_md *ctx, const struct pkt *p, const struct xlb_config *cfg, __u32 mtu)
{
	const __u32 hdr = sizeof(struct ipv6hdr) + sizeof(struct icmp6hdr);
	const __u32 quote = sizeof(struct ipv6hdr) + XLB_ICMP_QUOTE_L4;
	__u32 *w, w1, w10;
	__u64 sum;

	if (!have_node_addr(cfg, XLB_AF_INET6))
		return verdict(XLB_DROP_NO_NODE_ADDR, XDP_DROP);
	w = icmp_reply(ctx, p, hdr, quote, ETH_P_IPV6);
	if (!w)
		return verdict(XLB_DROP_ENCAP, XDP_DROP);
	/* IPv6 header: version 6, traffic class and flow label 0, payload
	 * length, next header ICMPv6, hop limit 64; node -> client */
	w1 = bpf_htons(sizeof(struct icmp6hdr) + quote) | (__u32)IPPROTO_ICMPV6 << 16 | (__u32)64 << 24;
	w[0] = bpf_htonl(6 << 28);
	w[1] = w1;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		w[2 + i] = cfg->node6[i];
		w[6 + i] = p->flow.src[i];
	}
	/* ICMPv6: type 2, code 0, checksum; MTU; the quote (words 12..23).
	 * The checksum covers the pseudo header: addresses, upper-layer
	 * length, next header. */
	w10 = bpf_htonl(mtu < 1280 ? 1280 : mtu);
	sum = (__u64)ICMPV6_PKT_TOOBIG + w10 + bpf_htonl(sizeof(struct icmp6hdr) + quote) + bpf_htonl(IPPROTO_ICMPV6);
#pragma unroll
	for (int i = 2; i < 10; i++)
		sum += w[i];
#pragma unroll
	for (int i = 12; i < 24; i++)
		sum += w[i];
	w[10] = ICMPV6_PKT_TOOBIG | (__u32)(__u16)~csum_fold64(sum) << 16;
	w[11] = w10;
	return tx_built(XLB_TX_TOO_BIG);
}

/* XLB_GROW_MAX is the most a dispatch adds: Geneve over IPv6 for an IPv6
 * service. */
#define XLB_GROW_MAX (sizeof(struct ipv6hdr) + sizeof(struct udphdr) + sizeof(struct genevehdr_) + sizeof(struct geneve_opt_hdr) + 20)

/* encap_growth is what the dispatch of ct adds to the packet. */
static __always_inline __u32 encap_growth(const struct pkt *p, const struct xlb_ct *ct)
{
	__u32 outer = ct->be.tunnel_family == XLB_AF_INET6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
	int svc6 = p->flow.family == XLB_AF_INET6;

	switch (ct->action) {
	case XLB_ACT_GENEVE:
		return outer + sizeof(struct udphdr) + sizeof(struct genevehdr_) + sizeof(struct geneve_opt_hdr) + (svc6 ? 20 : 8);
	case XLB_ACT_OPT:
		return svc6 ? XLB_IP6OPT_HDRLEN : XLB_IPOPT_LEN;
	case XLB_ACT_SNAT:
		return 0;
	}
	return outer;
}

/* too_big answers (see frag_needed4, packet_too_big6) a client packet that
 * would not fit the device's MTU once encapsulated for ct, and returns
 * LB_CONTINUE for one that fits. Only packets that would grow beyond
 * XLB_MTU_CHECK_MIN are checked (bpf_check_mtu: the MTU of the device the
 * packet came in on, which XDP_TX sends it out of). */
static __always_inline int too_big(struct xdp_md *ctx, const struct pkt *p, const struct xlb_config *cfg,
				   const struct xlb_ct *ct)
{
	__u32 grow, mtu = p->ip_len;

	/* the common case in one comparison: small enough for any dispatch */
	if (p->ip_len + XLB_GROW_MAX <= XLB_MTU_CHECK_MIN)
		return LB_CONTINUE;
	grow = encap_growth(p, ct);
	if (p->ip_len + grow <= XLB_MTU_CHECK_MIN)
		return LB_CONTINUE;
	if (bpf_check_mtu(ctx, 0, &mtu, (__s32)grow, 0) != BPF_MTU_CHK_RET_FRAG_NEEDED)
		return LB_CONTINUE;
	mtu = mtu > grow ? mtu - grow : 0;
	if (p->flow.family == XLB_AF_INET)
		return frag_needed4(ctx, p, cfg, mtu);
	return packet_too_big6(ctx, p, cfg, mtu);
}

/* ---- backend selection ---- */

/* slot_hash is the Maglev flow hash that picks a new flow's slot: of its
 * 5-tuple, or for client-IP affinity of the same with the client's port
 * zeroed. ports is the raw __u32 of the transport header's first four
 * bytes: on bpfel the source port is its low half. */
static __always_inline __u32 slot_hash(const struct xlb_service *svc, const __u32 *src, const __u32 *dst,
				       __u32 ports, __u8 proto, int v4, __u32 seed)
{
	if (svc->flags & XLB_SVC_CLIENT_IP)
		ports &= 0xffff0000;
	return flow_hash(src, dst, ports, proto, v4, seed);
}

/* pick fills ct with the backend owning slot hash % M of the service's
 * Maglev table. */
static __always_inline int pick(const struct xlb_service *svc, __u32 hash, struct xlb_ct *ct)
{
	struct xlb_backend *be;
	__u32 slot, *id;
	void *table;

	if (svc->size == 0)
		return -1;
	table = bpf_map_lookup_elem(&lb_tables, &svc->id);
	if (!table)
		return -1;
	slot = hash % svc->size;
	id = bpf_map_lookup_elem(table, &slot);
	if (!id)
		return -1;
	be = bpf_map_lookup_elem(&lb_backends, id);
	if (!be)
		return -1;
	ct->be = *be;
	ct->be_id = *id;
	ct->svc_id = svc->id;
	return 0;
}

static __always_inline __u8 action_for(const struct xlb_service *svc, __u8 proto)
{
	if (svc->mode == XLB_MODE_SNAT || (svc->mode == XLB_MODE_HYBRID && proto == IPPROTO_UDP))
		return XLB_ACT_SNAT;
	if (svc->dispatch == XLB_DISPATCH_GENEVE)
		return XLB_ACT_GENEVE;
	if (svc->dispatch == XLB_DISPATCH_OPT)
		return XLB_ACT_OPT;
	return XLB_ACT_IPIP;
}

static __always_inline int same_snat(const struct xlb_snat *a, const struct xlb_snat *b)
{
	return a->client[0] == b->client[0] && a->client[1] == b->client[1] && a->client[2] == b->client[2] &&
	       a->client[3] == b->client[3] && a->vip[0] == b->vip[0] && a->vip[1] == b->vip[1] &&
	       a->vip[2] == b->vip[2] && a->vip[3] == b->vip[3] && a->client_port == b->client_port &&
	       a->vip_port == b->vip_port;
}

/* snat_claim makes sure the flow owns a node port towards its backend:
 * ct->snat_port if set and still ours, otherwise the first free port from a
 * hash-derived start in the configured range. */
static __always_inline int snat_claim(const struct pkt *p, struct xlb_ct *ct, const struct xlb_config *cfg, __u32 hash)
{
	struct xlb_snat_key k = {};
	struct xlb_snat v = {};
	struct xlb_snat *old;
	__u32 lo = cfg->snat_lo, hi = cfg->snat_hi, port;

	if (lo == 0 || hi < lo)
		return -1;
	__builtin_memcpy(k.backend, ct->be.addr, 16);
	k.backend_port = ct->be.port;
	k.proto = p->flow.proto;
	k.family = p->flow.family;
	__builtin_memcpy(v.client, p->flow.src, 16);
	__builtin_memcpy(v.vip, p->flow.dst, 16);
	v.client_port = p->flow.sport;
	v.vip_port = p->flow.dport;
	v.svc_id = ct->svc_id;
	v.be_id = ct->be_id;
	if (ct->snat_port) {
		k.node_port = ct->snat_port;
		old = bpf_map_lookup_elem(&lb_snat, &k);
		if (old && same_snat(old, &v))
			return 0;
		if (!old && !bpf_map_update_elem(&lb_snat, &k, &v, BPF_NOEXIST))
			return 0;
	}
	port = lo + (hash >> 8) % (hi - lo + 1);
	for (int i = 0; i < SNAT_PROBES; i++) {
		k.node_port = bpf_htons(port);
		if (!bpf_map_update_elem(&lb_snat, &k, &v, BPF_NOEXIST)) {
			ct->snat_port = k.node_port;
			return 0;
		}
		old = bpf_map_lookup_elem(&lb_snat, &k);
		if (old && same_snat(old, &v)) {
			ct->snat_port = k.node_port;
			return 0;
		}
		port = port >= hi ? lo : port + 1;
	}
	return -1;
}

static __always_inline int snat_forward(struct xdp_md *ctx, const struct pkt *p, const struct xlb_config *cfg,
					const struct xlb_ct *ct)
{
	__u32 node[4] = {};

	if (p->flow.family == XLB_AF_INET6)
		__builtin_memcpy(node, cfg->node6, 16);
	else
		node[0] = cfg->node4;
	if (rewrite(ctx, p, node, ct->snat_port, ct->be.addr, ct->be.port, 1))
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	return tx(ctx, XLB_TX_SNAT);
}

/* forward sends a client -> VIP packet to its backend: that of ct when hit
 * (the flow's valid conntrack entry; a RST deletes it), or else one picked
 * from the table of svc into ct. hash is its xlb_ct_hash. One struct for
 * both: the program's stack is near its limit. */
static __always_inline int forward(struct xdp_md *ctx, struct pkt *p, struct xlb_config *cfg,
				   const struct xlb_service *svc, struct xlb_ct *ct, int hit, int syn, int rst,
				   __u32 hash)
{
	__u16 snat_port = 0;
	int fresh = 0;

	if (hit) {
		snat_port = ct->snat_port;
		stat_inc(XLB_EV_CT_HIT);
	} else {
		if (!svc)
			return verdict(XLB_PASS_NOT_VIP, XDP_PASS);
		__builtin_memset(ct, 0, sizeof(*ct));
		ct->hash = hash;
		if (pick(svc, slot_hash(svc, p->flow.src, p->flow.dst, p->ports, p->flow.proto,
					p->flow.family == XLB_AF_INET, cfg->seed), ct)) {
			struct xlb_svc_stats *s = bpf_map_lookup_elem(&lb_svc_stats, &svc->id);

			if (s)
				s->no_backend++;
			return verdict(XLB_DROP_NO_BACKEND, XDP_DROP);
		}
		ct->action = action_for(svc, p->flow.proto);
		ct->gen = svc->gen;
		fresh = 1;
		stat_inc(XLB_EV_CT_NEW);
		if (p->flow.proto == IPPROTO_TCP && !syn)
			stat_inc(XLB_EV_CT_MIDFLOW);
	}
	if (ct->action == XLB_ACT_SNAT) {
		if (!have_node_addr(cfg, p->flow.family))
			return verdict(XLB_DROP_NO_NODE_ADDR, XDP_DROP);
		/* an established flow's new port (if its own was lost) is
		 * written to its entry below */
		if (snat_claim(p, ct, cfg, ct->hash))
			return verdict(XLB_DROP_NO_SNAT_PORT, XDP_DROP);
	}
	/* Before the entry is made: a first packet answered "too big" starts
	 * no flow (the client's smaller resend does, and is counted). */
	if (ct->action != XLB_ACT_SNAT) {
		int big = too_big(ctx, p, cfg, ct);

		if (big != LB_CONTINUE)
			return big;
	}
	if (rst) {
		if (hit) {
			ct_del(cfg, &p->flow, hash);
			stat_inc(XLB_EV_CT_RST);
		}
	} else if (fresh || ct->snat_port != snat_port) {
		ct_set(cfg, &p->flow, ct);
	}
	svc_count(ct->svc_id, p->frame_len, fresh);
	be_count(ct->be_id, p->frame_len, fresh);

	switch (ct->action) {
	case XLB_ACT_SNAT:
		return snat_forward(ctx, p, cfg, ct);
	case XLB_ACT_GENEVE:
		if (rewrite(ctx, p, 0, 0, ct->be.addr, ct->be.port, 0))
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		return encap_geneve(ctx, p, cfg, &ct->be, ct->hash, p->flow.dst, p->flow.dport, XLB_TX_GENEVE);
	case XLB_ACT_OPT:
		if (rewrite(ctx, p, 0, 0, ct->be.addr, ct->be.port, 0))
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		if (p->flow.family == XLB_AF_INET6)
			return insert_opt6(ctx, p, p->flow.dst, p->flow.dport, XLB_TX_OPT);
		return insert_opt4(ctx, p, p->flow.dst, p->flow.dport, XLB_TX_OPT);
	default:
		return encap_ipip(ctx, p, cfg, &ct->be, ct->hash, XLB_TX_IPIP);
	}
}

/* to_node reports whether the packet is addressed to the node address of
 * its family. */
static __always_inline int to_node(const struct xlb_config *cfg, const struct pkt *p)
{
	if (p->flow.family == XLB_AF_INET)
		return cfg->node4 && p->flow.dst[0] == cfg->node4;
	return have_node_addr(cfg, XLB_AF_INET6) && p->flow.dst[0] == cfg->node6[0] &&
	       p->flow.dst[1] == cfg->node6[1] && p->flow.dst[2] == cfg->node6[2] && p->flow.dst[3] == cfg->node6[3];
}

/* snat_of finds the SNATed flow a packet from a backend to the node address
 * (p: a whole datagram or a first fragment) replies to. */
static __always_inline struct xlb_snat *snat_of(const struct xlb_config *cfg, const struct pkt *p)
{
	struct xlb_snat_key k = {};

	if (!to_node(cfg, p))
		return 0;
	__builtin_memcpy(k.backend, p->flow.src, 16);
	k.backend_port = p->flow.sport;
	k.node_port = p->flow.dport;
	k.proto = p->flow.proto;
	k.family = p->flow.family;
	return bpf_map_lookup_elem(&lb_snat, &k);
}

/* snat_reply handles a packet for no frontend: if it is a backend's reply
 * to a SNATed flow, it is rewritten to VIP -> client and bounced. */
static __always_inline int snat_reply(struct xdp_md *ctx, struct pkt *p)
{
	__u32 zero = 0;
	struct xlb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	struct xlb_snat *s;

	if (!cfg)
		return verdict(XLB_PASS_NOT_VIP, XDP_PASS);
	s = snat_of(cfg, p);
	if (!s)
		return verdict(XLB_PASS_NOT_VIP, XDP_PASS);
	svc_count(s->svc_id, p->frame_len, 0);
	be_count(s->be_id, p->frame_len, 0);
	if (rewrite(ctx, p, s->vip, s->vip_port, s->client, s->client_port, 1))
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	return tx(ctx, XLB_TX_SNAT_REPLY);
}

/* snat_frag handles an IPv4 or IPv6 fragment. Fragments of a backend's
 * reply to a SNATed flow (a UDP reply larger than the backend's MTU) are
 * rewritten like the whole datagram: the first, which carries the ports,
 * through lb_snat, recording what its addresses became in lb_frags under
 * (backend, node address, IP identification, protocol); the later ones
 * from that record, deleted with the last fragment. A sender's fragments
 * leave it first to last. Any other fragment, or a later one without its
 * record (counted), goes to the kernel. */
static __always_inline int snat_frag(struct xdp_md *ctx, struct pkt *p)
{
	__u32 zero = 0;
	struct xlb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	struct xlb_frag_key fk = {};
	struct xlb_frag fv = {};
	struct xlb_snat *s;

	if (!cfg || (p->flow.proto != IPPROTO_TCP && p->flow.proto != IPPROTO_UDP) || !to_node(cfg, p))
		return verdict(XLB_PASS_FRAGMENT, XDP_PASS);
	__builtin_memcpy(fk.src, p->flow.src, 16);
	__builtin_memcpy(fk.dst, p->flow.dst, 16);
	fk.id = p->frag_id;
	fk.proto = p->flow.proto;
	fk.family = p->flow.family;
	if (p->frag == FRAG_LATER) {
		struct xlb_frag *f = bpf_map_lookup_elem(&lb_frags, &fk);

		if (!f) {
			stat_inc(XLB_EV_FRAG_UNKNOWN);
			return verdict(XLB_PASS_FRAGMENT, XDP_PASS);
		}
		fv = *f;
		if (!p->more)
			bpf_map_delete_elem(&lb_frags, &fk);
		stat_inc(XLB_EV_FRAG_LATER);
	} else {
		s = snat_of(cfg, p);
		if (!s)
			return verdict(XLB_PASS_FRAGMENT, XDP_PASS);
		__builtin_memcpy(fv.src, s->vip, 16);
		__builtin_memcpy(fv.dst, s->client, 16);
		fv.svc_id = s->svc_id;
		fv.be_id = s->be_id;
		bpf_map_update_elem(&lb_frags, &fk, &fv, BPF_ANY);
		stat_inc(XLB_EV_FRAG_FIRST);
		p->flow.sport = s->vip_port;
		p->flow.dport = s->client_port;
	}
	svc_count(fv.svc_id, p->frame_len, 0);
	be_count(fv.be_id, p->frame_len, 0);
	if (rewrite(ctx, p, fv.src, p->flow.sport, fv.dst, p->flow.dport, 1))
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	return tx(ctx, XLB_TX_SNAT_REPLY);
}

/* ip4_header_ok verifies the IPv4 header checksum of a VIP packet. */
static __always_inline int ip4_header_ok(struct xdp_md *ctx, const struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + l2_len(p);

	if ((void *)(ip + 1) > end)
		return 0;
	return ip4_csum20(ip) == 0;
}

/* lb_l4 is the common path once the 5-tuple is known. An established flow
 * (conntrack hit of a live service generation; a SYN always picks afresh)
 * needs no frontend lookup. */
static __always_inline int lb_l4(struct xdp_md *ctx, struct pkt *p, __u8 ttl)
{
	__u32 zero = 0;
	struct xlb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	struct xlb_service *svc = 0;
	struct xlb_ct cur;
	int syn = 0, rst = 0, hit = 0;
	__u32 hash;

	if (!cfg)
		return verdict(XLB_PASS_NOT_VIP, XDP_PASS);
	if (p->flow.proto == IPPROTO_TCP) {
		syn = (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
		rst = p->tcp_flags & TCP_FLAG_RST;
	}
	hash = xlb_ct_hash(&p->flow, cfg->seed);
	/* stale when its service is gone: a new flow if the frontend still exists */
	if (!syn && !ct_get(cfg, &p->flow, hash, &cur) && ct_live(&cur))
		hit = 1;
	if (!hit) {
		struct xlb_vip key = {};

		__builtin_memcpy(key.addr, p->flow.dst, 16);
		key.port = p->flow.dport;
		key.proto = p->flow.proto;
		key.family = p->flow.family;
		svc = bpf_map_lookup_elem(&lb_services, &key);
		if (!svc)
			return snat_reply(ctx, p);
	}
	if (ttl <= 1)
		return verdict(XLB_PASS_TTL, XDP_PASS);
	if (p->flow.family == XLB_AF_INET && !ip4_header_ok(ctx, p))
		return verdict(XLB_PASS_BAD_CSUM, XDP_PASS);
	return forward(ctx, p, cfg, svc, &cur, hit, syn, rst, hash);
}

/* set_addr4w writes the 4-word address to into a (words of the packet) and
 * adds the change to the accumulators *d1 and *d2. */
static __always_inline void set_addr4w(__u32 *a, const __u32 *to, int v6, __u32 *d1, __u32 *d2)
{
	if (!v6) {
		*d1 = csum_diff4(*d1, a[0], to[0]);
		*d2 = csum_diff4(*d2, a[0], to[0]);
		a[0] = to[0];
		return;
	}
#pragma unroll
	for (int i = 0; i < 4; i++) {
		*d1 = csum_diff4(*d1, a[i], to[i]);
		*d2 = csum_diff4(*d2, a[i], to[i]);
		a[i] = to[i];
	}
}

/* icmp_nat translates, in place, an ICMP error (IPv4 frag-needed or ICMPv6
 * packet-too-big) about a reply that left as VIP:port -> client into the
 * error the backend's own socket expects: the outer destination becomes
 * odst (and the outer source osrc, if given); the quoted packet's source
 * becomes esrc:esport (and its destination edst:edport, if given). Every
 * checksum follows: the outer IPv4 header, the ICMP checksum (ICMPv6: with
 * its pseudo header), the quoted IPv4 header, and the quoted UDP/TCP
 * checksum when the quote reaches it. The caller checked that the quote
 * holds an IP header without options and 4 bytes of ports. */
static __always_inline int icmp_nat(struct xdp_md *ctx, const struct pkt *p, const __u32 *osrc, const __u32 *odst,
				    const __u32 *esrc, __u16 esport, const __u32 *edst, __u16 edport)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	int v6 = p->flow.family == XLB_AF_INET6;
	__u32 od = 0, icd = 0, ed = 0, l4d = 0, unused = 0;
	__u16 *eports, *check, *l4check, nc;
	__u8 eproto;

	if (!v6) {
		struct iphdr *ip = data + l2_len(p);
		struct icmphdr_ *ic = (void *)(ip + 1);
		struct iphdr *in = (void *)(ic + 1);

		eports = (void *)(in + 1);
		if ((void *)(eports + 2) > end)
			return -1;
		if (osrc)
			set_addr4w(&ip->saddr, osrc, 0, &od, &unused);
		set_addr4w(&ip->daddr, odst, 0, &od, &unused);
		ip->check = csum_apply(ip->check, od);
		/* the quoted header: the ICMP checksum covers it, its own
		 * checksum covers the addresses, its L4 checksum too */
		set_addr4w(&in->saddr, esrc, 0, &ed, &l4d);
		if (edst)
			set_addr4w(&in->daddr, edst, 0, &ed, &l4d);
		nc = csum_apply(in->check, ed);
		icd = csum_diff2(csum_add(icd, ed), in->check, nc);
		in->check = nc;
		eproto = in->protocol;
		check = &ic->checksum;
	} else {
		struct ipv6hdr *ip6 = data + l2_len(p);
		struct icmp6hdr *ic = (void *)(ip6 + 1);
		struct ipv6hdr *in = (void *)(ic + 1);

		eports = (void *)(in + 1);
		if ((void *)(eports + 2) > end)
			return -1;
		/* the ICMPv6 checksum covers the outer addresses (pseudo
		 * header) and the quoted packet */
		if (osrc)
			set_addr4w(ip6->saddr.in6_u.u6_addr32, osrc, 1, &icd, &unused);
		set_addr4w(ip6->daddr.in6_u.u6_addr32, odst, 1, &icd, &unused);
		set_addr4w(in->saddr.in6_u.u6_addr32, esrc, 1, &icd, &l4d);
		if (edst)
			set_addr4w(in->daddr.in6_u.u6_addr32, edst, 1, &icd, &l4d);
		eproto = in->nexthdr;
		check = &ic->icmp6_cksum;
	}
	l4d = csum_diff2(l4d, eports[0], esport);
	icd = csum_diff2(icd, eports[0], esport);
	eports[0] = esport;
	if (edst) {
		l4d = csum_diff2(l4d, eports[1], edport);
		icd = csum_diff2(icd, eports[1], edport);
		eports[1] = edport;
	}
	l4check = (void *)eports + (eproto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
	/* a UDP checksum of 0 is "none" (IPv4) or invalid: left alone */
	if ((void *)(l4check + 1) <= end && *l4check) {
		nc = csum_apply(*l4check, l4d);
		if (eproto == IPPROTO_UDP && !nc)
			nc = 0xffff;
		icd = csum_diff2(icd, *l4check, nc);
		*l4check = nc;
	}
	if ((void *)(check + 1) > end)
		return -1;
	*check = csum_apply(*check, icd);
	return 0;
}

/* icmp_error sends an ICMP error about a VIP flow on to that flow's
 * backend, the way the flow's own packets go: IPIP (the backend side
 * translates it), or translated here and sent by Geneve or with the service
 * option (DSR; with the option from the node address), or translated back
 * like a reply and bounced to the backend (SNAT: the backend's socket is
 * connected to the node address and port).
 * The quoted packet is a reply VIP -> client; the flow is its reverse.
 * esrc/edst are the quoted addresses, in the outer packet's family. */
static __always_inline int icmp_error(struct xdp_md *ctx, struct pkt *p, const __u32 *esrc, const __u32 *edst,
				      __u16 esport, __u16 edport, __u8 eproto, __u8 ttl)
{
	__u32 zero = 0, hash, ports;
	struct xlb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	struct xlb_vip key = {};
	struct xlb_service *svc;
	struct xlb_flow flow = {};
	struct xlb_ct ct = {};
	__u32 vip[4], node[4] = {};
	int hit;

	__builtin_memcpy(key.addr, esrc, 16);
	key.port = esport;
	key.proto = eproto;
	key.family = p->flow.family;
	svc = bpf_map_lookup_elem(&lb_services, &key);
	if (!svc || !cfg)
		return verdict(XLB_PASS_ICMP, XDP_PASS);
	if (ttl <= 1)
		return verdict(XLB_PASS_TTL, XDP_PASS);
	__builtin_memcpy(flow.src, edst, 16);
	__builtin_memcpy(flow.dst, esrc, 16);
	__builtin_memcpy(vip, esrc, 16);
	ports = (__u32)edport | (__u32)esport << 16;
	*(__u32 *)&flow.sport = ports; /* one store: read as one word */
	flow.proto = eproto;
	flow.family = p->flow.family;
	hash = xlb_ct_hash(&flow, cfg->seed);
	hit = !ct_get(cfg, &flow, hash, &ct) && ct_live(&ct);
	if (!hit) {
		if (pick(svc, slot_hash(svc, flow.src, flow.dst, ports, eproto, flow.family == XLB_AF_INET, cfg->seed), &ct))
			return verdict(XLB_PASS_ICMP, XDP_PASS);
		ct.action = action_for(svc, eproto);
	}
	if (p->flow.family == XLB_AF_INET6)
		__builtin_memcpy(node, cfg->node6, 16);
	else
		node[0] = cfg->node4;
	if (ct.action == XLB_ACT_SNAT) {
		/* without its conntrack entry the flow's node port is unknown */
		if (!hit || !ct.snat_port || !have_node_addr(cfg, p->flow.family))
			return verdict(XLB_PASS_ICMP, XDP_PASS);
		svc_count(ct.svc_id, p->frame_len, 0);
		be_count(ct.be_id, p->frame_len, 0);
		if (icmp_nat(ctx, p, node, ct.be.addr, ct.be.addr, ct.be.port, node, ct.snat_port))
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		return tx(ctx, XLB_TX_ICMP);
	}
	svc_count(ct.svc_id, p->frame_len, 0);
	be_count(ct.be_id, p->frame_len, 0);
	switch (ct.action) {
	case XLB_ACT_GENEVE:
		if (icmp_nat(ctx, p, 0, ct.be.addr, ct.be.addr, ct.be.port, 0, 0))
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		return encap_geneve(ctx, p, cfg, &ct.be, hash, vip, esport, XLB_TX_ICMP);
	case XLB_ACT_OPT:
		/* Routed as it is, back through the router that sent it,
		 * which would drop a packet from its own address: it leaves
		 * from the node address. */
		if (!have_node_addr(cfg, p->flow.family))
			return verdict(XLB_DROP_NO_NODE_ADDR, XDP_DROP);
		if (icmp_nat(ctx, p, node, ct.be.addr, ct.be.addr, ct.be.port, 0, 0))
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		if (p->flow.family == XLB_AF_INET6)
			return insert_opt6(ctx, p, vip, esport, XLB_TX_ICMP);
		return insert_opt4(ctx, p, vip, esport, XLB_TX_ICMP);
	default:
		return encap_ipip(ctx, p, cfg, &ct.be, hash, XLB_TX_ICMP);
	}
}


static __always_inline int handle_v4(struct xdp_md *ctx, struct pkt *p, __u8 *ttl)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + l2_len(p);
	__u32 tot;

	if ((void *)(ip + 1) > end)
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	if (ip->version != 4 || ip->ihl < 5)
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	if (ip->ihl != 5)
		return verdict(XLB_PASS_IP_OPTIONS, XDP_PASS);
	tot = bpf_ntohs(ip->tot_len);
	if (tot < sizeof(*ip) || (void *)ip + tot > end)
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	p->ip_len = tot;
	p->tos = ip->tos;
	p->flow.family = XLB_AF_INET;
	p->flow.proto = ip->protocol;
	p->flow.src[0] = ip->saddr;
	p->flow.dst[0] = ip->daddr;
	if (ip->frag_off & bpf_htons(IP_MF_ | IP_OFFSET_)) {
		p->frag_id = ip->id;
		p->more = (ip->frag_off & bpf_htons(IP_MF_)) != 0;
		if (ip->frag_off & bpf_htons(IP_OFFSET_)) {
			p->frag = FRAG_LATER;
			return LB_FRAG;
		}
		p->frag = FRAG_FIRST;
	}

	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(ip + 1);

		if ((void *)(th + 1) > end || tot < sizeof(*ip) + sizeof(*th))
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		p->ports = *(__u32 *)th;
		/* one store: the conntrack reads sport and dport as one word */
		*(__u32 *)&p->flow.sport = p->ports;
		p->tcp_flags = ((__u8 *)th)[13];
		*ttl = ip->ttl;
		return p->frag ? LB_FRAG : LB_CONTINUE;
	}
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(ip + 1);

		if ((void *)(uh + 1) > end || tot < sizeof(*ip) + sizeof(*uh))
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		p->ports = *(__u32 *)uh;
		/* one store: the conntrack reads sport and dport as one word */
		*(__u32 *)&p->flow.sport = p->ports;
		*ttl = ip->ttl;
		return p->frag ? LB_FRAG : LB_CONTINUE;
	}
	if (p->frag)
		return verdict(XLB_PASS_FRAGMENT, XDP_PASS);
	if (ip->protocol == IPPROTO_ICMP) {
		struct icmphdr_ *ic = (void *)(ip + 1);
		struct iphdr *in = (void *)(ic + 1);
		__u16 *eports = (void *)(in + 1);
		__u32 es[4] = {}, ed[4] = {};

		if ((void *)(ic + 1) > end)
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		if (ic->type != ICMP_DEST_UNREACH_ || ic->code != ICMP_FRAG_NEEDED_)
			return verdict(XLB_PASS_ICMP, XDP_PASS);
		if ((void *)(eports + 2) > end)
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		if (in->version != 4 || in->ihl != 5 ||
		    (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP))
			return verdict(XLB_PASS_ICMP, XDP_PASS);
		if (ip4_csum20(ip) != 0)
			return verdict(XLB_PASS_ICMP, XDP_PASS);
		es[0] = in->saddr;
		ed[0] = in->daddr;
		return icmp_error(ctx, p, es, ed, eports[0], eports[1], in->protocol, ip->ttl);
	}
	return verdict(XLB_PASS_NOT_VIP, XDP_PASS);
}

static __always_inline int is_ext_header(__u8 nh)
{
	switch (nh) {
	case 0:   /* hop-by-hop */
	case 43:  /* routing */
	case 50:  /* ESP */
	case 51:  /* AH */
	case 60:  /* destination options */
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
		return 1;
	}
	return 0;
}

static __always_inline int handle_v6(struct xdp_md *ctx, struct pkt *p, __u8 *ttl)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + l2_len(p);
	void *l4;
	__u32 plen, hlen = 0;
	__u8 nh;

	if ((void *)(ip6 + 1) > end)
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	if (ip6->version != 6)
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	plen = bpf_ntohs(ip6->payload_len);
	if ((void *)(ip6 + 1) + plen > end)
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	p->ip_len = sizeof(*ip6) + plen;
	p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
	p->flow.family = XLB_AF_INET6;
	__builtin_memcpy(p->flow.src, &ip6->saddr, 16);
	__builtin_memcpy(p->flow.dst, &ip6->daddr, 16);
	nh = ip6->nexthdr;
	l4 = ip6 + 1;
	if (nh == 44) {
		struct frag6hdr *fh = l4;

		if ((void *)(fh + 1) > end || plen < sizeof(*fh))
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		nh = fh->nexthdr;
		p->frag_id = fh->id;
		p->more = (fh->frag_off & bpf_htons(1)) != 0;
		p->flow.proto = nh;
		if (fh->frag_off & bpf_htons(0xfff8)) {
			p->frag = FRAG_LATER;
			return LB_FRAG;
		}
		p->frag = FRAG_FIRST;
		l4 = fh + 1;
		hlen = sizeof(*fh);
	}
	if (is_ext_header(nh))
		return verdict(p->frag ? XLB_PASS_FRAGMENT : XLB_PASS_IP_OPTIONS, XDP_PASS);
	p->flow.proto = nh;

	if (nh == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end || plen < hlen + sizeof(*th))
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		p->ports = *(__u32 *)th;
		/* one store: the conntrack reads sport and dport as one word */
		*(__u32 *)&p->flow.sport = p->ports;
		p->tcp_flags = ((__u8 *)th)[13];
		*ttl = ip6->hop_limit;
		return p->frag ? LB_FRAG : LB_CONTINUE;
	}
	if (nh == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > end || plen < hlen + sizeof(*uh))
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		p->ports = *(__u32 *)uh;
		/* one store: the conntrack reads sport and dport as one word */
		*(__u32 *)&p->flow.sport = p->ports;
		*ttl = ip6->hop_limit;
		return p->frag ? LB_FRAG : LB_CONTINUE;
	}
	if (p->frag)
		return verdict(XLB_PASS_FRAGMENT, XDP_PASS);
	if (nh == IPPROTO_ICMPV6) {
		struct icmp6hdr *ic = (void *)(ip6 + 1);
		struct ipv6hdr *in = (void *)(ic + 1);
		__u16 *eports = (void *)(in + 1);
		__u32 es[4], ed[4];

		if ((void *)(ic + 1) > end)
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		if (ic->icmp6_type != ICMPV6_PKT_TOOBIG)
			return verdict(XLB_PASS_ICMP, XDP_PASS);
		if ((void *)(eports + 2) > end)
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		if (in->version != 6 || (in->nexthdr != IPPROTO_TCP && in->nexthdr != IPPROTO_UDP))
			return verdict(XLB_PASS_ICMP, XDP_PASS);
		__builtin_memcpy(es, &in->saddr, 16);
		__builtin_memcpy(ed, &in->daddr, 16);
		return icmp_error(ctx, p, es, ed, eports[0], eports[1], in->nexthdr, ip6->hop_limit);
	}
	return verdict(XLB_PASS_NOT_VIP, XDP_PASS);
}

SEC("xdp")
int xdplb(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct pkt p = {};
	__be16 proto;
	__u8 ttl = 0;
	int ret;

	if ((void *)(eth + 1) > end)
		return verdict(XLB_PASS_MALFORMED, XDP_PASS);
	p.frame_len = end - data;
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q_) || proto == bpf_htons(ETH_P_8021AD_)) {
		struct vlanhdr *vh = (void *)(eth + 1);

		if ((void *)(vh + 1) > end)
			return verdict(XLB_PASS_MALFORMED, XDP_PASS);
		proto = vh->proto;
		p.vlan = 1;
	}
	if (proto == bpf_htons(ETH_P_IP))
		ret = handle_v4(ctx, &p, &ttl);
	else if (proto == bpf_htons(ETH_P_IPV6))
		ret = handle_v6(ctx, &p, &ttl);
	else
		return verdict(XLB_PASS_NOT_IP, XDP_PASS);
	if (ret == LB_FRAG)
		return snat_frag(ctx, &p);
	if (ret != LB_CONTINUE)
		return ret;
	return lb_l4(ctx, &p, ttl);
}

/* xdp_pass is attached to the peer of a veth the load balancer runs on:
 * a veth drops XDP_TX frames unless its peer runs an XDP program. */
SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
