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
  The proxier lets a partial sync delete them only when it changes no Service (the periodic sync) or when many
  wait: nft 1.0 fetches every chain of the table before a `delete chain` (about 120 ms at 3,000 Services), and
  an endpoint change must not wait for that. An empty, unreferenced chain costs the datapath nothing.

Commands are ordered so every reference resolves: chains are added before the rules, maps and affinity sets that
name them, rules and elements that go away are removed before what they pointed to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from nodeagent.cluster.model import ObjectRef
from nodeagent.service.nftables import names as n
from nodeagent.service.nftables.render import (
    BASE_CHAINS,
    JUMPS,
    REJECT_CHAIN_COMMENT,
    SYNCED_CONTAINERS,
    PortPiece,
    Rendered,
    base_chain_spec,
    container_spec,
)
from nodeagent.service.nftables.ruleset import Chain, Container, Element, Table, element_text, wire_text
from nodeagent.state.translation import ServicePortName

STALE_GRACE = 1.0  # seconds: kube-proxy deletes chains stale since before "oneSecondAgo"


@dataclass
class KernelState:
    """What the kernel holds after our last successful transaction: the table, the pieces it was written from,
    and which ports render each map or set element (a cluster IP is one element for all ports of its Service;
    a misconfigured cluster may give two Services one external IP and port)."""

    table: Table
    pieces: dict[ServicePortName, PortPiece]
    holders: dict[tuple[str, str], set[ServicePortName]]

    @classmethod
    def of(cls, rendered: Rendered, stale: Iterable[str]) -> KernelState:
        """The state after a full sync of `rendered` that left `stale` chains flushed."""
        table = rendered.table.copy_shallow()
        for name in stale:
            table.chains[name] = Chain(name)
        holders: dict[tuple[str, str], set[ServicePortName]] = {}
        for port, piece in rendered.pieces.items():
            for container, key, _ in piece.elements:
                holders.setdefault((container, key), set()).add(port)
        return cls(table, dict(rendered.pieces), holders)


@dataclass
class Plan:
    """One transaction, and how to update the kernel state once it has run (`commit`)."""

    lines: list[str]
    stale: dict[str, float]  # per-service chains flushed but not deleted yet -> when they became stale
    commit: Callable[[], KernelState]
    deleted_chains: list[str] = field(default_factory=list)
    flushed_chains: list[str] = field(default_factory=list)
    written_chains: int = 0

    def text(self) -> str:
        """The transaction as `nft -f` input: `lines`, each chain's rules in a chain block (`wire_text`)."""
        return wire_text(self.lines)


def _age(p: str, stale: Mapping[str, float] | None, wanted: Callable[[str], bool], now: float, grace: float
         ) -> tuple[list[str], list[str], dict[str, float]]:
    """The deletions of chains stale for `grace` seconds that are not wanted again: (lines, chains, stale left)."""
    stale_now = dict(stale or {})
    deleted = sorted(name for name, since in stale_now.items() if since <= now - grace and not wanted(name))
    for name in deleted:
        del stale_now[name]
    return [f"delete chain {p} {name}" for name in deleted], deleted, stale_now


def plan(rendered: Rendered, known: KernelState | None, *, full: bool, changed: AbstractSet[ObjectRef],
         existing_chains: Iterable[str] = (), existing_sets: Iterable[str] = (),
         stale: Mapping[str, float] | None = None, now: float = 0.0, recreate_base: bool = False,
         grace: float = STALE_GRACE, delete_stale: bool = True) -> Plan:
    """The transaction from `known` (what the last successful sync left; None: unknown, which forces a full
    sync) to `rendered`. A full sync also takes the per-service chains and affinity sets the kernel holds
    (`existing_chains`, `existing_sets`, as listed) into account; `stale` and `now` age the flushed chains, which
    a partial sync deletes only when `delete_stale`."""
    if full or known is None:
        return _full(rendered, known, existing_chains, existing_sets, stale, now, recreate_base, grace)
    return _partial(rendered, known, changed, stale, now, grace, delete_stale)


def _full(rendered: Rendered, known: KernelState | None, existing_chains: Iterable[str],
          existing_sets: Iterable[str], stale: Mapping[str, float] | None, now: float, recreate_base: bool,
          grace: float) -> Plan:
    desired = rendered.table
    p = desired.prefix
    lines, deleted, stale_now = _age(p, stale, lambda name: name in desired.chains, now, grace)
    _setup(lines, rendered, recreate_base)
    kernel_chains = {c for c in existing_chains if n.is_service_chain(c)}
    kernel_sets = {s for s in existing_sets if n.is_affinity_set(s)}
    if known is not None:
        kernel_chains |= {c for c in known.table.chains if n.is_service_chain(c)}
        kernel_sets |= {s for s in known.table.containers if n.is_affinity_set(s)}
    kernel_chains -= set(deleted)
    write = [c for name, c in desired.chains.items() if n.is_service_chain(name)]
    for chain in write:
        lines.append(f"add chain {p} {chain.name}")
        lines.append(f"flush chain {p} {chain.name}")
    for name, container in desired.containers.items():
        if n.is_affinity_set(name):
            lines.append(f"add set {p} {name} {container.spec}")
    for chain in write:
        lines.extend(f"add rule {p} {chain.name} {rule}" for rule in chain.rules)
    for name in SYNCED_CONTAINERS:  # (all flushed by the setup)
        lines.extend(f"add element {p} {name} {{ {element_text(key, element)} }}"
                     for key, element in desired.containers[name].elements.items())
    flushed = []
    for name in sorted(kernel_chains - set(desired.chains)):
        if name not in stale_now:
            lines.append(f"flush chain {p} {name}")
            stale_now[name] = now
            flushed.append(name)
    for name in list(stale_now):
        if name in desired.chains:
            del stale_now[name]  # wanted again before it was deleted
    lines.extend(f"delete set {p} {name}" for name in sorted(kernel_sets - set(desired.containers)))
    return Plan(lines, stale_now, lambda: KernelState.of(rendered, stale_now), deleted, flushed, len(write))


def _partial(rendered: Rendered, known: KernelState, changed: AbstractSet[ObjectRef],
             stale: Mapping[str, float] | None, now: float, grace: float, delete_stale: bool) -> Plan:
    """Only the ports whose piece changed (or whose Service is in `changed`): O(changes), not O(cluster)."""
    table = known.table
    p = table.prefix
    old, new = known.pieces, rendered.pieces
    touched = [name for name, piece in new.items() if old.get(name) is not piece or piece.service in changed]
    touched += [name for name in old if name not in new]
    wanted_chains = {c.name for name in touched if name in new for c in new[name].chains}
    lines: list[str] = []
    deleted: list[str] = []
    stale_now = dict(stale or {})
    if delete_stale:
        lines, deleted, stale_now = _age(
            p, stale, lambda name: name in wanted_chains or (name in table.chains and bool(table.chains[name].rules)),
            now, grace)
    write: list[Chain] = []
    stale_chains: list[str] = []
    add_sets: list[Container] = []
    drop_sets: list[str] = []
    for name in touched:
        before, after = old.get(name), new.get(name)
        keep = {c.name for c in after.chains} if after is not None else set()
        if after is not None:
            rewrite_all = after.service in changed
            write += [c for c in after.chains if rewrite_all or _differs(c, table.chains.get(c.name))]
            add_sets += [s for s in after.affinity_sets if rewrite_all or s.name not in table.containers]
        if before is not None:
            stale_chains += [c.name for c in before.chains if c.name not in keep and c.name not in stale_now
                             and c.name in table.chains]
            kept_sets = {s.name for s in after.affinity_sets} if after is not None else set()
            drop_sets += [s.name for s in before.affinity_sets if s.name not in kept_sets]
    for chain in write:
        lines.append(f"add chain {p} {chain.name}")
        lines.append(f"flush chain {p} {chain.name}")
    lines.extend(f"add set {p} {s.name} {s.spec}" for s in add_sets)
    for chain in write:
        lines.extend(f"add rule {p} {chain.name} {rule}" for rule in chain.rules)

    # elements: the keys the touched ports held or hold, each as the ports holding it after this sync render it
    gone = set(touched)
    holders_after: dict[tuple[str, str], set[ServicePortName]] = {}
    wanted: dict[tuple[str, str], Element] = {}
    for name in touched:
        for piece in (old.get(name), new.get(name)):
            for container, key, _ in (piece.elements if piece is not None else ()):
                if (container, key) not in holders_after:
                    holders_after[(container, key)] = known.holders.get((container, key), set()) - gone
    for name in touched:
        if (after := new.get(name)) is not None:
            for container, key, rendered_element in after.elements:
                holders_after[(container, key)].add(name)
                wanted[(container, key)] = rendered_element
    final: dict[tuple[str, str], Element | None] = {}
    for (container, key), holders in holders_after.items():
        found = wanted.get((container, key))
        if found is None and holders:  # still rendered by a port this sync did not touch
            found = next(e for c, k, e in new[next(iter(holders))].elements if (c, k) == (container, key))
        final[(container, key)] = found
    adds: list[str] = []
    for (container, key), element in final.items():
        have = table.containers[container].elements.get(key)
        if element is None:
            if have is not None:
                lines.append(f"delete element {p} {container} {{ {key} }}")
        elif have is None:
            adds.append(f"add element {p} {container} {{ {element_text(key, element)} }}")
        elif have.value != element.value or have.comment != element.comment:
            lines.append(f"delete element {p} {container} {{ {key} }}")
            adds.append(f"add element {p} {container} {{ {element_text(key, element)} }}")
    lines.extend(adds)
    flushed = sorted(set(stale_chains))
    for chain_name in flushed:
        lines.append(f"flush chain {p} {chain_name}")
        stale_now[chain_name] = now
    for chain_name in wanted_chains & set(stale_now):
        del stale_now[chain_name]  # wanted again before it was deleted
    lines.extend(f"delete set {p} {name}" for name in sorted(set(drop_sets)))

    def commit() -> KernelState:
        for chain_name in deleted:
            table.chains.pop(chain_name, None)
        for chain_name in flushed:
            table.chains[chain_name] = Chain(chain_name)
        for chain in write:
            table.chains[chain.name] = chain
        for container_set in add_sets:
            table.containers[container_set.name] = container_set
        for set_name in drop_sets:
            table.containers.pop(set_name, None)
        for (container, key), element in final.items():
            elements = table.containers[container].elements
            if element is None:
                elements.pop(key, None)
                known.holders.pop((container, key), None)
            else:
                elements[key] = element
                known.holders[(container, key)] = holders_after[(container, key)]
        for port in touched:
            if port in new:
                old[port] = new[port]
            else:
                old.pop(port, None)
        return known

    return Plan(lines, stale_now, commit, deleted, flushed, len(write))


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
