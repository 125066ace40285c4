"""The one `nft -f` transaction that takes the kernel's `kube-proxy` table to the rendered one. Pure.

As kube-proxy's syncProxyRules (pkg/proxy/nftables/proxier.go):

- A **full** sync runs `setupNFTables` (table, base chains added and flushed, the first time in a process added
  and deleted first so a changed priority takes; the fixed chains added, flushed and refilled; the maps and sets
  declared and flushed) and then writes every per-service chain (add, flush, rules) and every element.
- A **partial** sync writes only the chains of the Services that changed (and of any port whose rendering
  changed), flush-and-refill, and only the map and set elements that differ from what the kernel holds (kube-
  proxy's nftElementStorage: a changed value is deleted and added again).
- Per-service chains no longer wanted are flushed (their map elements go in the same transaction) and deleted
  by a later sync, once they have been stale for `grace` seconds: kernels before 6.2 notice only a little later
  that a chain a deleted map element pointed to is unreferenced. kube-proxy deletes them in a transaction of
  their own; here the deletions open the sync's single transaction (a failure drops them with the rest, and they
  are found again by the next full sync's listing). Affinity sets no longer wanted are deleted at once.

Commands are ordered so every reference resolves: chains are added before the rules, maps and affinity sets that
name them, rules and elements that go away are removed before what they pointed to.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from nodeagent.cluster.model import ObjectRef
from nodeagent.service.nftables import names as n
from nodeagent.service.nftables.render import (
    BASE_CHAINS,
    JUMPS,
    REJECT_CHAIN_COMMENT,
    SYNCED_CONTAINERS,
    Rendered,
    base_chain_spec,
    container_spec,
)
from nodeagent.service.nftables.ruleset import Chain, Container, Element, Table, element_text

STALE_GRACE = 1.0  # seconds: kube-proxy deletes chains stale since before "oneSecondAgo"


@dataclass
class Plan:
    """One transaction, and the kernel's table once it has run."""

    lines: list[str]
    after: Table
    stale: dict[str, float]  # per-service chains flushed but not deleted yet -> when they became stale
    deleted_chains: list[str] = field(default_factory=list)
    flushed_chains: list[str] = field(default_factory=list)
    written_chains: int = 0

    def text(self) -> str:
        """The transaction as `nft -f` input."""
        return "".join(line + "\n" for line in self.lines)


def plan(rendered: Rendered, known: Table | None, *, full: bool, changed: AbstractSet[ObjectRef],
         existing_chains: Iterable[str] = (), existing_sets: Iterable[str] = (),
         stale: Mapping[str, float] | None = None, now: float = 0.0, recreate_base: bool = False,
         grace: float = STALE_GRACE) -> Plan:
    """The transaction from `known` (what the last successful sync left; None: unknown, which forces a full
    sync) to `rendered`. A full sync also takes the per-service chains and affinity sets the kernel holds
    (`existing_chains`, `existing_sets`, as listed) into account; `stale` and `now` age the flushed chains."""
    desired = rendered.table
    full = full or known is None
    p = desired.prefix
    stale_now = dict(stale or {})
    lines: list[str] = []
    deleted: list[str] = []
    for name, since in sorted(stale_now.items()):
        if since <= now - grace and name not in desired.chains:
            lines.append(f"delete chain {p} {name}")
            deleted.append(name)
    for name in deleted:
        del stale_now[name]
    if full:
        _setup(lines, rendered, recreate_base)
        kernel_chains = {c for c in existing_chains if n.is_service_chain(c)} - set(deleted)
        kernel_sets = {s for s in existing_sets if n.is_affinity_set(s)}
        if known is not None:
            kernel_chains |= {c for c in known.chains if n.is_service_chain(c)} - set(deleted)
            kernel_sets |= {s for s in known.containers if n.is_affinity_set(s)}
        known_elements: dict[str, Mapping[str, Element]] = {name: {} for name in SYNCED_CONTAINERS}
        write = [c for name, c in desired.chains.items() if n.is_service_chain(name)]
    else:
        assert known is not None
        kernel_chains = {c for c in known.chains if n.is_service_chain(c)} - set(deleted)
        kernel_sets = {s for s in known.containers if n.is_affinity_set(s)}
        known_elements = {name: known.containers[name].elements for name in SYNCED_CONTAINERS}
        write = [c for name, c in desired.chains.items() if n.is_service_chain(name)
                 and (rendered.owner.get(name) in changed or _differs(c, known.chains.get(name)))]

    for chain in write:
        lines.append(f"add chain {p} {chain.name}")
        lines.append(f"flush chain {p} {chain.name}")
    write_sets = {rendered.owner[c.name] for c in write if c.name in rendered.owner}
    for name, container in desired.containers.items():
        if n.is_affinity_set(name) and (full or rendered.owner.get(name) in write_sets or name not in kernel_sets):
            lines.append(f"add set {p} {name} {container.spec}")
    for chain in write:
        lines.extend(f"add rule {p} {chain.name} {rule}" for rule in chain.rules)

    _elements(lines, p, desired, known_elements)

    flushed = []
    for name in sorted(kernel_chains - set(desired.chains)):
        if name not in stale_now:
            lines.append(f"flush chain {p} {name}")
            stale_now[name] = now
            flushed.append(name)
    for name in list(stale_now):
        if name in desired.chains:
            del stale_now[name]  # wanted again before it was deleted
    for name in sorted(kernel_sets - set(desired.containers)):
        lines.append(f"delete set {p} {name}")

    after = Table(desired.family, desired.name, desired.comment, dict(desired.chains), dict(desired.containers))
    for name in stale_now:
        after.chains[name] = Chain(name)
    return Plan(lines, after, stale_now, deleted, flushed, len(write))


def _differs(chain: Chain, known: Chain | None) -> bool:
    return known is None or known.rules != chain.rules


def _setup(lines: list[str], rendered: Rendered, recreate_base: bool) -> None:
    """`setupNFTables`, command for command."""
    table = rendered.table
    p = table.prefix
    family = 4 if table.family == "ip" else 6
    rules = rendered.setup_rules
    lines.append(f'add table {p} {{ comment "{n.TABLE_COMMENT}" ; }}')
    if recreate_base:
        for name, *_ in BASE_CHAINS:
            lines.append(f"add chain {p} {name}")
            lines.append(f"delete chain {p} {name}")
    for name, hook_type, hook, priority in BASE_CHAINS:
        lines.append(f"add chain {p} {name} {base_chain_spec(hook_type, hook, priority)}")
        lines.append(f"flush chain {p} {name}")
    created: set[str] = set()

    def ensure(chain: str) -> None:
        if chain not in created:
            created.add(chain)
            lines.append(f"add chain {p} {chain}")
            lines.append(f"flush chain {p} {chain}")

    for to, from_, match in JUMPS:
        ensure(to)
        lines.append(f"add rule {p} {from_} {match} jump {to}" if match else f"add rule {p} {from_} jump {to}")
    for chain in (n.SERVICES, n.CLUSTER_IPS_CHECK, n.MASQUERADING, n.MARK_MASQ):
        ensure(chain)
    for chain in (n.MARK_MASQ, n.MASQUERADING):
        lines.extend(f"add rule {p} {chain} {rule}" for rule in rules[chain])
    lines.append(f"add set {p} {n.CLUSTER_IPS} {container_spec(n.CLUSTER_IPS, family)}")
    lines.extend(f"add rule {p} {n.CLUSTER_IPS_CHECK} {rule}" for rule in rules[n.CLUSTER_IPS_CHECK])
    lines.append(f"add set {p} {n.NODEPORT_IPS} {container_spec(n.NODEPORT_IPS, family)}")
    if rendered.nodeport_ips is None:
        lines.append(f"delete set {p} {n.NODEPORT_IPS}")
    else:
        lines.append(f"flush set {p} {n.NODEPORT_IPS}")
        lines.extend(f"add element {p} {n.NODEPORT_IPS} {{ {ip} }}" for ip in rendered.nodeport_ips)
    for name in (n.NO_ENDPOINT_SERVICES, n.NO_ENDPOINT_NODEPORTS):
        lines.append(f"add map {p} {name} {container_spec(name, family)}")
    lines.append(f'add chain {p} {n.REJECT_CHAIN} {{ comment "{REJECT_CHAIN_COMMENT}" ; }}')
    lines.append(f"flush chain {p} {n.REJECT_CHAIN}")
    for chain in (n.REJECT_CHAIN, n.SERVICE_ENDPOINTS_CHECK, n.NODEPORT_ENDPOINTS_CHECK):
        lines.extend(f"add rule {p} {chain} {rule}" for rule in rules[chain])
    lines.append(f"add map {p} {n.FIREWALL_IPS} {container_spec(n.FIREWALL_IPS, family)}")
    ensure(n.FIREWALL_CHECK)
    lines.extend(f"add rule {p} {n.FIREWALL_CHECK} {rule}" for rule in rules[n.FIREWALL_CHECK])
    for name in (n.SERVICE_IPS, n.SERVICE_NODEPORTS):
        lines.append(f"add map {p} {name} {container_spec(name, family)}")
    lines.extend(f"add rule {p} {n.SERVICES} {rule}" for rule in rules[n.SERVICES])
    for name in SYNCED_CONTAINERS:
        kind = "set" if name == n.CLUSTER_IPS else "map"
        lines.append(f"flush {kind} {p} {name}")


def _elements(lines: list[str], p: str, desired: Table, known: Mapping[str, Mapping[str, Element]]) -> None:
    """nftElementStorage's ensureElem / cleanupLeftoverKeys for each synced map and set: removals first."""
    adds: list[str] = []
    for name in SYNCED_CONTAINERS:
        want: Container = desired.containers[name]
        have = known[name]
        for key in have:
            if key not in want.elements:
                lines.append(f"delete element {p} {name} {{ {key} }}")
        for key, element in want.elements.items():
            old = have.get(key)
            if old is None:
                adds.append(f"add element {p} {name} {{ {element_text(key, element)} }}")
            elif old.value != element.value or old.comment != element.comment:
                lines.append(f"delete element {p} {name} {{ {key} }}")
                adds.append(f"add element {p} {name} {{ {element_text(key, element)} }}")
    lines.extend(adds)
