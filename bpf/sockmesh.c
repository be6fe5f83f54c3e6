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
 * Anything Shunt cannot decide fails open: the socket goes to the normal
 * kernel path untouched. The one deliberate refusal is a service that
 * exists but has no backend: connect()/sendmsg() fail at once with
 * ECONNREFUSED, as kube-proxy's REJECT rule does.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/shunt.h"

#define ECONNREFUSED 111

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

/* Force BTF for the types Go needs that no map names. */
const enum shunt_stat __unused_stat __attribute__((unused));
const enum socklb_mode __unused_socklb __attribute__((unused));
const enum shunt_layout __unused_layout __attribute__((unused));

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

/* pick selects a backend of service *svc. sticky != 0 picks the slot from
 * the socket cookie instead of at random, so that an unconnected UDP socket
 * keeps talking to one backend while the service is unchanged. */
static __always_inline int pick(struct svc_value *svc, struct shunt_addr *out, __u64 cookie, int sticky)
{
	struct shunt_addr *be;
	struct slot_key sk = {};
	__u32 r;

	if (svc->count == 0) {
		svc_stat(svc->id, 0);
		return XLATE_REFUSE;
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
	res = pick(svc, &be, cookie, sticky);
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
	res = pick(svc, &be, cookie, sticky);
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

SEC("cgroup/connect4")
int shunt_connect4(struct bpf_sock_addr *ctx)
{
	return xlate4(ctx, 0);
}

SEC("cgroup/connect6")
int shunt_connect6(struct bpf_sock_addr *ctx)
{
	return xlate6(ctx, 0);
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
	mapped = is_v4mapped(ip);
	rk.cookie = bpf_get_socket_cookie(ctx);
	if (mapped) {
		rk.backend.family = SHUNT_AF_INET;
		rk.backend.ip[0] = ip[3];
	} else {
		rk.backend.family = SHUNT_AF_INET6;
		rk.backend.ip[0] = ip[0];
		rk.backend.ip[1] = ip[1];
		rk.backend.ip[2] = ip[2];
		rk.backend.ip[3] = ip[3];
	}
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
