/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624)
 * on raw header words. One's complement sums do not depend on byte order,
 * so fields are summed exactly as loaded from the packet. */
#ifndef SHUNT_CSUM_H
#define SHUNT_CSUM_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

/* csum_add adds b to the 32-bit one's complement accumulator a. */
static __always_inline __u32 csum_add(__u32 a, __u32 b)
{
	__u32 r = a + b;

	return r + (r < b);
}

/* csum_fold folds a 32-bit accumulator to 16 bits (not complemented). */
static __always_inline __u16 csum_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* csum_diff4 is the accumulator change for replacing 32-bit word from by to. */
static __always_inline __u32 csum_diff4(__u32 acc, __u32 from, __u32 to)
{
	return csum_add(csum_add(acc, ~from), to);
}

/* csum_diff2 is the accumulator change for replacing 16-bit word from by to. */
static __always_inline __u32 csum_diff2(__u32 acc, __u16 from, __u16 to)
{
	return csum_add(csum_add(acc, (__u16)~from), to);
}

/* csum_apply returns checksum field check updated by accumulator diff. */
static __always_inline __u16 csum_apply(__u16 check, __u32 diff)
{
	return (__u16)~csum_fold(csum_add(diff, (__u16)~check));
}

/* csum_fold64 folds a 64-bit sum of raw 32-bit words (less than 2^35) to
 * 16 bits (not complemented). */
static __always_inline __u16 csum_fold64(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* ip4_csum20 computes the checksum of a 20-byte IPv4 header held in memory
 * the verifier knows is readable (4-byte aligned stack, or checked packet);
 * the check field must be zero, or the result is 0 when it is right. Five
 * 32-bit loads instead of ten 16-bit ones. */
static __always_inline __u16 ip4_csum20(const void *hdr)
{
	const __u32 *w = hdr;
	__u64 s = (__u64)w[0] + w[1] + w[2] + w[3] + w[4];

	return (__u16)~csum_fold64(s);
}

#endif
