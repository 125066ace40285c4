"""A fake Kubernetes API server: real HTTP/1.1, the real list/watch wire format, and ways to misbehave.

It serves what nodeagent's Kubernetes source asks for, the way kube-apiserver answers it:
- lists with `limit`/`continue` pagination and the list's `resourceVersion`, items without kind;
- watches as chunked streams of one JSON event per line, from any resourceVersion still in its
  history, with BOOKMARK events when `allowWatchBookmarks=true`, ending after `timeoutSeconds`;
- `410 Gone` for a resourceVersion older than its history (after `compact()`), as an HTTP status or
  as an ERROR event inside the stream (both happen in real clusters);
- `labelSelector` (`key`, `!key`, `key=value`) and `fieldSelector` (`spec.nodeName=`, `metadata.name=`);
- bearer-token authentication (401 without it);
- create (POST), replace (PUT) and delete (DELETE) of objects, so a separate process can drive it.

And the failures a client must survive: `drop_connections()` cuts every open watch mid-stream,
`inject(plural, line)` sends an arbitrary (malformed) line to open watches, `expire_watches()` sends
a 410 ERROR event, `stop()`/`start()` restart the server on the same port with its state kept.

Run standalone for benchmarks: `python -m tests.fakeapi --services 10000` prints its URL.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# plural -> (api prefix, kind, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "services": ("/api/v1", "Service", True),
    "pods": ("/api/v1", "Pod", True),
    "nodes": ("/api/v1", "Node", False),
    "namespaces": ("/api/v1", "Namespace", False),
    "endpointslices": ("/apis/discovery.k8s.io/v1", "EndpointSlice", True),
    "authorizationpolicies": ("/apis/security.nodeagent.io/v1", "AuthorizationPolicy", True),
    "peerauthentications": ("/apis/security.nodeagent.io/v1", "PeerAuthentication", True),
}
PLURAL_OF_KIND = {kind: plural for plural, (_, kind, _) in RESOURCES.items()}
_DROP = object()
_END = object()


@dataclass
class _Watcher:
    plural: str
    selector: Callable[[dict[str, Any]], bool]
    bookmarks: bool
    events: queue.Queue[Any] = field(default_factory=queue.Queue)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _label_match(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


def _field_match(obj: dict[str, Any], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        path, value = term.split("=", 1)
        current: Any = obj
        for part in path.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        if (current or "") != value:
            return False
    return True


TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"  # the API server's own audience


class TokenRegistry:
    """Projected ServiceAccount tokens this fake API server issued, and its TokenReview answers.

    A token is JWT-shaped (its payload carries `exp`, `aud` and the kubernetes.io claims, as a real bound
    token does) but only this registry can vouch for it. Reviews answer as kube-apiserver does: for a
    valid token, `status.authenticated`, `user.username` `system:serviceaccount:<ns>:<sa>`, `user.extra`
    with the pod's name and uid and the node's name, and `audiences` (the asked-for audiences the token
    is for); unauthenticated with an `error` for an unknown, expired or wrong-audience token. Unlike
    kube-apiserver it does not check that the bound pod still exists: the CA's own check is what the
    tests exercise.
    """

    def __init__(self) -> None:
        self._tokens: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def issue(self, namespace: str, service_account: str, pod_name: str, pod_uid: str, node_name: str,
              audiences: Iterable[str] = ("nodeagent-ca",), expires: float | None = None) -> str:
        """A new token for a pod of `namespace/service_account`; `expires` is a Unix time (default: in 1 h)."""
        now = time.time()
        claims = {"aud": list(audiences), "exp": int(expires if expires is not None else now + 3600), "iat": int(now),
                  "iss": API_AUDIENCE, "sub": f"system:serviceaccount:{namespace}:{service_account}",
                  "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": service_account},
                                    "pod": {"name": pod_name, "uid": pod_uid}, "node": {"name": node_name}}}

        def segment(data: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

        token = ".".join((segment({"alg": "RS256", "kid": "fake"}), segment(claims),
                          base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")))
        with self._lock:
            self._tokens[token] = claims
        return token

    def review(self, body: dict[str, Any]) -> dict[str, Any]:
        """The TokenReview answer to a posted TokenReview `body`."""
        spec = body.get("spec") or {}
        asked = list(spec.get("audiences") or [API_AUDIENCE])
        with self._lock:
            claims = self._tokens.get(str(spec.get("token") or ""))
        status: dict[str, Any] = {"authenticated": False, "user": {}}
        if claims is None:
            status["error"] = "invalid bearer token"
        elif claims["exp"] <= time.time():
            status["error"] = "[invalid bearer token, service account token has expired]"
        elif not set(asked) & set(claims["aud"]):
            status["error"] = f"[invalid bearer token, token audiences {claims['aud']} is invalid for the target " \
                              f"audiences {asked}]"
        else:
            bound = claims["kubernetes.io"]
            namespace = bound["namespace"]
            status = {"authenticated": True, "audiences": [a for a in asked if a in claims["aud"]], "user": {
                "username": claims["sub"], "uid": f"uid-of-{bound['serviceaccount']['name']}",
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                "extra": {"authentication.kubernetes.io/pod-name": [bound["pod"]["name"]],
                          "authentication.kubernetes.io/pod-uid": [bound["pod"]["uid"]],
                          "authentication.kubernetes.io/node-name": [bound["node"]["name"]]}}}
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}


class FakeApiServer:
    """In-process fake kube-apiserver; see the module doc."""

    def __init__(self, token: str = "fake-token", port: int = 0, *, expire_in_stream: bool = True,
                 bookmark_interval: float | None = None, serve_mesh_kinds: bool = True) -> None:
        self.token = token
        self.expire_in_stream = expire_in_stream
        self.serve_mesh_kinds = serve_mesh_kinds
        self._bookmark_interval = bookmark_interval
        self._lock = threading.Lock()
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {p: {} for p in RESOURCES}
        self._history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, plural, type, object)
        self._oldest = 1  # the oldest resourceVersion a watch may start from
        self._rv = 100
        self._watchers: list[_Watcher] = []
        self._sockets: set[socket.socket] = set()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.tokens = TokenRegistry()

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> FakeApiServer:
        """Listen (on the same port as before, after a stop)."""
        handler = type("Handler", (_Handler,), {"api": self})
        server = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
        server.daemon_threads = True
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fakeapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every connection; the objects are kept for a later `start()`."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self.drop_connections()
        self._server = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self._port}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig that points at this server with its token."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
        }))
        return path

    def issue_token(self, namespace: str, service_account: str, pod_name: str, pod_uid: str, node_name: str,
                    audiences: Iterable[str] = ("nodeagent-ca",), expires: float | None = None) -> str:
        """A projected token this server's TokenReview accepts (see TokenRegistry)."""
        return self.tokens.issue(namespace, service_account, pod_name, pod_uid, node_name, audiences, expires)

    # --- state --------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The current (latest) resourceVersion."""
        return self._rv

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Add (or replace) an object and notify watchers."""
        plural = PLURAL_OF_KIND[obj["kind"]]
        with self._lock:
            key = self._key(plural, obj)
            event = "MODIFIED" if key in self._objects[plural] else "ADDED"
            return self._record(plural, event, copy.deepcopy(obj))

    def create_many(self, objects: Iterable[dict[str, Any]]) -> None:
        """Add many objects at once (no watch events kept in history for them: like a restored etcd)."""
        with self._lock:
            for obj in objects:
                plural = PLURAL_OF_KIND[obj["kind"]]
                self._rv += 1
                stored = copy.deepcopy(obj)
                stored["metadata"]["resourceVersion"] = str(self._rv)
                self._objects[plural][self._key(plural, stored)] = stored
            self._oldest = self._rv

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Remove an object and notify watchers."""
        plural = PLURAL_OF_KIND[kind]
        with self._lock:
            obj = self._objects[plural].pop((namespace, name))
            self._record(plural, "DELETED", obj, store=False)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """A copy of a stored object."""
        with self._lock:
            return copy.deepcopy(self._objects[PLURAL_OF_KIND[kind]][(namespace, name)])

    def _key(self, plural: str, obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata", {})
        namespaced = RESOURCES[plural][2]
        return (meta.get("namespace", "default") if namespaced else "", meta["name"])

    def _record(self, plural: str, event: str, obj: dict[str, Any], store: bool = True) -> dict[str, Any]:
        self._rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
        if store:
            self._objects[plural][self._key(plural, obj)] = obj
        self._history.append((self._rv, plural, event, obj))
        for watcher in self._watchers:
            if watcher.plural == plural and watcher.selector(obj):
                watcher.events.put(json.dumps({"type": event, "object": obj}).encode())
        return copy.deepcopy(obj)

    # --- misbehaviour -------------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget history: every resourceVersion before now is too old to watch from (410)."""
        with self._lock:
            self._history.clear()
            self._oldest = self._rv

    def bookmark(self, plural: str | None = None) -> None:
        """Send a BOOKMARK with the current resourceVersion to watchers that asked for bookmarks."""
        with self._lock:
            for watcher in self._watchers:
                if watcher.bookmarks and plural in (None, watcher.plural):
                    watcher.events.put(self._bookmark_line(watcher.plural))

    def _bookmark_line(self, plural: str) -> bytes:
        prefix, kind, _ = RESOURCES[plural]
        return json.dumps({"type": "BOOKMARK", "object": {
            "kind": kind, "apiVersion": prefix.split("/", 2)[-1] if prefix != "/api/v1" else "v1",
            "metadata": {"resourceVersion": str(self._rv),
                         "annotations": {"k8s.io/initial-events-end": "true"}}}}).encode()

    def inject(self, plural: str, line: bytes) -> None:
        """Send one raw line (say, a malformed event) to every open watch of `plural`."""
        with self._lock:
            for watcher in self._watchers:
                if watcher.plural == plural:
                    watcher.events.put(line)

    def expire_watches(self) -> None:
        """End every open watch with an ERROR 410 event, and forget history (as a compaction would)."""
        with self._lock:
            self._history.clear()
            self._oldest = self._rv + 1
            for watcher in self._watchers:
                watcher.events.put(json.dumps({"type": "ERROR", "object": _status(
                    410, "Expired", "too old resource version")}).encode())
                watcher.events.put(_END)

    def drop_connections(self) -> None:
        """Cut every open connection without a proper end of stream."""
        with self._lock:
            for watcher in self._watchers:
                watcher.events.put(_DROP)
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def open_watches(self, plural: str | None = None) -> int:
        """How many watches are open (of `plural`)."""
        with self._lock:
            return sum(1 for w in self._watchers if plural in (None, w.plural))

    # --- serving ------------------------------------------------------------------------------------

    def _list(self, plural: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        selector = self._selector(query)
        limit = int(query.get("limit", "0") or 0)
        with self._lock:
            if "continue" in query:
                rv, offset = json.loads(base64.b64decode(query["continue"]))
                if rv < self._oldest:
                    return 410, _status(410, "Expired", "The provided continue parameter is too old")
            else:
                rv, offset = self._rv, 0
            # Pages are served from the current objects; a real server serves the list's snapshot,
            # which only matters if objects change between pages (tests that care compact instead).
            matching = sorted((k, o) for k, o in self._objects[plural].items() if selector(o))
            page = matching[offset:offset + limit] if limit else matching[offset:]
            more = bool(limit) and offset + limit < len(matching)
            items = []
            for _, obj in page:
                item = copy.copy(obj)
                item.pop("kind", None)
                item.pop("apiVersion", None)
                items.append(item)
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if more:
                meta["continue"] = base64.b64encode(json.dumps([rv, offset + limit]).encode()).decode()
            _prefix, kind, _ = RESOURCES[plural]
            return 200, {"kind": f"{kind}List", "apiVersion": "v1", "metadata": meta, "items": items}

    @staticmethod
    def _selector(query: dict[str, str]) -> Callable[[dict[str, Any]], bool]:
        labels, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")
        return lambda obj: (_label_match(obj.get("metadata", {}).get("labels") or {}, labels)
                            and _field_match(obj, fields))

    def _open_watch(self, plural: str, query: dict[str, str]) -> tuple[_Watcher | None, list[bytes]]:
        selector = self._selector(query)
        rv = int(query.get("resourceVersion") or 0)
        with self._lock:
            if rv and rv < self._oldest:
                return None, []
            watcher = _Watcher(plural, selector, query.get("allowWatchBookmarks") == "true")
            backlog = [json.dumps({"type": t, "object": o}).encode()
                       for v, p, t, o in self._history if p == plural and v > rv and selector(o)]
            self._watchers.append(watcher)
            return watcher, backlog

    def _close_watch(self, watcher: _Watcher) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: FakeApiServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.api._lock:
            self.api._sockets.add(self.connection)

    def finish(self) -> None:
        with self.api._lock:
            self.api._sockets.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _send_json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> tuple[str, str | None, str | None, dict[str, str]] | None:
        """(plural, namespace, name, query) for a known resource path."""
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        for plural, (prefix, _, namespaced) in RESOURCES.items():
            if not parts.path.startswith(prefix + "/"):
                continue
            rest = parts.path[len(prefix) + 1:].split("/")
            if rest == [plural]:
                return plural, None, None, query
            if namespaced and len(rest) >= 3 and rest[0] == "namespaces" and rest[2] == plural:
                return plural, rest[1], rest[3] if len(rest) > 3 else None, query
            if not namespaced and len(rest) == 2 and rest[0] == plural:
                return plural, None, rest[1], query
        return None

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.api.token}":
            return True
        self._send_json(401, _status(401, "Unauthorized", "Unauthorized"))
        return False

    def _resolve(self) -> tuple[str, str | None, str | None, dict[str, str]] | None:
        """Route, record and authorize a request; None when an error was already answered."""
        route = self._route()
        if route is not None and self.command == "GET":
            self.api.requests.append((route[0], route[3]))
        if not self._authorized():
            return None
        mesh = route is not None and RESOURCES[route[0]][0].startswith("/apis/security")
        if route is None or (mesh and not self.api.serve_mesh_kinds):
            self._send_json(404, _status(404, "NotFound", "the server could not find the requested resource"))
            return None
        return route

    def do_GET(self) -> None:
        if (route := self._resolve()) is None:
            return
        plural, _, _, query = route
        if query.get("watch") in ("1", "true"):
            self._watch(plural, query)
        else:
            self._send_json(*self.api._list(plural, query))

    def _watch(self, plural: str, query: dict[str, str]) -> None:
        watcher, backlog = self.api._open_watch(plural, query)
        if watcher is None:
            if not self.api.expire_in_stream:
                self._send_json(410, _status(410, "Expired", "too old resource version"))
                return
            backlog = [json.dumps({"type": "ERROR", "object": _status(
                410, "Expired", "too old resource version")}).encode()]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        timeout = float(query.get("timeoutSeconds", "1800"))
        try:
            for line in backlog:
                self._chunk(line + b"\n")
            if watcher is None:
                self._chunk(b"")
                return
            self._stream(watcher, timeout)
        except OSError:
            pass
        finally:
            if watcher is not None:
                self.api._close_watch(watcher)

    def _stream(self, watcher: _Watcher, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        interval = self.api._bookmark_interval
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._chunk(b"")  # the server-side timeout: a clean end of stream
                return
            try:
                item = watcher.events.get(timeout=min(remaining, interval or remaining))
            except queue.Empty:
                if interval and watcher.bookmarks:
                    with self.api._lock:
                        self._chunk(self.api._bookmark_line(watcher.plural) + b"\n")
                continue
            if item is _DROP:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if item is _END:
                self._chunk(b"")
                return
            self._chunk(item + b"\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length", "0"))
        body: dict[str, Any] = json.loads(self.rfile.read(length))
        return body

    def do_POST(self) -> None:
        if urlsplit(self.path).path == TOKEN_REVIEW_PATH:
            if self._authorized():
                self._send_json(201, self.api.tokens.review(self._body()))
            return
        if (route := self._resolve()) is None:
            return
        obj = self._body()
        if route[1] is not None:
            obj.setdefault("metadata", {})["namespace"] = route[1]
        self._send_json(201, self.api.create(obj))

    def do_PUT(self) -> None:
        self.do_POST()

    def do_DELETE(self) -> None:
        if (route := self._resolve()) is None:
            return
        plural, namespace, name, _ = route
        try:
            self.api.delete(RESOURCES[plural][1], namespace or "", name or "")
        except KeyError:
            self._send_json(404, _status(404, "NotFound", f"{plural} {name!r} not found"))
            return
        self._send_json(200, _status(200, "", "deleted") | {"status": "Success"})


def main() -> None:
    """Serve a cluster of the benchmark's shape until killed; print the URL and token on stdout."""
    from tests.objects import scale_cluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=0)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = FakeApiServer(port=args.port)
    services, slices = scale_cluster(args.services, args.endpoints)
    server.create_many([*services, *slices])
    server.start()
    print(json.dumps({"url": server.url, "token": server.token}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
