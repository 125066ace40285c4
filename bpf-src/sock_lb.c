// Socket-level Service load balancing (IPv4), as Cilium's kube-proxy replacement does it: the
// Service address is rewritten to a backend when the socket connects (TCP, connected UDP) or sends
// (unconnected UDP), so packets never carry the VIP and need no per-packet NAT. The reverse view
// (getpeername, the source of UDP replies) shows the VIP again, so applications see what they dialed.
//
// Compiled by bcc from nodeagent/kernel/bpf/loader.py, which substitutes PIN_DIR; every map is pinned there,
// so it outlives the agent and a restarted agent adopts it. Layout changes bump LAYOUT_VERSION in the
// loader, which moves PIN_DIR: an old map is never read with a new layout.
//
// The maps and their layouts are described in lib/maps.h, the backend pick in lib/pick.h.

#include <uapi/linux/bpf.h>
#include <linux/in.h>

#include "lib/cgroup.h"
#include "lib/maps.h"
#include "lib/pick.h"

#define NA_ECONNREFUSED 111
#define NA_NSEC_PER_SEC 1000000000ULL

// Where translate() keeps what untranslate() needs to show the Service address again.
enum na_remember {
    NA_REMEMBER_IN_MAP = 1,     // na_reverse, by socket cookie (sendmsg: unconnected UDP)
    NA_REMEMBER_IN_SOCKET = 2,  // na_sk_reverse, the socket's own storage (connect)
};

BPF_TABLE_PINNED("hash", struct svc_key, struct svc_val, na_services, NA_SERVICES_MAX, "PIN_DIR/na_services");
BPF_TABLE_PINNED("hash", struct slot_key, struct slot_val, na_slots, NA_SLOTS_MAX, "PIN_DIR/na_slots");
BPF_TABLE_PINNED("hash", u32, struct backend_val, na_backends, NA_BACKENDS_MAX, "PIN_DIR/na_backends");
BPF_TABLE_PINNED("lru_hash", struct rev_key, struct rev_val, na_reverse, NA_REVERSE_MAX, "PIN_DIR/na_reverse");
BPF_TABLE_PINNED("lru_hash", struct aff_key, struct aff_val, na_affinity, NA_AFFINITY_MAX, "PIN_DIR/na_affinity");
// A connected socket has one peer: its reverse entry lives in the socket itself (no hashing, no LRU
// eviction, freed with the socket). Unconnected UDP (sendmsg) may talk to many: na_reverse.
BPF_TABLE_PINNED7("sk_storage", int, struct sk_rev, na_sk_reverse, 0, "PIN_DIR/na_sk_reverse", BPF_F_NO_PREALLOC);

// lib/pick.h's one map access, here because bcc rewrites map calls only in the program's own text.
static __always_inline struct slot_val *na_slot_lookup(u32 id, u32 slot) {
    struct slot_key k = {.id = id, .slot = slot};
    return na_slots.lookup(&k);
}

// CGROUP_PROCEED: translated (or not a Service); CGROUP_REFUSE: the syscall fails with ECONNREFUSED.
static __always_inline int translate(struct bpf_sock_addr *ctx, enum na_remember remember) {
    if (ctx->user_family != AF_INET)
        return CGROUP_PROCEED;
    struct svc_key key = {.ip = ctx->user_ip4, .port = (u16)ctx->user_port, .proto = (u8)ctx->protocol};
    struct svc_val *svc = na_services.lookup(&key);
    if (!svc)
        return CGROUP_PROCEED;
    if (!na_has_backends(svc)) {
        bpf_set_retval(-NA_ECONNREFUSED);
        return CGROUP_REFUSE;
    }
    u32 backend_id = 0;
    int have = 0;
    struct aff_key ak = {};
    u64 now = 0;
    if (svc->affinity_s) {
        ak.netns = bpf_get_netns_cookie(ctx);
        ak.ip = key.ip;
        ak.port = key.port;
        ak.proto = key.proto;
        now = bpf_ktime_get_ns();
        struct aff_val *av = na_affinity.lookup(&ak);
        if (av && now - av->last < (u64)svc->affinity_s * NA_NSEC_PER_SEC &&
            na_backends.lookup(&av->backend)) {
            backend_id = av->backend;
            have = 1;
        }
    }
    if (!have && na_pick(svc, &backend_id) < 0)
        return CGROUP_PROCEED;  // a version being replaced this instant: let the connect go to the VIP unchanged
    struct backend_val *backend = na_backends.lookup(&backend_id);
    if (!backend)
        return CGROUP_PROCEED;
    if (svc->affinity_s) {
        struct aff_val av = {.backend = backend_id, .last = now};
        na_affinity.update(&ak, &av);
    }
    if (remember == NA_REMEMBER_IN_SOCKET) {
        struct bpf_sock *sk = ctx->sk;
        if (sk) {
            struct sk_rev *sr = na_sk_reverse.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
            if (sr) {
                sr->backend_ip = backend->ip;
                sr->backend_port = backend->port;
                sr->vip = key.ip;
                sr->vip_port = key.port;
            }
        }
    } else if (remember == NA_REMEMBER_IN_MAP) {
        struct rev_key rk = {.cookie = bpf_get_socket_cookie(ctx), .ip = backend->ip, .port = backend->port};
        struct rev_val rv = {.ip = key.ip, .port = key.port};
        na_reverse.update(&rk, &rv);
    }
    ctx->user_ip4 = backend->ip;
    ctx->user_port = (u32)backend->port;
    return CGROUP_PROCEED;
}

// Shows the Service address again where the application looks at its peer.
static __always_inline int untranslate(struct bpf_sock_addr *ctx) {
    if (ctx->user_family != AF_INET)
        return CGROUP_PROCEED;
    struct bpf_sock *sk = ctx->sk;
    if (sk) {
        struct sk_rev *sr = na_sk_reverse.sk_storage_get(sk, 0, 0);
        if (sr && sr->backend_ip == ctx->user_ip4 && sr->backend_port == (u16)ctx->user_port) {
            ctx->user_ip4 = sr->vip;
            ctx->user_port = (u32)sr->vip_port;
            return CGROUP_PROCEED;
        }
    }
    struct rev_key rk = {.cookie = bpf_get_socket_cookie(ctx), .ip = ctx->user_ip4, .port = (u16)ctx->user_port};
    struct rev_val *rv = na_reverse.lookup(&rk);
    if (rv) {
        ctx->user_ip4 = rv->ip;
        ctx->user_port = (u32)rv->port;
    }
    return CGROUP_PROCEED;
}

int na_connect4(struct bpf_sock_addr *ctx) { return translate(ctx, NA_REMEMBER_IN_SOCKET); }
int na_sendmsg4(struct bpf_sock_addr *ctx) { return translate(ctx, NA_REMEMBER_IN_MAP); }
int na_recvmsg4(struct bpf_sock_addr *ctx) { return untranslate(ctx); }
int na_getpeername4(struct bpf_sock_addr *ctx) { return untranslate(ctx); }
