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
// IPv4 only: IPv6 packets pass untouched to the stack, where the agent keeps kube-proxy's ip6tables rules for
// every IPv6 NodePort, externalIP and load-balancer IP (the eBPF proxier's IPv6 side feeds them).

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/in.h>

#include "lib/maps.h"
#include "lib/pick.h"

#define NA_IP_FRAG_MASK 0x3fff     // IP_MF | IP_OFFSET: a fragment (first or later)
#define NA_SNAT_PORT_MIN 32768     // a source port taken for masquerading is drawn from
#define NA_SNAT_PORT_SPAN 28000    // [NA_SNAT_PORT_MIN, NA_SNAT_PORT_MIN + NA_SNAT_PORT_SPAN)

// Which address of a packet set_addr() rewrites.
enum na_side {
    NA_DESTINATION = 0,
    NA_SOURCE = 1,
};

BPF_TABLE_PINNED("hash", struct svc_key, struct svc_val, na_services, NA_SERVICES_MAX, "PIN_DIR/na_services");
BPF_TABLE_PINNED("hash", struct slot_key, struct slot_val, na_slots, NA_SLOTS_MAX, "PIN_DIR/na_slots");
BPF_TABLE_PINNED("hash", u32, struct backend_val, na_backends, NA_BACKENDS_MAX, "PIN_DIR/na_backends");
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_val, na_ct, NA_CT_MAX, "PIN_DIR/na_ct");

// lib/pick.h's one map access, here because bcc rewrites map calls only in the program's own text.
// tc translates IPv4 only (IPv6 from outside is left to the stack: the agent's ip6tables rules), so `family`
// is always NA_FAMILY_V4.
static __always_inline struct slot_val *na_slot_lookup(u32 family, u32 id, u32 slot) {
    struct slot_key k = {.id = id, .slot = slot};
    return na_slots.lookup(&k);
}

// The kernel's four-argument form (bcc 0.26 declares an older three-argument one).
static long (*na_redirect_neigh)(u32 ifindex, void *params, int plen, u64 flags) = (void *)BPF_FUNC_redirect_neigh;

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define L4_OFF (ETH_HLEN + sizeof(struct iphdr))

struct flow { u32 saddr; u32 daddr; u16 sport; u16 dport; u8 proto; u32 csum_off; };

static __always_inline int parse(struct __sk_buff *skb, struct flow *f) {
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
    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *th = (void *)(ip + 1);
        if ((void *)(th + 1) > end)
            return -1;
        f->sport = th->source;
        f->dport = th->dest;
        f->csum_off = L4_OFF + offsetof(struct tcphdr, check);
    } else if (ip->protocol == IPPROTO_UDP) {
        struct udphdr *uh = (void *)(ip + 1);
        if ((void *)(uh + 1) > end)
            return -1;
        f->sport = uh->source;
        f->dport = uh->dest;
        f->csum_off = L4_OFF + offsetof(struct udphdr, check);
    } else {
        return -1;
    }
    return 0;
}

static __always_inline void set_addr(struct __sk_buff *skb, struct flow *f, enum na_side side, u32 new_ip,
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
static __always_inline int local_backend(struct __sk_buff *skb, struct flow *f, u32 ip, u32 *out_ifindex) {
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

int na_tc_ingress(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse(skb, &f) < 0)
        return TC_ACT_OK;
    // A reply from a backend elsewhere to a flow we masqueraded: back to the client, from the frontend.
    struct ct_key rk = {.saddr = f.saddr, .daddr = f.daddr, .sport = f.sport, .dport = f.dport, .proto = f.proto,
                        .dir = NA_CT_REPLY_SNAT};
    struct ct_val *rv = na_ct.lookup(&rk);
    if (rv) {
        u32 cip = rv->ip1, fip = rv->ip2;
        u16 cport = rv->port1, fport = rv->port2;
        set_addr(skb, &f, NA_DESTINATION, cip, cport);
        set_addr(skb, &f, NA_SOURCE, fip, fport);
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
            local_backend(skb, &f, bip, &out_ifindex);
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
        if (!local_backend(skb, &f, bip, &out_ifindex)) {
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
    set_addr(skb, &f, NA_DESTINATION, bip, bport);
    if (!snat_ip)
        return TC_ACT_OK;
    set_addr(skb, &f, NA_SOURCE, snat_ip, snat_port);
    return na_redirect_neigh(out_ifindex ? out_ifindex : skb->ingress_ifindex, NULL, 0, 0);
}

int na_tc_egress(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse(skb, &f) < 0)
        return TC_ACT_OK;
    struct ct_key k = {.saddr = f.saddr, .daddr = f.daddr, .sport = f.sport, .dport = f.dport, .proto = f.proto,
                       .dir = NA_CT_REPLY_LOCAL};
    struct ct_val *v = na_ct.lookup(&k);
    if (v) {
        u32 ip = v->ip1;
        u16 port = v->port1;
        set_addr(skb, &f, NA_SOURCE, ip, port);
    }
    return TC_ACT_OK;
}
