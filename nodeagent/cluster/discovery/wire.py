"""The Kubernetes list/watch wire format and reconnect policy, without I/O (as h11 is to HTTP).

What the API server sends: list responses (`{"metadata": {"resourceVersion", "continue"}, "items"}`,
items without `kind`/`apiVersion`), and watch streams of one JSON event per line, where an `ERROR`
event carries a `Status` (410 Gone: the resourceVersion is too old, relist) and a `BOOKMARK`
carries only a resourceVersion. See the API concepts page, "Efficient detection of changes".
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from nodeagent.cluster.model import MESH_GROUP, Kind
from nodeagent.errors import NodeAgentError


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the API and how to ask for it."""

    kind: Kind
    api_version: str
    plural: str

    @property
    def path(self) -> str:
        """The cluster-wide collection path, e.g. /apis/discovery.k8s.io/v1/endpointslices."""
        prefix = "/api" if "/" not in self.api_version else "/apis"
        return f"{prefix}/{self.api_version}/{self.plural}"


RESOURCES: dict[Kind, Resource] = {
    Kind.SERVICE: Resource(Kind.SERVICE, "v1", "services"),
    Kind.ENDPOINT_SLICE: Resource(Kind.ENDPOINT_SLICE, "discovery.k8s.io/v1", "endpointslices"),
    Kind.POD: Resource(Kind.POD, "v1", "pods"),
    Kind.NODE: Resource(Kind.NODE, "v1", "nodes"),
    Kind.NAMESPACE: Resource(Kind.NAMESPACE, "v1", "namespaces"),
    Kind.AUTHORIZATION_POLICY: Resource(Kind.AUTHORIZATION_POLICY, f"{MESH_GROUP}/v1", "authorizationpolicies"),
    Kind.PEER_AUTHENTICATION: Resource(Kind.PEER_AUTHENTICATION, f"{MESH_GROUP}/v1", "peerauthentications"),
}

# kube-proxy's selectors (cmd/kube-proxy/app/server.go): Services handled by another proxy, and the
# endpoints of headless Services, are never sent to it.
NO_PROXY_NAME = "!service.kubernetes.io/service-proxy-name"
NO_HEADLESS = "!service.kubernetes.io/headless"
HTTP_GONE = 410


@dataclass(frozen=True)
class WatchEvent:
    """ADDED, MODIFIED, DELETED or BOOKMARK, with the object as sent."""

    type: str
    obj: dict[str, Any]

    @property
    def resource_version(self) -> str:
        """The object's resourceVersion ('' if absent)."""
        meta = self.obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        return rv if isinstance(rv, str) else ""


@dataclass(frozen=True)
class WatchFailure:
    """An ERROR event: the server ends the watch with a Status."""

    code: int
    reason: str
    message: str

    @property
    def expired(self) -> bool:
        """410 Gone: the requested resourceVersion is no longer available; relist."""
        return self.code == HTTP_GONE


@dataclass(frozen=True)
class Malformed:
    """A line that is not a watch event; reported and skipped, the stream goes on."""

    reason: str
    excerpt: str


WATCH_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK"})


def parse_watch_line(line: bytes) -> WatchEvent | WatchFailure | Malformed | None:
    """One line of a watch stream; None for a blank keep-alive line."""
    if not line.strip():
        return None
    excerpt = line[:200].decode("utf-8", "replace")
    try:
        event = orjson.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return Malformed(f"not JSON: {exc}", excerpt)
    if not isinstance(event, dict):
        return Malformed(f"an event must be a JSON object, got {type(event).__name__}", excerpt)
    kind, obj = event.get("type"), event.get("object")
    if not isinstance(obj, dict):
        return Malformed("event without an object", excerpt)
    if kind == "ERROR":
        code = obj.get("code")
        return WatchFailure(code if isinstance(code, int) else 0, str(obj.get("reason", "")),
                            str(obj.get("message", "")))
    if kind not in WATCH_TYPES:
        return Malformed(f"unknown event type {kind!r}", excerpt)
    return WatchEvent(str(kind), obj)


class LineSplitter:
    """Turns the chunks of a streamed body into complete lines (a chunk may end mid-line)."""

    def __init__(self, max_line: int = 64 << 20) -> None:
        self._buffer = bytearray()
        self._max_line = max_line

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines completed by `chunk`, without their newlines."""
        self._buffer += chunk
        if b"\n" not in chunk:
            if len(self._buffer) > self._max_line:
                raise ValueError(f"watch line longer than {self._max_line} bytes")
            return []
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = bytearray(rest)
        return [bytes(line) for line in lines]


@dataclass(frozen=True)
class ListPage:
    """One page of a list response."""

    items: list[Any]
    resource_version: str
    continue_token: str


class ProtocolError(NodeAgentError):
    """The server's answer does not follow the API's wire format."""


def parse_list(body: bytes) -> ListPage:
    """A list response; raises ProtocolError when it is not one."""
    try:
        data = orjson.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"list response is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("metadata", {}), dict):
        raise ProtocolError("list response is not an object with metadata")
    items = data.get("items") or []
    if not isinstance(items, list):
        raise ProtocolError("list response items is not a list")
    meta = data.get("metadata", {})
    rv, token = meta.get("resourceVersion", ""), meta.get("continue", "")
    return ListPage(items, rv if isinstance(rv, str) else "", token if isinstance(token, str) else "")


def status_message(body: bytes) -> str:
    """The message of a Status error body, or the body's start."""
    try:
        data = orjson.loads(body)
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    except (ValueError, UnicodeDecodeError):
        pass
    return body[:200].decode("utf-8", "replace")


def with_kind(item: Any, resource: Resource) -> Any:
    """List items come without kind and apiVersion; put them back so the item decodes like a watched one."""
    if isinstance(item, dict):
        item.setdefault("kind", resource.kind.value)
        item.setdefault("apiVersion", resource.api_version)
    return item


@dataclass
class Backoff:
    """Exponential backoff, each delay jittered to between half and all of it, reset after a period
    of health (client-go's reflector: 800 ms initial, doubling, capped at 30 s, reset after 2 minutes)."""

    initial: float = 0.8
    cap: float = 30.0
    factor: float = 2.0
    reset_after: float = 120.0
    rng: Callable[[], float] = field(default=random.random)
    _current: float = 0.0
    _last_failure: float | None = None

    def next_delay(self, now: float) -> float:
        """Record a failure at `now` and return how long to wait before the next attempt."""
        if self._last_failure is None or now - self._last_failure > self.reset_after:
            self._current = self.initial
        else:
            self._current = min(self.cap, self._current * self.factor)
        self._last_failure = now
        return self._current * (0.5 + self.rng() / 2)


def watch_timeout(rng: Callable[[], float] = random.random, minimum: int = 300) -> int:
    """Server-side watch timeout, spread between 5 and 10 minutes as client-go does, so that the
    watches of thousands of agents do not all reconnect at the same moment."""
    return int(minimum * (1 + rng()))
