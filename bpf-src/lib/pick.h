// The backend pick of the service datapath, shared by sock_lb.c (at connect and sendmsg) and
// nodeport_tc.c (on a flow's first packet): one weighted random draw over a frontend's backend set.
//
// A set is one version id in na_slots: slots 0..count-1 in order, each with its backend id and the
// cumulative weight up to it (nodeagent/service/ebpf/maps.py writes them). bcc rewrites map calls
// (`na_slots.lookup(...)`) only in the program's own text, not in included headers, so the including
// program declares na_slots and defines na_slot_lookup() below; the search itself is here.
//
// `family` (NA_FAMILY_V4 or NA_FAMILY_V6) says whose slot map a set lives in (na_slots or na_slots6: each
// family's agent side numbers its versions on its own). Always a constant, so the branch is compiled away.

#ifndef NA_LIB_PICK_H
#define NA_LIB_PICK_H

#include "lib/maps.h"

#define NA_MAX_SEARCH 16  // binary search depth: up to 65,536 backends per Service
#define NA_FAMILY_V4 4
#define NA_FAMILY_V6 6

// na_slots[(id, slot)] (na_slots6 for NA_FAMILY_V6), or NULL. Defined by the including program (see above).
static __always_inline struct slot_val *na_slot_lookup(u32 family, u32 id, u32 slot);

// Whether a frontend has anything to pick from; without, the programs refuse (as kube-proxy rejects).
static __always_inline int na_has_backends(const struct svc_val *svc) {
    return svc->count != 0 && svc->weight_total != 0;
}

// The slot whose cumulative weight first exceeds r (weights are positive, so this is a proper
// weighted choice; with equal weights it is slot r).
static __always_inline int na_pick_slot(u32 family, u32 id, u32 count, u32 r, u32 *backend) {
    u32 lo = 0, hi = count - 1;
    for (int i = 0; i < NA_MAX_SEARCH; i++) {
        if (lo >= hi)
            break;
        u32 mid = lo + (hi - lo) / 2;
        struct slot_val *v = na_slot_lookup(family, id, mid);
        if (!v)
            return -1;
        if (v->cum_weight > r)
            hi = mid;
        else
            lo = mid + 1;
    }
    struct slot_val *v = na_slot_lookup(family, id, lo);
    if (!v)
        return -1;
    *backend = v->backend;
    return 0;
}

// A weighted random backend id of `svc` (which na_has_backends); -1 when its set is being replaced this
// instant (a slot already deleted): the caller leaves the packet or connect untranslated.
static __always_inline int na_pick(const struct svc_val *svc, u32 *backend, u32 family) {
    return na_pick_slot(family, svc->id, svc->count, bpf_get_prandom_u32() % svc->weight_total, backend);
}

#endif
