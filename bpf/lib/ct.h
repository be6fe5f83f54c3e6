/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The load balancer's conntrack table (struct xlb_ct_set4 / xlb_ct_set6 in
 * lib/xdplb.h, where the design is described): finding a flow's entry in
 * its set, writing one, emptying one. Shared by xdplb.c and the benchmark's
 * "conntrack alone" program (xdpbench.c), so that measures this code.
 *
 * The caller looks the two sets up (each map's lookups at call sites of
 * their own, so the verifier inlines them) and passes the flow's
 * xlb_ct_hash: it picks the sets and seeds the check. The writers (ct_put*,
 * ct_clear*) are global functions (verified once, on their own): inlined,
 * their branches multiplied the verifier's states past its limit.
 */
#ifndef SHUNT_CT_H
#define SHUNT_CT_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#include "xdplb.h"
#include "flowhash.h"

/* The conntrack's hash: pairs of 32-bit words as 64-bit words, each
 * multiplied by odd constants, in two sums. A product's top bits depend on
 * every bit of its input; the hash is the top 16 bits of each sum, so
 * whichever bits the sets take are mixed from the whole flow. The products
 * are independent and overlap in the CPU: the Maglev flow hash's jhash
 * rounds (dependent, and rotates are three instructions in BPF) were half
 * of an established packet's time, a murmur3 finalizer another 6 ns. */
#define CT_K0 0x9e3779b97f4a7c15ULL
#define CT_K1 0xc2b2ae3d27d4eb4fULL
#define CT_K2 0x165667b19e3779f9ULL
#define CT_K3 0x85ebca77c2b2ae63ULL
#define CT_K4 0x27d4eb2f165667c5ULL
#define CT_K5 0xbf58476d1ce4e5b9ULL
#define CT_K6 0x94d049bb133111ebULL
#define CT_K7 0xff51afd7ed558ccdULL
#define CT_K8 0xc4ceb9fe1a85ec53ULL
#define CT_K9 0xd6e8feb86659fd93ULL

static __always_inline __u64 ct_pair(__u32 hi, __u32 lo)
{
	return (__u64)hi << 32 | lo;
}

static __always_inline __u32 ct_top(__u64 x1, __u64 x2)
{
	return ((__u32)(x1 >> 32) & 0xffff0000) | (__u32)(x2 >> 48);
}

/* xlb_ct_hash is the conntrack's hash of flow f (src and dst as loaded
 * from the packet, sport/dport as in the L4 header): it places the flow's
 * entry, seeds its check and is the flow's entropy (encapsulation source
 * port / flow label, SNAT port search). Only a new flow needs the Maglev
 * flow hash. Every word is mixed with the Maglev seed first (xor, then add:
 * the carries make a change of the input change the product by an amount
 * that depends on the seed), so a client cannot aim flows at one set
 * without knowing it: a keyed mix, not a cryptographic one. agent/xdp
 * computes the same (CTFlowHash). */
static __always_inline __u32 xlb_ct_hash(const struct xlb_flow *f, __u32 seed)
{
	__u64 key = ct_pair(seed, ~seed);
	__u64 tail = ct_pair(*(const __u32 *)&f->sport, (__u32)f->proto << 8 | f->family) ^ key;
	__u64 a = (ct_pair(f->src[0], f->dst[0]) ^ key) + key, b, c, d;

	if (f->family == XLB_AF_INET)
		return ct_top(a * CT_K0 + tail * CT_K1, a * CT_K5 + tail * CT_K6);
	a = (ct_pair(f->src[0], f->src[1]) ^ key) + key;
	b = (ct_pair(f->src[2], f->src[3]) ^ key) + key;
	c = (ct_pair(f->dst[0], f->dst[1]) ^ key) + key;
	d = (ct_pair(f->dst[2], f->dst[3]) ^ key) + key;
	return ct_top(a * CT_K0 + tail * CT_K1 + b * CT_K2 + c * CT_K3 + d * CT_K4,
		      a * CT_K5 + tail * CT_K6 + b * CT_K7 + c * CT_K8 + d * CT_K9);
}

/* xlb_ct_check mixes the tail's first four words (ports; proto, action,
 * snat_port; svc_id, be_id; gen) with the flow's hash, low bit set (0
 * marks an empty way): a changed word changes it but by chance (2^-31). It
 * only has to tell a mix of two writes from either: nobody else writes the
 * table. agent/xdp computes the same (CTCheck). */
static __always_inline __u32 xlb_ct_check(__u32 hash, const struct xlb_ct_tail *t)
{
	const __u32 *w = (const __u32 *)t;
	__u64 x = ct_pair(w[0], w[1]) * CT_K0 + ct_pair(w[2], w[3]) * CT_K1 + (__u64)hash * CT_K2;

	/* any change to one word changes the sum, and so the fold but by
	 * chance */
	return ((__u32)(x >> 32) ^ (__u32)x) | 1;
}

/* ct_now is the entries' clock: jiffies, low 32 bits (only differences
 * between entries of one set are compared). */
static __always_inline __u32 ct_now(void)
{
	return (__u32)bpf_jiffies64();
}

/* ct_tail_ok copies a way's tail to *t and checks the copy: it must be the
 * flow's (ports, proto) and pass its check. The entry may change under the
 * reader; the copy cannot. */
static __always_inline int ct_tail_ok(const struct xlb_ct_tail *w, __u32 ports, __u8 proto, __u32 hash,
				      struct xlb_ct_tail *t)
{
	__builtin_memcpy(t, w, sizeof(*t));
	return *(__u32 *)t == ports && t->proto == proto && t->check && xlb_ct_check(hash, t) == t->check;
}

/* ct_set2 gives a flow's second set (before the mask; the first is the
 * hash itself): its halves swapped, so the two indexes come from different
 * bits (all of them up to 65536 sets; beyond, they share a few). Each flow
 * may live in either set, which keeps sets from overflowing long before
 * the table is full. */
static __always_inline __u32 ct_set2(__u32 hash)
{
	return hash >> 16 | hash << 16;
}

static __always_inline int addr6_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline __u32 ct_ports(const struct xlb_flow *f)
{
	return *(const __u32 *)&f->sport; /* sport, dport: the L4 header's first word */
}

static __always_inline int ct_key4(const struct xlb_ct_way4 *w, const struct xlb_flow *f)
{
	return w->src == f->src[0] && w->dst == f->dst[0] && *(const __u32 *)&w->t == ct_ports(f) &&
	       w->t.proto == f->proto;
}

static __always_inline int ct_key6(const struct xlb_ct_way6 *w, const struct xlb_flow *f)
{
	return *(const __u32 *)&w->t == ct_ports(f) && w->t.proto == f->proto && addr6_eq(w->src, f->src) &&
	       addr6_eq(w->dst, f->dst);
}

/* The service generation's bits in xlb_ct_tail.gen (the backend's above). */
#define XLB_CT_GEN_MASK 0xffffff

/* CT_MISS / CT_TORN: ct_find4 / ct_find6 found no valid entry; CT_TORN:
 * and a way with the flow's key failed its check (mixed from two writes). */
#define CT_MISS -1
#define CT_TORN -2

/* ct_find4 / ct_find6 return the way (0..7: set s1's, then s2's) holding
 * flow f with a valid entry (hash: its xlb_ct_hash), its tail copied to *t,
 * or CT_MISS / CT_TORN. */
static __always_inline int ct_find4(struct xlb_ct_set4 *s1, struct xlb_ct_set4 *s2, const struct xlb_flow *f,
					__u32 hash, struct xlb_ct_tail *t)
{
	int ret = CT_MISS;

	if (!s1 || !s2 || !f || !t)
		return CT_MISS;
#pragma unroll
	for (int i = 0; i < 2 * XLB_CT_WAYS; i++) {
		struct xlb_ct_way4 *w = i < XLB_CT_WAYS ? &s1->way[i] : &s2->way[i - XLB_CT_WAYS];

		if (!w->t.check || !ct_key4(w, f))
			continue;
		if (ct_tail_ok(&w->t, ct_ports(f), f->proto, hash, t))
			return i;
		ret = CT_TORN;
	}
	return ret;
}

static __always_inline int ct_find6(struct xlb_ct_set6 *s1, struct xlb_ct_set6 *s2, const struct xlb_flow *f,
					__u32 hash, struct xlb_ct_tail *t)
{
	int ret = CT_MISS;

	if (!s1 || !s2 || !f || !t)
		return CT_MISS;
#pragma unroll
	for (int i = 0; i < 2 * XLB_CT_WAYS; i++) {
		struct xlb_ct_way6 *w = i < XLB_CT_WAYS ? &s1->way[i] : &s2->way[i - XLB_CT_WAYS];

		if (!w->t.check || !ct_key6(w, f))
			continue;
		if (ct_tail_ok(&w->t, ct_ports(f), f->proto, hash, t))
			return i;
		ret = CT_TORN;
	}
	return ret;
}

/* ct_touch marks a hit's entry seen now, writing only when the clock moved
 * (an established flow's packets do not keep dirtying the line). */
static __always_inline void ct_touch(struct xlb_ct_tail *w, __u32 now)
{
	if (w->seen != now)
		w->seen = now;
}

/* ct_victim picks the way (0..7) a flow's entry goes to: the flow's own
 * (match: bit i set when way i holds its key; replaced in place), else an
 * empty way of the set with more of them (s1 on a tie), else the way of
 * the two sets seen least recently (*evict set). */
static __always_inline int ct_victim(struct xlb_ct_tail *const *w, __u32 match, __u32 now, int *evict)
{
	__u32 age, oldest = 0, empty = 0;
	int victim = 0, i;

	if (match)
		return __builtin_ctz(match);
#pragma unroll
	for (i = 0; i < 2 * XLB_CT_WAYS; i++)
		if (!w[i]->check)
			empty |= 1u << i;
	if (empty) {
		__u32 e1 = empty & 0xf, e2 = empty >> 4;

		if (e1 && (!e2 || __builtin_popcount(e1) >= __builtin_popcount(e2)))
			return __builtin_ctz(e1);
		return 4 + __builtin_ctz(e2);
	}
#pragma unroll
	for (i = 0; i < 2 * XLB_CT_WAYS; i++) {
		age = now - w[i]->seen;
		if ((__s32)age < 0)
			age = 0; /* seen by another CPU after this one read the clock */
		if (age > oldest) {
			oldest = age;
			victim = i;
		}
	}
	*evict = 1;
	return victim;
}

/* ct_fill_tail writes the tail of ct's entry, its check last (computed
 * from what it wrote: a word another CPU changed in between makes the
 * entry fail its check, as any mixed entry). Straight into the map: the
 * program's stack is near its limit. */
static __always_inline void ct_fill_tail(struct xlb_ct_tail *t, __u32 ports, __u8 proto, const struct xlb_ct *ct,
					 __u32 now)
{
	*(__u32 *)t = ports;
	t->proto = proto;
	t->action = ct->action;
	t->snat_port = ct->snat_port;
	t->svc_id = (__u16)ct->svc_id;
	t->be_id = (__u16)ct->be_id;
	t->gen = (ct->gen & XLB_CT_GEN_MASK) | (ct->be.gen << 24);
	t->seen = now;
	t->check = xlb_ct_check(ct->hash, t);
}

/* ct_put4 / ct_put6 write ct's entry for flow f into one of its sets s1,
 * s2 (ct->hash is its xlb_ct_hash); they return 1 when another flow's entry
 * was replaced. */
__noinline int ct_put4(struct xlb_ct_set4 *s1, struct xlb_ct_set4 *s2, const struct xlb_flow *f,
		       const struct xlb_ct *ct)
{
	struct xlb_ct_tail *tails[2 * XLB_CT_WAYS];
	struct xlb_ct_way4 *w;
	__u32 now = ct_now(), match = 0;
	int evict = 0, v;

	if (!s1 || !s2 || !f || !ct)
		return 0;
#pragma unroll
	for (int i = 0; i < 2 * XLB_CT_WAYS; i++) {
		w = i < XLB_CT_WAYS ? &s1->way[i] : &s2->way[i - XLB_CT_WAYS];
		tails[i] = &w->t;
		if (ct_key4(w, f))
			match |= 1u << i;
	}
	v = ct_victim(tails, match, now, &evict) & (2 * XLB_CT_WAYS - 1);
	w = v < XLB_CT_WAYS ? &s1->way[v & (XLB_CT_WAYS - 1)] : &s2->way[v & (XLB_CT_WAYS - 1)];
	w->src = f->src[0];
	w->dst = f->dst[0];
	ct_fill_tail(&w->t, ct_ports(f), f->proto, ct, now);
	return evict;
}

__noinline int ct_put6(struct xlb_ct_set6 *s1, struct xlb_ct_set6 *s2, const struct xlb_flow *f,
		       const struct xlb_ct *ct)
{
	struct xlb_ct_tail *tails[2 * XLB_CT_WAYS];
	struct xlb_ct_way6 *w;
	__u32 now = ct_now(), match = 0;
	int evict = 0, v;

	if (!s1 || !s2 || !f || !ct)
		return 0;
#pragma unroll
	for (int i = 0; i < 2 * XLB_CT_WAYS; i++) {
		w = i < XLB_CT_WAYS ? &s1->way[i] : &s2->way[i - XLB_CT_WAYS];
		tails[i] = &w->t;
		if (ct_key6(w, f))
			match |= 1u << i;
	}
	v = ct_victim(tails, match, now, &evict) & (2 * XLB_CT_WAYS - 1);
	w = v < XLB_CT_WAYS ? &s1->way[v & (XLB_CT_WAYS - 1)] : &s2->way[v & (XLB_CT_WAYS - 1)];
	__builtin_memcpy(w->src, f->src, 16);
	__builtin_memcpy(w->dst, f->dst, 16);
	ct_fill_tail(&w->t, ct_ports(f), f->proto, ct, now);
	return evict;
}

/* ct_clear4 / ct_clear6 empty every way of s1 and s2 holding flow f's key. */
__noinline int ct_clear4(struct xlb_ct_set4 *s1, struct xlb_ct_set4 *s2, const struct xlb_flow *f)
{
	if (!s1 || !s2 || !f)
		return 0;
#pragma unroll
	for (int i = 0; i < 2 * XLB_CT_WAYS; i++) {
		struct xlb_ct_way4 *w = i < XLB_CT_WAYS ? &s1->way[i] : &s2->way[i - XLB_CT_WAYS];

		if (ct_key4(w, f))
			w->t.check = 0;
	}
	return 0;
}

__noinline int ct_clear6(struct xlb_ct_set6 *s1, struct xlb_ct_set6 *s2, const struct xlb_flow *f)
{
	if (!s1 || !s2 || !f)
		return 0;
#pragma unroll
	for (int i = 0; i < 2 * XLB_CT_WAYS; i++) {
		struct xlb_ct_way6 *w = i < XLB_CT_WAYS ? &s1->way[i] : &s2->way[i - XLB_CT_WAYS];

		if (ct_key6(w, f))
			w->t.check = 0;
	}
	return 0;
}

#endif
