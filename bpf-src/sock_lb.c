// Socket-level Service load balancing (IPv4), as Cilium's kube-proxy replacement does it: the
// Service address is rewritten to a backend when the socket connects (TCP, connected UDP) or sends
// (unconnected UDP), so packets never carry the VIP and need no per-packet NAT. The reverse view
// (getpeername, the source of UDP replies) shows the VIP again, so applications see what they dialed.
//
// Compiled by bcc from nodeagent/kernel/bpf/loader.py, which substitutes PIN_DIR; every map is pinned there,
// so it outlives the agent and a restarted agent adopts it. Layout changes bump LAYOUT_VERSION in the
// loader, which moves PIN_DIR: an old map is never read with a new layout.
//
// Maps (keys and values in network byte order where they hold addresses and ports):
//   na_services:  (vip, port, proto) -> (version id, backend count, total weight, affinity seconds)
//   na_slots:     (version id, slot)  -> (backend id, cumulative weight): one version per backend set,
//                 written completely before na_services points at it, so a lookup never sees a
//                 half-written set
//   na_backends:  backend id -> (ip, port)
//   na_reverse:   (socket cookie, backend ip, port) -> (vip, port), LRU: getpeername and UDP replies
//   na_affinity:  (netns cookie, vip, port, proto) -> (backend id, last use): ClientIP affinity
//   na_sk_reverse: per connected socket, (backend, vip): getpeername and connected-UDP replies

#include <uapi/linux/bpf.h>
#include <linux/in.h>

#define NA_ECONNREFUSED 111
#define MAX_SEARCH 16  // binary search depth: up to 65,536 backends per Service

struct svc_key { u32 ip; u16 port; u8 proto; u8 pad; };
struct svc_val { u32 id; u32 count; u32 weight_total; u32 affinity_s; };
struct slot_key { u32 id; u32 slot; };
struct slot_val { u32 backend; u32 cum_weight; };
struct backend_val { u32 ip; u16 port; u16 pad; };
struct rev_key { u64 cookie; u32 ip; u16 port; u16 pad; };
struct rev_val { u32 ip; u16 port; u16 pad; };
struct aff_key { u64 netns; u32 ip; u16 port; u8 proto; u8 pad; };
struct aff_val { u32 backend; u32 pad; u64 last; };

BPF_TABLE_PINNED("hash", struct svc_key, struct svc_val, na_services, 131072, "PIN_DIR/na_services");
BPF_TABLE_PINNED("hash", struct slot_key, struct slot_val, na_slots, 1048576, "PIN_DIR/na_slots");
BPF_TABLE_PINNED("hash", u32, struct backend_val, na_backends, 1048576, "PIN_DIR/na_backends");
BPF_TABLE_PINNED("lru_hash", struct rev_key, struct rev_val, na_reverse, 262144, "PIN_DIR/na_reverse");
BPF_TABLE_PINNED("lru_hash", struct aff_key, struct aff_val, na_affinity, 262144, "PIN_DIR/na_affinity");
// A connected socket has one peer: its reverse entry lives in the socket itself (no hashing, no LRU
// eviction, freed with the socket). Unconnected UDP (sendmsg) may talk to many: na_reverse.
struct sk_rev { u32 backend_ip; u16 backend_port; u16 pad; u32 vip; u16 vip_port; u16 pad2; };
BPF_TABLE_PINNED7("sk_storage", int, struct sk_rev, na_sk_reverse, 0, "PIN_DIR/na_sk_reverse", BPF_F_NO_PREALLOC);

// The slot whose cumulative weight first exceeds r (weights are positive, so this is a proper
// weighted choice; with equal weights it is slot r).
static __always_inline int pick_slot(u32 id, u32 count, u32 r, u32 *backend) {
    u32 lo = 0, hi = count - 1;
    for (int i = 0; i < MAX_SEARCH; i++) {
        if (lo >= hi)
            break;
        u32 mid = lo + (hi - lo) / 2;
        struct slot_key k = {.id = id, .slot = mid};
        struct slot_val *v = na_slots.lookup(&k);
        if (!v)
            return -1;
        if (v->cum_weight > r)
            hi = mid;
        else
            lo = mid + 1;
    }
    struct slot_key k = {.id = id, .slot = lo};
    struct slot_val *v = na_slots.lookup(&k);
    if (!v)
        return -1;
    *backend = v->backend;
    return 0;
}

// 1: translated (or not a Service), 0: refuse (the syscall fails with ECONNREFUSED).
static __always_inline int translate(struct bpf_sock_addr *ctx, int remember) {
    if (ctx->user_family != AF_INET)
        return 1;
    struct svc_key key = {.ip = ctx->user_ip4, .port = (u16)ctx->user_port, .proto = (u8)ctx->protocol};
    struct svc_val *svc = na_services.lookup(&key);
    if (!svc)
        return 1;
    if (svc->count == 0 || svc->weight_total == 0) {
        bpf_set_retval(-NA_ECONNREFUSED);
        return 0;
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
        if (av && now - av->last < (u64)svc->affinity_s * 1000000000ULL &&
            na_backends.lookup(&av->backend)) {
            backend_id = av->backend;
            have = 1;
        }
    }
    if (!have && pick_slot(svc->id, svc->count, bpf_get_prandom_u32() % svc->weight_total, &backend_id) < 0)
        return 1;  // a version being replaced this instant: let the connect go to the VIP unchanged
    struct backend_val *backend = na_backends.lookup(&backend_id);
    if (!backend)
        return 1;
    if (svc->affinity_s) {
        struct aff_val av = {.backend = backend_id, .last = now};
        na_affinity.update(&ak, &av);
    }
    if (remember == 2) {
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
    } else if (remember) {
        struct rev_key rk = {.cookie = bpf_get_socket_cookie(ctx), .ip = backend->ip, .port = backend->port};
        struct rev_val rv = {.ip = key.ip, .port = key.port};
        na_reverse.update(&rk, &rv);
    }
    ctx->user_ip4 = backend->ip;
    ctx->user_port = (u32)backend->port;
    return 1;
}

// Shows the Service address again where the application looks at its peer.
static __always_inline int untranslate(struct bpf_sock_addr *ctx) {
    if (ctx->user_family != AF_INET)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (sk) {
        struct sk_rev *sr = na_sk_reverse.sk_storage_get(sk, 0, 0);
        if (sr && sr->backend_ip == ctx->user_ip4 && sr->backend_port == (u16)ctx->user_port) {
            ctx->user_ip4 = sr->vip;
            ctx->user_port = (u32)sr->vip_port;
            return 1;
        }
    }
    struct rev_key rk = {.cookie = bpf_get_socket_cookie(ctx), .ip = ctx->user_ip4, .port = (u16)ctx->user_port};
    struct rev_val *rv = na_reverse.lookup(&rk);
    if (rv) {
        ctx->user_ip4 = rv->ip;
        ctx->user_port = (u32)rv->port;
    }
    return 1;
}

int na_connect4(struct bpf_sock_addr *ctx) { return translate(ctx, 2); }
int na_sendmsg4(struct bpf_sock_addr *ctx) { return translate(ctx, 1); }
int na_recvmsg4(struct bpf_sock_addr *ctx) { return untranslate(ctx); }
int na_getpeername4(struct bpf_sock_addr *ctx) { return untranslate(ctx); }
