// The service datapath's map layouts, shared by sock_lb.c (socket load balancing) and nodeport_tc.c
// (NodePort and external addresses on the node's interfaces), which use the same pinned Service maps.
//
// Only the layouts live here: the maps are declared (BPF_TABLE_PINNED) in each program, because the
// loaders substitute PIN_DIR in the program's own text and compile_check's unpinned() rewrites those
// declarations there. Their sizes are named below so both programs declare the same map.
//
// The agent writes and reads these bytes from Python. Each mirror says which struct it must match
// (nodeagent/service/ebpf/desired.py: svc_key; nodeagent/service/ebpf/maps.py: svc_val, slot_key,
// slot_val, backend_val; the sizes in nodeagent/kernel/bpf/loader.py MAPS), and
// tests/integration/test_bpf_layouts.py compares them with what bcc compiles. The maps are pinned and
// outlive the agent: changing a layout here bumps LAYOUT_VERSION in nodeagent/kernel/bpf/loader.py.
//
// Maps (keys and values in network byte order where they hold addresses and ports):
//   na_services:   (vip, port, proto) -> (version id, backend count, total weight, affinity seconds, flags)
//   na_slots:      (version id, slot)  -> (backend id, cumulative weight): one version per backend set,
//                  written completely before na_services points at it, so a lookup never sees a
//                  half-written set
//   na_backends:   backend id -> (ip, port)
//   na_reverse:    (socket cookie, backend ip, port) -> (vip, port), LRU: getpeername and UDP replies
//   na_affinity:   (netns cookie, vip, port, proto) -> (backend id, last use): ClientIP affinity
//   na_sk_reverse: per connected socket, (backend, vip): getpeername and connected-UDP replies
//   na_ct:         (tc) a flow's 4-tuple, protocol and direction -> its translation, LRU
//
// IPv6 has maps of its own, the same roles with 16-byte addresses (as Cilium keeps lb4_* and lb6_* maps apart):
//   na_services6, na_slots6, na_backends6 (written by the agent's IPv6 side), na_reverse6, na_affinity6,
//   na_sk_reverse6 (sock_lb.c's), na_ct6 (nodeport_tc.c's). A v4-mapped address (::ffff:a.b.c.d) dialed from an
//   IPv6 socket is an IPv4 Service's: it is looked up in the IPv4 maps (see sock_lb.c).

#ifndef NA_LIB_MAPS_H
#define NA_LIB_MAPS_H

#define NA_SERVICES_MAX 131072
#define NA_SLOTS_MAX 1048576
#define NA_BACKENDS_MAX 1048576
#define NA_REVERSE_MAX 262144
#define NA_AFFINITY_MAX 262144
#define NA_CT_MAX 262144

// na_services, na_slots, na_backends: written by the agent (nodeagent/service/ebpf/maps.py).
struct svc_key { u32 ip; u16 port; u8 proto; u8 pad; };
struct svc_val { u32 id; u32 count; u32 weight_total; u32 affinity_s; u32 flags; };  // affinity_s 0: no affinity
// svc_val.flags
enum na_svc_flags {
    // An external frontend (externalIP, load-balancer IP, node IP:NodePort) of a Service port that needs what
    // tc does not implement (externalTrafficPolicy Local, loadBalancerSourceRanges, ClientIP affinity, reject
    // without endpoints...): nodeport_tc.c leaves new flows to it to the stack, where the agent keeps
    // kube-proxy's own iptables rules for exactly those Services. The socket programs ignore it.
    NA_SVC_EXTERNAL_STACK = 1,
};
struct slot_key { u32 id; u32 slot; };
struct slot_val { u32 backend; u32 cum_weight; };
struct backend_val { u32 ip; u16 port; u16 pad; };  // keyed by a u32 backend id

// sock_lb.c's own: written by the programs only.
struct rev_key { u64 cookie; u32 ip; u16 port; u16 pad; };
struct rev_val { u32 ip; u16 port; u16 pad; };
struct aff_key { u64 netns; u32 ip; u16 port; u8 proto; u8 pad; };
struct aff_val { u32 backend; u32 pad; u64 last; };
struct sk_rev { u32 backend_ip; u16 backend_port; u16 pad; u32 vip; u16 vip_port; u16 pad2; };

// The IPv6 maps: addresses as four 32-bit words in network order, as bpf_sock_addr's user_ip6 holds them.
// svc_val, slot_key, slot_val and aff_val are shared with IPv4.
struct svc_key6 { u32 ip[4]; u16 port; u8 proto; u8 pad; };
struct backend_val6 { u32 ip[4]; u16 port; u16 pad; };  // keyed by a u32 backend id (na_backends6)
struct rev_key6 { u64 cookie; u32 ip[4]; u16 port; u16 pad; u32 pad2; };
struct rev_val6 { u32 ip[4]; u16 port; u16 pad; };
struct aff_key6 { u64 netns; u32 ip[4]; u16 port; u8 proto; u8 pad; u32 pad2; };
// per connected IPv6 socket; a v4-mapped connect keeps its v4-mapped backend and VIP here too
struct sk_rev6 { u32 backend_ip[4]; u16 backend_port; u16 pad; u32 vip[4]; u16 vip_port; u16 pad2; };

// nodeport_tc.c's connection tracking: written by the programs only.
// Which packets of a flow an na_ct entry translates (ct_key.dir).
enum na_ct_dir {
    NA_CT_FORWARD = 0,      // client -> frontend, as it came in: (backend, SNAT address or 0)
    NA_CT_REPLY_LOCAL = 1,  // backend on this node -> client, leaving: (frontend), the DNAT undone
    NA_CT_REPLY_SNAT = 2,   // backend elsewhere -> the frontend we masqueraded as: (client, frontend)
};
struct ct_key { u32 saddr; u32 daddr; u16 sport; u16 dport; u8 proto; u8 dir; u16 pad; };
struct ct_val { u32 ip1; u16 port1; u16 pad1; u32 ip2; u16 port2; u16 pad2; };
// na_ct6: the same for IPv6 (nodeport_tc.c's IPv6 path), with 16-byte addresses.
struct ct_key6 { u32 saddr[4]; u32 daddr[4]; u16 sport; u16 dport; u8 proto; u8 dir; u16 pad; };
struct ct_val6 { u32 ip1[4]; u16 port1; u16 pad1; u32 ip2[4]; u16 port2; u16 pad2; };

#endif
