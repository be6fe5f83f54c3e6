/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Shared layouts of Shunt's maps. This header is the one definition: Go
 * types are generated from it by bpf2go (-type), never mirrored by hand.
 *
 * Changing any struct here changes the pinned map layout: bump
 * SHUNT_LAYOUT_VERSION, and the agent refuses (or migrates) pinned maps of
 * another version on start.
 */
#ifndef SHUNT_H
#define SHUNT_H

#include <linux/types.h>

enum shunt_layout {
	SHUNT_LAYOUT_VERSION = 1,
};

#define SHUNT_AF_INET 2
#define SHUNT_AF_INET6 10

/* An L3/L4 address. IPv4 lives in ip[0] with ip[1..3] zero; all fields in
 * network byte order except family and proto. */
struct shunt_addr {
	__u32 ip[4];
	__u16 port;
	__u8 family; /* SHUNT_AF_INET or SHUNT_AF_INET6 */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
};

/* services: frontend (VIP, port, proto) -> service. */
struct svc_value {
	__u32 id;    /* index into svc_stats; stable for the service's life */
	__u16 count; /* backend slots in the active revision; 0 = no backend */
	__u8 rev;    /* active revision of the slots (0 or 1) */
	__u8 flags;  /* SVC_F_* */
};

/* Slots are written under the inactive revision first, then the service's
 * value is switched to it in one map update, then the old revision's slots
 * are deleted: a connect() never sees a half-written backend set. Weighted
 * selection repeats a backend in proportion to its weight. */
struct slot_key {
	__u32 svc_id;
	__u16 rev;
	__u16 slot; /* 0 .. count-1 */
};

/* revnat: (socket cookie, backend) -> the frontend the app asked for. Read by
 * getpeername and UDP recvmsg so the app sees the VIP. */
struct revnat_key {
	__u64 cookie;
	struct shunt_addr backend;
	__u32 pad;
};

enum socklb_mode {
	SOCKLB_INHERIT = 0,   /* follow shunt_config.host_ns_only */
	SOCKLB_BYPASS = 1,    /* never translate this pod's sockets */
	SOCKLB_TRANSLATE = 2, /* always translate, even if host_ns_only */
};

/* pods: network-namespace cookie -> enrolled pod. */
struct pod_info {
	__u32 id;
	__u8 socklb;  /* enum socklb_mode */
	__u8 sockmap; /* enum sockmap_mode (acceleration) */
	__u16 flags;
};

/* config[0]: agent-wide settings, changeable at run time. */
struct shunt_config {
	__u64 host_netns_cookie; /* the node's own network namespace */
	__u32 host_ns_only;      /* 1: only host-netns sockets are translated */
	__u32 pad;
};

/* meta[0]: describes the pinned maps. */
struct shunt_meta {
	__u32 layout_version;
	__u32 pad;
};

/* Per-service counters (per-CPU array indexed by svc_value.id). */
struct svc_stats {
	__u64 translations; /* connect/sendmsg translated to a backend */
	__u64 no_backend;   /* connect/sendmsg refused: service has no backend */
};

/* Global counters (per-CPU array indexed by enum shunt_stat). Go label
 * table in agent/ is checked against STAT_MAX by a test. */
enum shunt_stat {
	STAT_BYPASS_NETNS = 0,  /* socket LB skipped: hostNamespaceOnly */
	STAT_SLOT_MISS,         /* service without its slot: failed open */
	STAT_REVNAT_FAIL,       /* revnat entry could not be written */
	STAT_REVNAT_HIT,        /* getpeername/recvmsg answered with the VIP */
	STAT_V4MAPPED,          /* connect6 to a v4-mapped VIP translated */
	STAT_MAX,
};

#endif
