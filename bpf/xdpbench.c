//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* xdpbench: the traffic generator and sink of `shuntctl bench xdp`.
 *
 * bench_tx is run with BPF_PROG_TEST_RUN in live-frames mode: every frame
 * it returns XDP_TX for is transmitted out of the given interface, towards
 * the device under test. Live-frames mode recycles pages, and a device
 * under test that rewrites frames in place (XDP_TX after encapsulating)
 * leaves its output in them, so bench_tx first copies the frame from
 * bench_frame[0] (BENCH_FRAME_LEN bytes). bench_sink, attached to where the
 * device under test sends its output, counts the frames and drops them.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

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
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct bench_frame);
	__uint(max_entries, 1);
} bench_tmpl SEC(".maps");

const enum bench_const __unused_bench_const __attribute__((unused));

SEC("xdp")
int bench_tx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct bench_frame *f = bpf_map_lookup_elem(&bench_tmpl, &zero);

	if (!f || data + BENCH_FRAME_LEN > end)
		return XDP_ABORTED;
	__builtin_memcpy(data, f->data, BENCH_FRAME_LEN);
	return XDP_TX;
}

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

SEC("xdp")
int bench_replay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 zero = 0, idx;
	struct bench_state *st = bpf_map_lookup_elem(&bench_pos, &zero);
	struct bench_frame *f;
	long grown = (long)(end - data) - BENCH_FRAME_LEN;

	if (!st || st->n == 0 || grown < 0 || grown > 255)
		return XDP_ABORTED;
	if (grown && bpf_xdp_adjust_head(ctx, (int)grown))
		return XDP_ABORTED;
	idx = st->base + st->next;
	st->next = st->next + 1 >= st->n ? 0 : st->next + 1;
	f = bpf_map_lookup_elem(&bench_frames, &idx);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (!f || data + BENCH_FRAME_LEN > end)
		return XDP_ABORTED;
	__builtin_memcpy(data, f->data, BENCH_FRAME_LEN);
	bpf_tail_call(ctx, &bench_target, 0);
	return XDP_ABORTED;
}
