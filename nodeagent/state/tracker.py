"""Events in, immutable snapshots out: the change tracker (its pacing is `nodeagent.state.sync`).

Modelled on kube-proxy's `pkg/proxy`: change trackers remember which Services an event touched,
and one sync function turns the pending changes into the next state. Here that state is a
`Snapshot` (what the node must look like) plus exactly which Service ports' translation changed
since the previous snapshot, so a reconciler can rewrite only those chains or map entries (kube-proxy's
partial sync).

Building a snapshot costs O(changed Services): the maps are persistent (HAMTs), so a change makes a new
map sharing every untouched entry; objects are immutable and shared between snapshots, so a snapshot
handed to a reconciler never changes under it.

Threads: sources call `ChangeTracker.apply` from their own threads; `SyncRunner` calls `snapshot()`
from its thread. One lock guards the tracker; a snapshot is built under it in milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import immutables
import structlog

from nodeagent.cluster.decode import Decoded
from nodeagent.cluster.events import Deleted, Event, Listed, Progressed, Unreadable, Upserted
from nodeagent.cluster.model import (
    AuthorizationPolicy,
    EndpointSlice,
    Kind,
    Namespace,
    Node,
    Object,
    ObjectRef,
    PeerAuthentication,
    Pod,
    Rejection,
    Service,
)
from nodeagent.heap import collector_paused
from nodeagent.state.translation import (
    EndpointInfo,
    ServicePortInfo,
    ServicePortName,
    changed_ports,
    merge_endpoints,
    service_port_infos,
    unserved_families,
)

log = structlog.get_logger("nodeagent.state.tracker")

_EMPTY: Mapping[Any, Any] = MappingProxyType({})
RECENT_UNREADABLE = 100


@dataclass(frozen=True)
class Snapshot:
    """What the node must look like, as of `generation`; never modified after it is built.

    `changed_ports` / `changed_services` name what differs from the previous snapshot (on the first
    snapshot, everything); `changed_kinds` names the kinds with any change at all.
    """

    generation: int
    node_name: str
    resource_versions: Mapping[Kind, str]
    synced_kinds: frozenset[Kind]
    services: Mapping[ObjectRef, Service]
    endpoint_slices: Mapping[ObjectRef, EndpointSlice]
    pods: Mapping[ObjectRef, Pod]
    nodes: Mapping[ObjectRef, Node]
    namespaces: Mapping[ObjectRef, Namespace]
    authorization_policies: Mapping[ObjectRef, AuthorizationPolicy]
    peer_authentications: Mapping[ObjectRef, PeerAuthentication]
    service_ports: Mapping[ServicePortName, ServicePortInfo]
    endpoints: Mapping[ServicePortName, tuple[EndpointInfo, ...]]
    skipped_services: Mapping[ObjectRef, str]
    rejections: Mapping[ObjectRef, tuple[Rejection, ...]]
    rejection_counts: Mapping[tuple[str, str], int]  # (kind, "field" | "object" | "unreadable") -> total seen
    unreadable: tuple[Unreadable, ...]
    changed_ports: frozenset[ServicePortName]
    changed_services: frozenset[ObjectRef]
    changed_kinds: frozenset[Kind]
    built_at: float = field(default_factory=time.monotonic)
    # the IP families this node serves (a proxier of each runs); None: not checked (a tracker made without them)
    served_families: frozenset[int] | None = None

    def synced(self, kinds: Iterable[Kind]) -> bool:
        """Whether every kind in `kinds` has been listed completely at least once."""
        return all(kind in self.synced_kinds for kind in kinds)

    def ports_of(self, service: ObjectRef) -> tuple[ServicePortInfo, ...]:
        """The programmed ports of one Service, in name order."""
        return tuple(sorted((p for n, p in self.service_ports.items() if n.service == service),
                            key=lambda p: p.name))

    def endpoints_of(self, port: ServicePortName) -> tuple[EndpointInfo, ...]:
        """The merged endpoints of one Service port (empty if none)."""
        return self.endpoints.get(port, ())

    @property
    def node(self) -> Node | None:
        """This node's own Node object, once known."""
        return self.nodes.get(ObjectRef(Kind.NODE, "", self.node_name))

    def rejections_of(self, ref: ObjectRef) -> tuple[Rejection, ...]:
        """Why (parts of) one object were not accepted, as of this snapshot."""
        return self.rejections.get(ref, ())


_FIELD_OF_KIND = {
    Kind.SERVICE: "services", Kind.ENDPOINT_SLICE: "endpoint_slices", Kind.POD: "pods", Kind.NODE: "nodes",
    Kind.NAMESPACE: "namespaces", Kind.AUTHORIZATION_POLICY: "authorization_policies",
    Kind.PEER_AUTHENTICATION: "peer_authentications",
}


class ChangeTracker:
    """Folds source events into pending changes; `snapshot()` turns them into the next `Snapshot`.

    `families`: the IP families served whatever the Node says (the agent's: IPv4, and those of its cluster CIDRs).
    With them, the node's own Node object adds the families of its addresses and pod CIDRs, and every Service
    with a cluster IP of a family not served is reported (a rejection on `spec.ipFamilies[i]`, counted as
    ("Service", "family")), never dropped silently. None: no such check (the tunnel, the CA: no proxier).
    `servable`: the families a proxier exists for at all (the Node's families outside it are not served)."""

    def __init__(self, node_name: str, on_change: Callable[[], None] | None = None,
                 families: frozenset[int] | None = None, servable: frozenset[int] = frozenset({4, 6})) -> None:
        self._lock = threading.Lock()
        self._node_name = node_name
        self._on_change = on_change
        self._base_families = families
        self._servable = servable  # the families a proxier exists for: the Node cannot add another
        self._served: frozenset[int] | None = None  # as of the last snapshot
        self._family_rejections: dict[ObjectRef, tuple[Rejection, ...]] = {}
        # Persistent maps (HAMTs): a snapshot holds the map as it is, and the next change makes a new
        # map sharing all untouched entries, so a snapshot costs O(changes), not O(cluster).
        self._objects: dict[Kind, immutables.Map[ObjectRef, Object]] = {kind: immutables.Map() for kind in Kind}
        self._slices_by_service: dict[ObjectRef, dict[ObjectRef, EndpointSlice]] = {}
        self._resource_versions: dict[Kind, str] = {}
        self._synced: set[Kind] = set()
        self._rejections: dict[ObjectRef, tuple[Rejection, ...]] = {}
        self._rejection_counts: Counter[tuple[str, str]] = Counter()
        self._unreadable: deque[Unreadable] = deque(maxlen=RECENT_UNREADABLE)
        # what the next snapshot must recompute
        self._dirty_services: set[ObjectRef] = set()
        self._dirty_kinds: set[Kind] = set()
        self._dirty_meta = False
        # the translation as of the last snapshot, updated in place service by service
        self._service_ports: immutables.Map[ServicePortName, ServicePortInfo] = immutables.Map()
        self._endpoints: immutables.Map[ServicePortName, tuple[EndpointInfo, ...]] = immutables.Map()
        self._port_names: dict[ObjectRef, set[ServicePortName]] = {}
        self._skipped: dict[ObjectRef, str] = {}
        self._last: Snapshot | None = None

    # --- events -------------------------------------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Fold one event in; never raises on bad content (that was rejected when decoding)."""
        self.apply_all((event,))

    def apply_all(self, events: Iterable[Event]) -> None:
        """Fold several events in under one lock acquisition."""
        with self._lock:
            before, listed_before = self._pending(), len(self._synced)
            for event in events:
                self._apply(event)
            now_pending, newly_listed = self._pending(), len(self._synced) > listed_before
        # A kind listed for the first time is news even while changes are already pending: a consumer that
        # waits for its kinds (the agent before its first sync) passed on the earlier notice and must be
        # told, or it would wait for its periodic sync (30 s) when kinds arrive one by one from an API server.
        if now_pending and (not before or newly_listed) and self._on_change is not None:
            self._on_change()

    def synced(self, kinds: Iterable[Kind]) -> bool:
        """Whether every kind in `kinds` has been listed completely (kube-proxy's "initialized")."""
        with self._lock:
            return all(kind in self._synced for kind in kinds)

    def pending(self) -> bool:
        """Whether the next `snapshot()` would differ from the last one."""
        with self._lock:
            return self._pending()

    def _pending(self) -> bool:
        return bool(self._dirty_services or self._dirty_kinds or self._dirty_meta or self._last is None)

    def _apply(self, event: Event) -> None:
        if isinstance(event, Upserted):
            self._upsert(event.kind, event.ref, event.decoded)
            self._note_version(event.kind, event.resource_version)
        elif isinstance(event, Deleted):
            self._remove(event.ref)
            if self._rejections.pop(event.ref, None) is not None:
                self._dirty_meta = True
            self._note_version(event.ref.kind, event.resource_version)
        elif isinstance(event, Listed):
            self._replace(event)
        elif isinstance(event, Progressed):
            self._note_version(event.kind, event.resource_version)
        elif isinstance(event, Unreadable):
            self._unreadable.append(event)
            self._rejection_counts[(str(event.kind or "unknown"), "unreadable")] += 1
            self._dirty_meta = True
            log.warning("unreadable input", kind=str(event.kind or "unknown"), source=event.source,
                        reason=event.reason)

    def _note_version(self, kind: Kind, version: str) -> None:
        # Resource versions alone do not make a new snapshot; they ride along with the next one.
        if version:
            self._resource_versions[kind] = version

    def _replace(self, event: Listed) -> None:
        present = {ref for ref, _ in event.items if ref is not None}
        for gone in [ref for ref in self._objects[event.kind] if ref not in present]:
            self._remove(gone)
        for gone in [ref for ref in self._rejections if ref.kind is event.kind and ref not in present]:
            del self._rejections[gone]
            self._dirty_meta = True
        for ref, decoded in event.items:
            self._upsert(event.kind, ref, decoded)
        self._note_version(event.kind, event.resource_version)
        if event.kind not in self._synced:
            self._synced.add(event.kind)
            self._dirty_meta = True

    def _upsert(self, kind: Kind, ref: ObjectRef | None, decoded: Decoded) -> None:
        for rejection in decoded.rejections:
            self._rejection_counts[(str(kind), "object" if rejection.whole_object else "field")] += 1
        if ref is None:
            for rejection in decoded.rejections:
                self._unreadable.append(Unreadable(kind, "-", str(rejection)))
            self._dirty_meta = True
            return
        if decoded.rejections:
            if self._rejections.get(ref) != decoded.rejections:
                self._rejections[ref] = decoded.rejections
                self._dirty_meta = True
                log.warning("object rejected" if decoded.obj is None else "object partly rejected", object=str(ref),
                            problems=[f"{r.field}: {r.reason}" for r in decoded.rejections])
        elif self._rejections.pop(ref, None) is not None:
            self._dirty_meta = True
        obj = decoded.obj
        if obj is None:
            # The object as it is now is unusable: whatever an earlier version said no longer holds.
            self._remove(ref)
            return
        store = self._objects[kind]
        old = store.get(ref)
        if old == obj:
            return
        self._objects[kind] = store.set(ref, obj)
        self._dirty_kinds.add(kind)
        if isinstance(obj, Service):
            self._dirty_services.add(ref)
        elif isinstance(obj, EndpointSlice):
            if isinstance(old, EndpointSlice) and old.service != obj.service:
                self._unindex_slice(old)
            self._slices_by_service.setdefault(obj.service, {})[ref] = obj
            self._dirty_services.add(obj.service)

    def _remove(self, ref: ObjectRef) -> None:
        store = self._objects[ref.kind]
        old = store.get(ref)
        if old is None:
            return
        self._objects[ref.kind] = store.delete(ref)
        self._dirty_kinds.add(ref.kind)
        if isinstance(old, Service):
            self._dirty_services.add(ref)
        elif isinstance(old, EndpointSlice):
            self._unindex_slice(old)

    def _unindex_slice(self, old: EndpointSlice) -> None:
        slices = self._slices_by_service.get(old.service)
        if slices is not None:
            slices.pop(old.ref, None)
            if not slices:
                del self._slices_by_service[old.service]
        self._dirty_services.add(old.service)

    # --- snapshots ----------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot | None:
        """The next snapshot, or None when nothing changed since the last one."""
        with self._lock:
            if not self._pending():
                return None
            if self._last is None:  # the first snapshot translates everything at once
                with collector_paused():
                    return self._build()
            return self._build()

    def last(self) -> Snapshot | None:
        """The most recent snapshot built, if any."""
        with self._lock:
            return self._last

    def _build(self) -> Snapshot:
        last = self._last
        changed: set[ServicePortName] = set()
        changed_services: set[ObjectRef] = set()
        for service_ref in self._dirty_services:
            if self._retranslate(service_ref, changed):
                changed_services.add(service_ref)
        self._check_families()
        if last is None:
            changed = set(self._service_ports)
            changed_services = {name.service for name in changed}

        def kind_map(kind: Kind) -> Mapping[ObjectRef, Any]:
            if last is not None and kind not in self._dirty_kinds:
                previous: Mapping[ObjectRef, Any] = getattr(last, _FIELD_OF_KIND[kind])
                return previous
            return self._objects[kind]

        snapshot = Snapshot(
            generation=(last.generation + 1) if last is not None else 1,
            node_name=self._node_name,
            resource_versions=MappingProxyType(dict(self._resource_versions)),
            synced_kinds=frozenset(self._synced),
            services=kind_map(Kind.SERVICE),
            endpoint_slices=kind_map(Kind.ENDPOINT_SLICE),
            pods=kind_map(Kind.POD),
            nodes=kind_map(Kind.NODE),
            namespaces=kind_map(Kind.NAMESPACE),
            authorization_policies=kind_map(Kind.AUTHORIZATION_POLICY),
            peer_authentications=kind_map(Kind.PEER_AUTHENTICATION),
            service_ports=self._service_ports,
            endpoints=self._endpoints,
            skipped_services=(last.skipped_services if last is not None and Kind.SERVICE not in self._dirty_kinds
                              else MappingProxyType(dict(self._skipped))),
            rejections=(last.rejections if last is not None and not self._dirty_meta
                        else MappingProxyType(self._all_rejections())),
            rejection_counts=MappingProxyType(dict(self._rejection_counts)),
            unreadable=tuple(self._unreadable),
            changed_ports=frozenset(changed),
            changed_services=frozenset(changed_services),
            changed_kinds=frozenset(self._dirty_kinds) if last is not None else frozenset(Kind),
            served_families=self._served,
        )
        self._dirty_services.clear()
        self._dirty_kinds.clear()
        self._dirty_meta = False
        self._last = snapshot
        return snapshot

    def _served_families(self) -> frozenset[int] | None:
        if self._base_families is None:
            return None
        node = self._objects[Kind.NODE].get(ObjectRef(Kind.NODE, "", self._node_name))
        return self._base_families | ((node.families if isinstance(node, Node) else frozenset()) & self._servable)

    def _check_families(self) -> None:
        """Report the Services with a family this node does not serve: the dirty ones, or all of them when the
        served families changed (the Node object arrived or changed its addresses)."""
        served = self._served_families()
        if served is None:
            return
        refs: Iterable[ObjectRef] = ({*self._objects[Kind.SERVICE].keys(), *self._family_rejections}
                                     if served != self._served else self._dirty_services)
        if served != self._served:
            log.info("IP families served", node=self._node_name, families=[f"IPv{f}" for f in sorted(served)])
            self._served = served
            self._dirty_meta = True
        for ref in list(refs):
            service = self._objects[Kind.SERVICE].get(ref)
            found = unserved_families(service, served) if isinstance(service, Service) else ()
            before = self._family_rejections.get(ref, ())
            if found == before:
                continue
            self._dirty_meta = True
            if found:
                self._family_rejections[ref] = found
            else:
                del self._family_rejections[ref]
            for rejection in found:
                if rejection not in before:
                    self._rejection_counts[(str(Kind.SERVICE), "family")] += 1
                    log.warning("IP family not served", object=str(ref), field=rejection.field,
                                reason=rejection.reason)

    def _all_rejections(self) -> dict[ObjectRef, tuple[Rejection, ...]]:
        merged = dict(self._rejections)
        for ref, found in self._family_rejections.items():
            merged[ref] = (*merged.get(ref, ()), *found)
        return merged

    def _retranslate(self, service_ref: ObjectRef, changed: set[ServicePortName]) -> bool:
        """Recompute one Service's ports and endpoints in place; record the ports that changed."""
        service = self._objects[Kind.SERVICE].get(service_ref)
        old_names = self._port_names.pop(service_ref, set())
        ports, endpoints = self._service_ports.mutate(), self._endpoints.mutate()
        old_ports = {name: ports.pop(name) for name in old_names}
        old_endpoints = {name: endpoints.pop(name) for name in old_names if name in endpoints}
        self._skipped.pop(service_ref, None)
        new_ports: dict[ServicePortName, ServicePortInfo] = {}
        new_endpoints: dict[ServicePortName, tuple[EndpointInfo, ...]] = {}
        if isinstance(service, Service):
            reason = service.skip_reason
            if reason is not None:
                self._skipped[service_ref] = reason
            new_ports = {info.name: info for info in service_port_infos(service)}
            if new_ports:
                merged = merge_endpoints(service_ref, self._slices_by_service.get(service_ref, {}).values(),
                                         self._node_name)
                new_endpoints = {name: eps for name, eps in merged.items() if name in new_ports and eps}
        ports.update(new_ports)
        endpoints.update(new_endpoints)
        self._service_ports, self._endpoints = ports.finish(), endpoints.finish()
        if new_ports:
            self._port_names[service_ref] = set(new_ports)
        before = len(changed)
        changed |= changed_ports(old_ports, new_ports, old_endpoints, new_endpoints,
                                 candidates=set(old_ports) | set(new_ports))
        return len(changed) > before
