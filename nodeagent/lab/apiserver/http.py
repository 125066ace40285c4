"""The HTTP side of the lab API server: routing, authentication, content negotiation, streaming watches.

Paths follow kube-apiserver: `/api/v1/<plural>`, `/api/v1/namespaces/<ns>/<plural>[/<name>[/status]]`,
`/apis/<group>/<version>/...`, discovery under `/api` and `/apis`, `/version`, the health endpoints,
TokenReview, TokenRequest (`/api/v1/namespaces/<ns>/serviceaccounts/<sa>/token`), and `/admin/...`
(fault injection, guarded by the admin token; see server.py).
"""

from __future__ import annotations

import contextlib
import queue
import re
import select
import socket
import ssl
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson
import structlog

from nodeagent.cluster.model import MESH_GROUP
from nodeagent.lab.apiserver import protobuf, resources, tables
from nodeagent.lab.apiserver.patch import APPLY, PATCH_TYPES
from nodeagent.lab.apiserver.resources import ApiResource
from nodeagent.lab.apiserver.selectors import Selection
from nodeagent.lab.apiserver.store import DROP, END, ApiError, Watcher, status_body

if TYPE_CHECKING:
    from nodeagent.lab.apiserver.server import LabApiServer

log = structlog.get_logger("nodeagent.lab.apiserver")
AGGREGATED = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
DEFAULT_WATCH_TIMEOUT = 1800.0
CLIENT_CHECK_INTERVAL = 1.0  # how often an idle watch checks that its client is still there
_UNAUTHENTICATED = ("/healthz", "/livez", "/readyz")
# The TokenRequest subresource of a ServiceAccount (the lab stores no ServiceAccounts: only this is served).
_TOKEN_REQUEST = re.compile(r"^/api/v1/namespaces/([^/]+)/serviceaccounts/([^/]+)/token$")


@dataclass(frozen=True)
class Route:
    """A request for a resource: which kind, where, which object and subresource."""

    resource: ApiResource
    namespace: str | None
    name: str | None
    subresource: str
    query: dict[str, str]


def _dumps(body: Any) -> bytes:
    return orjson.dumps(body)


class Handler(BaseHTTPRequestHandler):
    """One connection; the class attribute `api` is the server it serves (set by the server)."""

    protocol_version = "HTTP/1.1"
    api: LabApiServer
    _raw_body = b""

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: requests are not logged line by line (watch streams would flood the log)."""

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes: with Nagle's algorithm the body waited for the client's
        # delayed ACK of the headers, ~40 ms per response on a kept-alive connection (44 ms per PUT measured).
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.api._track(self.connection, True)

    def finish(self) -> None:
        self.api._track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    # --- plumbing -----------------------------------------------------------------------------------

    def _send(self, code: int, body: Any, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else _dumps(body)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, error: ApiError) -> None:
        self._send(error.code, error.status(), headers=error.headers)

    def _body(self) -> Any:
        raw = self._raw_body
        if not raw:
            return None
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type == protobuf.CONTENT_TYPE:
            try:
                return protobuf.decode_object(raw)
            except (protobuf.Unsupported, UnicodeDecodeError) as exc:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format "
                               f"- accepted media types include: application/json ({exc})") from exc
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "BadRequest", f"the body of the request was in an unknown format: {exc}") from exc

    def _authenticated(self, path: str) -> bool:
        if path in _UNAUTHENTICATED:
            return True
        header = self.headers.get("Authorization", "")
        return header in (f"Bearer {self.api.token}", f"Bearer {self.api.admin_token}")

    def _route(self, path: str, query: dict[str, str]) -> Route | None:
        # Routed over every known kind, served or not: a request for a kind whose CRD is not installed is
        # still recorded (tests count them) before it gets its 404.
        served = [*resources.RESOURCES.values()]
        for prefix in {r.prefix for r in served if "list" in r.verbs}:
            if not path.startswith(prefix + "/"):
                continue
            parts = path[len(prefix) + 1:].split("/")
            in_group = {r.plural: r for r in served if r.prefix == prefix}
            if len(parts) >= 3 and parts[0] == "namespaces" and parts[2] in in_group \
                    and in_group[parts[2]].namespaced:
                resource, namespace, rest = in_group[parts[2]], parts[1], parts[3:]
            elif parts[0] in in_group:
                resource, namespace, rest = in_group[parts[0]], None, parts[1:]
            else:
                return None
            if len(rest) > 2 or (resource.namespaced is False and namespace is not None):
                return None
            return Route(resource, namespace, rest[0] if rest else None, rest[1] if len(rest) > 1 else "", query)
        return None

    def _dispatch(self) -> None:
        # The body is read before anything is answered: a reply (say a 401) sent over an unread body, then
        # the connection closed, makes the kernel reset it and the client may never see the reply.
        length = int(self.headers.get("Content-Length") or 0)
        self._raw_body = self.rfile.read(length) if length > 0 else b""
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if path.startswith("/admin/"):
            self.api._admin(self, path[len("/admin/"):], query)
            return
        route = self._route(path, query)
        if route is not None and self.command == "GET":
            self.api.requests.append((route.resource.plural, query))
        if not self._authenticated(path):
            self._send(401, status_body(401, "Unauthorized", "Unauthorized"))
            return
        try:
            if route is not None and route.resource not in self.api.served():
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            self.api._before_request(route.resource.plural if route else None)
            if route is not None:
                self._resource(route)
            elif (token_request := _TOKEN_REQUEST.match(path)) is not None:
                if self.command != "POST":
                    raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on {path}")
                self._send(201, self.api.request_token(token_request[1], token_request[2], self._body()))
            elif path == resources.TOKEN_REVIEW_PATH and self.command == "POST":
                self._send(201, self.api.review_token(self._body()))
            elif path == resources.ACCESS_REVIEW_PATH and self.command == "POST":
                # (kubectl sends this one as protobuf: the answer does not depend on it, so it is not read)
                self._send(201, {"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                                 "metadata": {}, "spec": {},
                                 "status": {"allowed": True, "reason": "the lab's token is its admin"}})
            elif self.command == "GET":
                self._discovery(path)
            else:
                raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on {path}")
        except ApiError as error:
            self._fail(error)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    # --- discovery ----------------------------------------------------------------------------------

    def _discovery(self, path: str) -> None:
        served = self.api.served()
        accept = self.headers.get("Accept", "")
        if path in ("/healthz", "/livez", "/readyz"):
            self._send(200, b"ok", "text/plain")
            return
        if path == "/version":
            self._send(200, resources.SERVER_VERSION)
            return
        if path in ("/api", "/apis") and "as=APIGroupDiscoveryList" in accept and "v=v2;" in accept + ";":
            self._send(200, resources.aggregated(served, core=path == "/api"), AGGREGATED)
            return
        body: dict[str, Any] | None = None
        if path == "/openapi/v3":
            body = resources.openapi_root(served)
        elif path.startswith("/openapi/v3/"):
            body = resources.openapi_document(path[len("/openapi/v3/"):], served)
        elif path == "/api":
            body = resources.api_versions(self.api.advertised)
        elif path == "/apis":
            body = resources.group_list(served)
        elif path == "/api/v1":
            body = resources.resource_list("v1", served)
        elif path.startswith("/apis/"):
            segments = path.split("/")[2:]
            if len(segments) == 1:
                body = resources.group(segments[0], served)
            elif len(segments) == 2:
                body = resources.resource_list("/".join(segments), served)
        if body is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        self._send(200, body)

    # --- resources ----------------------------------------------------------------------------------

    def _resource(self, route: Route) -> None:
        store, resource = self.api.store, route.resource
        dry_run = route.query.get("dryRun") == "All"
        if route.subresource not in ("", "status"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if self.command == "GET":
            if route.query.get("watch") in ("1", "true"):
                self._watch(route)
            elif route.name is None:
                self._list(route)
            else:
                self._object(route, store.get(resource, route.namespace, route.name))
        elif self.command == "POST" and route.name is None:
            self._send(201, store.create(resource, route.namespace, self._body(), dry_run=dry_run))
        elif self.command == "PUT" and route.name is not None:
            self._send(200, store.update(resource, route.namespace, route.name, self._body(),
                                         subresource=route.subresource, dry_run=dry_run))
        elif self.command == "PATCH" and route.name is not None:
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if content_type == APPLY or content_type not in PATCH_TYPES:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format "
                               f"- accepted media types include: {', '.join(PATCH_TYPES)}")
            self._send(200, store.patch(resource, route.namespace, route.name, content_type, self._body(),
                                        subresource=route.subresource, dry_run=dry_run))
        elif self.command == "DELETE" and route.name is not None:
            options = self._body() or {}
            gone = store.delete(resource, route.namespace, route.name, options.get("preconditions"),
                                dry_run=dry_run or options.get("dryRun") == ["All"])
            if resource.kind in ("Pod", "Service", "Namespace") or resource.group == MESH_GROUP:
                self._send(200, gone)  # these return the deleted object, the others a Status
            else:
                details = {"name": route.name, "kind": resource.plural, "uid": gone["metadata"].get("uid")}
                if resource.group:
                    details["group"] = resource.group
                self._send(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                 "details": details})
        else:
            raise ApiError(405, "MethodNotAllowed", f"{self.command} is not supported on this path")

    def _as_table(self) -> bool:
        return "as=Table" in self.headers.get("Accept", "")

    def _object(self, route: Route, obj: dict[str, Any]) -> None:
        if self._as_table():
            metadata = {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
            self._send(200, tables.table(route.resource.kind, [obj], metadata,
                                         route.query.get("includeObject", "Metadata")))
        else:
            self._send(200, obj)

    def _selection(self, route: Route) -> Any:
        selection = Selection(route.namespace, route.query.get("labelSelector", ""),
                              route.query.get("fieldSelector", ""))
        if route.name is not None:  # a watch or list of one object by path
            selection = Selection(route.namespace, selection.labels,
                                  ",".join(filter(None, [selection.fields, f"metadata.name={route.name}"])))
        try:
            return selection.predicate()
        except ValueError as exc:
            raise ApiError(400, "BadRequest", str(exc)) from exc

    def _list(self, route: Route) -> None:
        query = route.query
        try:
            limit = int(query.get("limit") or 0)
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"limit: {exc}") from exc
        items, rv, token = self.api.store.list_page(route.resource, self._selection(route), limit,
                                               query.get("continue", ""), query.get("resourceVersion", ""),
                                               query.get("resourceVersionMatch", ""))
        metadata: dict[str, Any] = {"resourceVersion": str(rv)}
        if token:
            metadata["continue"] = token
        if self._as_table():
            self._send(200, tables.table(route.resource.kind, items, metadata, query.get("includeObject",
                                                                                          "Metadata")))
            return
        # Items of a list carry no kind/apiVersion, as the real server sends them.
        body = {"kind": f"{route.resource.kind}List", "apiVersion": route.resource.api_version,
                "metadata": metadata,
                "items": [{k: v for k, v in item.items() if k not in ("kind", "apiVersion")} for item in items]}
        self._send(200, body)

    # --- watches ------------------------------------------------------------------------------------

    def _watch(self, route: Route) -> None:
        query = route.query
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        initial = query.get("sendInitialEvents")
        initial_events = None if initial is None else initial == "true"
        try:
            timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"timeoutSeconds: {exc}") from exc
        watcher: Watcher | None = None
        try:
            watcher, backlog, rv = self.api.store.open_watch(route.resource, self._selection(route),
                                                             query.get("resourceVersion", ""),
                                                             bookmarks=bookmarks, initial_events=initial_events)
        except ApiError as error:
            if error.code != 410 or not self.api.expire_in_stream:
                raise
            # The real server accepts the watch, then ends it with an ERROR event carrying the 410.
            self._start_stream()
            with contextlib.suppress(OSError):
                self._event("ERROR", error.status(), route)
                self._chunk(b"")
            return
        headers_sent = False
        try:
            self._start_stream()
            headers_sent = True
            for event_type, obj in backlog:
                self._event(event_type, obj, route)
            if initial_events and bookmarks:
                self._event("BOOKMARK", self.api.bookmark_object(route.resource, rv, initial_end=True), route)
            self._stream(watcher, route, timeout)
        except OSError:
            pass  # the client went away (or the server cut the connection on purpose)
        finally:
            self.api.store.close_watch(watcher)
            if not headers_sent:
                self.close_connection = True

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._header_pending = True

    def _event(self, event_type: str, obj: dict[str, Any], route: Route) -> None:
        if self._as_table() and event_type in ("ADDED", "MODIFIED", "DELETED"):
            # The first table of a stream carries the column definitions, later ones only rows.
            obj = tables.table(route.resource.kind, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]},
                               route.query.get("includeObject", "Metadata"), headers=self._header_pending)
            self._header_pending = False
        self._chunk(_dumps({"type": event_type, "object": obj}) + b"\n")

    def _client_gone(self) -> bool:
        """Whether the watching client closed its end (it sends nothing on a watch, so a readable socket
        means end of stream, or a TLS close_notify that reads as one)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            # Non-blocking: a TLS record that carries no application data must not stall the stream.
            self.connection.setblocking(False)
            try:
                data: bytes = self.connection.recv(1)
            finally:
                self.connection.setblocking(True)
            return data == b""
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except (OSError, ValueError):
            return True

    def _stream(self, watcher: Watcher, route: Route, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        interval = self.api.bookmark_interval
        next_bookmark = time.monotonic() + (interval or timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._chunk(b"")  # the server-side timeout: a clean end of stream
                return
            try:
                item = watcher.events.get(timeout=min(remaining, CLIENT_CHECK_INTERVAL))
            except queue.Empty:
                # Idle: a client that went away is noticed now, not at the next event of its kind (which
                # may never come), so its watch is not counted or fed any longer.
                if self._client_gone():
                    return
                if interval and watcher.bookmarks and time.monotonic() >= next_bookmark:
                    self._event("BOOKMARK", self.api.bookmark_object(route.resource), route)
                    next_bookmark = time.monotonic() + interval
                continue
            if item == DROP:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if item == END:
                self._chunk(b"")
                return
            if isinstance(item, bytes):
                self._chunk(item + b"\n")
            else:
                self._event(item[0], item[1], route)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
