// Reference C implementation of maglev.FlowHash, written the way an eBPF
// program computes it: addresses and ports are loaded as raw __u32 from the
// packet bytes (host order on a little-endian machine), never byte-swapped.
//
// TestFlowHashMatchesC compiles this with the host C compiler (skipped if
// none) and feeds it lines of
//
//	<src: 32 hex chars> <dst: 32 hex chars> <sport> <dport> <proto> <seed>
//
// (addresses as 16 bytes in network order, numbers in decimal) and compares
// the printed hashes with the Go implementation.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint32_t u32;

static inline u32 rol32(u32 w, unsigned s) { return (w << s) | (w >> (32 - s)); }

#define JHASH_MIX(a, b, c)                 \
	do {                               \
		a -= c; a ^= rol32(c, 4);  c += b; \
		b -= a; b ^= rol32(a, 6);  a += c; \
		c -= b; c ^= rol32(b, 8);  b += a; \
		a -= c; a ^= rol32(c, 16); c += b; \
		b -= a; b ^= rol32(a, 19); a += c; \
		c -= b; c ^= rol32(b, 4);  b += a; \
	} while (0)

#define JHASH_FINAL(a, b, c)               \
	do {                               \
		c ^= b; c -= rol32(b, 14); \
		a ^= c; a -= rol32(c, 11); \
		b ^= a; b -= rol32(a, 25); \
		c ^= b; c -= rol32(b, 16); \
		a ^= c; a -= rol32(c, 4);  \
		b ^= a; b -= rol32(a, 14); \
		c ^= b; c -= rol32(b, 24); \
	} while (0)

// flow_hash: w[10] laid out as documented on maglev.FlowHash.
static u32 flow_hash(const u32 w[10], u32 seed)
{
	u32 a, b, c;
	a = b = c = 0xdeadbeef + (10 << 2) + seed;
	a += w[0]; b += w[1]; c += w[2]; JHASH_MIX(a, b, c);
	a += w[3]; b += w[4]; c += w[5]; JHASH_MIX(a, b, c);
	a += w[6]; b += w[7]; c += w[8]; JHASH_MIX(a, b, c);
	a += w[9]; JHASH_FINAL(a, b, c);
	return c;
}

static int parse_hex16(const char *s, unsigned char out[16])
{
	for (int i = 0; i < 16; i++) {
		unsigned v;
		if (sscanf(s + 2 * i, "%2x", &v) != 1)
			return -1;
		out[i] = (unsigned char)v;
	}
	return 0;
}

static const unsigned char v4mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

// load_addr fills 4 words from a 16-byte address the way a datapath would:
// IPv4 from a 4-byte iphdr field, IPv6 from the in6_addr words.
static void load_addr(const unsigned char a[16], u32 w[4])
{
	if (memcmp(a, v4mapped_prefix, 12) == 0) {
		u32 v4; // as iph->saddr
		memcpy(&v4, a + 12, 4);
		w[0] = 0;
		w[1] = 0;
		w[2] = 0xffff0000; // bytes 00 00 ff ff
		w[3] = v4;
		return;
	}
	memcpy(w, a, 16); // as ip6h->saddr.in6_u.u6_addr32
}

int main(void)
{
	char src[64], dst[64];
	unsigned sport, dport, proto;
	unsigned long seed;
	while (scanf("%63s %63s %u %u %u %lu", src, dst, &sport, &dport, &proto, &seed) == 6) {
		unsigned char s[16], d[16], l4[4];
		u32 w[10];
		if (parse_hex16(src, s) || parse_hex16(dst, d))
			return 2;
		load_addr(s, w);
		load_addr(d, w + 4);
		// The first four bytes of a TCP/UDP header: source then
		// destination port, big endian.
		l4[0] = sport >> 8;
		l4[1] = sport & 0xff;
		l4[2] = dport >> 8;
		l4[3] = dport & 0xff;
		memcpy(&w[8], l4, 4);
		w[9] = proto;
		printf("%u\n", flow_hash(w, (u32)seed));
	}
	return 0;
}
