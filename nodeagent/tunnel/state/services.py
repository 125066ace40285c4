"""The tunnel's Service table: which Service a captured destination `ip:port` is, and its endpoints. Pure.

A captured outbound connection knows only its original destination. `ServiceTable.lookup(ip, port)`
answers, per connection and in one dict lookup, whether that is a Service frontend and if so with a
`ServiceTarget`: the Service, its port, its tunnel settings (`service_config`) and its candidate
endpoints (address, target port, node, zone, weight, conditions). Choosing among them is
`nodeagent.tunnel.resilience.balance`'s job; this module only says who the candidates are.

The frontends are those kube-proxy would translate for traffic starting on this node (read from the
snapshot's `ServicePortInfo`, the same view every datapath uses): each cluster IP, external IP and
load-balancer IP at the Service port, and this node's InternalIPs at the NodePort; TCP only (the tunnel
carries TCP). Which endpoints each frontend gets follows kube-proxy too: a cluster IP with
`internalTrafficPolicy: Local` only this node's endpoints (none: refused, no fallback), external
frontends every endpoint unless both traffic policies are Local. Conditions are passed on unfiltered;
`balance` prefers ready endpoints and falls back to serving-terminating ones as kube-proxy does.
An endpoint's zone is its node's `topology.kubernetes.io/zone` label.

Rebuilding: `service_table(snapshot)` builds everything (measured by bench/endpoint_choice.py);
`table.updated(next_snapshot)` redoes only the Services whose translation or object changed (the
snapshot's `changed_services`, plus Services whose annotations changed, found by an identity scan), on
persistent maps, so the old table stays valid for connections already using it. A change to the
nodes' zones or this node's addresses, or a skipped generation, rebuilds everything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from typing import NamedTuple, cast

import immutables

from nodeagent.cluster.model import IPAddress, Kind, ObjectRef, Protocol, Rejection, Service, ServiceType
from nodeagent.heap import collector_paused
from nodeagent.state.tracker import Snapshot
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName
from nodeagent.tunnel.state.service_config import ServiceConfig, service_config

ZONE_LABEL = "topology.kubernetes.io/zone"

Frontend = tuple[str, int]  # (ip as str() writes it, port)


class Candidate(NamedTuple):
    """One endpoint a connection to the Service may go to.

    A named tuple rather than a frozen dataclass: a table holds one per endpoint per Service port
    (100,000 at 10,000 Services) and a frozen dataclass costs 5x as much to build.
    """

    key: tuple[IPAddress, int]  # (ip, target port): its name in outlier state and exclude sets
    port: int  # the target port on the endpoint
    node: str | None
    zone: str | None
    weight: int  # relative; 0: never chosen
    ready: bool
    serving: bool
    terminating: bool
    pod: ObjectRef | None

    @property
    def ip(self) -> IPAddress:
        """The endpoint's address."""
        return self.key[0]

    @property
    def address(self) -> str:
        """`ip:port` (`[ip]:port` for IPv6), as logs and HBONE's :authority write it."""
        ip = self.key[0]
        return f"[{ip}]:{self.port}" if isinstance(ip, IPv6Address) else f"{ip}:{self.port}"

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """What a Service frontend leads to: the Service, its port, its tunnel settings and its candidates."""

    service: ObjectRef
    port: ServicePortName
    config: ServiceConfig
    endpoints: tuple[Candidate, ...]
    node_local_only: bool = False  # internalTrafficPolicy Local: the candidates are this node's only
    weighted: bool = field(init=False)  # some candidate weighs other than 1 (else the balancer picks uniformly)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weighted", any(c.weight != 1 for c in self.endpoints))


@dataclass(frozen=True)
class _Placement:
    """What, besides a Service itself, decides its targets; a change here rebuilds the whole table."""

    node: str
    zones: Mapping[str, str]  # node name -> zone label
    node_ips: tuple[str, ...]  # this node's InternalIPs, for NodePort frontends


class ServiceTable:
    """Service frontends of one snapshot -> targets; immutable, `updated()` returns a new table."""

    __slots__ = ("_configs", "_frontends", "_owned", "_placement", "_snapshot")

    def __init__(self, snapshot: Snapshot, placement: _Placement, frontends: immutables.Map[Frontend, ServiceTarget],
                 owned: immutables.Map[ObjectRef, tuple[Frontend, ...]],
                 configs: immutables.Map[ObjectRef, tuple[ServiceConfig, tuple[Rejection, ...]]]) -> None:
        self._snapshot, self._placement = snapshot, placement
        self._frontends, self._owned, self._configs = frontends, owned, configs

    def __repr__(self) -> str:
        return (f"<ServiceTable node={self._placement.node} generation={self.generation} "
                f"services={len(self._configs)} frontends={len(self._frontends)}>")

    def __len__(self) -> int:
        return len(self._frontends)

    @property
    def generation(self) -> int:
        """The generation of the snapshot this table reflects."""
        return self._snapshot.generation

    @property
    def node(self) -> str:
        """The node whose tunnel uses this table."""
        return self._placement.node

    @property
    def zone(self) -> str | None:
        """This node's zone (its `topology.kubernetes.io/zone` label), if it has one."""
        return self._placement.zones.get(self._placement.node)

    def lookup(self, ip: str | IPAddress, port: int) -> ServiceTarget | None:
        """The Service behind destination `ip:port`, or None when it is not a Service frontend."""
        return self._frontends.get((ip if isinstance(ip, str) else str(ip), port))

    def frontends(self) -> Mapping[Frontend, ServiceTarget]:
        """Every frontend and its target (read-only; for the admin dump and tests)."""
        return self._frontends

    def config(self, service: ObjectRef) -> ServiceConfig | None:
        """The tunnel settings of one Service (None if the table does not know it)."""
        entry = self._configs.get(service)
        return None if entry is None else entry[0]

    def rejections(self, service: ObjectRef) -> tuple[Rejection, ...]:
        """The annotations of one Service that were ignored, and why."""
        entry = self._configs.get(service)
        return () if entry is None else entry[1]

    def all_rejections(self) -> Iterable[Rejection]:
        """Every ignored annotation of every Service (for logs and the admin dump)."""
        for _, rejections in self._configs.values():
            yield from rejections

    def updated(self, snapshot: Snapshot) -> ServiceTable:
        """The table for the next snapshot, rebuilding only what changed (see the module docstring)."""
        old = self._snapshot
        if snapshot is old:
            return self
        placement = _placement(snapshot) if Kind.NODE in snapshot.changed_kinds else self._placement
        if snapshot.generation != old.generation + 1 or placement != self._placement:
            return service_table(snapshot)
        dirty = set(snapshot.changed_services)
        if Kind.SERVICE in snapshot.changed_kinds:
            before, after = old.services, snapshot.services
            dirty.update(ref for ref, svc in after.items() if before.get(ref) is not svc)
            dirty.update(ref for ref in before if ref not in after)
        frontends, owned, configs = self._frontends.mutate(), self._owned.mutate(), self._configs.mutate()
        for ref in dirty:
            for frontend in owned.pop(ref, ()):
                target = frontends.get(frontend)
                if target is not None and target.service == ref:
                    del frontends[frontend]
            configs.pop(ref, None)
            service = snapshot.services.get(ref)
            if service is not None:
                _add(service, snapshot, placement, frontends, owned, configs)
        return ServiceTable(snapshot, placement, frontends.finish(), owned.finish(), configs.finish())


    def delta_since(self, sent: ServiceTable | None) -> ServicesDelta:
        """What a holder of `sent` (None: nothing) needs to hold this table (a tunnel worker's copy).

        A whole table is the whole cluster's Services and endpoints (25 MB and seconds to pickle at 10,000
        Services), while a snapshot changes a few: tables made by `updated` share every unchanged target, so
        what changed is found by identity and only that goes."""
        if sent is None or sent._placement != self._placement:
            return ServicesDelta(self.generation, self._placement, True, dict(self._frontends), (),
                                 dict(self._configs), ())
        return ServicesDelta(
            self.generation, self._placement, False,
            {key: target for key, target in self._frontends.items() if sent._frontends.get(key) is not target},
            tuple(key for key in sent._frontends if key not in self._frontends),
            {ref: entry for ref, entry in self._configs.items() if sent._configs.get(ref) is not entry},
            tuple(ref for ref in sent._configs if ref not in self._configs))

    @classmethod
    def from_delta(cls, held: ServiceTable | None, delta: ServicesDelta) -> ServiceTable:
        """`held` with `delta` applied: it answers lookups, configurations, zone, node and rejections as the
        table the delta came from; it has no snapshot, so it cannot be `updated` (only given more deltas)."""
        if delta.full or held is None:
            frontends: immutables.Map[Frontend, ServiceTarget] = immutables.Map(delta.frontends)
            configs: immutables.Map[ObjectRef, tuple[ServiceConfig, tuple[Rejection, ...]]] = immutables.Map(
                delta.configs)
        else:
            frontend_changes, config_changes = held._frontends.mutate(), held._configs.mutate()
            for key in delta.removed_frontends:
                frontend_changes.pop(key, None)
            frontend_changes.update(delta.frontends)
            for ref in delta.removed_configs:
                config_changes.pop(ref, None)
            config_changes.update(delta.configs)
            frontends, configs = frontend_changes.finish(), config_changes.finish()
        return cls(cast(Snapshot, _GenerationOnly(delta.generation)), delta.placement, frontends, immutables.Map(),
                   configs)


@dataclass(frozen=True)
class ServicesDelta:
    """A Service table as a copy elsewhere gets it: what changed since the table it has (`full`: everything)."""

    generation: int
    placement: _Placement  # the node, the zones, the node's addresses
    full: bool
    frontends: dict[Frontend, ServiceTarget]  # added or changed
    removed_frontends: tuple[Frontend, ...]
    configs: dict[ObjectRef, tuple[ServiceConfig, tuple[Rejection, ...]]]  # added or changed
    removed_configs: tuple[ObjectRef, ...]


@dataclass(frozen=True)
class _GenerationOnly:
    """The one thing a table made from a delta reads of its snapshot."""

    generation: int


def service_table(snapshot: Snapshot) -> ServiceTable:
    """The table of every Service of `snapshot`, for this snapshot's node."""
    placement = _placement(snapshot)
    frontends: immutables.MapMutation[Frontend, ServiceTarget] = immutables.Map[Frontend, ServiceTarget]().mutate()
    owned: immutables.MapMutation[ObjectRef, tuple[Frontend, ...]] = immutables.Map[
        ObjectRef, tuple[Frontend, ...]]().mutate()
    configs: immutables.MapMutation[ObjectRef, tuple[ServiceConfig, tuple[Rejection, ...]]] = immutables.Map[
        ObjectRef, tuple[ServiceConfig, tuple[Rejection, ...]]]().mutate()
    with collector_paused():  # a burst of acyclic allocations (see nodeagent.heap): 3x faster without it
        for service in snapshot.services.values():
            _add(service, snapshot, placement, frontends, owned, configs)
    return ServiceTable(snapshot, placement, frontends.finish(), owned.finish(), configs.finish())


def _placement(snapshot: Snapshot) -> _Placement:
    zones = {ref.name: node.labels[ZONE_LABEL] for ref, node in snapshot.nodes.items() if ZONE_LABEL in node.labels}
    node = snapshot.node
    return _Placement(snapshot.node_name, zones, tuple(str(ip) for ip in node.internal_ips) if node else ())


def _add(service: Service, snapshot: Snapshot, placement: _Placement,
         frontends: immutables.MapMutation[Frontend, ServiceTarget],
         owned: immutables.MapMutation[ObjectRef, tuple[Frontend, ...]],
         configs: immutables.MapMutation[ObjectRef, tuple[ServiceConfig, tuple[Rejection, ...]]]) -> None:
    """Put one Service's frontends, config and rejections into the maps being built."""
    if service.skip_reason is not None:
        return
    config, rejections = service_config(service)
    configs[service.ref] = (config, rejections)
    mine: list[Frontend] = []
    weights = dict(config.endpoint_weights)
    for port in service.ports:
        if port.protocol is not Protocol.TCP:
            continue
        name = ServicePortName(service.ref.namespace, service.ref.name, port.name, port.protocol)
        info = snapshot.service_ports.get(name)
        if info is None:
            continue
        endpoints = snapshot.endpoints.get(name, ())
        every = tuple(_candidate(e, placement.zones, weights) for e in endpoints)
        local = tuple(c for c, e in zip(every, endpoints, strict=True) if e.is_local)
        external_local = not _uses_cluster_endpoints(info)
        internal = ServiceTarget(service.ref, name, config, local if info.internal_policy_local else every,
                                 node_local_only=info.internal_policy_local)
        external = ServiceTarget(service.ref, name, config, local if external_local else every,
                                 node_local_only=external_local)
        by_family: dict[tuple[int, bool], ServiceTarget] = {}
        for address in info.cluster_ips:
            mine.append((str(address), info.port))
            frontends[mine[-1]] = _of_family(internal, str(address), False, by_family)
        for address in (*info.external_ips, *info.load_balancer_ips):
            mine.append((str(address), info.port))
            frontends[mine[-1]] = _of_family(external, str(address), True, by_family)
        if info.node_port:
            for node_ip in placement.node_ips:
                mine.append((node_ip, info.node_port))
                frontends[mine[-1]] = _of_family(external, node_ip, True, by_family)
    if mine:
        owned[service.ref] = tuple(mine)


def _of_family(target: ServiceTarget, address: str, external: bool,
               made: dict[tuple[int, bool], ServiceTarget]) -> ServiceTarget:
    """`target` narrowed to the endpoints of `address`'s family when it has endpoints of both (a dual-stack
    Service's slices hold each pod once per family): as ztunnel prefers the original destination's family
    (src/state.rs pick_workload_destination_or_resolve), and as kube-proxy's proxier of a family sees that
    family's endpoints only. A single-family target is returned as it is."""
    version = 6 if ":" in address else 4
    if all(c.key[0].version == version for c in target.endpoints):
        return target
    key = (version, external)
    if key not in made:
        same = tuple(c for c in target.endpoints if c.key[0].version == version)
        made[key] = dataclasses.replace(target, endpoints=same) if same else target
    return made[key]


def _uses_cluster_endpoints(info: ServicePortInfo) -> bool:
    """kube-proxy's UsesClusterEndpoints: every endpoint unless both traffic policies are Local."""
    # (as nodeagent.service.iptables.render's, which the layer contract keeps the tunnel from importing)
    externally_accessible = info.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER) or bool(info.external_ips)
    return not info.internal_policy_local or (externally_accessible and not info.external_policy_local)


def _candidate(endpoint: EndpointInfo, zones: Mapping[str, str], weights: Mapping[str, int]) -> Candidate:
    node, pod = endpoint.node_name, endpoint.pod
    return Candidate((endpoint.ip, endpoint.port), endpoint.port, node, zones.get(node) if node else None,
                     weights.get(pod.name, 1) if pod is not None and weights else 1,
                     endpoint.ready, endpoint.serving, endpoint.terminating, pod)
