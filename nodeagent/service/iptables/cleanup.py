"""`nodeagent cleanup`: remove every chain and jump rule the iptables mode creates, and nothing else.

As `kube-proxy --cleanup` (CleanupLeftovers, which it runs for iptables and ip6tables): jump rules are deleted
one by one from the built-in chains, then our chains are flushed and deleted in one restore per table.
Unlike kube-proxy, the chains it leaves behind (KUBE-MARK-MASQ, KUBE-PROXY-FIREWALL, the canaries) go
too, so the tables end as they were before the agent ran. kubelet's KUBE-FIREWALL (which kube-proxy
duplicates) is removed only when it holds nothing but the rule we write into it.
"""

from __future__ import annotations

import structlog

from nodeagent.kernel.netfilter import Iptables, chains_in
from nodeagent.service.iptables import names as n
from nodeagent.service.iptables.jumps import JUMPS, KUBELET_JUMPS

log = structlog.get_logger("nodeagent.service.iptables.cleanup")

OWNED = {
    "nat": (n.KUBE_SERVICES, n.KUBE_NODEPORTS, n.KUBE_POSTROUTING, n.KUBE_MARK_MASQ, n.KUBE_PROXY_CANARY),
    "filter": (n.KUBE_SERVICES, n.KUBE_EXTERNAL_SERVICES, n.KUBE_FORWARD, n.KUBE_NODEPORTS, n.KUBE_PROXY_FIREWALL,
               n.KUBE_PROXY_CANARY),
    "mangle": (n.KUBE_PROXY_CANARY,),
}
_OUR_FIREWALL_RULE = "block incoming localnet connections"


def _kubelet_firewall_is_ours(ipt: Iptables) -> bool:
    rules = [line for line in ipt.save("filter").splitlines() if line.startswith(f"-A {n.KUBELET_FIREWALL} ")]
    return all(_OUR_FIREWALL_RULE in line for line in rules)


def has_our_chains(ipt: Iptables) -> bool:
    """Whether any table holds a chain of ours (read with iptables-save, which creates nothing: on a node the
    IPv6 proxier never ran, cleanup leaves ip6tables untouched)."""
    return any(c in OWNED[table] or n.is_service_chain(c) for table in OWNED for c in chains_in(ipt.save(table)))


def cleanup(ipt: Iptables) -> list[str]:
    """Remove what the iptables mode created; returns a line per removed jump rule or chain."""
    removed: list[str] = []
    kubelet_ours = ipt.chain_exists("filter", n.KUBELET_FIREWALL) and _kubelet_firewall_is_ours(ipt)
    for jump in (*JUMPS, *(KUBELET_JUMPS if kubelet_ours else ())):
        while ipt.delete_rule(jump.table, jump.source, jump.rule):
            removed.append(f"{jump.table}: {jump.source} -> {jump.target}")
    for table, owned in OWNED.items():
        existing = chains_in(ipt.save(table))
        doomed = [c for c in owned if c in existing]
        if table == "nat":
            doomed += sorted(c for c in existing if n.is_service_chain(c))
        if table == "filter" and kubelet_ours and n.KUBELET_FIREWALL in existing:
            doomed.append(n.KUBELET_FIREWALL)
        if not doomed:
            continue
        lines = [f"*{table}", *(f":{c} - [0:0]" for c in doomed), *(f"-X {c}" for c in doomed), "COMMIT"]
        ipt.restore("\n".join(lines) + "\n")
        removed.extend(f"{table}: chain {c}" for c in doomed)
    log.info("iptables cleanup", backend=ipt.backend, family=f"IPv{ipt.family}", removed=len(removed))
    return removed
