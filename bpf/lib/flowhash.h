/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The Maglev flow hash: Linux's jhash2 over ten 32-bit words, exactly as
 * documented on maglev.FlowHash (mesh/maglev/hash.go). Tests compare it with
 * the Go implementation on 10,000 random flows through the loaded program.
 */
#ifndef SHUNT_FLOWHASH_H
#define SHUNT_FLOWHASH_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

static __always_inline __u32 fh_rol32(__u32 w, unsigned int s)
{
	return (w << s) | (w >> (32 - s));
}

#define FH_MIX(a, b, c)                                   \
	do {                                              \
		a -= c; a ^= fh_rol32(c, 4);  c += b;     \
		b -= a; b ^= fh_rol32(a, 6);  a += c;     \
		c -= b; c ^= fh_rol32(b, 8);  b += a;     \
		a -= c; a ^= fh_rol32(c, 16); c += b;     \
		b -= a; b ^= fh_rol32(a, 19); a += c;     \
		c -= b; c ^= fh_rol32(b, 4);  b += a;     \
	} while (0)

#define FH_FINAL(a, b, c)                                 \
	do {                                              \
		c ^= b; c -= fh_rol32(b, 14);             \
		a ^= c; a -= fh_rol32(c, 11);             \
		b ^= a; b -= fh_rol32(a, 25);             \
		c ^= b; c -= fh_rol32(b, 16);             \
		a ^= c; a -= fh_rol32(c, 4);              \
		b ^= a; b -= fh_rol32(a, 14);             \
		c ^= b; c -= fh_rol32(b, 24);             \
	} while (0)

/* flow_hash hashes a client -> VIP 5-tuple. src/dst are 4 words each as
 * loaded from the packet (IPv4: the address in word 0, the others zero; it
 * is hashed IPv4-mapped), ports is the raw __u32 of the first four bytes of
 * the TCP/UDP header (sport then dport, network order), v4 selects the
 * IPv4-mapped form. */
static __always_inline __u32 flow_hash(const __u32 *src, const __u32 *dst, __u32 ports,
				       __u8 proto, int v4, __u32 seed)
{
	__u32 a, b, c;

	a = b = c = 0xdeadbeef + (10 << 2) + seed;
	if (v4) {
		/* w0 = w1 = 0, w2 = bytes 00 00 ff ff, w3 = saddr */
		c += 0xffff0000;
		FH_MIX(a, b, c);
		a += src[0];
		/* w4 = w5 = 0 */
		FH_MIX(a, b, c);
		a += 0xffff0000;
		b += dst[0];
		c += ports;
		FH_MIX(a, b, c);
	} else {
		a += src[0];
		b += src[1];
		c += src[2];
		FH_MIX(a, b, c);
		a += src[3];
		b += dst[0];
		c += dst[1];
		FH_MIX(a, b, c);
		a += dst[2];
		b += dst[3];
		c += ports;
		FH_MIX(a, b, c);
	}
	a += proto;
	FH_FINAL(a, b, c);
	return c;
}

#endif
