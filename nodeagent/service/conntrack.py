"""Stale UDP conntrack flows: which to delete, decided against the kernel's table (kube-proxy's conntrack
reconciler, `pkg/proxy/conntrack/cleanup.go` `CleanStaleEntries`).

UDP has no close: a flow NATed to an endpoint that is gone keeps carrying a client's datagrams to nowhere until
it times out, and one recorded while a Service had no endpoints keeps the client rejected. Comparing the table
with the current Services (instead of the previous sync's endpoints with the current ones) also finds flows of
endpoints removed while the agent was down, and works for any datapath whose NAT the kernel tracks.

For each UDP Service port with at least one *serving* endpoint (traffic policies, topology and terminating are
not considered: a serving-but-terminating endpoint keeps its flows), a UDP flow is deleted when

- its original destination is the port's cluster IP, an external IP or a load-balancer IP on the Service port,
  and its reply source (the DNAT target) is not a serving endpoint `ip:port`; or
- its original destination port is the port's NodePort (any address) and its reply source is not one.

Services without serving endpoints are left alone. The decision (`stale_filters`, `cleanup_required`) is pure;
`ConntrackReconciler` runs it after a datapath's sync against a `ConntrackTable` (`kernel.conntrack.Conntrack`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

import structlog

from nodeagent.cluster.model import IPAddress, ObjectRef, Protocol
from nodeagent.errors import NodeAgentError
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName

log = structlog.get_logger("nodeagent.service.conntrack")

UDP = "udp"  # conntrack's name of the protocol


class Flow(TypingProtocol):
    """What the reconciler reads of a conntrack entry (`kernel.conntrack.Flow`)."""

    @property
    def protocol(self) -> str: ...

    @property
    def orig_dst(self) -> IPAddress: ...

    @property
    def orig_dst_port(self) -> int: ...

    @property
    def reply_src(self) -> IPAddress: ...

    @property
    def reply_src_port(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Filter:
    """The flows one deletion selects (kube-proxy's `filterForIPPortNAT` with `orig_dst`, `filterForPortNAT`
    for a NodePort without it); a field left None matches any value."""

    orig_dst: IPAddress | None
    orig_dst_port: int
    reply_src: IPAddress
    reply_src_port: int
    protocol: str = UDP

    def matches(self, flow: Flow) -> bool:
        """Whether `flow` is one this filter deletes (as the kernel side applies it)."""
        return (flow.protocol == self.protocol and flow.orig_dst_port == self.orig_dst_port
                and (self.orig_dst is None or flow.orig_dst == self.orig_dst)
                and flow.reply_src == self.reply_src and flow.reply_src_port == self.reply_src_port)


Backend = tuple[IPAddress, int]  # an address and port (a Service's or an endpoint's)


def serving_backends(ports: Mapping[ServicePortName, ServicePortInfo],
                     endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
                     family: int) -> tuple[dict[Backend, frozenset[Backend]], dict[int, frozenset[Backend]]]:
    """The serving endpoints of every UDP Service port that has some, by Service address and port
    (`serviceIPEndpoints`) and by NodePort (`serviceNodePortEndpoints`), for one IP family. Pure."""
    by_address: dict[Backend, frozenset[Backend]] = {}
    by_node_port: dict[int, frozenset[Backend]] = {}
    for name, info in ports.items():
        if info.protocol is not Protocol.UDP:
            continue
        backends = frozenset((e.ip, e.port) for e in endpoints.get(name, ()) if e.serving and e.ip.version == family)
        if not backends:  # a Service without endpoints rejects; its flows are not stale (yet)
            continue
        for address in (*info.cluster_ips, *info.load_balancer_ips, *info.external_ips):
            if address.version == family:
                by_address[(address, info.port)] = backends
        if info.node_port:
            by_node_port[info.node_port] = backends
    return by_address, by_node_port


def stale_filters(ports: Mapping[ServicePortName, ServicePortInfo],
                  endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
                  flows: Iterable[Flow], family: int = 4) -> list[Filter]:
    """The deletions that clear every stale UDP flow among `flows` (read once, in order), without duplicates. Pure.

    Each filter names the Service address (or NodePort) and the stale reply source, so it also catches flows of
    the same kind created between the listing and the deletion, as kube-proxy's do.
    """
    by_address, by_node_port = serving_backends(ports, endpoints, family)
    found: dict[Filter, None] = {}  # ordered set
    for flow in flows:
        if flow.protocol != UDP:
            continue
        reply = (flow.reply_src, flow.reply_src_port)
        backends = by_address.get((flow.orig_dst, flow.orig_dst_port))
        if backends is not None and reply not in backends:
            found[Filter(flow.orig_dst, flow.orig_dst_port, flow.reply_src, flow.reply_src_port)] = None
        backends = by_node_port.get(flow.orig_dst_port)
        if backends is not None and reply not in backends:
            found[Filter(None, flow.orig_dst_port, flow.reply_src, flow.reply_src_port)] = None
    return list(found)


def cleanup_required(old_endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
                     new_endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
                     changed: AbstractSet[ObjectRef]) -> bool:
    """kube-proxy's `ConntrackCleanupRequired`: some changed Service had a UDP port with endpoints before or
    after the change. Pure."""
    return any(name.protocol is Protocol.UDP and name.service in changed and endpoints
               for mapping in (old_endpoints, new_endpoints) for name, endpoints in mapping.items())


class ConntrackTable(TypingProtocol):
    """The kernel side (`kernel.conntrack.Conntrack`): raises NodeAgentError or OSError when it cannot."""

    def flows(self, family: int, protocol: str = UDP) -> Iterable[Flow]: ...

    def delete(self, family: int, match: Filter) -> int: ...


@dataclass(frozen=True)
class Reconciled:
    """What one pass of the reconciler did (kube-proxy observes its duration and counts the deletions)."""

    family: int
    filters: tuple[Filter, ...]
    deleted: int
    seconds: float
    complete: bool = True  # False: listing or a deletion failed; the next sync reconciles again

    @property
    def ip_family(self) -> str:
        """kube-proxy's `ip_family` label value."""
        return "IPv6" if self.family == 6 else "IPv4"


@dataclass
class ConntrackReconciler:
    """Runs the decision after each sync of a datapath when it is required (the first sync, a UDP endpoint
    change, or a previous pass that failed), and counts what it deleted
    (`kubeproxy_conntrack_reconciler_deleted_entries_total`; durations in each `Reconciled`).

    A failure is logged, never raised: the datapath's sync succeeded, and the next sync retries.
    """

    table: ConntrackTable
    family: int = 4
    clock: Callable[[], float] = time.monotonic
    deleted_total: int = 0
    last: Reconciled | None = None
    observers: list[Callable[[Reconciled], None]] = field(default_factory=list)
    _pending: bool = True  # nothing reconciled yet: after a restart every flow may be stale
    _endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]] = field(default_factory=dict)

    def after_sync(self, ports: Mapping[ServicePortName, ServicePortInfo],
                   endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
                   changed: AbstractSet[ObjectRef]) -> Reconciled | None:
        """Reconcile when required after a successful sync to `ports`/`endpoints` (`changed`: the Services that
        sync covered); what was done, or None when nothing was required."""
        required = self._pending or cleanup_required(self._endpoints, endpoints, changed)
        self._endpoints = endpoints
        if not required:
            return None
        result = self._reconcile(ports, endpoints)
        self._pending = not result.complete
        self.deleted_total += result.deleted
        self.last = result
        for observe in self.observers:
            observe(result)
        return result

    def _reconcile(self, ports: Mapping[ServicePortName, ServicePortInfo],
                   endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]]) -> Reconciled:
        started = self.clock()
        try:
            filters = stale_filters(ports, endpoints, self.table.flows(self.family), self.family)
        except (NodeAgentError, OSError) as exc:
            log.warning("conntrack flows not listed; stale UDP flows stay until the next sync", reason=str(exc))
            return Reconciled(self.family, (), 0, self.clock() - started, complete=False)
        deleted, complete = 0, True
        for match in filters:
            try:
                deleted += self.table.delete(self.family, match)
            except (NodeAgentError, OSError) as exc:
                log.warning("stale conntrack flows not deleted", filter=str(match), reason=str(exc))
                complete = False
        result = Reconciled(self.family, tuple(filters), deleted, self.clock() - started, complete)
        if filters:
            log.info("stale UDP conntrack flows deleted", filters=len(filters), deleted=deleted,
                     seconds=round(result.seconds, 4))
        return result
