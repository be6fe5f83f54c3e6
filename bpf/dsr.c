//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* dsr: the backend side of xdplb's direct server return, two tc (tcx)
 * programs on a backend's interface. This kernel has no ipip or geneve
 * module, so decapsulation is done here.
 *
 * dsr_ingress undoes each dispatch and hands the packet to the local stack
 * addressed to the backend's own socket (address and port):
 *
 *   - IPIP / IP6IP6 / 4in6 / 6in4: the inner packet is still addressed to
 *     the VIP. dsr_services maps (VIP, port, proto, tunnel address) to the
 *     local backend; the outer header is removed and the inner destination
 *     rewritten (DNAT) to the backend.
 *   - Geneve (UDP 6081, protocol type IPv4/IPv6, Shunt's option holding the
 *     service): the inner packet is already addressed to the backend; the
 *     outer headers are removed.
 *   - IPv4 option / IPv6 destination option holding the service: the
 *     packet is already addressed to the backend; the option is removed.
 *   - An ICMP "fragmentation needed" / "packet too big" the LB sent on in
 *     IPIP: decapsulated and translated so the backend's socket learns the
 *     path MTU (embedded source and outer destination VIP -> backend).
 *
 *   - An ICMP error the LB sent on by Geneve or with the service option
 *     (already translated there): decapsulated / option removed.
 *
 * In every case the service (VIP, port) is remembered in dsr_revnat, keyed by
 * the reply's 5-tuple. dsr_egress rewrites the source of those replies back
 * to VIP:port, so they go straight to the client, which sees the address it
 * connected to. A reply larger than the MTU (UDP) leaves in fragments, and
 * only the first carries the ports: its rewrite is recorded in dsr_frags
 * under (backend, client, IP identification, protocol) and applied to the
 * later fragments of the datagram, which Linux sends after the first
 * (ip_do_fragment / ip6_fragment emit them in order). Anything else passes
 * untouched.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmpv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/xdplb.h"
#include "lib/csum.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Newer than the installed UAPI headers (Linux 6.3). */
#define ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)

#define IP_MF_ 0x2000
#define IP_OFFSET_ 0x1fff
#define ICMP_DEST_UNREACH_ 3
#define ICMP_FRAG_NEEDED_ 4
#define IPPROTO_DSTOPTS_ 60
#define ETH_HLEN_ 14

/* An LRU: the agent never deletes the entry of a backend removed from its
 * service, so established flows the load balancer still sends there (from
 * its conntrack) keep working; stale entries are the first evicted. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct dsr_svc_key);
	__type(value, struct dsr_local);
	__uint(max_entries, 65536);
} dsr_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct xlb_flow);
	__type(value, struct dsr_orig);
	__uint(max_entries, 262144);
} dsr_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct xlb_meta);
	__uint(max_entries, 1);
} dsr_meta SEC(".maps");

/* Fragmented replies: the first fragment's new source, for the later
 * fragments of the datagram (deleted with the last one). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct xlb_frag_key);
	__type(value, struct xlb_frag);
	__uint(max_entries, 16384);
} dsr_frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, XLB_STAT_SLOTS);
} dsr_stats SEC(".maps");

_Static_assert((int)DSR_STAT_MAX <= (int)XLB_STAT_SLOTS, "dsr_stats has room for every counter");

const enum dsr_stat __unused_dsr_stat __attribute__((unused));
const enum xlb_layout __unused_xlb_layout __attribute__((unused));

struct icmphdr_ {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 rest;
};

struct genevehdr_ {
	__u8 ver_optlen;
	__u8 flags;
	__be16 proto;
	__u8 vni[3];
	__u8 rsvd;
};

struct geneve_opt_hdr {
	__be16 opt_class;
	__u8 type;
	__u8 length;
};

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&dsr_stats, &idx);

	if (v)
		*v += 1;
}

/* ensure makes the first n bytes linear (direct access), if the packet has them. */
static __always_inline void ensure(struct __sk_buff *skb, __u32 n)
{
	if ((void *)(long)skb->data + n > (void *)(long)skb->data_end && skb->len >= n)
		bpf_skb_pull_data(skb, n);
}

/* inner is a packet's 5-tuple as the backend's stack will see it. */
struct inner {
	__u32 src[4], dst[4];
	__u16 sport, dport;
	__u8 proto, family;
	__u16 l4_off; /* offset of the L4 header from the start of the frame */
	__u16 l3_off;
};

/* parse_l4 reads the ports of a TCP/UDP header at off. */
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, struct inner *in)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u16 *ports;

	if (in->proto != IPPROTO_TCP && in->proto != IPPROTO_UDP)
		return -1;
	off &= 0x1ff;
	ports = data + off;
	if ((void *)(ports + 2) > end)
		return -1;
	in->sport = ports[0];
	in->dport = ports[1];
	in->l4_off = off;
	return 0;
}

struct frag6hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset (8-byte units) << 3 | M */
	__be32 id;
};

/* parse_ip reads the IP header of family at off (IPv4 without options;
 * IPv6 without extension headers) and the ports after it. A fragment is
 * refused, unless first_frag is set and it is the first fragment (offset
 * 0; IPv6: a fragment header right after the IPv6 header). */
static __always_inline int parse_ip(struct __sk_buff *skb, __u32 off, __u8 family, struct inner *in, int first_frag)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	off &= 0xff;
	in->family = family;
	in->l3_off = off;
	if (family == XLB_AF_INET) {
		struct iphdr *ip = data + off;

		if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl != 5 ||
		    (ip->frag_off & bpf_htons(first_frag ? IP_OFFSET_ : IP_MF_ | IP_OFFSET_)))
			return -1;
		in->proto = ip->protocol;
		in->src[0] = ip->saddr;
		in->dst[0] = ip->daddr;
		return parse_l4(skb, off + sizeof(*ip), in);
	} else {
		struct ipv6hdr *ip6 = data + off;
		struct frag6hdr *fh = (void *)(ip6 + 1);

		if ((void *)(ip6 + 1) > end || ip6->version != 6)
			return -1;
		in->proto = ip6->nexthdr;
		__builtin_memcpy(in->src, &ip6->saddr, 16);
		__builtin_memcpy(in->dst, &ip6->daddr, 16);
		if (first_frag && ip6->nexthdr == 44) {
			if ((void *)(fh + 1) > end || (fh->frag_off & bpf_htons(0xfff8)))
				return -1;
			in->proto = fh->nexthdr;
			return parse_l4(skb, off + sizeof(*ip6) + sizeof(*fh), in);
		}
		return parse_l4(skb, off + sizeof(*ip6), in);
	}
}

/* remember stores the tuple of the replies of a flow from client (caddr,
 * cport) to the local backend (baddr, bport) with the service (VIP, port)
 * the client addressed. */
static __always_inline void remember(const __u32 *baddr, __u16 bport, const __u32 *caddr, __u16 cport, __u8 proto,
				     __u8 family, const __u32 *vip, __u16 vport)
{
	struct xlb_flow k = {};
	struct dsr_orig v = {};

	__builtin_memcpy(k.src, baddr, 16);
	__builtin_memcpy(k.dst, caddr, 16);
	k.sport = bport;
	k.dport = cport;
	k.proto = proto;
	k.family = family;
	__builtin_memcpy(v.vip, vip, 16);
	v.port = vport;
	if (bpf_map_update_elem(&dsr_revnat, &k, &v, BPF_ANY))
		stat_inc(DSR_REVNAT_FULL);
}

static __always_inline __u16 l4_check_off(__u8 proto)
{
	return proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check);
}

/* set_addr_port rewrites the source (src != 0) or destination address and
 * port of the IP packet at in->l3_off, fixing the IPv4 header and L4
 * checksums. */
static __always_inline int set_addr_port(struct __sk_buff *skb, const struct inner *in, const __u32 *addr, __u16 port,
					 int src)
{
	__u32 csum_off = in->l4_off + l4_check_off(in->proto);
	__u64 mangled0 = in->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u32 port_off = in->l4_off + (src ? 0 : 2);
	__u16 old_port = src ? in->sport : in->dport;

	if (in->family == XLB_AF_INET) {
		__u32 aoff = in->l3_off + (src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
		__u32 old = src ? in->src[0] : in->dst[0];

		if (bpf_l4_csum_replace(skb, csum_off, old, addr[0], BPF_F_PSEUDO_HDR | mangled0 | 4))
			return -1;
		if (bpf_l3_csum_replace(skb, in->l3_off + offsetof(struct iphdr, check), old, addr[0], 4))
			return -1;
		if (bpf_skb_store_bytes(skb, aoff, addr, 4, 0))
			return -1;
	} else {
		__u32 aoff = in->l3_off + (src ? offsetof(struct ipv6hdr, saddr) : offsetof(struct ipv6hdr, daddr));
		__s64 diff = bpf_csum_diff((__be32 *)(src ? in->src : in->dst), 16, (__be32 *)addr, 16, 0);

		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, csum_off, 0, (__u32)diff, BPF_F_PSEUDO_HDR | mangled0))
			return -1;
		if (bpf_skb_store_bytes(skb, aoff, addr, 16, 0))
			return -1;
	}
	if (bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled0 | 2))
		return -1;
	if (bpf_skb_store_bytes(skb, port_off, &port, 2, 0))
		return -1;
	return 0;
}

/* set_eth_proto sets the EtherType after a decapsulation changed the family. */
static __always_inline int set_eth_proto(struct __sk_buff *skb, __u8 family)
{
	__be16 p = bpf_htons(family == XLB_AF_INET6 ? ETH_P_IPV6 : ETH_P_IP);

	return bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &p, sizeof(p), 0);
}

/* decap removes len bytes of outer headers after the Ethernet header. */
static __always_inline int decap(struct __sk_buff *skb, __u32 len, __u8 inner_family)
{
	__u64 flags = inner_family == XLB_AF_INET6 ? ADJ_ROOM_DECAP_L3_IPV6 : ADJ_ROOM_DECAP_L3_IPV4;

	if (bpf_skb_adjust_room(skb, -(__s32)len, BPF_ADJ_ROOM_MAC, flags))
		return -1;
	return set_eth_proto(skb, inner_family);
}

/* quoted_l4_csum updates the UDP/TCP checksum of the packet quoted in an
 * ICMP error (L4 header at l4_off, the ICMP checksum at csum_off) for the
 * change diff of its addresses and ports, when the quote reaches it. */
static __always_inline int quoted_l4_csum(struct __sk_buff *skb, __u32 l4_off, __u8 proto, __u32 csum_off, __u32 diff)
{
	__u32 off = l4_off + l4_check_off(proto);
	__u16 old, nc;

	if (bpf_skb_load_bytes(skb, off, &old, sizeof(old)) || !old)
		return 0; /* not quoted, or a UDP datagram without checksum */
	nc = csum_apply(old, diff);
	if (proto == IPPROTO_UDP && !nc)
		nc = 0xffff;
	if (bpf_l4_csum_replace(skb, csum_off, old, nc, 2) || bpf_skb_store_bytes(skb, off, &nc, sizeof(nc), 0))
		return -1;
	return 0;
}

/* icmp_ptb translates an ICMP error about a DSR flow, just decapsulated, so
 * that the local socket (backend address and port) receives it. The
 * embedded packet is a reply: its source is the VIP. */
static __always_inline int icmp_ptb(struct __sk_buff *skb, __u8 family, const struct dsr_local *loc,
				    const __u32 *vip, __u16 vport, __u8 eproto)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 icmp_off, emb_off, csum_off;

	if (family == XLB_AF_INET) {
		struct iphdr *ip = data + ETH_HLEN_;
		struct iphdr *emb;
		__be16 old_ecsum;
		__u16 new_ecsum;

		icmp_off = ETH_HLEN_ + sizeof(struct iphdr);
		emb_off = icmp_off + sizeof(struct icmphdr_);
		csum_off = icmp_off + offsetof(struct icmphdr_, checksum);
		emb = data + emb_off;
		if ((void *)(ip + 1) > end || (void *)(emb + 1) > end)
			return -1;
		old_ecsum = emb->check;
		new_ecsum = csum_apply(old_ecsum, csum_diff4(0, vip[0], loc->addr[0]));
		/* outer destination VIP -> backend */
		if (bpf_l3_csum_replace(skb, ETH_HLEN_ + offsetof(struct iphdr, check), vip[0], loc->addr[0], 4) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN_ + offsetof(struct iphdr, daddr), &loc->addr[0], 4, 0))
			return -1;
		/* embedded source VIP:port -> backend, and its header checksum;
		 * the ICMP checksum covers all three */
		if (bpf_l4_csum_replace(skb, csum_off, vip[0], loc->addr[0], 4) ||
		    bpf_l4_csum_replace(skb, csum_off, old_ecsum, new_ecsum, 2) ||
		    bpf_l4_csum_replace(skb, csum_off, vport, loc->port, 2))
			return -1;
		if (bpf_skb_store_bytes(skb, emb_off + offsetof(struct iphdr, saddr), &loc->addr[0], 4, 0) ||
		    bpf_skb_store_bytes(skb, emb_off + offsetof(struct iphdr, check), &new_ecsum, 2, 0) ||
		    bpf_skb_store_bytes(skb, emb_off + sizeof(struct iphdr), &loc->port, 2, 0))
			return -1;
		return quoted_l4_csum(skb, emb_off + sizeof(struct iphdr), eproto, csum_off,
				      csum_diff2(csum_diff4(0, vip[0], loc->addr[0]), vport, loc->port));
	} else {
		__s64 diff = bpf_csum_diff((__be32 *)vip, 16, (__be32 *)loc->addr, 16, 0);

		icmp_off = ETH_HLEN_ + sizeof(struct ipv6hdr);
		emb_off = icmp_off + sizeof(struct icmp6hdr);
		csum_off = icmp_off + offsetof(struct icmp6hdr, icmp6_cksum);
		if (diff < 0)
			return -1;
		/* the ICMPv6 checksum covers the pseudo header (outer
		 * destination) and the embedded source address and port */
		if (bpf_l4_csum_replace(skb, csum_off, 0, (__u32)diff, BPF_F_PSEUDO_HDR) ||
		    bpf_l4_csum_replace(skb, csum_off, 0, (__u32)diff, 0) ||
		    bpf_l4_csum_replace(skb, csum_off, vport, loc->port, 2))
			return -1;
		if (bpf_skb_store_bytes(skb, ETH_HLEN_ + offsetof(struct ipv6hdr, daddr), loc->addr, 16, 0) ||
		    bpf_skb_store_bytes(skb, emb_off + offsetof(struct ipv6hdr, saddr), loc->addr, 16, 0) ||
		    bpf_skb_store_bytes(skb, emb_off + sizeof(struct ipv6hdr), &loc->port, 2, 0))
			return -1;
		return quoted_l4_csum(skb, emb_off + sizeof(struct ipv6hdr), eproto, csum_off,
				      csum_diff2(csum_add(0, (__u32)diff), vport, loc->port));
	}
}

/* tunnel handles IPIP-style packets: outer header of olen bytes with
 * destination tun (family tfam), inner family ifam. */
static __always_inline int tunnel(struct __sk_buff *skb, __u32 olen, const __u32 *tun, __u8 tfam, __u8 ifam)
{
	struct dsr_svc_key k = {};
	struct dsr_local *loc;
	struct inner in = {};
	void *data, *end;
	__u32 ioff = ETH_HLEN_ + olen;

	ensure(skb, ioff + 40 + 8 + 40 + 8);
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	__builtin_memcpy(k.tunnel, tun, 16);
	k.tunnel_family = tfam;
	k.vip.family = ifam;

	/* ICMP errors: the flow is the reverse of the embedded packet. */
	if (ifam == XLB_AF_INET) {
		struct iphdr *ip = data + ioff;
		struct icmphdr_ *ic = (void *)(ip + 1);

		if ((void *)(ic + 1) > end)
			goto l4;
		if (ip->version == 4 && ip->ihl == 5 && ip->protocol == IPPROTO_ICMP) {
			struct inner emb = {};

			if (ic->type != ICMP_DEST_UNREACH_ || ic->code != ICMP_FRAG_NEEDED_)
				goto nosvc;
			if (parse_ip(skb, ioff + sizeof(*ip) + sizeof(*ic), XLB_AF_INET, &emb, 0))
				goto malformed;
			k.vip.addr[0] = emb.src[0];
			k.vip.port = emb.sport;
			k.vip.proto = emb.proto;
			loc = bpf_map_lookup_elem(&dsr_services, &k);
			if (!loc)
				goto nosvc;
			if (decap(skb, olen, ifam) || icmp_ptb(skb, ifam, loc, emb.src, emb.sport, emb.proto))
				goto error;
			stat_inc(DSR_IN_ICMP);
			return TC_ACT_OK;
		}
	} else {
		struct ipv6hdr *ip6 = data + ioff;
		struct icmp6hdr *ic = (void *)(ip6 + 1);

		if ((void *)(ic + 1) > end)
			goto l4;
		if (ip6->version == 6 && ip6->nexthdr == IPPROTO_ICMPV6) {
			struct inner emb = {};

			if (ic->icmp6_type != ICMPV6_PKT_TOOBIG)
				goto nosvc;
			if (parse_ip(skb, ioff + sizeof(*ip6) + sizeof(*ic), XLB_AF_INET6, &emb, 0))
				goto malformed;
			__builtin_memcpy(k.vip.addr, emb.src, 16);
			k.vip.port = emb.sport;
			k.vip.proto = emb.proto;
			loc = bpf_map_lookup_elem(&dsr_services, &k);
			if (!loc)
				goto nosvc;
			if (decap(skb, olen, ifam) || icmp_ptb(skb, ifam, loc, emb.src, emb.sport, emb.proto))
				goto error;
			stat_inc(DSR_IN_ICMP);
			return TC_ACT_OK;
		}
	}
l4:
	if (parse_ip(skb, ioff, ifam, &in, 0))
		goto malformed;
	__builtin_memcpy(k.vip.addr, in.dst, 16);
	k.vip.port = in.dport;
	k.vip.proto = in.proto;
	loc = bpf_map_lookup_elem(&dsr_services, &k);
	if (!loc)
		goto nosvc;
	{
		struct dsr_local l = *loc;

		remember(l.addr, l.port, in.src, in.sport, in.proto, ifam, in.dst, in.dport);
		if (decap(skb, olen, ifam))
			goto error;
		in.l3_off -= olen;
		in.l4_off -= olen;
		if (set_addr_port(skb, &in, l.addr, l.port, 0))
			goto error;
	}
	stat_inc(DSR_IN_IPIP);
	return TC_ACT_OK;
nosvc:
	stat_inc(DSR_IN_NO_SERVICE);
	return TC_ACT_OK;
malformed:
	stat_inc(DSR_IN_MALFORMED);
	return TC_ACT_OK;
error:
	stat_inc(DSR_IN_ERROR);
	return TC_ACT_SHOT;
}

/* inner_icmp reports whether the IP packet at off (family fam) is an ICMP
 * frag-needed / ICMPv6 packet-too-big. */
static __always_inline int inner_icmp(struct __sk_buff *skb, __u32 off, __u8 fam)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	off &= 0x3ff;
	if (fam == XLB_AF_INET) {
		struct iphdr *ip = data + off;
		struct icmphdr_ *ic = (void *)(ip + 1);

		return (void *)(ic + 1) <= end && ip->ihl == 5 && ip->protocol == IPPROTO_ICMP &&
		       ic->type == ICMP_DEST_UNREACH_ && ic->code == ICMP_FRAG_NEEDED_;
	} else {
		struct ipv6hdr *ip6 = data + off;
		struct icmp6hdr *ic = (void *)(ip6 + 1);

		return (void *)(ic + 1) <= end && ip6->nexthdr == IPPROTO_ICMPV6 && ic->icmp6_type == ICMPV6_PKT_TOOBIG;
	}
}

/* geneve handles a Geneve packet whose UDP header is at uoff; the outer IP
 * header is olen bytes. */
static __always_inline int geneve(struct __sk_buff *skb, __u32 olen)
{
	__u32 goff = ETH_HLEN_ + olen + sizeof(struct udphdr);
	__u32 optoff, optend, ioff, glen;
	struct genevehdr_ *g;
	struct inner in = {};
	__u32 vip[4] = {};
	__u16 vport = 0;
	__u8 ifam;
	int found = 0;
	void *data, *end;

	ensure(skb, goff + 8 + 252 + 40 + 8);
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	g = data + goff;
	if ((void *)(g + 1) > end || (g->ver_optlen >> 6) != 0)
		goto malformed;
	if (g->proto == bpf_htons(ETH_P_IP))
		ifam = XLB_AF_INET;
	else if (g->proto == bpf_htons(ETH_P_IPV6))
		ifam = XLB_AF_INET6;
	else
		goto malformed;
	glen = sizeof(*g) + (g->ver_optlen & 0x3f) * 4;
	optoff = goff + sizeof(*g);
	optend = goff + glen;
	/* Walk the options (at most 8) for Shunt's. */
#pragma unroll
	for (int i = 0; i < 8; i++) {
		struct geneve_opt_hdr *o;
		__u32 dlen;

		if (optoff >= optend)
			break;
		o = data + (optoff & 0x3ff);
		if ((void *)(o + 1) > end)
			goto malformed;
		dlen = (o->length & 0x1f) * 4;
		if (o->opt_class == bpf_htons(XLB_GENEVE_OPT_CLASS) && o->type == XLB_GENEVE_OPT_TYPE) {
			__u32 *d = (void *)(o + 1);

			if (ifam == XLB_AF_INET && dlen == 8) {
				if ((void *)d + 8 > end)
					goto malformed;
				vip[0] = d[0];
				vport = (__u16)d[1];
				found = 1;
			} else if (ifam == XLB_AF_INET6 && dlen == 20) {
				if ((void *)d + 20 > end)
					goto malformed;
				vip[0] = d[0];
				vip[1] = d[1];
				vip[2] = d[2];
				vip[3] = d[3];
				vport = (__u16)d[4];
				found = 1;
			}
			break;
		}
		optoff += sizeof(*o) + dlen;
	}
	if (!found)
		goto nosvc;
	ioff = goff + glen;
	/* An ICMP error the LB translated already: only the outer headers go. */
	if (inner_icmp(skb, ioff, ifam)) {
		if (decap(skb, olen + sizeof(struct udphdr) + glen, ifam))
			goto error;
		stat_inc(DSR_IN_ICMP);
		return TC_ACT_OK;
	}
	if (parse_ip(skb, ioff, ifam, &in, 0))
		goto malformed;
	remember(in.dst, in.dport, in.src, in.sport, in.proto, ifam, vip, vport);
	if (decap(skb, olen + sizeof(struct udphdr) + glen, ifam))
		goto error;
	stat_inc(DSR_IN_GENEVE);
	return TC_ACT_OK;
nosvc:
	stat_inc(DSR_IN_NO_SERVICE);
	return TC_ACT_OK;
malformed:
	stat_inc(DSR_IN_MALFORMED);
	return TC_ACT_OK;
error:
	stat_inc(DSR_IN_ERROR);
	return TC_ACT_SHOT;
}

/* opt4 handles an IPv4 packet whose header carries Shunt's 8-byte option
 * (and nothing else). */
static __always_inline int opt4(struct __sk_buff *skb)
{
	struct {
		struct iphdr ip;
		__u8 type, len;
		__be16 port;
		__be32 addr;
	} h;
	struct inner in = {};
	__u32 vip[4] = {};
	__u16 *ports;
	void *data, *end;

	ensure(skb, ETH_HLEN_ + sizeof(h) + 4);
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &h, sizeof(h)))
		goto malformed;
	if (h.len != XLB_IPOPT_LEN || (h.ip.frag_off & bpf_htons(IP_MF_ | IP_OFFSET_)) ||
	    (h.ip.protocol != IPPROTO_TCP && h.ip.protocol != IPPROTO_UDP && h.ip.protocol != IPPROTO_ICMP))
		goto malformed;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	ports = data + ETH_HLEN_ + sizeof(h);
	if ((void *)(ports + 2) > end)
		goto malformed;
	vip[0] = h.addr;
	in.src[0] = h.ip.saddr;
	in.dst[0] = h.ip.daddr;
	/* An ICMP error the LB translated already: only the option goes. */
	if (h.ip.protocol != IPPROTO_ICMP)
		remember(in.dst, ports[1], in.src, ports[0], h.ip.protocol, XLB_AF_INET, vip, h.port);
	if (bpf_skb_adjust_room(skb, -XLB_IPOPT_LEN, BPF_ADJ_ROOM_NET, 0))
		goto error;
	h.ip.ihl = 5;
	h.ip.tot_len = bpf_htons(bpf_ntohs(h.ip.tot_len) - XLB_IPOPT_LEN);
	h.ip.check = 0;
	h.ip.check = ip4_csum20(&h.ip);
	if (bpf_skb_store_bytes(skb, ETH_HLEN_, &h.ip, sizeof(h.ip), 0))
		goto error;
	stat_inc(h.ip.protocol == IPPROTO_ICMP ? DSR_IN_ICMP : DSR_IN_OPT);
	return TC_ACT_OK;
malformed:
	stat_inc(DSR_IN_MALFORMED);
	return TC_ACT_OK;
error:
	stat_inc(DSR_IN_ERROR);
	return TC_ACT_SHOT;
}

/* opt6 handles an IPv6 packet whose first extension header is a
 * Destination Options header with Shunt's option. */
static __always_inline int opt6(struct __sk_buff *skb)
{
	struct {
		struct ipv6hdr ip;
		__u8 nexthdr, hdrlen;
		__u8 type, len;
		__be16 port;
		__be32 addr[4];
		__u8 padn, padlen;
		__be16 sport, dport; /* the L4 header that follows */
	} __attribute__((packed)) h;
	__u32 src[4], dst[4], vip[4];

	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &h, sizeof(h)))
		goto malformed;
	if (h.hdrlen != XLB_IP6OPT_HDRLEN / 8 - 1 || h.type != XLB_IP6OPT_TYPE || h.len != 18)
		goto nosvc;
	if (h.nexthdr != IPPROTO_TCP && h.nexthdr != IPPROTO_UDP && h.nexthdr != IPPROTO_ICMPV6)
		goto malformed;
	__builtin_memcpy(src, &h.ip.saddr, 16);
	__builtin_memcpy(dst, &h.ip.daddr, 16);
	__builtin_memcpy(vip, h.addr, 16);
	/* An ICMPv6 error the LB translated already: only the option goes. */
	if (h.nexthdr != IPPROTO_ICMPV6)
		remember(dst, h.dport, src, h.sport, h.nexthdr, XLB_AF_INET6, vip, h.port);
	if (bpf_skb_adjust_room(skb, -XLB_IP6OPT_HDRLEN, BPF_ADJ_ROOM_NET, 0))
		goto error;
	h.ip.nexthdr = h.nexthdr;
	h.ip.payload_len = bpf_htons(bpf_ntohs(h.ip.payload_len) - XLB_IP6OPT_HDRLEN);
	if (bpf_skb_store_bytes(skb, ETH_HLEN_, &h.ip, sizeof(h.ip), 0))
		goto error;
	stat_inc(h.nexthdr == IPPROTO_ICMPV6 ? DSR_IN_ICMP : DSR_IN_OPT);
	return TC_ACT_OK;
nosvc:
	stat_inc(DSR_IN_NO_SERVICE);
	return TC_ACT_OK;
malformed:
	stat_inc(DSR_IN_MALFORMED);
	return TC_ACT_OK;
error:
	stat_inc(DSR_IN_ERROR);
	return TC_ACT_SHOT;
}

SEC("tc")
int dsr_ingress(struct __sk_buff *skb)
{
	void *data, *end;
	__u32 tun[4] = {};

	ensure(skb, ETH_HLEN_ + sizeof(struct ipv6hdr) + sizeof(struct udphdr));
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + ETH_HLEN_;

		if ((void *)(ip + 1) > end || ip->version != 4)
			return TC_ACT_OK;
		if (ip->ihl == 7) {
			__u8 *opt = (void *)(ip + 1);

			if ((void *)(opt + 1) > end || *opt != XLB_IPOPT_TYPE)
				return TC_ACT_OK;
			return opt4(skb);
		}
		if (ip->ihl != 5 || (ip->frag_off & bpf_htons(IP_MF_ | IP_OFFSET_)))
			return TC_ACT_OK;
		tun[0] = ip->daddr;
		if (ip->protocol == IPPROTO_IPIP)
			return tunnel(skb, sizeof(*ip), tun, XLB_AF_INET, XLB_AF_INET);
		if (ip->protocol == IPPROTO_IPV6)
			return tunnel(skb, sizeof(*ip), tun, XLB_AF_INET, XLB_AF_INET6);
		if (ip->protocol == IPPROTO_UDP) {
			struct udphdr *u = (void *)(ip + 1);

			if ((void *)(u + 1) <= end && u->dest == bpf_htons(XLB_GENEVE_PORT))
				return geneve(skb, sizeof(*ip));
		}
		return TC_ACT_OK;
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + ETH_HLEN_;

		if ((void *)(ip6 + 1) > end || ip6->version != 6)
			return TC_ACT_OK;
		__builtin_memcpy(tun, &ip6->daddr, 16);
		if (ip6->nexthdr == IPPROTO_IPIP)
			return tunnel(skb, sizeof(*ip6), tun, XLB_AF_INET6, XLB_AF_INET);
		if (ip6->nexthdr == IPPROTO_IPV6)
			return tunnel(skb, sizeof(*ip6), tun, XLB_AF_INET6, XLB_AF_INET6);
		if (ip6->nexthdr == IPPROTO_UDP) {
			struct udphdr *u = (void *)(ip6 + 1);

			if ((void *)(u + 1) <= end && u->dest == bpf_htons(XLB_GENEVE_PORT))
				return geneve(skb, sizeof(*ip6));
		}
		if (ip6->nexthdr == IPPROTO_DSTOPTS_)
			return opt6(skb);
	}
	return TC_ACT_OK;
}

/* frag_of tells whether the packet leaving (IP header at ETH_HLEN_) is a
 * fragment (enum frag_kind) and fills the key of its datagram. */
enum frag_kind {
	FRAG_NONE = 0,
	FRAG_FIRST = 1, /* offset 0: carries the L4 header */
	FRAG_LATER = 2, /* offset > 0 */
};

static __always_inline int frag_of(struct __sk_buff *skb, __u8 fam, struct xlb_frag_key *fk, __u8 *more)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u16 off;

	fk->family = fam;
	if (fam == XLB_AF_INET) {
		struct iphdr *ip = data + ETH_HLEN_;

		if ((void *)(ip + 1) > end || ip->version != 4 || !(ip->frag_off & bpf_htons(IP_MF_ | IP_OFFSET_)))
			return FRAG_NONE;
		fk->src[0] = ip->saddr;
		fk->dst[0] = ip->daddr;
		fk->id = ip->id;
		fk->proto = ip->protocol;
		*more = (ip->frag_off & bpf_htons(IP_MF_)) != 0;
		off = ip->frag_off & bpf_htons(IP_OFFSET_);
	} else {
		struct ipv6hdr *ip6 = data + ETH_HLEN_;
		struct frag6hdr *fh = (void *)(ip6 + 1);

		if ((void *)(fh + 1) > end || ip6->version != 6 || ip6->nexthdr != 44)
			return FRAG_NONE;
		__builtin_memcpy(fk->src, &ip6->saddr, 16);
		__builtin_memcpy(fk->dst, &ip6->daddr, 16);
		fk->id = fh->id;
		fk->proto = fh->nexthdr;
		*more = (fh->frag_off & bpf_htons(1)) != 0;
		off = fh->frag_off & bpf_htons(0xfff8);
	}
	return off ? FRAG_LATER : FRAG_FIRST;
}

/* later_frag rewrites the source of a later fragment of a reply from the
 * record its first fragment left; the record goes with the last fragment. */
static __always_inline int later_frag(struct __sk_buff *skb, __u8 fam, const struct xlb_frag_key *fk, __u8 more)
{
	struct xlb_frag *f = bpf_map_lookup_elem(&dsr_frags, fk);
	__u32 src[4];

	if (!f) {
		stat_inc(DSR_OUT_FRAG_UNKNOWN);
		return TC_ACT_OK;
	}
	__builtin_memcpy(src, f->src, 16);
	if (!more)
		bpf_map_delete_elem(&dsr_frags, fk);
	if (fam == XLB_AF_INET) {
		if (bpf_l3_csum_replace(skb, ETH_HLEN_ + offsetof(struct iphdr, check), fk->src[0], src[0], 4) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN_ + offsetof(struct iphdr, saddr), src, 4, 0))
			goto error;
	} else if (bpf_skb_store_bytes(skb, ETH_HLEN_ + offsetof(struct ipv6hdr, saddr), src, 16, 0)) {
		goto error;
	}
	stat_inc(DSR_OUT_FRAG_LATER);
	return TC_ACT_OK;
error:
	stat_inc(DSR_OUT_ERROR);
	return TC_ACT_OK;
}

/* dsr_egress rewrites the source of replies of DSR flows to VIP:port, every
 * fragment of a fragmented reply included. */
SEC("tc")
int dsr_egress(struct __sk_buff *skb)
{
	struct xlb_frag_key fk = {};
	struct xlb_flow k = {};
	struct dsr_orig *o;
	struct inner in = {};
	__u8 fam, more = 0;
	int frag;

	if (skb->protocol == bpf_htons(ETH_P_IP))
		fam = XLB_AF_INET;
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		fam = XLB_AF_INET6;
	else
		return TC_ACT_OK;
	ensure(skb, ETH_HLEN_ + sizeof(struct ipv6hdr) + sizeof(struct frag6hdr) + 4);
	frag = frag_of(skb, fam, &fk, &more);
	if (frag == FRAG_LATER)
		return later_frag(skb, fam, &fk, more);
	if (parse_ip(skb, ETH_HLEN_, fam, &in, frag == FRAG_FIRST))
		return TC_ACT_OK;
	__builtin_memcpy(k.src, in.src, 16);
	__builtin_memcpy(k.dst, in.dst, 16);
	k.sport = in.sport;
	k.dport = in.dport;
	k.proto = in.proto;
	k.family = fam;
	o = bpf_map_lookup_elem(&dsr_revnat, &k);
	if (!o)
		return TC_ACT_OK;
	{
		struct dsr_orig v = *o;

		if (set_addr_port(skb, &in, v.vip, v.port, 1)) {
			stat_inc(DSR_OUT_ERROR);
			return TC_ACT_OK;
		}
		if (frag == FRAG_FIRST) {
			struct xlb_frag f = {};

			__builtin_memcpy(f.src, v.vip, 16);
			__builtin_memcpy(f.dst, in.dst, 16);
			if (bpf_map_update_elem(&dsr_frags, &fk, &f, BPF_ANY))
				stat_inc(DSR_REVNAT_FULL);
			else
				stat_inc(DSR_OUT_FRAG_FIRST);
		}
	}
	stat_inc(DSR_OUT_REVNAT);
	return TC_ACT_OK;
}
