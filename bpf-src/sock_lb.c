// Socket-level Service load balancing (IPv4 and IPv6), as Cilium's kube-proxy replacement does it
// (bpf/bpf_sock.c): the Service address is rewritten to a backend when the socket connects (TCP, connected
// UDP) or sends (unconnected UDP), so packets never carry the VIP and need no per-packet NAT. The reverse view
// (getpeername, the source of UDP replies) shows the VIP again, so applications see what they dialed.
//
// IPv6 (connect6, sendmsg6, recvmsg6, getpeername6) follows Cilium's __sock6_xlate_fwd / __sock6_xlate_rev:
// its own maps (na_services6, ...; Cilium's lb6_*), and an IPv4-mapped address (::ffff:a.b.c.d) dialed from an
// IPv6 socket is an IPv4 Service's frontend, translated with the IPv4 maps to the v4-mapped backend
// (sock6_xlate_v4_in_v6, sock6_xlate_rev_v4_in_v6). The kernel itself hands a v4-mapped UDP sendmsg to
// udp_sendmsg and so to sendmsg4 (net/ipv6/udp.c, udpv6_sendmsg), whose reverse entry is IPv4; recvmsg6 then
// sees the reply's source v4-mapped and looks there, as Cilium's __sock6_xlate_rev falls back to the IPv4
// reverse map. Cilium's sock6_skip_xlate (external IPs translated only when the address is the host's) is not
// followed: external frontends are translated for local clients in both families, as kube-proxy does.
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
#define NA_AF_INET6 10

// Where translate*() keeps what untranslate*() needs to show the Service address again.
enum na_remember {
    NA_REMEMBER_IN_MAP = 1,     // na_reverse(6), by socket cookie (sendmsg: unconnected UDP)
    NA_REMEMBER_IN_SOCKET = 2,  // na_sk_reverse(6), the socket's own storage (connect)
};

// What resolving a frontend found.
enum na_verdict {
    NA_PASS = 0,        // not a Service (or its set is being replaced this instant): leave the call unchanged
    NA_TRANSLATED = 1,  // a backend was chosen
    NA_REFUSED = 2,     // a Service without endpoints: the call fails with ECONNREFUSED (kube-proxy's REJECT)
};

BPF_TABLE_PINNED("hash", struct svc_key, struct svc_val, na_services, NA_SERVICES_MAX, "PIN_DIR/na_services");
BPF_TABLE_PINNED("hash", struct slot_key, struct slot_val, na_slots, NA_SLOTS_MAX, "PIN_DIR/na_slots");
BPF_TABLE_PINNED("hash", u32, struct backend_val, na_backends, NA_BACKENDS_MAX, "PIN_DIR/na_backends");
BPF_TABLE_PINNED("lru_hash", struct rev_key, struct rev_val, na_reverse, NA_REVERSE_MAX, "PIN_DIR/na_reverse");
BPF_TABLE_PINNED("lru_hash", struct aff_key, struct aff_val, na_affinity, NA_AFFINITY_MAX, "PIN_DIR/na_affinity");
// A connected socket has one peer: its reverse entry lives in the socket itself (no hashing, no LRU
// eviction, freed with the socket). Unconnected UDP (sendmsg) may talk to many: na_reverse.
BPF_TABLE_PINNED7("sk_storage", int, struct sk_rev, na_sk_reverse, 0, "PIN_DIR/na_sk_reverse", BPF_F_NO_PREALLOC);

BPF_TABLE_PINNED("hash", struct svc_key6, struct svc_val, na_services6, NA_SERVICES_MAX, "PIN_DIR/na_services6");
BPF_TABLE_PINNED("hash", struct slot_key, struct slot_val, na_slots6, NA_SLOTS_MAX, "PIN_DIR/na_slots6");
BPF_TABLE_PINNED("hash", u32, struct backend_val6, na_backends6, NA_BACKENDS_MAX, "PIN_DIR/na_backends6");
BPF_TABLE_PINNED("lru_hash", struct rev_key6, struct rev_val6, na_reverse6, NA_REVERSE_MAX, "PIN_DIR/na_reverse6");
BPF_TABLE_PINNED("lru_hash", struct aff_key6, struct aff_val, na_affinity6, NA_AFFINITY_MAX, "PIN_DIR/na_affinity6");
BPF_TABLE_PINNED7("sk_storage", int, struct sk_rev6, na_sk_reverse6, 0, "PIN_DIR/na_sk_reverse6", BPF_F_NO_PREALLOC);

// lib/pick.h's one map access, here because bcc rewrites map calls only in the program's own text.
static __always_inline struct slot_val *na_slot_lookup(u32 family, u32 id, u32 slot) {
    struct slot_key k = {.id = id, .slot = slot};
    if (family == NA_FAMILY_V6)
        return na_slots6.lookup(&k);
    return na_slots.lookup(&k);
}

static __always_inline int refuse(void) {
    bpf_set_retval(-NA_ECONNREFUSED);
    return CGROUP_REFUSE;
}

// Whether an IPv6 address (four words, network order) is IPv4-mapped, ::ffff:a.b.c.d (Cilium's is_v4_in_v6).
static __always_inline int v4_mapped(const u32 *a) {
    return a[0] == 0 && a[1] == 0 && a[2] == htonl(0x0000ffff);
}

// The backend for a connect or send to an IPv4 frontend, with ClientIP affinity per network namespace.
static __always_inline int resolve4(struct bpf_sock_addr *ctx, struct svc_key *key, struct backend_val *out) {
    struct svc_val *svc = na_services.lookup(key);
    if (!svc)
        return NA_PASS;
    if (!na_has_backends(svc))
        return NA_REFUSED;
    u32 backend_id = 0;
    int have = 0;
    struct aff_key ak = {};
    u64 now = 0;
    if (svc->affinity_s) {
        ak.netns = bpf_get_netns_cookie(ctx);
        ak.ip = key->ip;
        ak.port = key->port;
        ak.proto = key->proto;
        now = bpf_ktime_get_ns();
        struct aff_val *av = na_affinity.lookup(&ak);
        if (av && now - av->last < (u64)svc->affinity_s * NA_NSEC_PER_SEC &&
            na_backends.lookup(&av->backend)) {
            backend_id = av->backend;
            have = 1;
        }
    }
    if (!have && na_pick(svc, &backend_id, NA_FAMILY_V4) < 0)
        return NA_PASS;  // a version being replaced this instant: let the connect go to the VIP unchanged
    struct backend_val *backend = na_backends.lookup(&backend_id);
    if (!backend)
        return NA_PASS;
    if (svc->affinity_s) {
        struct aff_val av = {.backend = backend_id, .last = now};
        na_affinity.update(&ak, &av);
    }
    out->ip = backend->ip;
    out->port = backend->port;
    return NA_TRANSLATED;
}

// The same for an IPv6 frontend, from the IPv6 maps.
static __always_inline int resolve6(struct bpf_sock_addr *ctx, struct svc_key6 *key, struct backend_val6 *out) {
    struct svc_val *svc = na_services6.lookup(key);
    if (!svc)
        return NA_PASS;
    if (!na_has_backends(svc))
        return NA_REFUSED;
    u32 backend_id = 0;
    int have = 0;
    struct aff_key6 ak = {};
    u64 now = 0;
    if (svc->affinity_s) {
        ak.netns = bpf_get_netns_cookie(ctx);
        ak.ip[0] = key->ip[0];
        ak.ip[1] = key->ip[1];
        ak.ip[2] = key->ip[2];
        ak.ip[3] = key->ip[3];
        ak.port = key->port;
        ak.proto = key->proto;
        now = bpf_ktime_get_ns();
        struct aff_val *av = na_affinity6.lookup(&ak);
        if (av && now - av->last < (u64)svc->affinity_s * NA_NSEC_PER_SEC &&
            na_backends6.lookup(&av->backend)) {
            backend_id = av->backend;
            have = 1;
        }
    }
    if (!have && na_pick(svc, &backend_id, NA_FAMILY_V6) < 0)
        return NA_PASS;
    struct backend_val6 *backend = na_backends6.lookup(&backend_id);
    if (!backend)
        return NA_PASS;
    if (svc->affinity_s) {
        struct aff_val av = {.backend = backend_id, .last = now};
        na_affinity6.update(&ak, &av);
    }
    out->ip[0] = backend->ip[0];
    out->ip[1] = backend->ip[1];
    out->ip[2] = backend->ip[2];
    out->ip[3] = backend->ip[3];
    out->port = backend->port;
    return NA_TRANSLATED;
}

// CGROUP_PROCEED: translated (or not a Service); CGROUP_REFUSE: the syscall fails with ECONNREFUSED.
static __always_inline int translate4(struct bpf_sock_addr *ctx, enum na_remember remember) {
    if (ctx->user_family != AF_INET)
        return CGROUP_PROCEED;
    struct svc_key key = {.ip = ctx->user_ip4, .port = (u16)ctx->user_port, .proto = (u8)ctx->protocol};
    struct backend_val backend = {};
    int verdict = resolve4(ctx, &key, &backend);
    if (verdict == NA_REFUSED)
        return refuse();
    if (verdict != NA_TRANSLATED)
        return CGROUP_PROCEED;
    if (remember == NA_REMEMBER_IN_SOCKET) {
        struct bpf_sock *sk = ctx->sk;
        if (sk) {
            struct sk_rev *sr = na_sk_reverse.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
            if (sr) {
                sr->backend_ip = backend.ip;
                sr->backend_port = backend.port;
                sr->vip = key.ip;
                sr->vip_port = key.port;
            }
        }
    } else if (remember == NA_REMEMBER_IN_MAP) {
        struct rev_key rk = {.cookie = bpf_get_socket_cookie(ctx), .ip = backend.ip, .port = backend.port};
        struct rev_val rv = {.ip = key.ip, .port = key.port};
        na_reverse.update(&rk, &rv);
    }
    ctx->user_ip4 = backend.ip;
    ctx->user_port = (u32)backend.port;
    return CGROUP_PROCEED;
}

// IPv6: an IPv6 Service from the IPv6 maps, or an IPv4 Service dialed v4-mapped (Cilium's
// sock6_xlate_v4_in_v6): the IPv4 maps' backend, written back v4-mapped.
static __always_inline int translate6(struct bpf_sock_addr *ctx, enum na_remember remember) {
    if (ctx->user_family != NA_AF_INET6)
        return CGROUP_PROCEED;
    u32 vip[4];
    vip[0] = ctx->user_ip6[0];
    vip[1] = ctx->user_ip6[1];
    vip[2] = ctx->user_ip6[2];
    vip[3] = ctx->user_ip6[3];
    u16 port = (u16)ctx->user_port;
    u32 backend_ip[4] = {};
    u16 backend_port = 0;
    int verdict;
    int mapped = v4_mapped(vip);
    if (mapped) {
        struct svc_key key = {.ip = vip[3], .port = port, .proto = (u8)ctx->protocol};
        struct backend_val b4 = {};
        verdict = resolve4(ctx, &key, &b4);
        backend_ip[2] = htonl(0x0000ffff);
        backend_ip[3] = b4.ip;
        backend_port = b4.port;
    } else {
        struct svc_key6 key = {};
        key.ip[0] = vip[0];
        key.ip[1] = vip[1];
        key.ip[2] = vip[2];
        key.ip[3] = vip[3];
        key.port = port;
        key.proto = (u8)ctx->protocol;
        struct backend_val6 b6 = {};
        verdict = resolve6(ctx, &key, &b6);
        backend_ip[0] = b6.ip[0];
        backend_ip[1] = b6.ip[1];
        backend_ip[2] = b6.ip[2];
        backend_ip[3] = b6.ip[3];
        backend_port = b6.port;
    }
    if (verdict == NA_REFUSED)
        return refuse();
    if (verdict != NA_TRANSLATED)
        return CGROUP_PROCEED;
    if (remember == NA_REMEMBER_IN_SOCKET) {
        struct bpf_sock *sk = ctx->sk;
        if (sk) {
            struct sk_rev6 *sr = na_sk_reverse6.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
            if (sr) {
                sr->backend_ip[0] = backend_ip[0];
                sr->backend_ip[1] = backend_ip[1];
                sr->backend_ip[2] = backend_ip[2];
                sr->backend_ip[3] = backend_ip[3];
                sr->backend_port = backend_port;
                sr->vip[0] = vip[0];
                sr->vip[1] = vip[1];
                sr->vip[2] = vip[2];
                sr->vip[3] = vip[3];
                sr->vip_port = port;
            }
        }
    } else if (remember == NA_REMEMBER_IN_MAP) {
        if (mapped) {  // where untranslate6's v4-mapped fallback (and sendmsg4's own entries) are
            struct rev_key rk = {.cookie = bpf_get_socket_cookie(ctx), .ip = backend_ip[3], .port = backend_port};
            struct rev_val rv = {.ip = vip[3], .port = port};
            na_reverse.update(&rk, &rv);
        } else {
            struct rev_key6 rk = {};
            rk.cookie = bpf_get_socket_cookie(ctx);
            rk.ip[0] = backend_ip[0];
            rk.ip[1] = backend_ip[1];
            rk.ip[2] = backend_ip[2];
            rk.ip[3] = backend_ip[3];
            rk.port = backend_port;
            struct rev_val6 rv = {};
            rv.ip[0] = vip[0];
            rv.ip[1] = vip[1];
            rv.ip[2] = vip[2];
            rv.ip[3] = vip[3];
            rv.port = port;
            na_reverse6.update(&rk, &rv);
        }
    }
    ctx->user_ip6[0] = backend_ip[0];
    ctx->user_ip6[1] = backend_ip[1];
    ctx->user_ip6[2] = backend_ip[2];
    ctx->user_ip6[3] = backend_ip[3];
    ctx->user_port = (u32)backend_port;
    return CGROUP_PROCEED;
}

// Shows the Service address again where the application looks at its peer.
static __always_inline int untranslate4(struct bpf_sock_addr *ctx) {
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

// IPv6: the socket's own entry (connect, v4-mapped ones included), else na_reverse6, else for a v4-mapped
// peer the IPv4 reverse map (Cilium's sock6_xlate_rev_v4_in_v6).
static __always_inline int untranslate6(struct bpf_sock_addr *ctx) {
    if (ctx->user_family != NA_AF_INET6)
        return CGROUP_PROCEED;
    u32 peer[4];
    peer[0] = ctx->user_ip6[0];
    peer[1] = ctx->user_ip6[1];
    peer[2] = ctx->user_ip6[2];
    peer[3] = ctx->user_ip6[3];
    u16 port = (u16)ctx->user_port;
    struct bpf_sock *sk = ctx->sk;
    if (sk) {
        struct sk_rev6 *sr = na_sk_reverse6.sk_storage_get(sk, 0, 0);
        if (sr && sr->backend_port == port && sr->backend_ip[0] == peer[0] && sr->backend_ip[1] == peer[1] &&
            sr->backend_ip[2] == peer[2] && sr->backend_ip[3] == peer[3]) {
            ctx->user_ip6[0] = sr->vip[0];
            ctx->user_ip6[1] = sr->vip[1];
            ctx->user_ip6[2] = sr->vip[2];
            ctx->user_ip6[3] = sr->vip[3];
            ctx->user_port = (u32)sr->vip_port;
            return CGROUP_PROCEED;
        }
    }
    u64 cookie = bpf_get_socket_cookie(ctx);
    if (v4_mapped(peer)) {
        struct rev_key rk = {.cookie = cookie, .ip = peer[3], .port = port};
        struct rev_val *rv = na_reverse.lookup(&rk);
        if (rv) {
            ctx->user_ip6[3] = rv->ip;
            ctx->user_port = (u32)rv->port;
        }
        return CGROUP_PROCEED;
    }
    struct rev_key6 rk = {};
    rk.cookie = cookie;
    rk.ip[0] = peer[0];
    rk.ip[1] = peer[1];
    rk.ip[2] = peer[2];
    rk.ip[3] = peer[3];
    rk.port = port;
    struct rev_val6 *rv = na_reverse6.lookup(&rk);
    if (rv) {
        ctx->user_ip6[0] = rv->ip[0];
        ctx->user_ip6[1] = rv->ip[1];
        ctx->user_ip6[2] = rv->ip[2];
        ctx->user_ip6[3] = rv->ip[3];
        ctx->user_port = (u32)rv->port;
    }
    return CGROUP_PROCEED;
}

int na_connect4(struct bpf_sock_addr *ctx) { return translate4(ctx, NA_REMEMBER_IN_SOCKET); }
int na_sendmsg4(struct bpf_sock_addr *ctx) { return translate4(ctx, NA_REMEMBER_IN_MAP); }
int na_recvmsg4(struct bpf_sock_addr *ctx) { return untranslate4(ctx); }
int na_getpeername4(struct bpf_sock_addr *ctx) { return untranslate4(ctx); }
int na_connect6(struct bpf_sock_addr *ctx) { return translate6(ctx, NA_REMEMBER_IN_SOCKET); }
int na_sendmsg6(struct bpf_sock_addr *ctx) { return translate6(ctx, NA_REMEMBER_IN_MAP); }
int na_recvmsg6(struct bpf_sock_addr *ctx) { return untranslate6(ctx); }
int na_getpeername6(struct bpf_sock_addr *ctx) { return untranslate6(ctx); }
