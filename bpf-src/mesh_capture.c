// Mesh capture, eBPF mode (issue 9): the same guarantees as the iptables capture (nodeagent/mesh/iptables),
// without a rule in the pod. Compiled by bcc from nodeagent/mesh/ebpf/programs.py, which substitutes PIN_DIR.
//
// Outbound (programs on the POD's cgroup, so only the pod's own processes are captured; the tunnel's
// sockets are created by the tunnel process, in the tunnel's cgroup, and never pass these):
//   nm_connect4     a TCP connect to anything but loopback, the pod itself or the probe address goes to
//                   127.0.0.1:<outbound port>, the tunnel's in-pod listener; the original destination is
//                   kept in the socket's local storage (nm_orig). As Merbridge's mb_connect.c
//                   (merbridge/merbridge bpf/mb_connect.c) and Cilium's socket LB (bpf/bpf_sock.c), but
//                   socket storage instead of a cookie-keyed LRU map: it is freed with the socket, cannot
//                   be evicted under load, and needs no key.
//   nm_sockops      when that connection is established (before its final ACK leaves, so before the
//                   tunnel can accept it), the original destination is filed under the connection's
//                   4-tuple plus the netns cookie (nm_pending): every pod dials 127.0.0.1:15001, so the
//                   tuple alone collides across pods (Merbridge binds to the pod IP instead, mb_connect.c;
//                   the cookie needs no bind). As merbridge/merbridge bpf/mb_sockops.c.
//   nm_getpeername4 the application sees the address it dialed, not 127.0.0.1:15001 (iptables' REDIRECT
//                   is invisible to the socket too).
//   nm_connect6, nm_getpeername6: the same for IPv4-mapped addresses on dual-stack IPv6 sockets (IPv4 on
//                   the wire, which iptables would capture too), and for real IPv6: a connect to anything
//                   but ::1, ::, the pod's own IPv6 address or the IPv6 probe address goes to [::1]:<outbound
//                   port> (what ip6tables' REDIRECT does in iptables mode), its destination kept in nm_orig6.
//   nm_sockops      (IPv6: files it under the IPv6 4-tuple in nm_pending6.)
// DNS (the same programs, plus sendmsg and recvmsg; the iptables capture's RedirectDNS rules, Istio's): a
// question to port 53 of anything but loopback or the pod itself goes to the tunnel's DNS proxy in the pod,
// 127.0.0.1 (or [::1]) at nm_config.dns_port, unless the pod opted out (dns_port 0):
//   nm_connect4/6   TCP, and connected UDP (glibc connects a UDP socket per nameserver); the resolver asked
//                   is kept in nm_orig(6) with via_port = the DNS port, so getpeername shows it, and a TCP
//                   question's resolver reaches the proxy through nm_sockops and nm_getsockopt like any
//                   captured connection's original destination (the proxy forwards to it).
//   nm_sendmsg4/6   unconnected UDP (musl and dnspython send with sendto): the same rewrite per datagram, the
//                   last resolver asked kept in the socket's storage. A v4-mapped sendto from an IPv6 socket
//                   arrives at sendmsg4 (net/ipv6/udp.c hands it to udp_sendmsg).
//   nm_recvmsg4/6   the answer's source (the proxy, 127.0.0.1:<dns port>) is shown as the resolver asked:
//                   stub resolvers drop answers from an address they did not ask (glibc res_send's
//                   res_ourserver_p, musl, dnspython). recvmsg6 sees an IPv4 answer v4-mapped.
//                   The tunnel's own forwards are made from its cgroup (and carry its mark), never passing
//                   these. Cilium's socket LB keeps the same reverse view for UDP (bpf/bpf_sock.c,
//                   sock4_xlate_rev).
// Original destination (program on the TUNNEL's cgroup):
//   nm_getsockopt   the tunnel keeps calling getsockopt(SOL_IP, SO_ORIGINAL_DST) as in iptables mode. The
//                   hook runs in the cgroup of the *socket* (kernel/bpf/cgroup.c uses sk->sk_cgrp_data),
//                   and an accepted socket inherits its listener's cgroup, i.e. the cgroup of the process
//                   that created the listener: the tunnel's. The answer comes from nm_pending (outbound;
//                   moved into the accepted socket's storage so a second call answers the same) or, for a
//                   connection the tc program handed to the inbound listener, is the socket's own local
//                   address (TPROXY semantics, as ztunnel reads it). It overrides the kernel's answer for
//                   outbound (conntrack, when loaded in the pod, would say 127.0.0.1:15001). As
//                   merbridge/merbridge bpf/mb_get_sockopts.c. For IPv6 sockets the tunnel asks
//                   getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST), answered from nm_pending6 as a sockaddr_in6.
// Inbound (tc ingress on the pod's interface, inside the pod's namespace):
//   nm_tc_inbound   a new TCP connection (SYN) to the pod, except to the HBONE port, from the probe address
//                   or to an excluded port, is assigned to the tunnel's plaintext listener with
//                   bpf_sk_assign, as TPROXY would (the connection keeps its destination as local address).
//                   As the kernel's selftest progs/test_sk_assign.c and Cilium's bpf/lib/proxy.h.
//                   No listener (tunnel down): the SYN is dropped (the client retries), never delivered
//                   to the application uncaptured.
//
// Maps (addresses and ports in network byte order):
//   nm_config:  netns cookie -> the pod's capture configuration (written by the agent per pod)
//   nm_pod_ips: pod IP -> netns cookie (tc finds its pod by destination; removal finds a vanished pod)
//   nm_stats:   netns cookie -> counters (what `inspect` and the tests read)
//   nm_orig:    socket storage: original destination of a captured client socket, or the answer given
//               for an accepted one
//   nm_pending: (netns cookie, client ip/port, listener ip/port) -> original destination, LRU
//   nm_inbound: (client ip/port, pod ip/port) of connections assigned to the inbound listener, LRU
//   nm_orig6, nm_pending6, nm_pod_ips6, nm_inbound6: nm_orig, nm_pending, nm_pod_ips and nm_inbound for IPv6

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/in.h>
#include <linux/in6.h>

#include "lib/cgroup.h"

#define NM_SOL_IP 0
#define NM_SOL_IPV6 41
#define NM_SO_ORIGINAL_DST 80
#define NM_PAGE_SIZE 4096
#define NM_MAX_EXCLUDE 8    // mirrored by nodeagent/mesh/ebpf/state.py MAX_EXCLUDE
#define NM_MARK_MASK 0xfff  // the iptables capture's too: nodeagent/mesh/iptables/render.py MARK_MASK
#define NM_LOCALHOST 0x7f000001
#define NM_TCP_TIME_WAIT 6
#define NM_TCP_LISTEN 10
#define NM_SOCK_STREAM 1
#define NM_SOCK_DGRAM 2
#define NM_DNS_PORT 53

// Where a sock_addr program's context holds its IPv4 destination: a constant per program (see
// v4_destination).
enum nm_family {
    NM_IPV4 = 0,         // user_ip4 (connect4, getpeername4)
    NM_IPV4_MAPPED = 1,  // user_ip6 as ::ffff:a.b.c.d (connect6, getpeername6 on dual-stack sockets)
};

// nm_config, nm_pod_ips and nm_stats are written or read by the agent: nodeagent/mesh/ebpf/state.py mirrors
// struct nm_config, struct nm_stats and NM_MAX_EXCLUDE, nodeagent/mesh/ebpf/programs.py MAPS their sizes, and
// tests/integration/test_bpf_layouts.py compares them with what bcc compiles. A layout change here bumps the
// capture's LAYOUT in programs.py (the maps are pinned and outlive the agent).
struct nm_cidr { u32 net; u32 mask; };
struct nm_cidr6 { u32 net[4]; u32 mask[4]; };
struct nm_config {
    u32 pod_ip;
    u32 probe_ip;
    u32 mark;                  // host order: compared with the socket's mark under NM_MARK_MASK
    u16 outbound_port;
    u16 inbound_port;
    u16 hbone_port;
    u8 n_out_ports;
    u8 n_in_ports;
    u8 n_out_cidrs;
    u8 n_out_cidrs6;
    u16 dns_port;              // the tunnel's DNS proxy in the pod (network order); 0: DNS not captured
    u16 exclude_out_ports[NM_MAX_EXCLUDE];
    u16 exclude_in_ports[NM_MAX_EXCLUDE];
    struct nm_cidr exclude_out_cidrs[NM_MAX_EXCLUDE];
    u32 pod_ip6[4];            // the pod's IPv6 address (all zero: none, real IPv6 is then not captured)
    u32 probe_ip6[4];          // the IPv6 probe address
    struct nm_cidr6 exclude_out_cidrs6[NM_MAX_EXCLUDE];  // excluded IPv6 destinations (n_out_cidrs6 of them)
};
struct nm_stats { u64 outbound; u64 outbound_skipped; u64 inbound; u64 inbound_dropped; u64 answered; u64 dns; };
struct nm_orig { u32 ip; u16 port; u16 via_port; };  // via_port: where connect4/sendmsg4 sent it (0: an answer)
struct nm_pending_key { u64 netns; u32 client_ip; u32 server_ip; u16 client_port; u16 server_port; u32 pad; };
struct nm_flow { u32 client_ip; u32 pod_ip; u16 client_port; u16 port; };
struct nm_orig6 { u32 ip[4]; u16 port; u16 via_port; };
struct nm_pending6_key { u64 netns; u32 client_ip[4]; u32 server_ip[4]; u16 client_port; u16 server_port; u32 pad; };
struct nm_flow6 { u32 client_ip[4]; u32 pod_ip[4]; u16 client_port; u16 port; };

BPF_TABLE_PINNED("hash", u64, struct nm_config, nm_config, 16384, "PIN_DIR/nm_config");
BPF_TABLE_PINNED("hash", u32, u64, nm_pod_ips, 16384, "PIN_DIR/nm_pod_ips");
BPF_TABLE_PINNED("hash", u64, struct nm_stats, nm_stats, 16384, "PIN_DIR/nm_stats");
BPF_TABLE_PINNED("lru_hash", struct nm_pending_key, struct nm_orig, nm_pending, 65536, "PIN_DIR/nm_pending");
BPF_TABLE_PINNED("lru_hash", struct nm_flow, u32, nm_inbound, 65536, "PIN_DIR/nm_inbound");
BPF_TABLE_PINNED7("sk_storage", int, struct nm_orig, nm_orig, 0, "PIN_DIR/nm_orig", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct nm_pending6_key, struct nm_orig6, nm_pending6, 65536, "PIN_DIR/nm_pending6");
BPF_TABLE_PINNED7("sk_storage", int, struct nm_orig6, nm_orig6, 0, "PIN_DIR/nm_orig6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct in6_addr, u64, nm_pod_ips6, 16384, "PIN_DIR/nm_pod_ips6");
BPF_TABLE_PINNED("lru_hash", struct nm_flow6, u32, nm_inbound6, 65536, "PIN_DIR/nm_inbound6");

// Counters are a side channel: a full map must never change what happens to a connection.
static __always_inline struct nm_stats *stats_of(u64 netns) {
    struct nm_stats zero = {};
    return nm_stats.lookup_or_try_init(&netns, &zero);
}

// What a redirect counts as (the counter is chosen after the map value's null check: the verifier refuses a field
// address taken from a pointer that may be null).
enum nm_counted {
    NM_COUNT_OUTBOUND = 0,
    NM_COUNT_DNS = 1,
};

static __always_inline void count_redirect(struct nm_stats *st, const enum nm_counted what) {
    if (!st)
        return;
    if (what == NM_COUNT_DNS)
        __sync_fetch_and_add(&st->dns, 1);
    else
        __sync_fetch_and_add(&st->outbound, 1);
}

// Unrolled: constant offsets into the map value, whatever the compiler makes of the loop otherwise.
static __always_inline int port_listed(const u16 *ports, u8 count, u16 port) {
#pragma unroll
    for (int i = 0; i < NM_MAX_EXCLUDE; i++) {
        if (i < count && ports[i] == port)
            return 1;
    }
    return 0;
}

// 1 when the iptables capture would not redirect this connect either (see nodeagent/mesh/iptables/render.py).
static __always_inline int outbound_exempt(struct nm_config *cfg, struct bpf_sock *sk, u32 ip, u16 port) {
    if ((sk->mark & NM_MARK_MASK) == cfg->mark)
        return 1;  // the tunnel's own socket: never in a pod's cgroup, but never captured even if it were
    if ((bpf_ntohl(ip) >> 24) == 127 || ip == 0 || ip == cfg->pod_ip)
        return 1;  // loopback, and the pod calling itself (over lo)
    if (ip == cfg->probe_ip)
        return 1;  // answers toward the probe address
    if (port_listed(cfg->exclude_out_ports, cfg->n_out_ports, port))
        return 1;
#pragma unroll
    for (int i = 0; i < NM_MAX_EXCLUDE; i++) {
        if (i < cfg->n_out_cidrs && (ip & cfg->exclude_out_cidrs[i].mask) == cfg->exclude_out_cidrs[i].net)
            return 1;
    }
    return 0;
}

// The destination of a connect or getpeername, IPv4 or IPv4-mapped IPv6 (a dual-stack socket talking IPv4,
// as Java's and Node's are by default: IPv4 on the wire, which the iptables capture would catch too, so
// it must not pass here). 0 when it is neither. `family` is a constant per program, so each program reads
// only its own context fields (a pointer chosen at run time between them is refused by the verifier).
static __always_inline int v4_destination(struct bpf_sock_addr *ctx, const enum nm_family family, u32 *ip) {
    if (family == NM_IPV4) {
        if (ctx->user_family != AF_INET)
            return 0;
        *ip = ctx->user_ip4;
        return 1;
    }
    if (ctx->user_family != AF_INET6 || ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
        ctx->user_ip6[2] != bpf_htonl(0xffff))
        return 0;
    *ip = ctx->user_ip6[3];
    return 1;
}

static __always_inline void set_v4_destination(struct bpf_sock_addr *ctx, const enum nm_family family, u32 ip,
                                               u16 port) {
    if (family == NM_IPV4)
        ctx->user_ip4 = ip;
    else
        ctx->user_ip6[3] = ip;  // the ::ffff: prefix stays
    ctx->user_port = (u32)port;
}

// TCP, or UDP to the DNS port (the only UDP captured, as in iptables mode); 0 for anything else.
static __always_inline int captured_kind(struct bpf_sock_addr *ctx, int *tcp) {
    *tcp = ctx->type == NM_SOCK_STREAM && ctx->protocol == IPPROTO_TCP;
    return *tcp || (ctx->type == NM_SOCK_DGRAM && ctx->protocol == IPPROTO_UDP &&
                    (u16)ctx->user_port == bpf_htons(NM_DNS_PORT));
}

// A DNS question the in-pod rules' RedirectDNS would not take either: the tunnel's own socket, loopback
// (`! -o lo`), the pod asking itself.
static __always_inline int dns_exempt(struct nm_config *cfg, struct bpf_sock *sk, u32 ip) {
    return !cfg->dns_port || (sk->mark & NM_MARK_MASK) == cfg->mark || (bpf_ntohl(ip) >> 24) == 127 || ip == 0 ||
           ip == cfg->pod_ip;
}

// Sends the call to 127.0.0.1:`via` (the tunnel's listener or DNS proxy in the pod), keeping what was dialled in
// the socket's storage for getpeername, recvmsg and sock_ops; counts it as `what` in `st`. Out of memory:
// refused (EPERM) rather than let the connection or question bypass the mesh.
static __always_inline int redirect4(struct bpf_sock_addr *ctx, const enum nm_family family, struct bpf_sock *sk,
                                     u32 ip, u16 port, u16 via, struct nm_stats *st, const enum nm_counted what) {
    struct nm_orig *orig = nm_orig.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!orig)
        return CGROUP_REFUSE;
    orig->ip = ip;
    orig->port = port;
    orig->via_port = via;
    set_v4_destination(ctx, family, bpf_htonl(NM_LOCALHOST), via);
    count_redirect(st, what);
    return CGROUP_PROCEED;
}

// connect4, sendmsg4 and (v4-mapped) connect6: TCP to the tunnel's outbound listener, DNS to its DNS proxy.
static __always_inline int capture_connect(struct bpf_sock_addr *ctx, const enum nm_family family) {
    u32 ip = 0;
    int tcp = 0;
    if (!captured_kind(ctx, &tcp) || !v4_destination(ctx, family, &ip))
        return CGROUP_PROCEED;  // other UDP is left alone, as in iptables mode; so is real IPv6 here
    u64 netns = bpf_get_netns_cookie(ctx);
    struct nm_config *cfg = nm_config.lookup(&netns);
    if (!cfg)
        return CGROUP_PROCEED;  // a namespace the agent has not configured: not captured
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return CGROUP_PROCEED;
    u16 port = (u16)ctx->user_port;
    struct nm_stats *st = stats_of(netns);
    if (port == bpf_htons(NM_DNS_PORT) && !dns_exempt(cfg, sk, ip))
        return redirect4(ctx, family, sk, ip, port, cfg->dns_port, st, NM_COUNT_DNS);
    if (!tcp)
        return CGROUP_PROCEED;  // DNS over UDP that is exempt (or not captured): as it was sent
    if (outbound_exempt(cfg, sk, ip, port)) {
        if (st)
            __sync_fetch_and_add(&st->outbound_skipped, 1);
        return CGROUP_PROCEED;
    }
    return redirect4(ctx, family, sk, ip, port, cfg->outbound_port, st, NM_COUNT_OUTBOUND);
}

static __always_inline int show_dialed(struct bpf_sock_addr *ctx, const enum nm_family family) {
    u32 ip = 0;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || !v4_destination(ctx, family, &ip))
        return CGROUP_PROCEED;
    struct nm_orig *orig = nm_orig.sk_storage_get(sk, 0, 0);
    if (orig && orig->via_port && ip == bpf_htonl(NM_LOCALHOST) && (u16)ctx->user_port == orig->via_port)
        set_v4_destination(ctx, family, orig->ip, orig->port);
    return CGROUP_PROCEED;
}

static __always_inline int ip6_equal(const u32 *a, const u32 *b) {
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

// A real IPv6 destination (not IPv4-mapped) of an IPv6 connect or getpeername: 1 and its address in ip[4].
static __always_inline int v6_destination(struct bpf_sock_addr *ctx, u32 *ip) {
    if (ctx->user_family != AF_INET6)
        return 0;
    ip[0] = ctx->user_ip6[0];
    ip[1] = ctx->user_ip6[1];
    ip[2] = ctx->user_ip6[2];
    ip[3] = ctx->user_ip6[3];
    return !(ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0xffff));
}

// 1 when ip6tables' in-pod rules would not redirect this connect either (nodeagent/mesh/iptables/render.py,
// family 6): the tunnel's mark, ::1 and ::, the pod itself, the probe address, an excluded port or IPv6 range.
static __always_inline int outbound_exempt6(struct nm_config *cfg, struct bpf_sock *sk, const u32 *ip, u16 port) {
    if ((sk->mark & NM_MARK_MASK) == cfg->mark)
        return 1;
    if (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == bpf_htonl(1)))
        return 1;  // :: and ::1
    if (ip6_equal(ip, cfg->pod_ip6) || ip6_equal(ip, cfg->probe_ip6))
        return 1;
    if (port_listed(cfg->exclude_out_ports, cfg->n_out_ports, port))
        return 1;
#pragma unroll
    for (int i = 0; i < NM_MAX_EXCLUDE; i++) {
        struct nm_cidr6 *c = &cfg->exclude_out_cidrs6[i];
        if (i < cfg->n_out_cidrs6 && (ip[0] & c->mask[0]) == c->net[0] && (ip[1] & c->mask[1]) == c->net[1] &&
            (ip[2] & c->mask[2]) == c->net[2] && (ip[3] & c->mask[3]) == c->net[3])
            return 1;
    }
    return 0;
}

// dns_exempt for IPv6: the tunnel's socket, :: and ::1, the pod's own IPv6 address.
static __always_inline int dns_exempt6(struct nm_config *cfg, struct bpf_sock *sk, const u32 *ip) {
    return !cfg->dns_port || (sk->mark & NM_MARK_MASK) == cfg->mark ||
           (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == bpf_htonl(1))) ||
           ip6_equal(ip, cfg->pod_ip6);
}

static __always_inline void set_v6_loopback(struct bpf_sock_addr *ctx, u16 port) {
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = bpf_htonl(1);
    ctx->user_port = (u32)port;
}

// redirect4 for IPv6: to [::1]:`via`, what was dialled kept in nm_orig6.
static __always_inline int redirect6(struct bpf_sock_addr *ctx, struct bpf_sock *sk, const u32 *ip, u16 port, u16 via,
                                     struct nm_stats *st, const enum nm_counted what) {
    struct nm_orig6 *orig = nm_orig6.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!orig)
        return CGROUP_REFUSE;
    orig->ip[0] = ip[0];
    orig->ip[1] = ip[1];
    orig->ip[2] = ip[2];
    orig->ip[3] = ip[3];
    orig->port = port;
    orig->via_port = via;
    set_v6_loopback(ctx, via);
    count_redirect(st, what);
    return CGROUP_PROCEED;
}

static __always_inline int capture_connect6(struct bpf_sock_addr *ctx) {
    u32 ip[4] = {};
    int tcp = 0;
    if (!captured_kind(ctx, &tcp) || !v6_destination(ctx, ip))
        return CGROUP_PROCEED;
    u64 netns = bpf_get_netns_cookie(ctx);
    struct nm_config *cfg = nm_config.lookup(&netns);
    if (!cfg)
        return CGROUP_PROCEED;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return CGROUP_PROCEED;
    u16 port = (u16)ctx->user_port;
    struct nm_stats *st = stats_of(netns);
    // DNS to an IPv6 resolver is taken whether or not the pod has an IPv6 address (the proxy listens on
    // [::1] in every served pod), as ip6tables' RedirectDNS rules would.
    if (port == bpf_htons(NM_DNS_PORT) && !dns_exempt6(cfg, sk, ip))
        return redirect6(ctx, sk, ip, port, cfg->dns_port, st, NM_COUNT_DNS);
    if (!tcp || (cfg->pod_ip6[0] | cfg->pod_ip6[1] | cfg->pod_ip6[2] | cfg->pod_ip6[3]) == 0)
        return CGROUP_PROCEED;  // other UDP; or a pod without IPv6, whose IPv6 connections are not captured
    if (outbound_exempt6(cfg, sk, ip, port)) {
        if (st)
            __sync_fetch_and_add(&st->outbound_skipped, 1);
        return CGROUP_PROCEED;
    }
    return redirect6(ctx, sk, ip, port, cfg->outbound_port, st, NM_COUNT_OUTBOUND);
}

static __always_inline int show_dialed6(struct bpf_sock_addr *ctx) {
    u32 ip[4] = {};
    struct bpf_sock *sk = ctx->sk;
    if (!sk || !v6_destination(ctx, ip))
        return CGROUP_PROCEED;
    struct nm_orig6 *orig = nm_orig6.sk_storage_get(sk, 0, 0);
    if (orig && orig->via_port && ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1) &&
        (u16)ctx->user_port == orig->via_port) {
        ctx->user_ip6[0] = orig->ip[0];
        ctx->user_ip6[1] = orig->ip[1];
        ctx->user_ip6[2] = orig->ip[2];
        ctx->user_ip6[3] = orig->ip[3];
        ctx->user_port = (u32)orig->port;
    }
    return CGROUP_PROCEED;
}

static __always_inline int capture6(struct bpf_sock_addr *ctx) {
    if (ctx->user_family == AF_INET6 && ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
        ctx->user_ip6[2] == bpf_htonl(0xffff))
        return capture_connect(ctx, NM_IPV4_MAPPED);
    return capture_connect6(ctx);
}

static __always_inline int show_dialed_any6(struct bpf_sock_addr *ctx) {
    show_dialed(ctx, NM_IPV4_MAPPED);
    return show_dialed6(ctx);
}

int nm_connect4(struct bpf_sock_addr *ctx) { return capture_connect(ctx, NM_IPV4); }
int nm_connect6(struct bpf_sock_addr *ctx) { return capture6(ctx); }
int nm_sendmsg4(struct bpf_sock_addr *ctx) { return capture_connect(ctx, NM_IPV4); }
// (The kernel hands a v4-mapped sendto to sendmsg4; capture6 covers it all the same.)
int nm_sendmsg6(struct bpf_sock_addr *ctx) { return capture6(ctx); }
int nm_getpeername4(struct bpf_sock_addr *ctx) { return show_dialed(ctx, NM_IPV4); }
int nm_getpeername6(struct bpf_sock_addr *ctx) { return show_dialed_any6(ctx); }
int nm_recvmsg4(struct bpf_sock_addr *ctx) { return show_dialed(ctx, NM_IPV4); }
int nm_recvmsg6(struct bpf_sock_addr *ctx) { return show_dialed_any6(ctx); }

int nm_sockops(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return CGROUP_PROCEED;  // (a v4-mapped IPv6 socket has its IPv4 addresses in the fields read below too)
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return CGROUP_PROCEED;
    struct nm_orig6 *orig6 = nm_orig6.sk_storage_get(sk, 0, 0);
    if (orig6 && orig6->via_port) {
        struct nm_pending6_key key6 = {};
        key6.netns = bpf_get_netns_cookie(skops);
        key6.client_ip[0] = sk->src_ip6[0];
        key6.client_ip[1] = sk->src_ip6[1];
        key6.client_ip[2] = sk->src_ip6[2];
        key6.client_ip[3] = sk->src_ip6[3];
        key6.server_ip[0] = sk->dst_ip6[0];
        key6.server_ip[1] = sk->dst_ip6[1];
        key6.server_ip[2] = sk->dst_ip6[2];
        key6.server_ip[3] = sk->dst_ip6[3];
        key6.client_port = bpf_htons((u16)sk->src_port);
        key6.server_port = (u16)sk->dst_port;
        struct nm_orig6 answer6 = {};
        answer6.ip[0] = orig6->ip[0];
        answer6.ip[1] = orig6->ip[1];
        answer6.ip[2] = orig6->ip[2];
        answer6.ip[3] = orig6->ip[3];
        answer6.port = orig6->port;
        nm_pending6.update(&key6, &answer6);
        return CGROUP_PROCEED;
    }
    struct nm_orig *orig = nm_orig.sk_storage_get(sk, 0, 0);
    if (!orig || !orig->via_port)
        return CGROUP_PROCEED;
    struct nm_pending_key key = {};
    key.netns = bpf_get_netns_cookie(skops);
    key.client_ip = sk->src_ip4;
    key.client_port = bpf_htons((u16)sk->src_port);
    key.server_ip = sk->dst_ip4;
    key.server_port = (u16)sk->dst_port;
    struct nm_orig answer = {.ip = orig->ip, .port = orig->port, .via_port = 0};
    nm_pending.update(&key, &answer);
    return CGROUP_PROCEED;
}

// getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) on a socket the tunnel accepted from a connection nm_connect6
// redirected: the original IPv6 destination as a sockaddr_in6, from nm_pending6 (kept in the accepted socket's
// nm_orig6 so a second call answers the same).
static __always_inline int original_dst6(struct bpf_sockopt *ctx, struct bpf_sock *sk) {
    struct nm_orig6 answer = {};
    int found = 0;
    if (sk->family != AF_INET6 || sk->protocol != IPPROTO_TCP)
        goto pass6;
    struct nm_orig6 *cached = nm_orig6.sk_storage_get(sk, 0, 0);
    if (cached && !cached->via_port) {
        answer = *cached;
        found = 1;
    }
    if (!found) {
        struct nm_pending6_key key = {};
        key.netns = bpf_get_netns_cookie(ctx);
        key.client_ip[0] = sk->dst_ip6[0];
        key.client_ip[1] = sk->dst_ip6[1];
        key.client_ip[2] = sk->dst_ip6[2];
        key.client_ip[3] = sk->dst_ip6[3];
        key.server_ip[0] = sk->src_ip6[0];
        key.server_ip[1] = sk->src_ip6[1];
        key.server_ip[2] = sk->src_ip6[2];
        key.server_ip[3] = sk->src_ip6[3];
        key.client_port = (u16)sk->dst_port;
        key.server_port = bpf_htons((u16)sk->src_port);
        struct nm_orig6 *pending = nm_pending6.lookup(&key);
        if (pending) {
            answer = *pending;
            found = 1;
            nm_pending6.delete(&key);
            struct nm_orig6 *keep = nm_orig6.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
            if (keep)
                *keep = answer;
        }
    }
    if (!found) {
        struct nm_flow6 flow = {};
        flow.client_ip[0] = sk->dst_ip6[0];
        flow.client_ip[1] = sk->dst_ip6[1];
        flow.client_ip[2] = sk->dst_ip6[2];
        flow.client_ip[3] = sk->dst_ip6[3];
        flow.pod_ip[0] = sk->src_ip6[0];
        flow.pod_ip[1] = sk->src_ip6[1];
        flow.pod_ip[2] = sk->src_ip6[2];
        flow.pod_ip[3] = sk->src_ip6[3];
        flow.client_port = (u16)sk->dst_port;
        flow.port = bpf_htons((u16)sk->src_port);
        if (nm_inbound6.lookup(&flow)) {  // assigned by nm_tc_inbound: the local address is the destination
            answer.ip[0] = flow.pod_ip[0];
            answer.ip[1] = flow.pod_ip[1];
            answer.ip[2] = flow.pod_ip[2];
            answer.ip[3] = flow.pod_ip[3];
            answer.port = flow.port;
            found = 1;
        }
    }
    if (!found)
        goto pass6;
    struct sockaddr_in6 *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end)
        goto pass6;
    __builtin_memset(sa, 0, sizeof(*sa));
    sa->sin6_family = AF_INET6;
    sa->sin6_port = answer.port;
    sa->sin6_addr.in6_u.u6_addr32[0] = answer.ip[0];
    sa->sin6_addr.in6_u.u6_addr32[1] = answer.ip[1];
    sa->sin6_addr.in6_u.u6_addr32[2] = answer.ip[2];
    sa->sin6_addr.in6_u.u6_addr32[3] = answer.ip[3];
    ctx->optlen = sizeof(*sa);
    asm volatile("" ::: "memory");  // see nm_getsockopt: two adjacent 4-byte stores must stay two
    ctx->retval = 0;
    struct nm_stats *st = stats_of(bpf_get_netns_cookie(ctx));
    if (st)
        __sync_fetch_and_add(&st->answered, 1);
    return CGROUP_PROCEED;
pass6:
    if (ctx->optlen > NM_PAGE_SIZE)
        ctx->optlen = 0;
    return CGROUP_PROCEED;
}

int nm_getsockopt(struct bpf_sockopt *ctx) {
    struct bpf_sock *sk = ctx->sk;
    struct nm_orig answer = {};
    int found = 0;
    if (ctx->level == NM_SOL_IPV6 && ctx->optname == NM_SO_ORIGINAL_DST && sk)
        return original_dst6(ctx, sk);
    if (ctx->level != NM_SOL_IP || ctx->optname != NM_SO_ORIGINAL_DST || !sk)
        goto pass;
    if (sk->family != AF_INET || sk->protocol != IPPROTO_TCP)
        goto pass;
    struct nm_orig *cached = nm_orig.sk_storage_get(sk, 0, 0);
    if (cached && !cached->via_port) {
        answer = *cached;
        found = 1;
    }
    if (!found) {
        struct nm_pending_key key = {};
        key.netns = bpf_get_netns_cookie(ctx);
        key.client_ip = sk->dst_ip4;
        key.client_port = (u16)sk->dst_port;
        key.server_ip = sk->src_ip4;
        key.server_port = bpf_htons((u16)sk->src_port);
        struct nm_orig *pending = nm_pending.lookup(&key);
        if (pending) {
            answer = *pending;
            found = 1;
            nm_pending.delete(&key);  // a later connection on the same ports must not find it
            struct nm_orig *keep = nm_orig.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
            if (keep)
                *keep = answer;
        }
    }
    if (!found) {
        struct nm_flow flow = {.client_ip = sk->dst_ip4, .pod_ip = sk->src_ip4,
                               .client_port = (u16)sk->dst_port, .port = bpf_htons((u16)sk->src_port)};
        if (nm_inbound.lookup(&flow)) {
            answer.ip = sk->src_ip4;
            answer.port = bpf_htons((u16)sk->src_port);
            found = 1;
        }
    }
    if (!found)
        goto pass;
    struct sockaddr_in *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end)
        goto pass;  // the caller's buffer is too small for an address: the kernel's answer stands
    sa->sin_family = AF_INET;
    sa->sin_port = answer.port;
    sa->sin_addr.s_addr = answer.ip;
    __builtin_memset(sa->sin_zero, 0, sizeof(sa->sin_zero));
    ctx->optlen = sizeof(*sa);
    // optlen and retval are adjacent 4-byte fields: the compiler would merge the two stores into one
    // 8-byte store, which the verifier refuses.
    asm volatile("" ::: "memory");
    ctx->retval = 0;
    struct nm_stats *st = stats_of(bpf_get_netns_cookie(ctx));
    if (st)
        __sync_fetch_and_add(&st->answered, 1);
    return CGROUP_PROCEED;
pass:
    // Values beyond a page are not shown to programs; optlen 0 hands the kernel's own result back
    // untouched. Kernels before 6.5 otherwise fail such calls with EFAULT (iptables-legacy's
    // IPT_SO_GET_ENTRIES from this cgroup); later ones ignore the program's buffer by themselves.
    if (ctx->optlen > NM_PAGE_SIZE)
        ctx->optlen = 0;
    return CGROUP_PROCEED;
}

#define NM_IPV6_EXT_MAX 4  // extension headers walked before TCP; more, and the packet is dropped

// nm_tc_inbound for IPv6: the same decisions on the IPv6 header. Extension headers (hop-by-hop, routing,
// destination options) are walked up to NM_IPV6_EXT_MAX; a packet behind more of them, or TCP behind a fragment
// header, is dropped rather than let past the capture to the application.
static __always_inline int tc_inbound6(struct __sk_buff *skb) {
    struct ipv6hdr ip6;
    struct tcphdr th;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
        return TC_ACT_OK;
    u64 *netns = nm_pod_ips6.lookup(&ip6.daddr);
    if (!netns)
        return TC_ACT_OK;  // not to one of our pods' IPv6 addresses
    u64 cookie = *netns;
    u8 next = ip6.nexthdr;
    u32 offset = ETH_HLEN + sizeof(ip6);
#pragma unroll
    for (int i = 0; i < NM_IPV6_EXT_MAX; i++) {
        if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS)
            break;
        u8 ext[2];
        if (bpf_skb_load_bytes(skb, offset, ext, sizeof(ext)) < 0)
            return TC_ACT_SHOT;
        next = ext[0];
        offset += ((u32)ext[1] + 1) * 8;
    }
    if (next == IPPROTO_FRAGMENT) {
        u8 inner;
        if (bpf_skb_load_bytes(skb, offset, &inner, sizeof(inner)) < 0)
            goto drop_unparsed;
        if (inner != IPPROTO_TCP)
            return TC_ACT_OK;  // fragmented UDP and the rest are not captured, as unfragmented
        goto drop_unparsed;    // TCP in fragments: never a SYN to let past the capture
    }
    if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS)
        goto drop_unparsed;  // more extension headers than walked: cannot tell, so not let through
    if (next != IPPROTO_TCP)
        return TC_ACT_OK;
    if (bpf_skb_load_bytes(skb, offset, &th, sizeof(th)) < 0)
        return TC_ACT_OK;
    if (!th.syn || th.ack)
        return TC_ACT_OK;
    struct nm_config *cfg = nm_config.lookup(&cookie);
    if (!cfg)
        return TC_ACT_OK;
    u32 saddr[4], daddr[4];
    __builtin_memcpy(saddr, &ip6.saddr, sizeof(saddr));
    __builtin_memcpy(daddr, &ip6.daddr, sizeof(daddr));
    if (th.dest == cfg->hbone_port || ip6_equal(saddr, cfg->probe_ip6) ||
        port_listed(cfg->exclude_in_ports, cfg->n_in_ports, th.dest))
        return TC_ACT_OK;
    struct nm_stats *st = stats_of(cookie);
    struct bpf_sock_tuple tuple = {};
    __builtin_memcpy(tuple.ipv6.saddr, saddr, sizeof(saddr));
    __builtin_memcpy(tuple.ipv6.daddr, daddr, sizeof(daddr));
    tuple.ipv6.sport = th.source;
    tuple.ipv6.dport = th.dest;
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        u32 state = sk->state;
        bpf_sk_release(sk);
        if (state != NM_TCP_LISTEN && state != NM_TCP_TIME_WAIT)
            return TC_ACT_OK;  // as for IPv4
    }
    tuple.ipv6.dport = cfg->inbound_port;
    sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        goto drop6;
    if (sk->state != NM_TCP_LISTEN) {
        bpf_sk_release(sk);
        goto drop6;
    }
    struct nm_flow6 flow = {};
    __builtin_memcpy(flow.client_ip, saddr, sizeof(saddr));
    __builtin_memcpy(flow.pod_ip, daddr, sizeof(daddr));
    flow.client_port = th.source;
    flow.port = th.dest;
    u32 one = 1;
    nm_inbound6.update(&flow, &one);
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        goto drop6;
    if (st)
        __sync_fetch_and_add(&st->inbound, 1);
    return TC_ACT_OK;
drop6:
    if (st)
        __sync_fetch_and_add(&st->inbound_dropped, 1);
    return TC_ACT_SHOT;
drop_unparsed:
    st = stats_of(cookie);
    if (st)
        __sync_fetch_and_add(&st->inbound_dropped, 1);
    return TC_ACT_SHOT;
}

int nm_tc_inbound(struct __sk_buff *skb) {
    struct iphdr iph;
    struct tcphdr th;
    if (skb->protocol == bpf_htons(ETH_P_IPV6))
        return tc_inbound6(skb);
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    // Loaded bytes, not packet pointers: headers outside the linear part (or with IP options) must be
    // judged like any other, or they would be a way around the capture.
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)) < 0)
        return TC_ACT_OK;
    if (iph.protocol != IPPROTO_TCP || (iph.frag_off & bpf_htons(0x1fff)))
        return TC_ACT_OK;
    u32 ihl = (u32)iph.ihl * 4;
    if (ihl < sizeof(iph) || bpf_skb_load_bytes(skb, ETH_HLEN + ihl, &th, sizeof(th)) < 0)
        return TC_ACT_OK;
    if (!th.syn || th.ack)
        return TC_ACT_OK;  // only new connections are steered; the rest find their socket by themselves
    u32 daddr = iph.daddr;
    u64 *netns = nm_pod_ips.lookup(&daddr);
    if (!netns)
        return TC_ACT_OK;
    u64 cookie = *netns;
    struct nm_config *cfg = nm_config.lookup(&cookie);
    if (!cfg)
        return TC_ACT_OK;
    if (th.dest == cfg->hbone_port || iph.saddr == cfg->probe_ip ||
        port_listed(cfg->exclude_in_ports, cfg->n_in_ports, th.dest))
        return TC_ACT_OK;
    struct nm_stats *st = stats_of(cookie);
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = iph.saddr;
    tuple.ipv4.daddr = iph.daddr;
    tuple.ipv4.sport = th.source;
    tuple.ipv4.dport = th.dest;
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        u32 state = sk->state;
        bpf_sk_release(sk);
        // A SYN for a connection being set up (retransmitted) stays with it. TIME_WAIT is not left to
        // the stack: it would hand a reused 4-tuple to the application's own listener.
        if (state != NM_TCP_LISTEN && state != NM_TCP_TIME_WAIT)
            return TC_ACT_OK;
    }
    tuple.ipv4.dport = cfg->inbound_port;
    sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        goto drop;
    if (sk->state != NM_TCP_LISTEN) {
        bpf_sk_release(sk);
        goto drop;
    }
    struct nm_flow flow = {.client_ip = iph.saddr, .pod_ip = iph.daddr, .client_port = th.source, .port = th.dest};
    nm_inbound.update(&flow, &flow.pod_ip);
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        goto drop;
    if (st)
        __sync_fetch_and_add(&st->inbound, 1);
    return TC_ACT_OK;
drop:
    if (st)
        __sync_fetch_and_add(&st->inbound_dropped, 1);
    return TC_ACT_SHOT;
}
