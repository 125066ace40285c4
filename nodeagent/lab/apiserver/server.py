"""The lab API server: lifecycle, kubeconfig, the Python-facing state methods, and fault injection.

Faults, for tests of clients that must survive a real cluster (Python methods in process, or
`POST /admin/<action>` with the admin token when the server runs as a process):
- `drop_connections()` / `drop_watches()`: cut connections mid-stream (no clean end of stream);
- `expire_watches()`: end open watches with an ERROR 410 and forget the history;
- `compact()`: forget the history (watches and continue tokens from before now get 410);
- `refuse(count, code, retry_after)`: answer the next `count` requests with 429/500/503 and Retry-After;
- `delay(seconds, count)`: hold the next `count` responses (all, with count None) for `seconds`;
- `inject(plural, line)`: send a raw (malformed) line to the open watches of a kind;
- `stop()` then `start()`, or `restart(down_for)`: stop listening and come back on the same port with
  every object and the history kept.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import secrets
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http.server import ThreadingHTTPServer
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import orjson
import structlog

from nodeagent.cluster.model import MESH_GROUP
from nodeagent.lab.apiserver import resources
from nodeagent.lab.apiserver.controllers import ServiceDefaults
from nodeagent.lab.apiserver.http import Handler
from nodeagent.lab.apiserver.resources import PLURAL_OF_KIND, RESOURCES, ApiResource
from nodeagent.lab.apiserver.store import DROP, END, INITIAL_EVENTS_END, ApiError, Store, conflict, status_body
from nodeagent.lab.apiserver.tls import ServingCredentials, make_credentials
from nodeagent.lab.apiserver.tokens import (
    API_AUDIENCE,
    TokenRegistry,
    review_answer,
    token_request,
    token_request_answer,
)
from nodeagent.lab.families import ServiceCIDRs

log = structlog.get_logger("nodeagent.lab.apiserver")
ISTIO_GROUP = "security.istio.io"
# How kube-apiserver names the bound object in a TokenRequest's 409: by kind ("Pod"), not by resource.
_POD_KIND = ApiResource("", "v1", "Pod", "Pod", True)
HANDSHAKE_TIMEOUT = 10.0


class _HttpServer(ThreadingHTTPServer):
    """One thread per connection; the TLS handshake happens in that thread, not in the accept loop
    (a client that stalls its handshake must not stop everyone else from connecting)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[Handler], context: ssl.SSLContext | None) -> None:
        self.context = context
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.context is not None:
            try:
                request.settimeout(HANDSHAKE_TIMEOUT)
                request = self.context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError):
                return
        try:
            self.RequestHandlerClass(request, client_address, self)  # type: ignore[arg-type]
        finally:
            if self.context is not None:
                with contextlib.suppress(OSError):
                    request.close()


class LabApiServer:
    """A Kubernetes API server for the lab and the tests; see the package doc and this module's doc."""

    def __init__(self, token: str | None = None, port: int = 0, *, host: str = "127.0.0.1", tls: bool = True,
                 credentials: ServingCredentials | None = None, admin_token: str | None = None,
                 expire_in_stream: bool = True, bookmark_interval: float | None = None,
                 serve_mesh_kinds: bool = True,
                 service_cidr: IPv4Network | ServiceCIDRs | None = None) -> None:
        self.token = token or secrets.token_urlsafe(24)
        self.admin_token = admin_token or secrets.token_urlsafe(24)
        self.host = host
        self.tls = tls
        self.expire_in_stream = expire_in_stream
        self.serve_mesh_kinds = serve_mesh_kinds
        self.bookmark_interval = bookmark_interval
        self.store = Store()
        # The latest GETs of resources (plural, query), for tests; bounded, as the lab's server runs for hours.
        self.requests: deque[tuple[str, dict[str, str]]] = deque(maxlen=100_000)
        self.tokens = TokenRegistry()
        if service_cidr is not None:  # then Services created through the API get cluster IPs from it
            defaults = ServiceDefaults(self.store, service_cidr)
            self.store.on_create.append(lambda resource, obj: defaults.apply(obj) if resource.kind == "Service"
                                        else None)
        self._credentials = credentials if credentials is not None or not tls else make_credentials(
            [host, "localhost"])
        self._port = port
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._sockets: set[Any] = set()
        self._faults_lock = threading.Lock()
        self._refusals: list[tuple[int, int, str | None]] = []  # (code, retry-after, plural or None)
        # (seconds, requests left or None for all, plural or None for any): held responses
        self._delays: list[list[Any]] = []

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> LabApiServer:
        """Listen (on the same port as before, after a stop)."""
        handler = type("BoundHandler", (Handler,), {"api": self})
        context = self._credentials.context() if self._credentials is not None else None
        server = _HttpServer((self.host, self._port), handler, context)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="lab-apiserver", daemon=True)
        self._thread.start()
        log.info("apiserver.listening", url=self.url)
        return self

    def stop(self) -> None:
        """Stop listening and cut every connection; objects and history are kept for a later `start()`."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self.drop_connections()
        self._server = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down `down_for` seconds (an outage), and listen again on the same port."""
        self.stop()
        time.sleep(down_for)  # the injected outage itself, not a wait for a condition
        self.start()

    @property
    def port(self) -> int:
        """The port listened on (chosen at the first start when 0)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self._port}"

    @property
    def advertised(self) -> str:
        """host:port, as /api reports the server's address."""
        return f"{self.host}:{self._port}"

    @property
    def ca_pem(self) -> bytes | None:
        """The CA certificate clients must trust (None without TLS)."""
        return self._credentials.ca_pem if self._credentials is not None else None

    def kubeconfig(self, name: str = "lab") -> dict[str, Any]:
        """A kubeconfig for this server with its token (and its CA, with TLS)."""
        cluster: dict[str, Any] = {"server": self.url}
        if self.ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        return {"apiVersion": "v1", "kind": "Config", "current-context": name, "preferences": {},
                "clusters": [{"name": name, "cluster": cluster}],
                "users": [{"name": f"{name}-admin", "user": {"token": self.token}}],
                "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin"}}]}

    def write_kubeconfig(self, path: Path, name: str = "lab") -> Path:
        """Write `kubeconfig()` to `path` (mode 0600: it holds the token)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(self.kubeconfig(name), indent=2))
        return path

    def served(self) -> list[ApiResource]:
        """The resources discovery lists and requests may reach."""
        return resources.served(self.serve_mesh_kinds)

    # --- state, for tests and loaders -----------------------------------------------------------------

    @property
    def _lock(self) -> Any:
        """The store's lock (tests read `_objects` under it)."""
        return self.store.lock

    @property
    def _objects(self) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
        """The stored objects by plural and (namespace, name)."""
        return self.store.objects

    @property
    def resource_version(self) -> int:
        """The current (latest) resourceVersion."""
        return self.store.rv

    @staticmethod
    def resource_of(obj: dict[str, Any]) -> ApiResource:
        """The resource an object belongs to, by its kind (KeyError for kinds not served)."""
        return RESOURCES[PLURAL_OF_KIND[obj["kind"]]]

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Add (or replace) an object as given and notify watchers."""
        return copy.deepcopy(self.store.upsert(self.resource_of(obj), obj))

    def create_many(self, objects: Iterable[dict[str, Any]]) -> None:
        """Add many objects at once, with no history kept for them (like a restored etcd)."""
        self.store.load((self.resource_of(o), o) for o in objects)

    def load_documents(self, documents: Iterable[dict[str, Any]]) -> int:
        """Load manifests (the lab's): kinds not served are skipped; policies written for Istio's group are
        stored under the agent's, which is where the agent reads them. Returns how many were loaded."""
        chosen = [self.normalized(doc) for doc in documents if doc.get("kind") in PLURAL_OF_KIND]
        self.create_many(chosen)
        return len(chosen)

    @staticmethod
    def normalized(doc: dict[str, Any]) -> dict[str, Any]:
        """A manifest as the server stores it: policies of Istio's group under the agent's group."""
        if str(doc.get("apiVersion", "")).startswith(ISTIO_GROUP + "/"):
            return {**doc, "apiVersion": f"{MESH_GROUP}/v1"}
        return doc

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Remove an object and notify watchers (KeyError if there is none)."""
        resource = RESOURCES[PLURAL_OF_KIND[kind]]
        try:
            self.store.delete(resource, namespace or None, name)
        except ApiError as exc:
            raise KeyError((kind, namespace, name)) from exc

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """A copy of a stored object (KeyError if there is none)."""
        with self.store.lock:
            return copy.deepcopy(self.store.objects[PLURAL_OF_KIND[kind]][(namespace, name)])

    def open_watches(self, plural: str | None = None) -> int:
        """How many watches are open (of `plural`)."""
        with self.store.lock:
            return sum(1 for w in self.store.watchers if plural in (None, w.plural))

    def bookmark_object(self, resource: ApiResource, rv: int | None = None, *, initial_end: bool = False) -> dict[
            str, Any]:
        """The object of a BOOKMARK event; the initial-events-end annotation only when asked for."""
        metadata: dict[str, Any] = {"resourceVersion": str(rv if rv is not None else self.store.rv)}
        if initial_end:
            metadata["annotations"] = {INITIAL_EVENTS_END: "true"}
        return {"kind": resource.kind, "apiVersion": resource.api_version, "metadata": metadata}

    def issue_token(self, namespace: str, service_account: str, pod_name: str, pod_uid: str, node_name: str,
                    audiences: Iterable[str] = ("nodeagent-ca",), expires: float | None = None) -> str:
        """A projected ServiceAccount token this server's TokenReview accepts (see tokens.TokenRegistry)."""
        return self.tokens.issue(namespace, service_account, pod_name, pod_uid, node_name, audiences, expires)

    def request_token(self, namespace: str, service_account: str, body: Any) -> dict[str, Any]:
        """TokenRequest (`POST .../serviceaccounts/<sa>/token`), as the kubelet asks for a pod's projected token:
        a token bound to the pod the request names (its uid, and the node from its `spec.nodeName`), for the
        asked audiences (the API server's by default) and `expirationSeconds` (3600 by default). Refused as
        kube-apiserver refuses it: 404 for a pod that does not exist, 409 for a uid that is not the pod's
        (a deleted and recreated pod), 400 for a pod running as another ServiceAccount or a bound object
        that is not a Pod, 422 for an expiration outside [600 s, 2^32 s]."""
        request = token_request(service_account, body)
        pod_name = pod_uid = node_name = node_uid = ""
        if request.bound_kind == "Pod":
            pod = self.store.get(RESOURCES["pods"], namespace, request.bound_name)  # 404 when there is none
            pod_uid = str(pod["metadata"].get("uid") or "")
            if (pod.get("spec") or {}).get("serviceAccountName", "default") != service_account:
                raise ApiError(400, "BadRequest", f'cannot bind token for serviceaccount "{service_account}" to pod '
                               "running with different serviceaccount name.")
            if request.bound_uid and request.bound_uid != pod_uid:
                raise conflict(_POD_KIND, request.bound_name, f"the UID in the bound object reference "
                               f"({request.bound_uid}) does not match the UID in record. The object might have "
                               "been deleted and then recreated")
            pod_name, node_name = request.bound_name, str((pod.get("spec") or {}).get("nodeName") or "")
            if node_name:
                with self.store.lock:
                    node = self.store.objects["nodes"].get(("", node_name))
                node_uid = str((node or {}).get("metadata", {}).get("uid") or "")
        expires = time.time() + request.expiration_seconds
        token = self.tokens.issue(namespace, service_account, pod_name, pod_uid, node_name, request.audiences,
                                  expires, node_uid=node_uid)
        log.info("apiserver.token_issued", namespace=namespace, service_account=service_account,
                 pod=pod_name or None, node=node_name or None, audiences=list(request.audiences),
                 expiration_seconds=request.expiration_seconds)
        return token_request_answer(namespace, service_account, request, token, expires, pod_uid)

    def review_token(self, body: Any) -> dict[str, Any]:
        """TokenReview: the registry's answer for a token it issued; the server's own bearer token
        authenticates as the lab's admin; anything else is not authenticated."""
        spec = body.get("spec") if isinstance(body, dict) else None
        token = spec.get("token") if isinstance(spec, dict) else None
        if not isinstance(token, str) or not token:
            raise ApiError(400, "BadRequest", "spec.token is required")
        answer = self.tokens.review(body)
        if answer is not None:
            return answer
        user = self.identity_of(token)
        if user is None:
            return review_answer(spec or {}, {"authenticated": False, "user": {}, "error": "invalid bearer token"})
        return review_answer(spec or {}, {"authenticated": True, "user": user,
                                          "audiences": list((spec or {}).get("audiences") or [API_AUDIENCE])})

    def identity_of(self, token: str) -> dict[str, Any] | None:
        """The user a token authenticates as, or None."""
        if secrets.compare_digest(token, self.token):
            return {"username": "lab-admin", "groups": ["system:masters", "system:authenticated"]}
        return None

    # --- faults -------------------------------------------------------------------------------------

    def _track(self, sock: Any, add: bool) -> None:
        with self.store.lock:
            if add:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)

    def compact(self) -> None:
        """Forget history: every resourceVersion before now is too old to watch from (410)."""
        self.store.compact()

    def bookmark(self, plural: str | None = None) -> None:
        """Send a BOOKMARK with the current resourceVersion to watchers that asked for bookmarks."""
        with self.store.lock:
            for watcher in self.store.watchers:
                if watcher.bookmarks and plural in (None, watcher.plural):
                    watcher.events.put(("BOOKMARK", self.bookmark_object(RESOURCES[watcher.plural])))

    def inject(self, plural: str, line: bytes) -> None:
        """Send one raw line (say, a malformed event) to every open watch of `plural`."""
        with self.store.lock:
            for watcher in self.store.watchers:
                if watcher.plural == plural:
                    watcher.events.put(line)

    def expire_watches(self) -> None:
        """End every open watch with an ERROR 410 event, and forget history (as a compaction would)."""
        with self.store.lock:
            # Compacted up to now: the 410 makes every watcher relist, and a watch from the version that
            # relist returns is valid again (no relist loop while nothing is written).
            self.store.compact()
            for watcher in self.store.watchers:
                watcher.events.put(b'{"type":"ERROR","object":' + orjson.dumps(status_body(
                    410, "Expired", "too old resource version")) + b"}")
                watcher.events.put(END)

    def drop_watches(self) -> None:
        """Cut every open watch stream mid-stream (other connections stay)."""
        with self.store.lock:
            for watcher in self.store.watchers:
                watcher.events.put(DROP)

    def drop_connections(self) -> None:
        """Cut every open connection without a proper end of stream."""
        self.drop_watches()
        with self.store.lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def refuse(self, count: int, code: int = 503, retry_after: int = 1, plural: str | None = None) -> None:
        """Answer the next `count` requests (of `plural`, or any) with `code` and a Retry-After header."""
        if code not in (429, 500, 503):
            raise ValueError(f"refuse with 429, 500 or 503, not {code}")
        with self._faults_lock:
            self._refusals.extend([(code, retry_after, plural)] * count)

    def delay(self, seconds: float, count: int | None = None, plural: str | None = None) -> None:
        """Hold the next `count` responses (every one, with None) about `plural` (or any) for `seconds`, so that a
        test can deliver kinds late or in an order of its choosing; delay(0) removes every delay."""
        with self._faults_lock:
            if not seconds:
                self._delays.clear()
            else:
                self._delays.append([seconds, count, plural])

    def _before_request(self, plural: str | None) -> None:
        """Apply pending faults to a request about to be served (ApiError for a refusal)."""
        seconds = 0.0
        with self._faults_lock:
            held = next((d for d in self._delays if d[2] in (None, plural)), None)
            if held is not None:
                seconds = held[0]
                if held[1] is not None:
                    held[1] -= 1
                    if held[1] <= 0:
                        self._delays.remove(held)
            refusal = next((r for r in self._refusals if r[2] in (None, plural)), None)
            if refusal is not None:
                self._refusals.remove(refusal)
        if seconds:
            time.sleep(seconds)  # the injected slowness itself
        if refusal is not None:
            code, retry_after, _ = refusal
            reason, message = {429: ("TooManyRequests", "the server has received too many requests and has asked "
                                     "us to try again later"),
                               500: ("InternalError", "an error on the server has prevented the request from "
                                     "succeeding"),
                               503: ("ServiceUnavailable", "the server is currently unable to handle the "
                                     "request")}[code]
            raise ApiError(code, reason, message, {"retryAfterSeconds": retry_after},
                           {"Retry-After": str(retry_after)})

    def _admin(self, handler: Handler, action: str, query: dict[str, str]) -> None:
        """`POST /admin/<action>` (JSON parameters in the body) and `GET /admin/state`."""
        if handler.headers.get("Authorization", "") != f"Bearer {self.admin_token}":
            handler._send(401, status_body(401, "Unauthorized", "the admin surface needs the admin token"))
            return
        try:
            params = handler._body() or {}
        except ApiError as error:
            handler._fail(error)
            return
        if handler.command == "GET" and action == "state":
            with self.store.lock:
                state = {"resourceVersion": self.store.rv, "oldest": self.store.oldest,
                         "openWatches": len(self.store.watchers), "history": len(self.store.history)}
            handler._send(200, state)
            return
        actions: dict[str, Callable[[], None]] = {
            "drop-watches": self.drop_watches, "drop-connections": self.drop_connections, "compact": self.compact,
            "expire-watches": self.expire_watches, "bookmark": self.bookmark,
            "refuse": lambda: self.refuse(int(params.get("count", 1)), int(params.get("code", 503)),
                                          int(params.get("retryAfter", 1)), params.get("plural")),
            "delay": lambda: self.delay(float(params.get("seconds", 0)), params.get("count"), params.get("plural")),
        }
        if handler.command != "POST" or (action not in actions and action != "restart"):
            handler._send(404, status_body(404, "NotFound", f"no admin action {action!r} (POST one of "
                                                            f"{sorted([*actions, 'restart'])}, or GET state)"))
            return
        log.info("apiserver.fault", action=action, **{k: v for k, v in params.items() if isinstance(v, int | str)})
        if action == "restart":
            handler._send(202, {"restarting": True})
            # From another thread: stopping closes this very connection.
            threading.Thread(target=self.restart, args=(float(params.get("downSeconds", 0)),),
                             name="apiserver-restart", daemon=True).start()
            return
        try:
            actions[action]()
        except (ValueError, TypeError) as exc:
            handler._send(400, status_body(400, "BadRequest", str(exc)))
            return
        handler._send(200, {"done": action})
