"""What a tunnel coordinator and its workers say to each other (`nodeagent ztunnel --workers N`, N > 1).

One private socketpair per worker, made by the coordinator and inherited by the worker alone (pass_fds):
every frame is the payload's length (4 bytes, big-endian) and a request id (8 bytes), then the payload, a
pickled message. Pickle is acceptable here *only*
because both ends are the same program and nothing else can reach the socket (an anonymous socketpair,
no path, no port); it must never be used on a socket another process could connect to. Workload keys
cross this socket (`Certificate.key_pem`), which is why it stays private.

The worker answers each request with a `Reply` framed with the request's id, in order: a worker handles one
request at a time, so `Tables` sent before an `AddPod` are in force when the pod's listeners open. Tables
go as what changed since the worker's last (a Service table as a delta, `ServiceTable.delta_since`).
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
from typing import Any

from nodeagent.ca.identity import SpiffeId
from nodeagent.tunnel.state.authz import Authorizer
from nodeagent.tunnel.state.services import ServicesDelta, ServiceTable
from nodeagent.tunnel.state.workloads import Workload, WorkloadTable

HEADER = struct.Struct(">IQ")  # payload length, request id
MAX_MESSAGE = 1 << 30  # a whole cluster's tables fit; a length beyond is a broken stream, not a message


@dataclass(frozen=True)
class State:
    """The tables a worker answers its tunnel's lookups from (the coordinator's latest)."""

    table: WorkloadTable | None
    services: ServiceTable | None
    authorizer: Authorizer | None


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
class Drain:
    """Stop taking connections and let the open ones finish within `deadline` seconds (`NodeTunnel.drain`);
    the reply is (finished, closed at the deadline)."""

    deadline: float


@dataclass(frozen=True)
class Scrape:
    """The worker's metric families (prometheus_client's `Metric` objects, as its registry collects them)."""


@dataclass(frozen=True)
class Status:
    """The worker's config dump (pods, listeners, pools) and pid."""


Request = Tables | Certificate | AddPod | RemovePod | Reevaluate | Drain | Scrape | Status


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
    if not isinstance(message, Tables | Certificate | AddPod | RemovePod | Reevaluate | Drain | Scrape | Status):
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
