//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* xdpbench: the traffic generator, sink and measuring aids of
 * `shuntctl bench xdp`.
 *
 * bench_tx is run with BPF_PROG_TEST_RUN in live-frames mode: every frame
 * it returns XDP_TX for is transmitted out of the given interface, towards
 * the device under test. Live-frames mode recycles pages, and a device
 * under test that rewrites frames in place (XDP_TX after encapsulating)
 * leaves its output in them, so bench_tx writes each frame afresh: the next
 * of the list in bench_frames (BENCH_FRAME_LEN bytes each), as bench_pos
 * says for the CPU. bench_sink, attached to where the device under test
 * sends its output, counts the frames and drops them.
 *
 * bench_replay runs a program under test with BPF_PROG_TEST_RUN's repeat,
 * giving each run the next frame of the list (tail call through
 * bench_target). bench_grow is the empty program that grows the frame as
 * IPIP does, to measure what putting a grown frame back costs the replay.
 * bench_ct_flow is the conntrack alone: the lookup and, on a miss, the
 * insert xdplb does for an IPv4 flow, in bench_ct, a table of lb_ct4's
 * layout and size; bench_lru_flow the same with the kernel's LRU hash, the
 * conntrack xdplb had before (map layout 3), for comparison.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/xdplb.h"
#include "lib/flowhash.h"
#include "lib/ct.h"

char __license[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} bench_count SEC(".maps");

enum bench_const {
	BENCH_FRAME_LEN = 60,
};

struct bench_frame {
	__u8 data[BENCH_FRAME_LEN];
} __attribute__((aligned(8)));

/* copy_frame writes a frame to the packet with word stores (a byte-wise
 * copy would make the replay's own cost, subtracted from every result,
 * larger and noisier). */
static __always_inline void copy_frame(void *dst, const struct bench_frame *f)
{
	const __u64 *s = (const __u64 *)f->data;

#pragma unroll
	for (int i = 0; i < BENCH_FRAME_LEN / 8; i++)
		((__u64 *)dst)[i] = s[i];
	*(__u32 *)(dst + 56) = *(const __u32 *)(f->data + 56);
}

const enum bench_const __unused_bench_const __attribute__((unused));
_Static_assert(BENCH_FRAME_LEN == 60, "copy_frame copies 7 words and 4 bytes");

SEC("xdp")
int bench_sink(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&bench_count, &zero);

	if (v)
		*v += 1;
	return XDP_DROP;
}

SEC("xdp")
int bench_reflect(struct xdp_md *ctx)
{
	return XDP_TX;
}

struct bench_state {
	__u32 base; /* first frame */
	__u32 n;    /* frames to cycle through */
	__u32 next; /* offset of the next frame */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct bench_state);
	__uint(max_entries, 1);
} bench_pos SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct bench_frame);
	__uint(max_entries, 1);
} bench_frames SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} bench_target SEC(".maps");

/* next_frame returns the frame the CPU's list gives next. */
static __always_inline struct bench_frame *next_frame(void)
{
	__u32 zero = 0, idx;
	struct bench_state *st = bpf_map_lookup_elem(&bench_pos, &zero);

	if (!st || st->n == 0)
		return 0;
	idx = st->base + st->next;
	st->next = st->next + 1 >= st->n ? 0 : st->next + 1;
	return bpf_map_lookup_elem(&bench_frames, &idx);
}

SEC("xdp")
int bench_tx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct bench_frame *f = next_frame();

	if (!f || data + BENCH_FRAME_LEN > end)
		return XDP_ABORTED;
	copy_frame(data, f);
	return XDP_TX;
}

SEC("xdp")
int bench_replay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct bench_frame *f;
	long grown = (long)(end - data) - BENCH_FRAME_LEN;

	if (grown < 0 || grown > 255)
		return XDP_ABORTED;
	if (grown && bpf_xdp_adjust_head(ctx, (int)grown))
		return XDP_ABORTED;
	f = next_frame();
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (!f || data + BENCH_FRAME_LEN > end)
		return XDP_ABORTED;
	copy_frame(data, f);
	bpf_tail_call(ctx, &bench_target, 0);
	return XDP_ABORTED;
}

SEC("xdp")
int bench_grow(struct xdp_md *ctx)
{
	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr)))
		return XDP_ABORTED;
	return XDP_TX;
}

/* bench_ct: the conntrack table alone (lib/ct.h, the code xdplb runs), in
 * a table of lb_ct4's layout and size (set by the benchmark, with
 * bench_ct_sets); bench_lru: the kernel's LRU hash with lb_ct4's former
 * key and value (struct xlb_flow4 -> struct xlb_ct; sized and flagged by
 * the benchmark), the conntrack up to map layout 3. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct xlb_ct_set4);
	__uint(max_entries, 65536);
} bench_ct SEC(".maps");

const volatile __u32 bench_ct_sets = 65536;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct xlb_flow4);
	__type(value, struct xlb_ct);
	__uint(max_entries, 262144);
} bench_lru SEC(".maps");

static __always_inline void count_insert(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&bench_count, &zero);

	if (n)
		*n += 1;
}

/* bench_ct_flow: xdplb's conntrack lookup, and on a miss its insert, for
 * the IPv4 TCP/UDP packet (its hash included: xdplb computes it for every
 * packet); bench_count counts the inserts. */
SEC("xdp")
int bench_ct_flow(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct udphdr *uh = (void *)(ip + 1);
	struct xlb_flow f = {};
	struct xlb_ct_set4 *s1, *s2;
	struct xlb_ct_tail t;
	struct xlb_ct ct = {};
	__u32 hash, i1, i2;
	int way;

	if ((void *)(uh + 1) > end)
		return XDP_ABORTED;
	f.src[0] = ip->saddr;
	f.dst[0] = ip->daddr;
	*(__u32 *)&f.sport = *(__u32 *)uh; /* one store, as xdplb */
	f.proto = ip->protocol;
	f.family = XLB_AF_INET;
	hash = xlb_ct_hash(&f, 0);
	i1 = hash & (bench_ct_sets - 1);
	i2 = ct_set2(hash) & (bench_ct_sets - 1);
	s1 = bpf_map_lookup_elem(&bench_ct, &i1);
	s2 = bpf_map_lookup_elem(&bench_ct, &i2);
	if (!s1 || !s2)
		return XDP_ABORTED;
	way = ct_find4(s1, s2, &f, hash, &t);
	if (way >= 0) {
		ct_touch(way < XLB_CT_WAYS ? &s1->way[way & (XLB_CT_WAYS - 1)].t : &s2->way[way & (XLB_CT_WAYS - 1)].t,
			 ct_now());
		return XDP_DROP;
	}
	ct.hash = hash;
	ct.be_id = 1;
	ct.gen = 1;
	ct_put4(s1, s2, &f, &ct);
	count_insert();
	return XDP_DROP;
}

/* bench_lru_flow: the same with the kernel's LRU hash (no flow hash: the
 * kernel hashes the key itself). */
SEC("xdp")
int bench_lru_flow(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct udphdr *uh = (void *)(ip + 1);
	struct xlb_flow4 k = {};
	struct xlb_ct ct = {};

	if ((void *)(uh + 1) > end)
		return XDP_ABORTED;
	k.src = ip->saddr;
	k.dst = ip->daddr;
	k.sport = uh->source;
	k.dport = uh->dest;
	k.proto = ip->protocol;
	if (bpf_map_lookup_elem(&bench_lru, &k))
		return XDP_DROP;
	ct.be.port = uh->dest;
	ct.be.family = XLB_AF_INET;
	bpf_map_update_elem(&bench_lru, &k, &ct, BPF_ANY);
	count_insert();
	return XDP_DROP;
}
