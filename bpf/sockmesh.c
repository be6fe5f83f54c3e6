//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* sockmesh: Shunt's socket-level datapath, attached to one cgroup v2.
 *
 * Socket LB: cgroup connect4/6 translate a service frontend (VIP:port) to a
 * backend once per connection; sendmsg4/6 do it per datagram for unconnected
 * UDP (sticky per socket); recvmsg4/6 and getpeername4/6 show the VIP to the
 * application again. Whether a socket is translated is decided per network
 * namespace (pods are enrolled by netns cookie) with a global
 * hostNamespaceOnly default.
 *
 * Sidecar steering (pods with a sidecar): connect4/6 send an app's outbound
 * TCP connections to the pod's sidecar on loopback, and the sidecar's own
 * connections to a same-node pod with a sidecar to that pod's inbound
 * listener. The original destination is recorded and handed to the proxy by
 * the getsockopt(SO_ORIGINAL_DST) hook; getpeername still shows the app what
 * it connected to.
 *
 * Short-circuit: sockops puts both ends of eligible connections into a
 * sockhash keyed by the connection's addresses; sk_msg redirects each send to
 * the peer socket's receive queue, skipping TCP/IP. A peer that is not in
 * the sockhash means the normal stack. Sockets are never removed from the
 * sockhash while alive (on this kernel that loses data): the decision is
 * made once, when the connection is established.
 *
 * Anything Shunt cannot decide fails open: the socket goes to the normal
 * kernel path untouched. The one deliberate refusal is a service that
 * exists but has no backend: connect()/sendmsg() fail at once with
 * ECONNREFUSED, as kube-proxy's REJECT rule does.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "lib/shunt.h"

#define ECONNREFUSED 111
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* also IP6T_SO_ORIGINAL_DST */
#define SOCK_STREAM 1
#define LOOPBACK4 0x7f000001 /* 127.0.0.1, host order */

/* The bits of the kernel's socket structs that sockops and sk_msg need,
 * relocated by CO-RE against the running kernel's BTF. */
struct sock___shunt {
	struct {
		__u32 val;
	} sk_uid;
	int sk_rcvbuf;
	void *sk_user_data;
} __attribute__((preserve_access_index));

struct tcp_sock___shunt {
	__u32 rcv_nxt;
	__u32 copied_seq;
	__u32 snd_una;
	__u32 write_seq;
} __attribute__((preserve_access_index));

/* struct sk_psock: msg_tot_len is the bytes waiting in the socket's
 * ingress_msg queue (what sk_msg redirected to it, not yet read). */
struct sk_psock___shunt {
	__u32 msg_tot_len;
} __attribute__((preserve_access_index));

#define SK_USER_DATA_PTRMASK (~7ULL) /* NOCOPY | BPF | PSOCK flag bits */

char __license[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct shunt_addr);
	__type(value, struct svc_value);
	__uint(max_entries, 65536);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct slot_key);
	__type(value, struct shunt_addr);
	__uint(max_entries, 1048576);
} slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, 262144);
} affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct member_key);
	__type(value, __u8);
	__uint(max_entries, 1048576);
} svc_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct revnat_key);
	__type(value, struct shunt_addr);
	__uint(max_entries, 262144);
} revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct pod_info);
	__uint(max_entries, 16384);
} pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct shunt_config);
	__uint(max_entries, 1);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct shunt_meta);
	__uint(max_entries, 1);
} meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct svc_stats);
	__uint(max_entries, 65536);
} svc_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_MAX);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct sidecar_cfg);
	__uint(max_entries, 16384);
} sidecars SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct local_ip_key);
	__type(value, struct local_ip);
	__uint(max_entries, 32768);
} local_ips SEC(".maps");

/* steer_pending: socket cookie -> original destination, from connect until
 * sockops sees the connection's source port. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u64);
	__type(value, struct shunt_addr);
	__uint(max_entries, 65536);
} steer_pending SEC(".maps");

/* origdst: the accepting side's view of a steered connection -> original
 * destination, answered by getsockopt(SO_ORIGINAL_DST). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock_key);
	__type(value, struct shunt_addr);
	__uint(max_entries, 262144);
} origdst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, struct sock_key);
	__type(value, __u64);
	__uint(max_entries, 65536);
} sock_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct pod_stats);
	__uint(max_entries, 16385);
} pod_counters SEC(".maps");

/* accel_socks: an accelerated socket's sockhash key -> the address of its
 * struct sock, so that the peer's sk_msg can read how much it has queued
 * (sk_msg may look sockets up in the sockhash but cannot release them).
 * Written when the socket enters the sockhash, deleted when it closes; read
 * only with bpf_probe_read_kernel. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock_key);
	__type(value, __u64);
	__uint(max_entries, 65536);
} accel_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct redir_state);
} redir_state SEC(".maps");

/* Force BTF for the types Go needs that no map names. */
const enum shunt_stat __unused_stat __attribute__((unused));
const enum socklb_mode __unused_socklb __attribute__((unused));
const enum shunt_layout __unused_layout __attribute__((unused));
const enum sockmap_mode __unused_sockmap __attribute__((unused));
const enum pod_flags __unused_pod_flags __attribute__((unused));
const enum config_flags __unused_config_flags __attribute__((unused));
const enum pod_stat __unused_pod_stat __attribute__((unused));

static __always_inline void pod_stat_add(__u32 id, __u32 idx, __u64 n)
{
	struct pod_stats *s = bpf_map_lookup_elem(&pod_counters, &id);
	if (s && idx < POD_STAT_MAX)
		s->v[idx] += n;
}

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += 1;
}

/* socklb_enabled reports whether this socket's network namespace gets
 * socket-level translation. */
static __always_inline int socklb_enabled(void *ctx)
{
	__u32 zero = 0;
	struct shunt_config *cfg = bpf_map_lookup_elem(&config, &zero);
	__u64 ns = bpf_get_netns_cookie(ctx);
	struct pod_info *pod;

	if (!cfg)
		return 1;
	if (ns == cfg->host_netns_cookie)
		return 1;
	pod = bpf_map_lookup_elem(&pods, &ns);
	if (pod) {
		if (pod->socklb == SOCKLB_BYPASS)
			goto bypass;
		if (pod->socklb == SOCKLB_TRANSLATE)
			return 1;
	}
	if (!cfg->host_ns_only)
		return 1;
bypass:
	stat_inc(STAT_BYPASS_NETNS);
	return 0;
}

static __always_inline void svc_stat(__u32 id, int translated)
{
	struct svc_stats *s = bpf_map_lookup_elem(&svc_counters, &id);
	if (!s)
		return;
	if (translated)
		s->translations++;
	else
		s->no_backend++;
}

enum xlate_result {
	XLATE_NONE = 0,    /* not a service: leave the socket alone */
	XLATE_DONE = 1,    /* *out holds the backend */
	XLATE_REFUSE = 2,  /* service without backend: refuse */
};

/* affinity_hit reads the backend client netns ns last used for *svc: it
 * counts while younger than the service's timeout and still a member. */
static __always_inline int affinity_hit(struct svc_value *svc, __u64 ns, __u64 now, struct shunt_addr *out)
{
	struct affinity_key k = {.netns = ns, .svc_id = svc->id};
	struct member_key mk = {.svc_id = svc->id};
	struct affinity_value *v;

	v = bpf_map_lookup_elem(&affinity, &k);
	if (!v || now - v->last_ns > (__u64)svc->affinity * 1000000000ULL)
		return 0;
	mk.backend = v->backend;
	if (!bpf_map_lookup_elem(&svc_backends, &mk))
		return 0;
	v->last_ns = now;
	*out = v->backend;
	return 1;
}

static __always_inline void affinity_store(struct svc_value *svc, __u64 ns, __u64 now, const struct shunt_addr *be)
{
	struct affinity_key k = {.netns = ns, .svc_id = svc->id};
	struct affinity_value v = {};

	v.backend = *be;
	v.last_ns = now;
	if (bpf_map_update_elem(&affinity, &k, &v, BPF_ANY))
		stat_inc(STAT_AFFINITY_FAIL);
}

/* pick selects a backend of service *svc. sticky != 0 picks the slot from
 * the socket cookie instead of at random, so that an unconnected UDP socket
 * keeps talking to one backend while the service is unchanged. A service
 * with affinity sends a client (network namespace ns) to the backend it
 * used last, while that is within the timeout and still a backend. */
static __always_inline int pick(struct svc_value *svc, struct shunt_addr *out, __u64 cookie, int sticky, __u64 ns)
{
	struct shunt_addr *be;
	struct slot_key sk = {};
	__u64 now = 0;
	__u32 r;

	if (svc->count == 0) {
		svc_stat(svc->id, 0);
		return XLATE_REFUSE;
	}
	if (svc->affinity) {
		now = bpf_ktime_get_ns();
		if (affinity_hit(svc, ns, now, out)) {
			stat_inc(STAT_AFFINITY_HIT);
			svc_stat(svc->id, 1);
			return XLATE_DONE;
		}
	}
	if (sticky)
		r = (__u32)(cookie ^ (cookie >> 32)) * 2654435761u;
	else
		r = bpf_get_prandom_u32();
	sk.svc_id = svc->id;
	sk.rev = svc->rev;
	sk.slot = r % svc->count;
	be = bpf_map_lookup_elem(&slots, &sk);
	if (!be) {
		stat_inc(STAT_SLOT_MISS);
		return XLATE_NONE;
	}
	*out = *be;
	if (svc->affinity)
		affinity_store(svc, ns, now, be);
	svc_stat(svc->id, 1);
	return XLATE_DONE;
}

static __always_inline void revnat_store(__u64 cookie, struct shunt_addr *backend, struct shunt_addr *front)
{
	struct revnat_key rk = {};

	rk.cookie = cookie;
	rk.backend = *backend;
	if (bpf_map_update_elem(&revnat, &rk, front, BPF_ANY))
		stat_inc(STAT_REVNAT_FAIL);
}

/* revnat_forget deletes the entry revnat_store wrote for backend (none: a
 * miss, harmless). */
static __always_inline void revnat_forget(__u64 cookie, struct shunt_addr *backend)
{
	struct revnat_key rk = {};

	rk.cookie = cookie;
	rk.backend = *backend;
	bpf_map_delete_elem(&revnat, &rk);
}

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	if (ctx->type == 2 /* SOCK_DGRAM */)
		return IPPROTO_UDP;
	if (ctx->type == 1 /* SOCK_STREAM */)
		return IPPROTO_TCP;
	return 0;
}

static __always_inline int refuse(void)
{
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

/* xlate4 handles connect4 and sendmsg4. */
static __always_inline int xlate4(struct bpf_sock_addr *ctx, int sticky)
{
	struct shunt_addr key = {}, be;
	struct svc_value *svc;
	__u64 cookie;
	int res;

	key.proto = sock_proto(ctx);
	if (!key.proto)
		return 1;
	key.family = SHUNT_AF_INET;
	key.ip[0] = ctx->user_ip4;
	key.port = (__u16)ctx->user_port;
	svc = bpf_map_lookup_elem(&services, &key);
	if (!svc)
		return 1;
	if (!socklb_enabled(ctx))
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	res = pick(svc, &be, cookie, sticky, bpf_get_netns_cookie(ctx));
	if (res == XLATE_REFUSE)
		return refuse();
	if (res != XLATE_DONE || be.family != SHUNT_AF_INET)
		return 1;
	revnat_store(cookie, &be, &key);
	ctx->user_ip4 = be.ip[0];
	ctx->user_port = be.port;
	return 1;
}

static __always_inline int is_v4mapped(__u32 *ip)
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff);
}

/* xlate6 handles connect6 and sendmsg6, including v4-mapped frontends on
 * dual-stack sockets. */
static __always_inline int xlate6(struct bpf_sock_addr *ctx, int sticky)
{
	struct shunt_addr key = {}, be;
	struct svc_value *svc;
	__u32 ip[4];
	__u64 cookie;
	int res, mapped;

	key.proto = sock_proto(ctx);
	if (!key.proto)
		return 1;
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	mapped = is_v4mapped(ip);
	if (mapped) {
		key.family = SHUNT_AF_INET;
		key.ip[0] = ip[3];
	} else {
		key.family = SHUNT_AF_INET6;
		key.ip[0] = ip[0];
		key.ip[1] = ip[1];
		key.ip[2] = ip[2];
		key.ip[3] = ip[3];
	}
	key.port = (__u16)ctx->user_port;
	svc = bpf_map_lookup_elem(&services, &key);
	if (!svc)
		return 1;
	if (!socklb_enabled(ctx))
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	res = pick(svc, &be, cookie, sticky, bpf_get_netns_cookie(ctx));
	if (res == XLATE_REFUSE)
		return refuse();
	if (res != XLATE_DONE || be.family != key.family)
		return 1;
	revnat_store(cookie, &be, &key);
	if (mapped) {
		stat_inc(STAT_V4MAPPED);
		ctx->user_ip6[3] = be.ip[0];
	} else {
		ctx->user_ip6[0] = be.ip[0];
		ctx->user_ip6[1] = be.ip[1];
		ctx->user_ip6[2] = be.ip[2];
		ctx->user_ip6[3] = be.ip[3];
	}
	ctx->user_port = be.port;
	return 1;
}

/* ---- Sidecar steering ---- */

static __always_inline int is_loopback(const struct shunt_addr *a)
{
	if (a->family == SHUNT_AF_INET)
		return (bpf_ntohl(a->ip[0]) >> 24) == 127;
	return a->ip[0] == 0 && a->ip[1] == 0 && a->ip[2] == 0 && a->ip[3] == bpf_htonl(1);
}

static __always_inline int port_listed(__u16 port, const __u16 *list, __u8 n)
{
	for (int i = 0; i < SIDECAR_MAX_PORTS; i++) {
		if (i >= n)
			break;
		if (list[i] == port)
			return 1;
	}
	return 0;
}

static __always_inline int cidr_match(const struct shunt_cidr *c, const struct shunt_addr *a)
{
	__u32 left = c->prefix_len;

	if (c->family != a->family)
		return 0;
	for (int w = 0; w < 4; w++) {
		__u32 bits = left > 32 ? 32 : left;
		__u32 mask;

		if (bits == 0)
			return 1;
		mask = bits == 32 ? 0xffffffffu : ~(0xffffffffu >> bits);
		if ((bpf_ntohl(a->ip[w]) ^ bpf_ntohl(c->ip[w])) & mask)
			return 0;
		left -= bits;
	}
	return 1;
}

static __always_inline int cidr_listed(const struct shunt_cidr *list, __u8 n, const struct shunt_addr *a)
{
	for (int i = 0; i < SIDECAR_MAX_CIDRS; i++) {
		if (i >= n)
			break;
		if (cidr_match(&list[i], a))
			return 1;
	}
	return 0;
}

/* local_pod returns the netns cookie of the enrolled pod on this node that
 * owns address a, or 0. */
static __always_inline __u64 local_pod(const struct shunt_addr *a)
{
	struct local_ip_key k = {};
	struct local_ip *v;

	k.family = a->family;
	k.ip[0] = a->ip[0];
	k.ip[1] = a->ip[1];
	k.ip[2] = a->ip[2];
	k.ip[3] = a->ip[3];
	v = bpf_map_lookup_elem(&local_ips, &k);
	return v ? v->netns_cookie : 0;
}

/* wants_outbound decides whether an app's connection to dst goes to its
 * sidecar (Istio's include/exclude semantics; exclusions win). */
static __always_inline int wants_outbound(const struct sidecar_cfg *sc, const struct shunt_addr *dst, __u64 own_ns)
{
	if (is_loopback(dst))
		return 0;
	if (port_listed(bpf_ntohs(dst->port), sc->excl_ports, sc->n_excl_ports))
		return 0;
	if (cidr_listed(sc->excl_cidrs, sc->n_excl_cidrs, dst))
		return 0;
	if (sc->n_incl_cidrs && !cidr_listed(sc->incl_cidrs, sc->n_incl_cidrs, dst))
		return 0;
	/* The pod's own address: Istio leaves that to the app too. */
	if (local_pod(dst) == own_ns)
		return 0;
	return 1;
}

/* inbound_port returns the inbound listener port (host order) that a
 * sidecar's connection to dst should go to instead, or 0: dst must be
 * another enrolled pod with a sidecar on this node. */
static __always_inline __u16 inbound_port(const struct shunt_addr *dst, __u64 own_ns)
{
	struct sidecar_cfg *peer;
	struct pod_info *pod;
	__u64 ns;
	__u16 port = bpf_ntohs(dst->port);

	ns = local_pod(dst);
	if (!ns || ns == own_ns)
		return 0;
	pod = bpf_map_lookup_elem(&pods, &ns);
	if (!pod || !(pod->flags & POD_F_SIDECAR))
		return 0;
	peer = bpf_map_lookup_elem(&sidecars, &ns);
	if (!peer)
		return 0;
	if (port == peer->inbound_port || port == peer->outbound_port)
		return 0;
	if (port_listed(port, peer->excl_in_ports, peer->n_excl_in_ports))
		return 0;
	return peer->inbound_port;
}

static __always_inline void steer_record(__u64 cookie, struct shunt_addr *orig)
{
	if (bpf_map_update_elem(&steer_pending, &cookie, orig, BPF_ANY))
		stat_inc(STAT_ORIGDST_FAIL);
}

/* sidecar_of returns the sidecar settings of the socket's pod, or NULL. */
static __always_inline struct sidecar_cfg *sidecar_of(void *ctx, __u64 ns, struct pod_info **podp)
{
	struct pod_info *pod = bpf_map_lookup_elem(&pods, &ns);

	*podp = pod;
	if (!pod || !(pod->flags & POD_F_SIDECAR))
		return NULL;
	return bpf_map_lookup_elem(&sidecars, &ns);
}

SEC("cgroup/connect4")
int shunt_connect4(struct bpf_sock_addr *ctx)
{
	struct shunt_addr dst = {}, now = {}, front;
	struct sidecar_cfg *sc;
	struct pod_info *pod;
	__u64 ns, cookie;
	__u16 in;

	if (ctx->type != SOCK_STREAM)
		return xlate4(ctx, 0);
	ns = bpf_get_netns_cookie(ctx);
	sc = sidecar_of(ctx, ns, &pod);
	if (!sc || !pod)
		return xlate4(ctx, 0);
	dst.family = SHUNT_AF_INET;
	dst.proto = IPPROTO_TCP;
	dst.ip[0] = ctx->user_ip4;
	dst.port = (__u16)ctx->user_port;
	cookie = bpf_get_socket_cookie(ctx);
	if ((__u32)bpf_get_current_uid_gid() != sc->uid) {
		/* An app: to its sidecar, untranslated (the proxy routes by the
		 * service address). */
		if (!wants_outbound(sc, &dst, ns)) {
			pod_stat_add(pod->id, POD_STAT_STEER_SKIP, 1);
			return xlate4(ctx, 0);
		}
		now = dst;
		now.ip[0] = bpf_htonl(LOOPBACK4);
		now.port = bpf_htons(sc->outbound_port);
		steer_record(cookie, &dst);
		revnat_store(cookie, &now, &dst);
		ctx->user_ip4 = now.ip[0];
		ctx->user_port = now.port;
		pod_stat_add(pod->id, POD_STAT_STEER_OUTBOUND, 1);
		return 1;
	}
	/* The sidecar: socket LB first, then same-node inbound steering. */
	xlate4(ctx, 0);
	now = dst;
	now.ip[0] = ctx->user_ip4;
	now.port = (__u16)ctx->user_port;
	in = inbound_port(&now, ns);
	if (!in)
		return 1;
	front = dst; /* what getpeername shows: the VIP if translated */
	steer_record(cookie, &now);
	revnat_forget(cookie, &now); /* the socket LB's entry: the peer is the inbound port now */
	now.port = bpf_htons(in);
	revnat_store(cookie, &now, &front);
	ctx->user_port = now.port;
	pod_stat_add(pod->id, POD_STAT_STEER_INBOUND, 1);
	return 1;
}

SEC("cgroup/connect6")
int shunt_connect6(struct bpf_sock_addr *ctx)
{
	struct shunt_addr dst = {}, now = {}, front;
	struct sidecar_cfg *sc;
	struct pod_info *pod;
	__u64 ns, cookie;
	__u32 ip[4];
	__u16 in;
	int mapped;

	if (ctx->type != SOCK_STREAM)
		return xlate6(ctx, 0);
	ns = bpf_get_netns_cookie(ctx);
	sc = sidecar_of(ctx, ns, &pod);
	if (!sc || !pod)
		return xlate6(ctx, 0);
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	mapped = is_v4mapped(ip);
	dst.proto = IPPROTO_TCP;
	if (mapped) {
		dst.family = SHUNT_AF_INET;
		dst.ip[0] = ip[3];
	} else {
		dst.family = SHUNT_AF_INET6;
		dst.ip[0] = ip[0];
		dst.ip[1] = ip[1];
		dst.ip[2] = ip[2];
		dst.ip[3] = ip[3];
	}
	dst.port = (__u16)ctx->user_port;
	cookie = bpf_get_socket_cookie(ctx);
	if ((__u32)bpf_get_current_uid_gid() != sc->uid) {
		if (!wants_outbound(sc, &dst, ns)) {
			pod_stat_add(pod->id, POD_STAT_STEER_SKIP, 1);
			return xlate6(ctx, 0);
		}
		now = dst;
		if (mapped) {
			now.ip[0] = bpf_htonl(LOOPBACK4);
			ctx->user_ip6[3] = now.ip[0];
		} else {
			now.ip[0] = 0;
			now.ip[1] = 0;
			now.ip[2] = 0;
			now.ip[3] = bpf_htonl(1);
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = 0;
			ctx->user_ip6[3] = now.ip[3];
		}
		now.port = bpf_htons(sc->outbound_port);
		steer_record(cookie, &dst);
		revnat_store(cookie, &now, &dst);
		ctx->user_port = now.port;
		pod_stat_add(pod->id, POD_STAT_STEER_OUTBOUND, 1);
		return 1;
	}
	xlate6(ctx, 0);
	now = dst;
	if (mapped) {
		now.ip[0] = ctx->user_ip6[3];
	} else {
		now.ip[0] = ctx->user_ip6[0];
		now.ip[1] = ctx->user_ip6[1];
		now.ip[2] = ctx->user_ip6[2];
		now.ip[3] = ctx->user_ip6[3];
	}
	now.port = (__u16)ctx->user_port;
	in = inbound_port(&now, ns);
	if (!in)
		return 1;
	front = dst;
	steer_record(cookie, &now);
	revnat_forget(cookie, &now); /* the socket LB's entry: the peer is the inbound port now */
	now.port = bpf_htons(in);
	revnat_store(cookie, &now, &front);
	ctx->user_port = now.port;
	pod_stat_add(pod->id, POD_STAT_STEER_INBOUND, 1);
	return 1;
}

/* ---- sockops: original destinations and the sockhash ---- */

/* conn is a TCP connection's addresses (network order) as seen from one
 * end. Every context field is read unconditionally, at a constant offset:
 * the verifier refuses context pointers that the compiler would otherwise
 * compute once and share between the IPv4 and IPv6 branches. */
struct conn {
	__u32 l[4], r[4];
	__u16 lp, rp;
	__u32 family;
};

static __always_inline void conn_set(struct conn *c, __u32 family, __u32 l4, __u32 r4, const __u32 *l6, const __u32 *r6)
{
	c->family = family;
	if (family == SHUNT_AF_INET) {
		c->l[0] = l4;
		c->r[0] = r4;
		c->l[1] = c->l[2] = c->l[3] = c->r[1] = c->r[2] = c->r[3] = 0;
		return;
	}
	c->l[0] = l6[0];
	c->l[1] = l6[1];
	c->l[2] = l6[2];
	c->l[3] = l6[3];
	c->r[0] = r6[0];
	c->r[1] = r6[1];
	c->r[2] = r6[2];
	c->r[3] = r6[3];
	/* v4-mapped (dual-stack socket): as IPv4, so both ends agree. */
	if (c->l[0] == 0 && c->l[1] == 0 && c->l[2] == bpf_htonl(0xffff)) {
		c->family = SHUNT_AF_INET;
		c->l[0] = c->l[3];
		c->r[0] = c->r[3];
		c->l[2] = c->l[3] = c->r[1] = c->r[2] = c->r[3] = 0;
	}
}

static __always_inline void sockops_conn(struct bpf_sock_ops *skops, struct conn *c)
{
	__u32 family = skops->family;
	__u32 l4 = skops->local_ip4, r4 = skops->remote_ip4;
	__u32 l6[4], r6[4];

	l6[0] = skops->local_ip6[0];
	l6[1] = skops->local_ip6[1];
	l6[2] = skops->local_ip6[2];
	l6[3] = skops->local_ip6[3];
	r6[0] = skops->remote_ip6[0];
	r6[1] = skops->remote_ip6[1];
	r6[2] = skops->remote_ip6[2];
	r6[3] = skops->remote_ip6[3];
	c->lp = bpf_htons((__u16)skops->local_port);
	c->rp = (__u16)(skops->remote_port >> 16);
	conn_set(c, family, l4, r4, l6, r6);
}

static __always_inline int ip_loopback(__u32 family, const __u32 *ip)
{
	if (family == SHUNT_AF_INET)
		return (bpf_ntohl(ip[0]) >> 24) == 127;
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1);
}

/* conn_key builds the sockhash / origdst key of c seen from its own end
 * (peer 0) or from the other end (peer 1). Loopback connections carry the
 * netns cookie: 127.0.0.1 exists in every namespace. */
static __always_inline void conn_key(const struct conn *c, struct sock_key *k, int peer, __u64 ns)
{
	const __u32 *l = peer ? c->r : c->l;
	const __u32 *r = peer ? c->l : c->r;

	k->family = c->family;
	k->local_ip[0] = l[0];
	k->local_ip[1] = l[1];
	k->local_ip[2] = l[2];
	k->local_ip[3] = l[3];
	k->remote_ip[0] = r[0];
	k->remote_ip[1] = r[1];
	k->remote_ip[2] = r[2];
	k->remote_ip[3] = r[3];
	k->local_port = peer ? c->rp : c->lp;
	k->remote_port = peer ? c->lp : c->rp;
	k->netns = ip_loopback(c->family, c->r) ? ns : 0;
}

static __always_inline void conn_addr(const struct conn *c, int remote, struct shunt_addr *a)
{
	const __u32 *ip = remote ? c->r : c->l;

	a->family = c->family;
	a->proto = IPPROTO_TCP;
	a->port = remote ? c->rp : c->lp;
	a->ip[0] = ip[0];
	a->ip[1] = ip[1];
	a->ip[2] = ip[2];
	a->ip[3] = ip[3];
}

/* on_connect moves a steered socket's original destination from its
 * cookie to the key its peer will look it up by, before the SYN leaves. */
static __always_inline void on_connect(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct shunt_addr *orig = bpf_map_lookup_elem(&steer_pending, &cookie);
	struct shunt_addr val;
	struct sock_key k = {};
	struct conn c;

	if (!orig)
		return;
	val = *orig;
	bpf_map_delete_elem(&steer_pending, &cookie);
	sockops_conn(skops, &c);
	conn_key(&c, &k, 1, bpf_get_netns_cookie(skops));
	if (bpf_map_update_elem(&origdst, &k, &val, BPF_ANY))
		stat_inc(STAT_ORIGDST_FAIL);
}

static __always_inline __u32 sock_uid(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock___shunt *s;

	if (!sk)
		return (__u32)-1;
	s = (struct sock___shunt *)bpf_skc_to_tcp_sock(sk);
	if (!s)
		return (__u32)-1;
	return s->sk_uid.val;
}

/* is_sidecar_link tells whether a connection of a sidecar socket is the
 * sidecar<->sidecar hop between two pods on this node: to a peer pod's
 * inbound listener, or accepted on this pod's inbound listener from a pod
 * with a sidecar. */
static __always_inline int is_sidecar_link(const struct conn *c, __u64 ns, const struct sidecar_cfg *sc)
{
	struct shunt_addr remote = {};
	struct sidecar_cfg *peer;
	__u64 pns;

	conn_addr(c, 1, &remote);
	pns = local_pod(&remote);
	if (!pns || pns == ns)
		return 0;
	peer = bpf_map_lookup_elem(&sidecars, &pns);
	if (!peer)
		return 0;
	if (bpf_ntohs(c->rp) == peer->inbound_port)
		return 1;
	return bpf_ntohs(c->lp) == sc->inbound_port;
}

/* on_established decides, once per connection, whether this end goes into
 * the sockhash. It is never taken out while the connection lives. */
static __always_inline void on_established(struct bpf_sock_ops *skops)
{
	__u32 zero = 0;
	struct shunt_config *cfg;
	struct sidecar_cfg *sc;
	struct pod_info *pod;
	struct shunt_addr remote = {};
	struct sock___shunt *tp;
	struct redir_state *st;
	struct bpf_sock *sk;
	struct sock_key k = {};
	struct conn c;
	__u64 addr;
	__u64 ns = bpf_get_netns_cookie(skops);

	pod = bpf_map_lookup_elem(&pods, &ns);
	if (!pod || pod->sockmap == SOCKMAP_OFF)
		return;
	/* Only connections whose peer is on this node can be short-cut. */
	sockops_conn(skops, &c);
	conn_addr(&c, 1, &remote);
	if (!is_loopback(&remote) && !local_pod(&remote))
		return;
	if (pod->sockmap != SOCKMAP_ON) {
		/* auto: only the sidecar<->sidecar hop, whose I/O style is a
		 * proxy's, and only on a kernel that passed the self-test. */
		if (!(pod->flags & POD_F_SIDECAR))
			return;
		sc = bpf_map_lookup_elem(&sidecars, &ns);
		if (!sc || sock_uid(skops) != sc->uid || !is_sidecar_link(&c, ns, sc))
			return;
		cfg = bpf_map_lookup_elem(&config, &zero);
		if (!cfg || !(cfg->flags & CONFIG_F_SOCKMAP_SAFE)) {
			pod_stat_add(pod->id, POD_STAT_SOCK_FALLBACK, 1);
			return;
		}
	}
	conn_key(&c, &k, 0, ns);
	/* sk_msg redirects only sends of sockets with this state, so it
	 * exists before the first send or never. */
	sk = skops->sk;
	if (!sk)
		return;
	st = bpf_sk_storage_get(&redir_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	tp = (struct sock___shunt *)bpf_skc_to_tcp_sock(sk);
	if (!st || !tp) {
		stat_inc(STAT_SOCKHASH_FAIL);
		return;
	}
	addr = (__u64)tp;
	if (bpf_map_update_elem(&accel_socks, &k, &addr, BPF_ANY)) {
		stat_inc(STAT_SOCKHASH_FAIL);
		return;
	}
	st->registered = 1;
	if (bpf_sock_hash_update(skops, &sock_hash, &k, BPF_NOEXIST)) {
		bpf_map_delete_elem(&accel_socks, &k);
		stat_inc(STAT_SOCKHASH_FAIL);
		return;
	}
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	pod_stat_add(pod->id, POD_STAT_SOCK_INSERT, 1);
}

SEC("sockops")
int shunt_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != SHUNT_AF_INET && skops->family != SHUNT_AF_INET6)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		on_connect(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_established(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			__u64 ns = bpf_get_netns_cookie(skops);
			struct pod_info *pod = bpf_map_lookup_elem(&pods, &ns);
			struct sock_key k = {};
			struct conn c;

			sockops_conn(skops, &c);
			conn_key(&c, &k, 0, ns);
			bpf_map_delete_elem(&accel_socks, &k);
			if (pod)
				pod_stat_add(pod->id, POD_STAT_SOCK_CLOSE, 1);
		}
		break;
	}
	return 1;
}

/* kread reads a u32 of the kernel object at addr + off; 0 on success. */
static __always_inline long kread(__u32 *dst, __u64 addr, __u32 off)
{
	return bpf_probe_read_kernel(dst, sizeof(*dst), (void *)(addr + off));
}

/* peer_full tells whether a send of size bytes must not be redirected to
 * the peer socket at address peer, because its ingress queue already holds
 * as much as its receive buffer (or the configured redirect_queue, when
 * larger: the peer's rcvbuf does not grow on this path as TCP's autotuning
 * would let it): a redirected send never blocks, so without this check a
 * slow reader would let the sender queue without bound (no back-pressure).
 * Anything that cannot be read counts as full: TCP. */
static __always_inline int peer_full(__u64 peer, __u32 size)
{
	__u32 zero = 0;
	struct shunt_config *cfg = bpf_map_lookup_elem(&config, &zero);
	__u64 ud = 0;
	__u32 queued, rcvbuf;

	if (!bpf_core_field_exists(struct sk_psock___shunt, msg_tot_len))
		return 1;
	if (bpf_probe_read_kernel(&ud, sizeof(ud), (void *)(peer + bpf_core_field_offset(struct sock___shunt, sk_user_data))))
		return 1;
	ud &= SK_USER_DATA_PTRMASK;
	if (!ud || kread(&queued, ud, bpf_core_field_offset(struct sk_psock___shunt, msg_tot_len)) ||
	    kread(&rcvbuf, peer, bpf_core_field_offset(struct sock___shunt, sk_rcvbuf)))
		return 1;
	if (cfg && cfg->redirect_queue > rcvbuf)
		rcvbuf = cfg->redirect_queue;
	return queued > 0 && (__u64)queued + size > (__u64)rcvbuf;
}

/* tcp_drained tells whether every byte self sent through TCP has been
 * read by the peer socket at address peer: all of it acknowledged (so in
 * the peer's receive queue, or read) and the peer's receive queue empty.
 * Only then may redirects resume without overtaking bytes still on the
 * TCP path. */
static __always_inline int tcp_drained(struct bpf_sock *self, __u64 peer)
{
	struct tcp_sock___shunt *a = (struct tcp_sock___shunt *)bpf_skc_to_tcp_sock(self);
	__u32 rcv_nxt, copied_seq;

	if (!a || a->write_seq != a->snd_una)
		return 0;
	if (kread(&rcv_nxt, peer, bpf_core_field_offset(struct tcp_sock___shunt, rcv_nxt)) ||
	    kread(&copied_seq, peer, bpf_core_field_offset(struct tcp_sock___shunt, copied_seq)))
		return 0;
	return rcv_nxt == copied_seq;
}

/* shunt_sk_msg runs on every send of a socket in the sockhash: the bytes go
 * straight to the peer socket's receive queue when the peer is in the
 * sockhash too and has room, else through the normal stack.
 *
 * Back-pressure: when the peer's queue is full the send takes TCP, which
 * blocks the sender as usual, and so do all later sends until everything
 * sent through TCP has been read (redirected bytes are read before TCP
 * ones, so resuming earlier could reorder the stream). The same rule covers
 * sends made before the peer entered the sockhash. */
SEC("sk_msg")
int shunt_sk_msg(struct sk_msg_md *msg)
{
	struct sock_key peer = {};
	__u64 ns = bpf_get_netns_cookie(msg);
	struct redir_state *st;
	struct bpf_sock *sk = msg->sk;
	__u64 *psk;
	struct pod_info *pod;
	__u32 size = msg->size;
	__u32 family = msg->family;
	__u32 l4 = msg->local_ip4, r4 = msg->remote_ip4;
	__u32 l6[4], r6[4];
	struct conn c;
	long ret;

	l6[0] = msg->local_ip6[0];
	l6[1] = msg->local_ip6[1];
	l6[2] = msg->local_ip6[2];
	l6[3] = msg->local_ip6[3];
	r6[0] = msg->remote_ip6[0];
	r6[1] = msg->remote_ip6[1];
	r6[2] = msg->remote_ip6[2];
	r6[3] = msg->remote_ip6[3];
	c.lp = bpf_htons((__u16)msg->local_port);
	c.rp = (__u16)(msg->remote_port >> 16);
	conn_set(&c, family, l4, r4, l6, r6);
	conn_key(&c, &peer, 1, ns);
	pod = bpf_map_lookup_elem(&pods, &ns);
	if (!sk)
		goto miss;
	st = bpf_sk_storage_get(&redir_state, sk, 0, 0);
	if (!st)
		goto miss; /* in the sockhash since before this program: TCP */
	if (!st->registered) {
		/* Put in the sockhash by the agent itself (the self-test), not by
		 * sockops: make this socket findable by its peer. */
		struct sock___shunt *tp = (struct sock___shunt *)bpf_skc_to_tcp_sock(sk);
		struct sock_key own = {};
		__u64 addr;

		if (!tp)
			goto miss;
		addr = (__u64)tp;
		conn_key(&c, &own, 0, ns);
		if (!bpf_map_update_elem(&accel_socks, &own, &addr, BPF_ANY))
			st->registered = 1;
	}
	psk = bpf_map_lookup_elem(&accel_socks, &peer);
	if (!psk) {
		/* Not (yet) accelerated: a peer accepting this connection enters
		 * the sockhash only when its handshake completes, after which
		 * bytes sent now may still sit in its TCP queue. */
		st->tcp = 1;
		goto miss;
	}
	if (st->tcp) {
		if (!tcp_drained(sk, *psk))
			goto full;
		st->tcp = 0;
		if (pod)
			pod_stat_add(pod->id, POD_STAT_MSG_RESUME, 1);
	}
	if (peer_full(*psk, size)) {
		st->tcp = 1;
		goto full;
	}
	ret = bpf_msg_redirect_hash(msg, &sock_hash, &peer, BPF_F_INGRESS);
	if (ret == SK_PASS) {
		stat_inc(STAT_MSG_REDIRECT);
		if (pod) {
			pod_stat_add(pod->id, POD_STAT_MSG_REDIRECT, 1);
			pod_stat_add(pod->id, POD_STAT_BYTES_REDIRECT, size);
		}
		return SK_PASS;
	}
	/* The peer left the sockhash between lookup and redirect (closed):
	 * TCP from now on. */
	st->tcp = 1;
miss:
	stat_inc(STAT_MSG_MISS);
	if (pod) {
		pod_stat_add(pod->id, POD_STAT_MSG_MISS, 1);
		pod_stat_add(pod->id, POD_STAT_BYTES_TCP, size);
	}
	return SK_PASS;
full:
	stat_inc(STAT_MSG_BACKPRESSURE);
	if (pod) {
		pod_stat_add(pod->id, POD_STAT_MSG_BACKPRESSURE, 1);
		pod_stat_add(pod->id, POD_STAT_BYTES_TCP, size);
	}
	return SK_PASS;
}

/* shunt_getsockopt answers getsockopt(SO_ORIGINAL_DST) (and
 * IP6T_SO_ORIGINAL_DST) on the accepting side of a steered connection;
 * everything else is left as the kernel answered it. */
SEC("cgroup/getsockopt")
int shunt_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock_key k = {};
	struct shunt_addr *orig;
	struct pod_info *pod;
	__u64 ns;

	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	if (!sk)
		return 1;
	{
		__u32 family = sk->family;
		__u32 l4 = sk->src_ip4, r4 = sk->dst_ip4;
		__u32 l6[4], r6[4];
		struct conn c;

		if (family != SHUNT_AF_INET && family != SHUNT_AF_INET6)
			return 1;
		l6[0] = sk->src_ip6[0];
		l6[1] = sk->src_ip6[1];
		l6[2] = sk->src_ip6[2];
		l6[3] = sk->src_ip6[3];
		r6[0] = sk->dst_ip6[0];
		r6[1] = sk->dst_ip6[1];
		r6[2] = sk->dst_ip6[2];
		r6[3] = sk->dst_ip6[3];
		c.lp = bpf_htons((__u16)sk->src_port);
		c.rp = (__u16)sk->dst_port;
		conn_set(&c, family, l4, r4, l6, r6);
		ns = bpf_get_netns_cookie(ctx);
		conn_key(&c, &k, 0, ns);
	}
	orig = bpf_map_lookup_elem(&origdst, &k);
	if (!orig)
		return 1;
	if (orig->family == SHUNT_AF_INET && ctx->level == SOL_IP) {
		/* struct sockaddr_in */
		__u8 *p = ctx->optval;
		if (p + 16 > (__u8 *)ctx->optval_end)
			return 1;
		*(__u16 *)p = SHUNT_AF_INET;
		*(__u16 *)(p + 2) = orig->port;
		*(__u32 *)(p + 4) = orig->ip[0];
		*(__u64 *)(p + 8) = 0;
		ctx->optlen = 16;
	} else if (ctx->level == SOL_IPV6) {
		/* struct sockaddr_in6; an IPv4 destination as v4-mapped */
		__u8 *p = ctx->optval;
		int v4 = orig->family == SHUNT_AF_INET;
		if (p + 28 > (__u8 *)ctx->optval_end)
			return 1;
		*(__u16 *)p = SHUNT_AF_INET6;
		*(__u16 *)(p + 2) = orig->port;
		*(__u32 *)(p + 4) = 0; /* flowinfo */
		*(__u32 *)(p + 8) = v4 ? 0 : orig->ip[0];
		*(__u32 *)(p + 12) = v4 ? 0 : orig->ip[1];
		*(__u32 *)(p + 16) = v4 ? bpf_htonl(0xffff) : orig->ip[2];
		*(__u32 *)(p + 20) = v4 ? orig->ip[0] : orig->ip[3];
		*(__u32 *)(p + 24) = 0; /* scope id */
		ctx->optlen = 28;
	} else {
		return 1;
	}
	ctx->retval = 0;
	pod = bpf_map_lookup_elem(&pods, &ns);
	if (pod)
		pod_stat_add(pod->id, POD_STAT_ORIGDST_ANSWER, 1);
	return 1;
}

SEC("cgroup/sendmsg4")
int shunt_sendmsg4(struct bpf_sock_addr *ctx)
{
	return xlate4(ctx, 1);
}

SEC("cgroup/sendmsg6")
int shunt_sendmsg6(struct bpf_sock_addr *ctx)
{
	return xlate6(ctx, 1);
}

/* revnat4 rewrites the peer address the application sees (getpeername,
 * recvmsg source) from the backend back to the frontend it asked for. */
static __always_inline int revnat4(struct bpf_sock_addr *ctx)
{
	struct revnat_key rk = {};
	struct shunt_addr *front;

	rk.backend.proto = sock_proto(ctx);
	if (!rk.backend.proto)
		return 1;
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.backend.family = SHUNT_AF_INET;
	rk.backend.ip[0] = ctx->user_ip4;
	rk.backend.port = (__u16)ctx->user_port;
	front = bpf_map_lookup_elem(&revnat, &rk);
	if (!front || front->family != SHUNT_AF_INET)
		return 1;
	stat_inc(STAT_REVNAT_HIT);
	ctx->user_ip4 = front->ip[0];
	ctx->user_port = front->port;
	return 1;
}

/* revnat_addr6 sets the address of a revnat key's backend from an IPv6
 * socket's peer: a v4-mapped address is keyed as the IPv4 one, as connect6
 * stored it. Returns whether it was mapped. */
static __always_inline int revnat_addr6(struct shunt_addr *b, __u32 *ip)
{
	if (is_v4mapped(ip)) {
		b->family = SHUNT_AF_INET;
		b->ip[0] = ip[3];
		return 1;
	}
	b->family = SHUNT_AF_INET6;
	b->ip[0] = ip[0];
	b->ip[1] = ip[1];
	b->ip[2] = ip[2];
	b->ip[3] = ip[3];
	return 0;
}

static __always_inline int revnat6(struct bpf_sock_addr *ctx)
{
	struct revnat_key rk = {};
	struct shunt_addr *front;
	__u32 ip[4];
	int mapped;

	rk.backend.proto = sock_proto(ctx);
	if (!rk.backend.proto)
		return 1;
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	rk.cookie = bpf_get_socket_cookie(ctx);
	mapped = revnat_addr6(&rk.backend, ip);
	rk.backend.port = (__u16)ctx->user_port;
	front = bpf_map_lookup_elem(&revnat, &rk);
	if (!front || front->family != rk.backend.family)
		return 1;
	stat_inc(STAT_REVNAT_HIT);
	if (mapped) {
		ctx->user_ip6[3] = front->ip[0];
	} else {
		ctx->user_ip6[0] = front->ip[0];
		ctx->user_ip6[1] = front->ip[1];
		ctx->user_ip6[2] = front->ip[2];
		ctx->user_ip6[3] = front->ip[3];
	}
	ctx->user_port = front->port;
	return 1;
}

SEC("cgroup/recvmsg4")
int shunt_recvmsg4(struct bpf_sock_addr *ctx)
{
	return revnat4(ctx);
}

SEC("cgroup/recvmsg6")
int shunt_recvmsg6(struct bpf_sock_addr *ctx)
{
	return revnat6(ctx);
}

SEC("cgroup/getpeername4")
int shunt_getpeername4(struct bpf_sock_addr *ctx)
{
	return revnat4(ctx);
}

SEC("cgroup/getpeername6")
int shunt_getpeername6(struct bpf_sock_addr *ctx)
{
	return revnat6(ctx);
}

/* shunt_sock_release forgets a closing socket's revnat entry for the peer
 * it was connected to (TCP, connected UDP), so the LRU holds live sockets
 * rather than evicting them for dead ones. An unconnected UDP socket's
 * entries (one per backend it sent to through sendmsg) are not known here:
 * they age out of the LRU. Never refuses: release cannot be denied. */
SEC("cgroup/sock_release")
int shunt_sock_release(struct bpf_sock *sk)
{
	struct shunt_addr peer = {};
	__u32 ip[4];

	/* by socket type, as sock_proto keyed it when the entry was written */
	if (sk->type == 1 /* SOCK_STREAM */)
		peer.proto = IPPROTO_TCP;
	else if (sk->type == 2 /* SOCK_DGRAM */)
		peer.proto = IPPROTO_UDP;
	else
		return 1;
	peer.port = (__u16)sk->dst_port;
	if (!peer.port)
		return 1; /* never connected */
	if (sk->family == SHUNT_AF_INET) {
		peer.family = SHUNT_AF_INET;
		peer.ip[0] = sk->dst_ip4;
	} else if (sk->family == SHUNT_AF_INET6) {
		ip[0] = sk->dst_ip6[0];
		ip[1] = sk->dst_ip6[1];
		ip[2] = sk->dst_ip6[2];
		ip[3] = sk->dst_ip6[3];
		revnat_addr6(&peer, ip);
	} else {
		return 1;
	}
	revnat_forget(bpf_get_socket_cookie(sk), &peer);
	return 1;
}
