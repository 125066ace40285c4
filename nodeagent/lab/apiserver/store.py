"""The lab API server's state: objects, one global resourceVersion, the change history, watchers.

Like etcd behind kube-apiserver, every write gets the next revision of one counter shared by all
kinds, and the history of changes since the last compaction is kept so that:
- a list is a snapshot at one resourceVersion: page N+1 of a paged list is cut from the same state
  as page 1 (the state at that version is the current state with later changes rolled back), so
  pages never skip or repeat an object however the objects change in between; a continue token older
  than the history answers 410;
- a watch from resourceVersion R replays the changes after R, then follows new ones; older than the
  history answers 410;
- a watch with a selector sees the transitions a change causes: an object that starts matching
  arrives as ADDED, one that stops matching leaves as DELETED (with its last matching state and the
  change's resourceVersion), as the real watch cache sends them.
All state is guarded by one lock; watchers are fed under it, so every watcher sees changes in
resourceVersion order.
"""

from __future__ import annotations

import base64
import bisect
import copy
import queue
import re
import secrets
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from nodeagent.errors import NodeAgentError
from nodeagent.lab.apiserver.resources import RESOURCES, ApiResource
from nodeagent.lab.apiserver.selectors import Predicate

Key = tuple[str, str]  # (namespace or "", name)
STATUS_SUBRESOURCE_KINDS = frozenset({"Pod", "Service", "Node", "Namespace"})
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SNAPSHOTS_KEPT = 16
# Queue items a watch stream understands besides events: cut the connection, end the stream cleanly.
DROP = "drop"
END = "end"


class ApiError(NodeAgentError):
    """An error the server answers with a Status body, as kube-apiserver does."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = details
        self.headers = headers or {}

    def status(self) -> dict[str, Any]:
        """The Status object."""
        return status_body(self.code, self.reason, self.message, self.details)


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `kind: Status` failure like the real server's."""
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if details is not None:
        body["details"] = details
    return body


def _details(resource: ApiResource, name: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": resource.plural}
    if resource.group:
        details["group"] = resource.group
    return details


def not_found(resource: ApiResource, name: str) -> ApiError:
    """404 NotFound for one object."""
    return ApiError(404, "NotFound", f'{resource.qualified} "{name}" not found', _details(resource, name))


def conflict(resource: ApiResource, name: str, why: str = "the object has been modified; please apply your "
             "changes to the latest version and try again") -> ApiError:
    """409 Conflict (a stale resourceVersion or a failed precondition)."""
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource.qualified} "{name}": {why}',
                    _details(resource, name))


def invalid(resource: ApiResource, name: str, field_path: str, reason: str, message: str) -> ApiError:
    """422 Invalid with one cause, as field validation reports it."""
    return ApiError(422, "Invalid", f'{resource.kind} "{name}" is invalid: {field_path}: {message}',
                    {"name": name, "group": resource.group, "kind": resource.kind,
                     "causes": [{"reason": reason, "message": message, "field": field_path}]})


def expired(message: str) -> ApiError:
    """410 Gone: a resourceVersion or continue token older than the history."""
    return ApiError(410, "Expired", message)


def bad_request(message: str) -> ApiError:
    """400 BadRequest."""
    return ApiError(400, "BadRequest", message)


def now() -> str:
    """A timestamp as the API writes them (RFC 3339, seconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Change:
    """One committed write: the object after it (for DELETED: as deleted) and before it."""

    rv: int
    plural: str
    type: str
    obj: dict[str, Any]
    prev: dict[str, Any] | None
    origin: str = "api"  # who wrote it: "api" for requests, or a loader (the manifest sync)


@dataclass
class Watcher:
    """One open watch: what it selects and the queue its stream reads."""

    plural: str
    matches: Predicate
    bookmarks: bool
    events: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)

    def offer(self, change: Change) -> None:
        """Queue what `change` means for this watch, if anything (see the module doc on transitions)."""
        for event in transitions(change, self.matches):
            self.events.put(event)


def transitions(change: Change, matches: Predicate) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (type, object) events a watch with `matches` sees for `change`."""
    now_matches = change.type != "DELETED" and matches(change.obj)
    before = change.prev if change.type != "DELETED" else change.obj
    was_matching = before is not None and matches(before)
    if change.type == "DELETED":
        if was_matching:
            yield "DELETED", change.obj
    elif now_matches:
        yield ("MODIFIED" if was_matching else "ADDED"), change.obj
    elif was_matching and before is not None:
        gone = dict(before)
        gone["metadata"] = {**before.get("metadata", {}), "resourceVersion": str(change.rv)}
        yield "DELETED", gone


def object_key(resource: ApiResource, obj: dict[str, Any]) -> Key:
    """Where `obj` is stored."""
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "default") if resource.namespaced else "", str(meta.get("name") or "")


def _without_metadata_and_status(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def encode_continue(rv: int, after: Key) -> str:
    """A continue token: the list's snapshot version and the last key served."""
    return base64.urlsafe_b64encode(orjson.dumps([rv, *after])).decode()


def decode_continue(token: str) -> tuple[int, Key]:
    """The snapshot version and last key of a continue token (ApiError 400 if it is not one)."""
    try:
        rv, namespace, name = orjson.loads(base64.urlsafe_b64decode(token.encode()))
        return int(rv), (str(namespace), str(name))
    except (ValueError, TypeError) as exc:
        raise bad_request(f"continue key is not valid: {exc}") from exc


class Store:
    """Objects, history and watchers; see the module doc."""

    def __init__(self, max_history: int = 200_000) -> None:
        self.lock = threading.RLock()
        self.objects: dict[str, dict[Key, dict[str, Any]]] = {p: {} for p in RESOURCES}
        self.history: list[Change] = []
        self.oldest = 1  # the oldest resourceVersion a watch (or a continue token) may start from
        self.rv = 100
        self.watchers: list[Watcher] = []
        # Called with every change, under the lock (in-process controllers queue what they need).
        self.observers: list[Callable[[Change], None]] = []
        # Called with every object about to be created through the API, under the lock (server defaults).
        self.on_create: list[Callable[[ApiResource, dict[str, Any]], None]] = []
        self._max_history = max_history
        self._snapshots: OrderedDict[tuple[str, int], tuple[list[Key], list[dict[str, Any]]]] = OrderedDict()

    # --- reading ------------------------------------------------------------------------------------

    def get(self, resource: ApiResource, namespace: str | None, name: str) -> dict[str, Any]:
        """The stored object (not a copy: stored objects are never changed in place), or 404."""
        with self.lock:
            obj = self.objects[resource.plural].get(("" if not resource.namespaced else namespace or "default",
                                                      name))
        if obj is None:
            raise not_found(resource, name)
        return obj

    def _snapshot(self, plural: str, rv: int) -> tuple[list[Key], list[dict[str, Any]]]:
        """Every object of `plural` as it was at `rv`, sorted by key; call with the lock held."""
        cached = self._snapshots.get((plural, rv))
        if cached is not None:
            self._snapshots.move_to_end((plural, rv))
            return cached
        state = dict(self.objects[plural])
        if rv != self.rv:
            # Roll back every later change of this kind, newest first.
            start = bisect.bisect_right([c.rv for c in self.history], rv)
            for change in reversed(self.history[start:]):
                if change.plural != plural:
                    continue
                key = object_key(RESOURCES[plural], change.obj)
                if change.type == "ADDED":
                    state.pop(key, None)
                elif change.prev is not None:
                    state[key] = change.prev
        keys = sorted(state)
        snapshot = (keys, [state[k] for k in keys])
        self._snapshots[(plural, rv)] = snapshot
        while len(self._snapshots) > _SNAPSHOTS_KEPT:
            self._snapshots.popitem(last=False)
        return snapshot

    def list_page(self, resource: ApiResource, matches: Predicate, limit: int = 0, token: str = "",
             resource_version: str = "", match: str = "") -> tuple[list[dict[str, Any]], int, str]:
        """One page of a consistent list: (items, the list's resourceVersion, continue token or '')."""
        with self.lock:
            if token:
                rv, after = decode_continue(token)
                if rv < self.oldest:
                    raise expired("The provided continue parameter is too old to display a consistent list "
                                  "result. You can start a new list without the continue parameter.")
            else:
                rv, after = self.rv, None
                if resource_version not in ("", "0") and match == "Exact":
                    rv = int(resource_version)
                    if rv < self.oldest:
                        raise expired(f"Timeout: Too large resource version or too old: {rv}")
                    if rv > self.rv:
                        raise ApiError(504, "Timeout", f"Too large resource version: {rv}, current: {self.rv}")
            keys, objs = self._snapshot(resource.plural, rv)
        start = bisect.bisect_right(keys, after) if after is not None else 0
        items: list[dict[str, Any]] = []
        more = ""
        for index in range(start, len(keys)):
            if not matches(objs[index]):
                continue
            if limit and len(items) == limit:
                more = encode_continue(rv, object_key(resource, items[-1]))
                break
            items.append(objs[index])
        return items, rv, more

    # --- writing ------------------------------------------------------------------------------------

    def commit(self, resource: ApiResource, event: str, obj: dict[str, Any],
               prev: dict[str, Any] | None, origin: str = "api") -> dict[str, Any]:
        """Record one change with the next resourceVersion and feed the watchers; call with the lock held."""
        self.rv += 1
        obj = {"apiVersion": resource.api_version, "kind": resource.kind, **obj,
               "metadata": {**obj.get("metadata", {}), "resourceVersion": str(self.rv)}}
        key = object_key(resource, obj)
        if event == "DELETED":
            self.objects[resource.plural].pop(key, None)
        else:
            self.objects[resource.plural][key] = obj
        change = Change(self.rv, resource.plural, event, obj, prev, origin)
        self.history.append(change)
        if len(self.history) > self._max_history:  # etcd compacts too: the oldest half goes
            cut = len(self.history) // 2
            self.oldest = self.history[cut - 1].rv
            del self.history[:cut]
        for watcher in self.watchers:
            if watcher.plural == resource.plural:
                watcher.offer(change)
        for observer in self.observers:
            observer(change)
        return obj

    def create(self, resource: ApiResource, namespace: str | None, body: dict[str, Any], *,
               dry_run: bool = False) -> dict[str, Any]:
        """POST: a new object (409 if it exists, 422 if it has no valid name)."""
        obj = self._prepare(resource, namespace, body)
        meta = obj["metadata"]
        with self.lock:
            if object_key(resource, obj) in self.objects[resource.plural]:
                raise ApiError(409, "AlreadyExists", f'{resource.qualified} "{meta["name"]}" already exists',
                               _details(resource, meta["name"]))
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
            meta.pop("resourceVersion", None)
            for hook in self.on_create:
                hook(resource, obj)
            if dry_run:
                return {**obj, "metadata": {**meta, "resourceVersion": str(self.rv)}}
            return self.commit(resource, "ADDED", obj, None)

    def _prepare(self, resource: ApiResource, namespace: str | None, body: dict[str, Any],
                 name: str | None = None) -> dict[str, Any]:
        """Check a request body against its path; returns a copy with kind, apiVersion and namespace set."""
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.get("metadata")
        if meta is None:
            meta = obj["metadata"] = {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if obj.setdefault("kind", resource.kind) != resource.kind:
            raise bad_request(f"the kind of the body ({obj['kind']}) does not match the path ({resource.kind})")
        obj.setdefault("apiVersion", resource.api_version)
        if resource.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on "
                                  "the request")
            meta["namespace"] = meta.get("namespace") or namespace or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName") and name is None:
            meta["name"] = f"{meta['generateName']}{secrets.token_hex(3)[:5]}"
        given = meta.get("name") or ""
        if not given:
            raise invalid(resource, "", "metadata.name", "FieldValueRequired",
                          "Required value: name or generateName is required")
        if not _NAME.match(given):
            raise invalid(resource, given, "metadata.name", "FieldValueInvalid",
                          f'Invalid value: "{given}": a lowercase RFC 1123 subdomain must consist of lower case '
                          "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                          "character")
        if name is not None and given != name:
            raise bad_request(f"the name of the object ({given}) does not match the name on the URL ({name})")
        return obj

    def update(self, resource: ApiResource, namespace: str | None, name: str, body: dict[str, Any], *,
               subresource: str = "", dry_run: bool = False) -> dict[str, Any]:
        """PUT: replace an object (404 if absent, 409 if the body's resourceVersion is not the current one)."""
        obj = self._prepare(resource, namespace, body, name)
        with self.lock:
            current = self.get(resource, namespace, name)
            return self._replace(resource, current, obj, subresource=subresource, dry_run=dry_run)

    def _replace(self, resource: ApiResource, current: dict[str, Any], obj: dict[str, Any], *,
                 subresource: str, dry_run: bool) -> dict[str, Any]:
        """Store `obj` over `current` with the server's bookkeeping; call with the lock held."""
        name = current["metadata"]["name"]
        wanted = obj["metadata"].get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise conflict(resource, name)
        uid = obj["metadata"].get("uid")
        if uid and uid != current["metadata"].get("uid"):
            raise conflict(resource, name, f"Precondition failed: UID in precondition: {uid}, UID in object "
                                           f"meta: {current['metadata'].get('uid')}")
        if subresource == "status":  # only the status changes through /status
            obj = {**current, "status": obj.get("status", {})}
        elif resource.kind in STATUS_SUBRESOURCE_KINDS and "status" in current:
            obj = {**obj, "status": current["status"]}  # and never through the object itself
        meta = obj["metadata"] = dict(obj["metadata"])  # never the stored object's own metadata
        for kept in ("uid", "creationTimestamp"):
            if kept in current["metadata"]:
                meta[kept] = current["metadata"][kept]
        generation = int(current["metadata"].get("generation") or 1)
        if _without_metadata_and_status(obj) != _without_metadata_and_status(current):
            generation += 1
        meta["generation"] = generation
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        if obj == current:
            return current  # a no-op write keeps its resourceVersion and sends no event, as upstream
        if dry_run:
            return obj
        return self.commit(resource, "MODIFIED", obj, current)

    def patch(self, resource: ApiResource, namespace: str | None, name: str, content_type: str, patch: Any, *,
              subresource: str = "", dry_run: bool = False) -> dict[str, Any]:
        """PATCH: apply `patch` to the current object; a resourceVersion in the patch is a precondition."""
        from nodeagent.lab.apiserver.patch import PatchError, apply_patch

        with self.lock:
            current = self.get(resource, namespace, name)
            try:
                patched = apply_patch(content_type, current, patch)
            except PatchError as exc:
                raise invalid(resource, name, "patch", "FieldValueInvalid", str(exc)) from exc
            meta = patched.get("metadata") or {}
            if meta.get("name") != name or (resource.namespaced and meta.get("namespace")
                                             != current["metadata"].get("namespace")):
                raise invalid(resource, name, "metadata.name", "FieldValueInvalid", "field is immutable")
            obj = self._prepare(resource, current["metadata"].get("namespace"), patched, name)
            if not obj["metadata"].get("resourceVersion"):
                obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self._replace(resource, current, obj, subresource=subresource, dry_run=dry_run)

    def delete(self, resource: ApiResource, namespace: str | None, name: str,
               preconditions: dict[str, Any] | None = None, *, dry_run: bool = False,
               origin: str = "api") -> dict[str, Any]:
        """DELETE: remove an object (404 if absent, 409 if a precondition fails); returns it as deleted."""
        with self.lock:
            current = self.get(resource, namespace, name)
            wanted = (preconditions or {}).get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise conflict(resource, name, f"Precondition failed: ResourceVersion in precondition: {wanted}, "
                                               f"ResourceVersion in object meta: "
                                               f"{current['metadata']['resourceVersion']}")
            uid = (preconditions or {}).get("uid")
            if uid and uid != current["metadata"].get("uid"):
                raise conflict(resource, name, f"Precondition failed: UID in precondition: {uid}, UID in object "
                                               f"meta: {current['metadata'].get('uid')}")
            if dry_run:
                return current
            if resource.kind == "Namespace":
                # The namespace controller's work, done at once: everything in the namespace goes first.
                for plural, objects in self.objects.items():
                    if RESOURCES[plural].namespaced:
                        for key in sorted(k for k in objects if k[0] == name):
                            self.commit(RESOURCES[plural], "DELETED", objects[key], objects[key], origin)
            return self.commit(resource, "DELETED", current, current, origin)

    def upsert(self, resource: ApiResource, obj: dict[str, Any], origin: str = "api") -> dict[str, Any]:
        """Add or replace an object as given (tests and the lab's loaders), with watch events."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if resource.namespaced:
            meta.setdefault("namespace", "default")
        with self.lock:
            current = self.objects[resource.plural].get(object_key(resource, obj))
            if current is None:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", now())
            else:
                for kept in ("uid", "creationTimestamp"):
                    if kept in current["metadata"]:
                        meta.setdefault(kept, current["metadata"][kept])
            return self.commit(resource, "MODIFIED" if current is not None else "ADDED", obj, current, origin)

    def load(self, objects: Iterable[tuple[ApiResource, dict[str, Any]]]) -> None:
        """Add many objects with no history (like a restored etcd): watches start after them."""
        with self.lock:
            for resource, obj in objects:
                self.rv += 1
                stored = {"apiVersion": resource.api_version, "kind": resource.kind, **copy.deepcopy(obj)}
                meta = stored.setdefault("metadata", {})
                if resource.namespaced:
                    meta.setdefault("namespace", "default")
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", now())
                meta["resourceVersion"] = str(self.rv)
                self.objects[resource.plural][object_key(resource, stored)] = stored
            self.compact()

    # --- history and watches ------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget history: every resourceVersion before now is too old to watch or continue from (410)."""
        with self.lock:
            self.history.clear()
            self.oldest = self.rv
            self._snapshots.clear()

    def open_watch(self, resource: ApiResource, matches: Predicate, resource_version: str, *, bookmarks: bool,
                   initial_events: bool | None) -> tuple[Watcher, list[tuple[str, dict[str, Any]]], int]:
        """Register a watch; returns it, the events to send first, and the version they end at.

        Without a resourceVersion (or with "0"), or with sendInitialEvents, the first events are a
        synthetic ADDED for every matching object; otherwise the replay of the history after it
        (ApiError 410 if that is older than the history).
        """
        with self.lock:
            start = 0 if resource_version in ("", "0") else int(resource_version)
            backlog: list[tuple[str, dict[str, Any]]] = []
            if initial_events or start == 0:
                # (with sendInitialEvents the given version is a lower bound, NotOlderThan: now is newer)
                _, objs = self._snapshot(resource.plural, self.rv)
                backlog.extend(("ADDED", o) for o in objs if matches(o))
                start = self.rv
            elif start < self.oldest:
                raise expired(f"too old resource version: {start} ({self.oldest})")
            first = bisect.bisect_right([c.rv for c in self.history], start)
            for change in self.history[first:]:
                if change.plural == resource.plural:
                    backlog.extend(transitions(change, matches))
            watcher = Watcher(resource.plural, matches, bookmarks)
            self.watchers.append(watcher)
            return watcher, backlog, self.rv

    def close_watch(self, watcher: Watcher) -> None:
        """Forget a watch whose stream ended."""
        with self.lock:
            if watcher in self.watchers:
                self.watchers.remove(watcher)
