"""What a tunnel coordinator and its workers say to each other (`nodeagent ztunnel --workers N`, N > 1).

One private socketpair per worker, made by the coordinator and inherited by the worker alone (pass_fds):
every frame is the payload's length (4 bytes, big-endian) and a request id (8 bytes), then the payload, a
pickled message. Pickle is acceptable here *only*
because both ends are the same program and nothing else can reach the socket (an anonymous socketpair,
no path, no port); it must never be used on a socket another process could connect to. Workload keys
cross this socket (`Certificate.key_pem`), which is why it stays private.

The worker answers each request with a `Reply` framed with the request's id, in order: a worker handles one
request at a time, so `Tables` sent before an `AddPod` are in force when the pod's listeners open. Tables
go as what changed since the worker's last (a Service table as a delta, see `ServicesDelta`).
"""

from __future__ import annotations

import asyncio
import copyreg
import io
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

import immutables

from nodeagent.ca.identity import SpiffeId
from nodeagent.cluster.model import ObjectRef
from nodeagent.state.tracker import Snapshot
from nodeagent.tunnel.state.authz import Authorizer
from nodeagent.tunnel.state.services import Frontend, ServiceTable, ServiceTarget
from nodeagent.tunnel.state.workloads import Workload, WorkloadTable

HEADER = struct.Struct(">IQ")  # payload length, request id
MAX_MESSAGE = 1 << 30  # a whole cluster's tables fit; a length beyond is a broken stream, not a message


@dataclass(frozen=True)
class State:
    """The tables a worker answers its tunnel's lookups from (the coordinator's latest)."""

    table: WorkloadTable | None
    services: ServiceTable | None
    authorizer: Authorizer | None


@dataclass(frozen=True)
class ServicesDelta:
    """A Service table as a worker gets it: what changed since the table it has (`full`: everything).

    A whole table is the whole cluster's Services and endpoints (25 MB and seconds to pickle at 10,000
    Services, and as long to unpickle, during which a worker carries nothing), while a snapshot changes a
    few: the coordinator's tables share every unchanged target (`ServiceTable.updated`), so what changed
    is found by identity and only that is sent."""

    generation: int
    placement: Any  # services._Placement: the node, the zones, the node's addresses
    full: bool
    frontends: dict[Frontend, ServiceTarget]  # added or changed
    removed_frontends: tuple[Frontend, ...]
    configs: dict[ObjectRef, Any]  # Service -> (ServiceConfig, rejections), added or changed
    removed_configs: tuple[ObjectRef, ...]


KEEP = "keep"  # a field of `Tables` the worker keeps as it has it


@dataclass(frozen=True)
class Tables:
    """The tables that changed since the worker's last (`KEEP` for those that did not)."""

    table: WorkloadTable | str | None
    services: ServicesDelta | str | None
    authorizer: Authorizer | str | None


@dataclass(frozen=True)
class Certificate:
    """An identity's current key and chain (on a pod's add and on every renewal)."""

    identity: SpiffeId
    key_pem: bytes
    chain: list[str]


@dataclass(frozen=True)
class AddPod:
    """Serve `workload` (its identity's certificate is installed first)."""

    workload: Workload
    certificate: Certificate


@dataclass(frozen=True)
class RemovePod:
    """Stop serving the pod at `ip`."""

    ip: str


@dataclass(frozen=True)
class Reevaluate:
    """Judge every open inbound connection again (policies or labels changed)."""


@dataclass(frozen=True)
class Scrape:
    """The worker's metric families (prometheus_client's `Metric` objects, as its registry collects them)."""


@dataclass(frozen=True)
class Status:
    """The worker's config dump (pods, listeners, pools) and pid."""


Request = Tables | Certificate | AddPod | RemovePod | Reevaluate | Scrape | Status


def services_delta(sent: ServiceTable | None, current: ServiceTable) -> ServicesDelta:
    """What a worker holding `sent` needs to hold `current`. ServiceTable keeps no public view of its
    configurations or placement: read here, the one place outside tunnel.state that does, because a
    worker's copy is built from exactly these parts (see `services_view`)."""
    frontends, configs = current._frontends, current._configs
    if sent is None or sent._placement != current._placement:
        return ServicesDelta(current.generation, current._placement, True, dict(frontends), (),
                             dict(configs), ())
    old_frontends, old_configs = sent._frontends, sent._configs
    return ServicesDelta(
        current.generation, current._placement, False,
        {key: target for key, target in frontends.items() if old_frontends.get(key) is not target},
        tuple(key for key in old_frontends if key not in frontends),
        {ref: entry for ref, entry in configs.items() if old_configs.get(ref) is not entry},
        tuple(ref for ref in old_configs if ref not in configs))


@dataclass(frozen=True)
class _Generation:
    """The one thing a worker's Service table reads of its snapshot (it never calls `updated`)."""

    generation: int


def services_view(held: ServiceTable | None, delta: ServicesDelta) -> ServiceTable:
    """A worker's Service table: `held` with `delta` applied. It answers lookups, configurations, zone,
    node and rejections as the coordinator's does; it has no snapshot, so it cannot be `updated`."""
    if delta.full or held is None:
        frontends: immutables.Map[Any, Any] = immutables.Map(delta.frontends)
        configs: immutables.Map[Any, Any] = immutables.Map(delta.configs)
    else:
        frontend_changes, config_changes = held._frontends.mutate(), held._configs.mutate()
        for key in delta.removed_frontends:
            frontend_changes.pop(key, None)
        frontend_changes.update(delta.frontends)
        for ref in delta.removed_configs:
            config_changes.pop(ref, None)
        config_changes.update(delta.configs)
        frontends, configs = frontend_changes.finish(), config_changes.finish()
    return ServiceTable(cast(Snapshot, _Generation(delta.generation)), delta.placement, frontends,
                        immutables.Map(), configs)


@dataclass(frozen=True)
class Reply:
    """The answer to one request: `value` when it succeeded, else `error` (the exception's type and message)."""

    value: Any = None
    error: str = ""


def _mapping_proxy(items: dict[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(items)


def _reduce_mapping_proxy(proxy: MappingProxyType[Any, Any]) -> tuple[Any, tuple[dict[Any, Any]]]:
    return _mapping_proxy, (dict(proxy),)


# Snapshots (inside a ServiceTable) hold read-only views, which pickle cannot take by itself: each is
# sent as the dict it views and viewed again on arrival. A pickler-local table, not copyreg's global one.
_DISPATCH = copyreg.dispatch_table.copy()
_DISPATCH[MappingProxyType] = _reduce_mapping_proxy


def dumps(message: Request | Reply) -> bytes:
    """A message's payload (pickled once, however many workers it goes to)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _DISPATCH
    pickler.dump(message)
    return buffer.getvalue()


def frame(request_id: int, payload: bytes) -> bytes:
    """One frame: the payload's length and the request id it belongs to, then the payload."""
    return HEADER.pack(len(payload), request_id) + payload


def load_request(payload: bytes) -> Request:
    """The request of one frame's payload."""
    message = pickle.loads(payload)
    if not isinstance(message, Tables | Certificate | AddPod | RemovePod | Reevaluate | Scrape | Status):
        raise ValueError(f"not a tunnel worker request: {type(message).__name__}")
    return message


def load_reply(payload: bytes) -> Reply:
    """The reply of one frame's payload."""
    message = pickle.loads(payload)
    if not isinstance(message, Reply):
        raise ValueError(f"not a tunnel worker reply: {type(message).__name__}")
    return message


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """(request id, payload) of the next frame, or None at a clean end of stream (between frames). A stream
    cut mid-frame raises asyncio.IncompleteReadError; an impossible length raises ValueError."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    length, request_id = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise ValueError(f"tunnel worker frame of {length} bytes: the stream is broken")
    return request_id, await reader.readexactly(length)
