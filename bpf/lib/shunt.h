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
	SHUNT_LAYOUT_VERSION = 2,
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
	__u32 affinity; /* client affinity timeout in seconds; 0 = none */
};

/* Session affinity (Kubernetes sessionAffinity: ClientIP). The socket LB
 * identifies a client by its network namespace (a pod; the node's own
 * namespace is one client), as it sees no source address at connect(). */
struct affinity_key {
	__u64 netns;
	__u32 svc_id;
	__u32 pad;
};

struct affinity_value {
	struct shunt_addr backend;
	__u32 pad;
	__u64 last_ns; /* bpf_ktime_get_ns() of the last connection */
};

/* svc_backends: the distinct backends of each service with affinity, so an
 * affinity entry is honoured only while its backend is still a member. */
struct member_key {
	__u32 svc_id;
	struct shunt_addr backend;
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

enum sockmap_mode {
	SOCKMAP_AUTO = 0, /* accelerate what is proven safe (sidecar<->sidecar) */
	SOCKMAP_ON = 1,   /* accelerate every enrolled TCP socket with a local peer */
	SOCKMAP_OFF = 2,  /* never put this pod's sockets in the sockhash */
};

enum pod_flags {
	POD_F_SIDECAR = 1, /* a sidecar proxy: sidecars[netns cookie] is set */
};

/* pods: network-namespace cookie -> enrolled pod. */
struct pod_info {
	__u32 id;     /* index into pod_counters; 1.. */
	__u8 socklb;  /* enum socklb_mode */
	__u8 sockmap; /* enum sockmap_mode (acceleration) */
	__u16 flags;  /* enum pod_flags */
};

#define SIDECAR_MAX_PORTS 16
#define SIDECAR_MAX_CIDRS 16

/* A CIDR: address in network order, IPv4 in ip[0]. */
struct shunt_cidr {
	__u32 ip[4];
	__u8 family;
	__u8 prefix_len;
	__u16 pad;
};

/* sidecars: netns cookie -> the pod's sidecar proxy settings. Ports in host
 * byte order. */
struct sidecar_cfg {
	__u32 uid;           /* the proxy's sockets are never steered */
	__u16 outbound_port; /* on 127.0.0.1 / ::1 */
	__u16 inbound_port;  /* on the pod's addresses */
	__u8 n_excl_ports;
	__u8 n_excl_in_ports;
	__u8 n_excl_cidrs;
	__u8 n_incl_cidrs;   /* 0 = every destination */
	__u16 excl_ports[SIDECAR_MAX_PORTS];
	__u16 excl_in_ports[SIDECAR_MAX_PORTS];
	struct shunt_cidr excl_cidrs[SIDECAR_MAX_CIDRS];
	struct shunt_cidr incl_cidrs[SIDECAR_MAX_CIDRS];
};

/* local_ips: an address of an enrolled pod on this node -> that pod. */
struct local_ip_key {
	__u32 ip[4];
	__u32 family;
};

struct local_ip {
	__u64 netns_cookie;
};

/* A TCP connection seen from one end. Addresses and ports in network byte
 * order. netns is the network namespace cookie for loopback connections
 * (127.0.0.0/8, ::1 are per namespace) and 0 otherwise, so both ends of a
 * connection between two pods compute each other's key. */
struct sock_key {
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u64 netns;
	__u16 local_port;
	__u16 remote_port;
	__u32 family;
};

/* config[0]: agent-wide settings, changeable at run time. */
struct shunt_config {
	__u64 host_netns_cookie; /* the node's own network namespace */
	__u32 host_ns_only;      /* 1: only host-netns sockets are translated */
	__u32 flags;             /* enum config_flags */
	__u32 redirect_queue;    /* bytes a peer's ingress queue may hold
	                          * before sends take TCP (or its rcvbuf) */
	__u32 pad;
};

enum config_flags {
	/* The sockmap self-test passed on this kernel: auto may accelerate. */
	CONFIG_F_SOCKMAP_SAFE = 1,
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
	STAT_ORIGDST_FAIL,      /* original-destination record not written */
	STAT_SOCKHASH_FAIL,     /* sockhash insert failed: socket left on TCP */
	STAT_MSG_REDIRECT,      /* sk_msg redirected a send to the peer socket */
	STAT_MSG_MISS,          /* sk_msg found no peer: normal stack */
	STAT_MSG_BACKPRESSURE,  /* sk_msg sent through TCP: peer's queue full */
	STAT_AFFINITY_HIT,      /* session affinity chose the backend */
	STAT_AFFINITY_FAIL,     /* affinity entry could not be written */
	STAT_MAX,
};

/* Per-socket state of an accelerated socket (sk_storage, created when the
 * socket enters the sockhash). tcp != 0: sends take the TCP path because
 * the peer's queue was full, until everything sent that way is consumed.
 * registered != 0: the socket's address is in accel_socks. */
struct redir_state {
	__u32 tcp;
	__u32 registered;
};

/* Per-pod counters (per-CPU array indexed by pod_info.id). Go label table in
 * agent/ is checked against POD_STAT_MAX by a test. */
enum pod_stat {
	POD_STAT_STEER_OUTBOUND = 0, /* app connect -> local sidecar outbound */
	POD_STAT_STEER_INBOUND,      /* sidecar connect -> peer pod's inbound */
	POD_STAT_STEER_SKIP,         /* app connect left alone: excluded/loopback */
	POD_STAT_ORIGDST_ANSWER,     /* SO_ORIGINAL_DST answered */
	POD_STAT_SOCK_INSERT,        /* socket put in the sockhash */
	POD_STAT_SOCK_CLOSE,         /* accelerated socket closed */
	POD_STAT_SOCK_FALLBACK,      /* would accelerate, but not proven safe */
	POD_STAT_MSG_REDIRECT,       /* sk_msg redirected to the peer socket */
	POD_STAT_BYTES_REDIRECT,
	POD_STAT_MSG_MISS,           /* peer not in the sockhash: normal stack */
	POD_STAT_MSG_BACKPRESSURE,   /* send taken by TCP: peer's queue full */
	POD_STAT_MSG_RESUME,         /* redirects resumed: TCP path drained */
	POD_STAT_BYTES_TCP,          /* bytes of sockhash sockets' sends that took TCP */
	POD_STAT_MAX,
};

struct pod_stats {
	__u64 v[POD_STAT_MAX];
};

#endif
