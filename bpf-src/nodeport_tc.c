// NodePort / externalIPs / load-balancer IPs for traffic that enters the node from outside: tc
// programs on the node's external interfaces (clsact, direct action), sharing the Service maps of
// sock_lb.c. Compiled by bcc from nodeagent/kernel/bpf/tc.py (PIN_DIR substituted).
//
// Ingress, a packet to a frontend of this node:
//   - backend on this node: DNAT only (the client address is kept), the stack delivers it; the
//     egress program undoes the DNAT on the reply (na_ct direction NA_CT_REPLY_LOCAL).
//   - backend elsewhere: DNAT and SNAT to the frontend address (as kube-proxy masquerades), sent out
//     at once with bpf_redirect_neigh (a packet with a local source address must not re-enter the
//     stack); its reply comes back to that address and is translated back to the client
//     (direction NA_CT_REPLY_SNAT).
// Flows are remembered in na_ct (LRU), so every packet of a connection goes to the same backend.
// A frontend flagged NA_SVC_EXTERNAL_STACK is left to the stack: the agent keeps kube-proxy's iptables
// rules for the Services whose external traffic needs what this program does not implement.
// The maps and their layouts are described in lib/maps.h, the backend pick in lib/pick.h.
//
// IPv6 is translated the same way (as Cilium's nodeport_lb6 / rev_nodeport_lb6), with the IPv6 Service maps the
// socket programs use (na_services6, na_slots6, na_backends6) and a flow table of its own, na_ct6. IPv6 has no
// header checksum: only the TCP or UDP checksum changes (its pseudo-header covers the addresses). Only TCP and UDP
// directly behind the fixed header are parsed: a packet with extension headers (a fragment too) passes to the
// stack untouched, where the agent keeps kube-proxy's ip6tables rules for every IPv6 external frontend, so it is
// served there as kube-proxy would (reassembled by the kernel's conntrack first). Those rules never match what
// tc translated: it is DNATed before the stack sees it, or sent out with bpf_redirect_neigh past it.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/in.h>

#include "lib/maps.h"
#include "lib/pick.h"

#define NA_IP_FRAG_MASK 0x3fff     // IP_MF | IP_OFFSET: a fragment (first or later)
#define NA_SNAT_PORT_MIN 32768     // a source port taken for masquerading is drawn from
#define NA_SNAT_PORT_SPAN 28000    // [NA_SNAT_PORT_MIN, NA_SNAT_PORT_MIN + NA_SNAT_PORT_SPAN)

// Which address of a packet set_addr4() and set_addr6() rewrite.
enum na_side {
    NA_DESTINATION = 0,
    NA_SOURCE = 1,
};

BPF_TABLE_PINNED("hash", struct svc_key, struct svc_val, na_services, NA_SERVICES_MAX, "PIN_DIR/na_services");
BPF_TABLE_PINNED("hash", struct slot_key, struct slot_val, na_slots, NA_SLOTS_MAX, "PIN_DIR/na_slots");
BPF_TABLE_PINNED("hash", u32, struct backend_val, na_backends, NA_BACKENDS_MAX, "PIN_DIR/na_backends");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_val, na_ct, NA_CT_MAX, "PIN_DIR/na_ct");
BPF_TABLE_PINNED("hash", struct svc_key6, struct svc_val, na_services6, NA_SERVICES_MAX, "PIN_DIR/na_services6");
BPF_TABLE_PINNED("hash", struct slot_key, struct slot_val, na_slots6, NA_SLOTS_MAX, "PIN_DIR/na_slots6");
BPF_TABLE_PINNED("hash", u32, struct backend_val6, na_backends6, NA_BACKENDS_MAX, "PIN_DIR/na_backends6");
BPF_TABLE_PINNED("lru_hash", struct ct_key6, struct ct_val6, na_ct6, NA_CT_MAX, "PIN_DIR/na_ct6");

// lib/pick.h's one map access, here because bcc rewrites map calls only in the program's own text.
static __always_inline struct slot_val *na_slot_lookup(u32 family, u32 id, u32 slot) {
    struct slot_key k = {.id = id, .slot = slot};
    if (family == NA_FAMILY_V6)
        return na_slots6.lookup(&k);
    return na_slots.lookup(&k);
}

// The kernel's four-argument form (bcc 0.26 declares an older three-argument one).
static long (*na_redirect_neigh)(u32 ifindex, void *params, int plen, u64 flags) = (void *)BPF_FUNC_redirect_neigh;

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define L4_OFF (ETH_HLEN + sizeof(struct iphdr))

struct flow { u32 saddr; u32 daddr; u16 sport; u16 dport; u8 proto; u32 csum_off; };

// The ports and the checksum's offset of the TCP or UDP header at `l4` (`l4_off` into the frame), for both
// families; -1 for another protocol or a header cut short.
static __always_inline int parse_ports(void *l4, void *end, u8 proto, u32 l4_off, u16 *sport, u16 *dport,
                                       u32 *csum_off) {
    if (proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > end)
            return -1;
        *sport = th->source;
        *dport = th->dest;
        *csum_off = l4_off + offsetof(struct tcphdr, check);
        return 0;
    }
    if (proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > end)
            return -1;
        *sport = uh->source;
        *dport = uh->dest;
        *csum_off = l4_off + offsetof(struct udphdr, check);
        return 0;
    }
    return -1;
}

static __always_inline int parse4(struct __sk_buff *skb, struct flow *f) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return -1;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5 || (ip->frag_off & htons(NA_IP_FRAG_MASK)))
        return -1;  // options or fragments: leave them to the stack
    f->saddr = ip->saddr;
    f->daddr = ip->daddr;
    f->proto = ip->protocol;
    return parse_ports(ip + 1, end, ip->protocol, L4_OFF, &f->sport, &f->dport, &f->csum_off);
}

static __always_inline void set_addr4(struct __sk_buff *skb, struct flow *f, enum na_side side, u32 new_ip,
                                      u16 new_port) {
    int src = side == NA_SOURCE;
    u32 old_ip = src ? f->saddr : f->daddr;
    u16 old_port = src ? f->sport : f->dport;
    u32 port_off = L4_OFF + (src ? 0 : 2);  // source and destination ports lead TCP and UDP headers
    u64 l4flags = f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
    if (old_ip != new_ip) {
        bpf_l4_csum_replace(skb, f->csum_off, old_ip, new_ip, l4flags | BPF_F_PSEUDO_HDR | 4);
        bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, 4);
        bpf_skb_store_bytes(skb, src ? IP_SRC_OFF : IP_DST_OFF, &new_ip, 4, 0);
    }
    if (old_port != new_port) {
        bpf_l4_csum_replace(skb, f->csum_off, old_port, new_port, l4flags | 2);
        bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0);
    }
    if (src) { f->saddr = new_ip; f->sport = new_port; } else { f->daddr = new_ip; f->dport = new_port; }
}

// Whether `ip` is reached through another interface than the one the packet came in on.
static __always_inline int local_backend4(struct __sk_buff *skb, struct flow *f, u32 ip, u32 *out_ifindex) {
    struct bpf_fib_lookup p = {};
    p.family = AF_INET;
    p.ipv4_src = f->daddr;
    p.ipv4_dst = ip;
    p.l4_protocol = f->proto;
    p.ifindex = skb->ingress_ifindex;
    int rc = bpf_fib_lookup(skb, &p, sizeof(p), BPF_FIB_LOOKUP_OUTPUT);
    *out_ifindex = p.ifindex;
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
        return 1;  // let the stack deal with it
    return p.ifindex != skb->ingress_ifindex;
}

static __always_inline int ingress4(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse4(skb, &f) < 0)
        return TC_ACT_OK;
    // A reply from a backend elsewhere to a flow we masqueraded: back to the client, from the frontend.
    struct ct_key rk = {.saddr = f.saddr, .daddr = f.daddr, .sport = f.sport, .dport = f.dport, .proto = f.proto,
                        .dir = NA_CT_REPLY_SNAT};
    struct ct_val *rv = na_ct.lookup(&rk);
    if (rv) {
        u32 cip = rv->ip1, fip = rv->ip2;
        u16 cport = rv->port1, fport = rv->port2;
        set_addr4(skb, &f, NA_DESTINATION, cip, cport);
        set_addr4(skb, &f, NA_SOURCE, fip, fport);
        return na_redirect_neigh(skb->ingress_ifindex, NULL, 0, 0);
    }
    struct ct_key fk = {.saddr = f.saddr, .daddr = f.daddr, .sport = f.sport, .dport = f.dport, .proto = f.proto,
                        .dir = NA_CT_FORWARD};
    struct ct_val *fv = na_ct.lookup(&fk);
    u32 bip, snat_ip;
    u16 bport, snat_port;
    u32 out_ifindex = 0;
    if (fv) {
        bip = fv->ip1; bport = fv->port1; snat_ip = fv->ip2; snat_port = fv->port2;
        if (snat_ip)
            local_backend4(skb, &f, bip, &out_ifindex);
    } else {
        struct svc_key sk = {.ip = f.daddr, .port = f.dport, .proto = f.proto};
        struct svc_val *svc = na_services.lookup(&sk);
        if (!svc || (svc->flags & NA_SVC_EXTERNAL_STACK))
            return TC_ACT_OK;  // not ours, or served by the iptables rules kept for it
        if (!na_has_backends(svc))
            return TC_ACT_SHOT;  // a frontend without endpoints
        u32 id = 0;
        if (na_pick(svc, &id, NA_FAMILY_V4) < 0)
            return TC_ACT_OK;
        struct backend_val *b = na_backends.lookup(&id);
        if (!b)
            return TC_ACT_OK;
        bip = b->ip; bport = b->port; snat_ip = 0; snat_port = 0;
        if (!local_backend4(skb, &f, bip, &out_ifindex)) {
            snat_ip = f.daddr;
            snat_port = f.sport;
            struct ct_key probe = {.saddr = bip, .daddr = snat_ip, .sport = bport, .dport = snat_port,
                                   .proto = f.proto, .dir = NA_CT_REPLY_SNAT};
            if (na_ct.lookup(&probe))  // that source port is taken towards this backend: another one
                snat_port = htons(NA_SNAT_PORT_MIN + (bpf_get_prandom_u32() % NA_SNAT_PORT_SPAN));
            struct ct_val back = {.ip1 = f.saddr, .port1 = f.sport, .ip2 = f.daddr, .port2 = f.dport};
            probe.sport = bport;
            probe.dport = snat_port;
            na_ct.update(&probe, &back);
        } else {
            struct ct_key lk = {.saddr = bip, .daddr = f.saddr, .sport = bport, .dport = f.sport, .proto = f.proto,
                                .dir = NA_CT_REPLY_LOCAL};
            struct ct_val front = {.ip1 = f.daddr, .port1 = f.dport};
            na_ct.update(&lk, &front);
        }
        struct ct_val fwd = {.ip1 = bip, .port1 = bport, .ip2 = snat_ip, .port2 = snat_port};
        na_ct.update(&fk, &fwd);
    }
    set_addr4(skb, &f, NA_DESTINATION, bip, bport);
    if (!snat_ip)
        return TC_ACT_OK;
    set_addr4(skb, &f, NA_SOURCE, snat_ip, snat_port);
    return na_redirect_neigh(out_ifindex ? out_ifindex : skb->ingress_ifindex, NULL, 0, 0);
}

static __always_inline int egress4(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse4(skb, &f) < 0)
        return TC_ACT_OK;
    struct ct_key k = {.saddr = f.saddr, .daddr = f.daddr, .sport = f.sport, .dport = f.dport, .proto = f.proto,
                       .dir = NA_CT_REPLY_LOCAL};
    struct ct_val *v = na_ct.lookup(&k);
    if (v) {
        u32 ip = v->ip1;
        u16 port = v->port1;
        set_addr4(skb, &f, NA_SOURCE, ip, port);
    }
    return TC_ACT_OK;
}

// --- IPv6 -----------------------------------------------------------------------------------------------------------

#define IP6_SRC_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP6_DST_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))
#define L4_OFF6 (ETH_HLEN + sizeof(struct ipv6hdr))

struct flow6 { u32 saddr[4]; u32 daddr[4]; u16 sport; u16 dport; u8 proto; u32 csum_off; };

static __always_inline void addr6_copy(u32 *to, const u32 *from) {
    to[0] = from[0]; to[1] = from[1]; to[2] = from[2]; to[3] = from[3];
}

static __always_inline int addr6_equal(const u32 *a, const u32 *b) {
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int addr6_zero(const u32 *a) {
    return (a[0] | a[1] | a[2] | a[3]) == 0;
}

// An na_ct6 key, zeroed first (hash keys are compared whole, pads included).
static __always_inline void ct6_key(struct ct_key6 *k, const u32 *saddr, const u32 *daddr, u16 sport, u16 dport,
                                    u8 proto, u8 dir) {
    __builtin_memset(k, 0, sizeof(*k));
    addr6_copy(k->saddr, saddr);
    addr6_copy(k->daddr, daddr);
    k->sport = sport;
    k->dport = dport;
    k->proto = proto;
    k->dir = dir;
}

static __always_inline int parse6(struct __sk_buff *skb, struct flow6 *f) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IPV6))
        return -1;
    struct ipv6hdr *ip6 = (void *)(eth + 1);
    if ((void *)(ip6 + 1) > end)
        return -1;
    __builtin_memcpy(f->saddr, &ip6->saddr, 16);
    __builtin_memcpy(f->daddr, &ip6->daddr, 16);
    f->proto = ip6->nexthdr;
    // Anything else behind the fixed header (an extension header, a fragment header, ICMPv6) is the stack's: the
    // agent's ip6tables rules serve those packets to an external frontend.
    return parse_ports(ip6 + 1, end, ip6->nexthdr, L4_OFF6, &f->sport, &f->dport, &f->csum_off);
}

// Rewrites one address and port of the packet (and `f`). Only the L4 checksum changes: by the 16-byte difference
// of the address (its pseudo-header part) and the port's. A UDP checksum must never become 0 over IPv6 (0 means
// none, which IPv6 forbids): BPF_F_MARK_MANGLED_0 writes 0xffff instead.
static __always_inline void set_addr6(struct __sk_buff *skb, struct flow6 *f, enum na_side side, const u32 *new_ip,
                                      u16 new_port) {
    int src = side == NA_SOURCE;
    u32 *old_ip = src ? f->saddr : f->daddr;
    u16 old_port = src ? f->sport : f->dport;
    u32 port_off = L4_OFF6 + (src ? 0 : 2);  // source and destination ports lead TCP and UDP headers
    u64 l4flags = f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
    u32 ip[4];
    addr6_copy(ip, new_ip);  // from a map value that may change under us: diff, store and remember one copy
    if (!addr6_equal(old_ip, ip)) {
        s64 diff = bpf_csum_diff(old_ip, 16, ip, 16, 0);
        bpf_l4_csum_replace(skb, f->csum_off, 0, diff, l4flags | BPF_F_PSEUDO_HDR);
        bpf_skb_store_bytes(skb, src ? IP6_SRC_OFF : IP6_DST_OFF, ip, 16, 0);
        addr6_copy(old_ip, ip);
    }
    if (old_port != new_port) {
        bpf_l4_csum_replace(skb, f->csum_off, old_port, new_port, l4flags | 2);
        bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0);
    }
    if (src) f->sport = new_port; else f->dport = new_port;
}

// Whether `ip` is reached through another interface than the one the packet came in on (as local_backend4).
static __always_inline int local_backend6(struct __sk_buff *skb, struct flow6 *f, const u32 *ip, u32 *out_ifindex) {
    struct bpf_fib_lookup p = {};
    p.family = AF_INET6;
    addr6_copy(p.ipv6_src, f->daddr);
    addr6_copy(p.ipv6_dst, ip);
    p.l4_protocol = f->proto;
    p.ifindex = skb->ingress_ifindex;
    int rc = bpf_fib_lookup(skb, &p, sizeof(p), BPF_FIB_LOOKUP_OUTPUT);
    *out_ifindex = p.ifindex;
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
        return 1;  // let the stack deal with it
    return p.ifindex != skb->ingress_ifindex;
}

// ingress4 for IPv6, with na_services6 / na_backends6 / na_ct6.
static __always_inline int ingress6(struct __sk_buff *skb) {
    struct flow6 f = {};
    if (parse6(skb, &f) < 0)
        return TC_ACT_OK;
    // A reply from a backend elsewhere to a flow we masqueraded: back to the client, from the frontend.
    struct ct_key6 rk;
    ct6_key(&rk, f.saddr, f.daddr, f.sport, f.dport, f.proto, NA_CT_REPLY_SNAT);
    struct ct_val6 *rv = na_ct6.lookup(&rk);
    if (rv) {
        u32 cip[4], fip[4];
        addr6_copy(cip, rv->ip1);
        addr6_copy(fip, rv->ip2);
        u16 cport = rv->port1, fport = rv->port2;
        set_addr6(skb, &f, NA_DESTINATION, cip, cport);
        set_addr6(skb, &f, NA_SOURCE, fip, fport);
        return na_redirect_neigh(skb->ingress_ifindex, NULL, 0, 0);
    }
    struct ct_key6 fk;
    ct6_key(&fk, f.saddr, f.daddr, f.sport, f.dport, f.proto, NA_CT_FORWARD);
    struct ct_val6 *fv = na_ct6.lookup(&fk);
    u32 bip[4] = {}, snat_ip[4] = {};  // snat_ip all zero: a backend on this node, no SNAT
    u16 bport, snat_port;
    u32 out_ifindex = 0;
    if (fv) {
        addr6_copy(bip, fv->ip1);
        addr6_copy(snat_ip, fv->ip2);
        bport = fv->port1; snat_port = fv->port2;
        if (!addr6_zero(snat_ip))
            local_backend6(skb, &f, bip, &out_ifindex);
    } else {
        struct svc_key6 sk = {};
        addr6_copy(sk.ip, f.daddr);
        sk.port = f.dport;
        sk.proto = f.proto;
        struct svc_val *svc = na_services6.lookup(&sk);
        if (!svc || (svc->flags & NA_SVC_EXTERNAL_STACK))
            return TC_ACT_OK;  // not ours, or served by the ip6tables rules kept for it
        if (!na_has_backends(svc))
            return TC_ACT_SHOT;  // a frontend without endpoints
        u32 id = 0;
        if (na_pick(svc, &id, NA_FAMILY_V6) < 0)
            return TC_ACT_OK;
        struct backend_val6 *b = na_backends6.lookup(&id);
        if (!b)
            return TC_ACT_OK;
        addr6_copy(bip, b->ip);
        bport = b->port; snat_port = 0;
        struct ct_val6 fwd = {};
        if (!local_backend6(skb, &f, bip, &out_ifindex)) {
            addr6_copy(snat_ip, f.daddr);
            snat_port = f.sport;
            struct ct_key6 probe;
            ct6_key(&probe, bip, snat_ip, bport, snat_port, f.proto, NA_CT_REPLY_SNAT);
            if (na_ct6.lookup(&probe))  // that source port is taken towards this backend: another one
                snat_port = htons(NA_SNAT_PORT_MIN + (bpf_get_prandom_u32() % NA_SNAT_PORT_SPAN));
            struct ct_val6 back = {};
            addr6_copy(back.ip1, f.saddr);
            back.port1 = f.sport;
            addr6_copy(back.ip2, f.daddr);
            back.port2 = f.dport;
            probe.dport = snat_port;
            na_ct6.update(&probe, &back);
            addr6_copy(fwd.ip2, snat_ip);
            fwd.port2 = snat_port;
        } else {
            struct ct_key6 lk;
            ct6_key(&lk, bip, f.saddr, bport, f.sport, f.proto, NA_CT_REPLY_LOCAL);
            struct ct_val6 front = {};
            addr6_copy(front.ip1, f.daddr);
            front.port1 = f.dport;
            na_ct6.update(&lk, &front);
        }
        addr6_copy(fwd.ip1, bip);
        fwd.port1 = bport;
        na_ct6.update(&fk, &fwd);
    }
    set_addr6(skb, &f, NA_DESTINATION, bip, bport);
    if (addr6_zero(snat_ip))
        return TC_ACT_OK;
    set_addr6(skb, &f, NA_SOURCE, snat_ip, snat_port);
    return na_redirect_neigh(out_ifindex ? out_ifindex : skb->ingress_ifindex, NULL, 0, 0);
}

// egress4 for IPv6: a local backend's reply leaves from the frontend it was dialled at.
static __always_inline int egress6(struct __sk_buff *skb) {
    struct flow6 f = {};
    if (parse6(skb, &f) < 0)
        return TC_ACT_OK;
    struct ct_key6 k;
    ct6_key(&k, f.saddr, f.daddr, f.sport, f.dport, f.proto, NA_CT_REPLY_LOCAL);
    struct ct_val6 *v = na_ct6.lookup(&k);
    if (v) {
        u32 ip[4];
        addr6_copy(ip, v->ip1);
        u16 port = v->port1;
        set_addr6(skb, &f, NA_SOURCE, ip, port);
    }
    return TC_ACT_OK;
}

// --- the programs: each family its own path (skb->protocol: the frame's EtherType, as the stack read it) ----------

int na_tc_ingress(struct __sk_buff *skb) {
    if (skb->protocol == htons(ETH_P_IPV6))
        return ingress6(skb);
    return ingress4(skb);
}

int na_tc_egress(struct __sk_buff *skb) {
    if (skb->protocol == htons(ETH_P_IPV6))
        return egress6(skb);
    return egress4(skb);
}
