"""The Kubernetes API as a source: list, then watch from the list's resourceVersion, per kind.

Config, authentication and HTTP come from the official client (`kubernetes`): in-cluster service
account, kubeconfig with every auth plugin it supports, token refresh, TLS. Its `Watch.stream` is
not used, for reasons visible in its source (kubernetes 37.0.2, watch/watch.py):
- on 410 Gone it retries once with the same expired resourceVersion, then raises; the caller has to
  relist anyway (kubernetes-client/python-base#57, #199 report the stale-version loops);
- one event that does not parse either ends the stream (`deserialize=False`: `json.loads` raises) or
  is yielded as `None` (`deserialize=True`), and an object its generated model refuses raises;
- bookmarks only advance its resourceVersion when it deserializes every event into generated models,
  which costs more than our own decoding of the same event;
- it reconnects in a tight loop, without backoff.
So the loop here is client-go's reflector: list in pages, watch with `allowWatchBookmarks`, resume
from the last seen resourceVersion after a dropped connection, relist on 410, back off with jitter
on errors, and turn a bad event into an `Unreadable` report while the stream goes on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.discovery.bulk import decode_items
from nodeagent.cluster.discovery.wire import (
    HTTP_GONE,
    NO_HEADLESS,
    NO_PROXY_NAME,
    RESOURCES,
    Backoff,
    LineSplitter,
    Malformed,
    ProtocolError,
    Resource,
    WatchFailure,
    parse_list,
    parse_watch_line,
    status_message,
    watch_timeout,
    with_kind,
)
from nodeagent.cluster.events import Deleted, Listed, Progressed, Sink, Unreadable, Upserted
from nodeagent.cluster.model import Kind
from nodeagent.errors import NodeAgentError
from nodeagent.heap import collector_paused

log = structlog.get_logger("nodeagent.cluster.discovery.kubernetes")

PAGE_SIZE = 500
CORE_KINDS = (Kind.SERVICE, Kind.ENDPOINT_SLICE, Kind.POD, Kind.NODE, Kind.NAMESPACE)
MESH_KINDS = (Kind.AUTHORIZATION_POLICY, Kind.PEER_AUTHENTICATION)


class ApiError(NodeAgentError):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Expired(NodeAgentError):
    """The resourceVersion (or continue token) is too old: list again."""


class ApiConnection:
    """The official client's configuration, authentication and connection pool, used for raw GETs."""

    def __init__(self, configuration: k8s_client.Configuration) -> None:
        self._api = k8s_client.ApiClient(configuration)
        self.host = configuration.host

    @classmethod
    def from_config(cls, kubeconfig: str | None = None, context: str | None = None) -> ApiConnection:
        """In a pod: the service account. Otherwise: `kubeconfig`, $KUBECONFIG or ~/.kube/config."""
        configuration = k8s_client.Configuration()
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=configuration)
        else:
            k8s_config.load_kube_config(config_file=kubeconfig, context=context,
                                        client_configuration=configuration, persist_config=False)
        return cls(configuration)

    def get(self, path: str, query: list[tuple[str, str]], timeout: float) -> Any:
        """Send a GET; the response body is not read yet (so a watch can be streamed)."""
        method, url, headers, body, _ = self._api.param_serialize(
            "GET", path, query_params=query, header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"])
        return self._api.call_api(method, url, header_params=headers, body=body,
                                  _request_timeout=(10.0, timeout)).response

    def close(self) -> None:
        """Release the connection pool."""
        self._api.close()


@dataclass(frozen=True)
class Selection:
    """Which objects of a kind this node asks for."""

    field_selector: str = ""
    label_selector: str = ""

    def query(self) -> list[tuple[str, str]]:
        """As query parameters."""
        query = []
        if self.field_selector:
            query.append(("fieldSelector", self.field_selector))
        if self.label_selector:
            query.append(("labelSelector", self.label_selector))
        return query


def selections(node_name: str, all_pods: bool) -> dict[Kind, Selection]:
    """kube-proxy's selectors for Services and slices; pods of this node only unless `all_pods`."""
    return {
        Kind.SERVICE: Selection(label_selector=NO_PROXY_NAME),
        Kind.ENDPOINT_SLICE: Selection(label_selector=f"{NO_PROXY_NAME},{NO_HEADLESS}"),
        Kind.POD: Selection() if all_pods else Selection(field_selector=f"spec.nodeName={node_name}"),
    }


class Reflector:
    """Keeps one kind in sync: list, watch, relist on 410, back off on errors; runs on its own thread."""

    def __init__(self, api: ApiConnection, resource: Resource, sink: Sink, selection: Selection = Selection(),
                 *, page_size: int = PAGE_SIZE, min_watch_timeout: int = 300, backoff: Backoff | None = None) -> None:
        self._api = api
        self._resource = resource
        self._sink = sink
        self._selection = selection
        self._page_size = page_size
        self._min_watch_timeout = min_watch_timeout
        self._backoff = backoff or Backoff()
        self._stop = threading.Event()
        self._response_lock = threading.Lock()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{resource.plural}", daemon=True)
        self.lists = 0
        self.watches = 0
        self.resource_version = ""
        self.last_error = ""  # why the last request failed, until one succeeds (readiness reasons)

    def start(self) -> Reflector:
        """Start listing and watching."""
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the reflector to stop at its next step (see `stop`)."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop; interrupts a watch that is waiting for the next event."""
        self._stop.set()
        with self._response_lock:
            if self._response is not None:
                self._response.shutdown()
        self._thread.join(timeout)

    def _run(self) -> None:
        # self.resource_version is the resume point: advanced by every event and bookmark, so a watch
        # that breaks mid-stream resumes exactly where it broke; cleared by 410 to force a relist.
        while not self._stop.is_set():
            try:
                if not self.resource_version:
                    self._list()
                self._watch(self.resource_version)
            except Expired:
                log.info("resource version expired, relisting", kind=str(self._resource.kind),
                         resource_version=self.resource_version)
                self.resource_version = ""
            except (ApiError, ProtocolError, urllib3.exceptions.HTTPError, OSError) as exc:
                if self._stop.is_set():
                    return
                self.last_error = str(exc)
                delay = self._backoff.next_delay(time.monotonic())
                log.warning("API request failed, backing off", kind=str(self._resource.kind), error=str(exc),
                            retry_in=round(delay, 2))
                self._stop.wait(delay)

    def _list(self) -> None:
        """List every page and hand the tracker the complete set; resume from the list's resourceVersion."""
        items: list[tuple[Any, Any]] = []
        token, version = "", ""
        while True:
            query = [*self._selection.query(), ("limit", str(self._page_size))]
            if token:
                query.append(("continue", token))
            body = self._request(query, timeout=60.0)
            with collector_paused():
                page = parse_list(body)
                items.extend(decode_items(page.items, self._resource))
            version, token = page.resource_version, page.continue_token
            if not token:
                break
        self.lists += 1
        self.resource_version = version
        self.last_error = ""
        with collector_paused():
            self._sink(Listed(self._resource.kind, tuple(items), version))
        log.info("listed", kind=str(self._resource.kind), objects=len(items), resource_version=version)

    def _request(self, query: list[tuple[str, str]], timeout: float) -> bytes:
        response = self._api.get(self._resource.path, query, timeout)
        try:
            body: bytes = response.data
        finally:
            response.release_conn()
        if response.status == HTTP_GONE:
            raise Expired()
        if response.status != 200:
            message = status_message(body)
            if response.status == 404:
                message += f" (does this API server serve {self._resource.path}? a CRD may not be installed)"
            raise ApiError(response.status, message)
        return body

    def _watch(self, version: str) -> None:
        """Watch from `version` until the server ends the stream."""
        server_timeout = watch_timeout(minimum=self._min_watch_timeout)
        query = [*self._selection.query(), ("watch", "1"), ("resourceVersion", version),
                 ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(server_timeout))]
        response = self._api.get(self._resource.path, query, timeout=server_timeout + 30)
        with self._response_lock:
            self._response = response
        try:
            if self._stop.is_set():
                return
            if response.status == HTTP_GONE:
                raise Expired()
            if response.status != 200:
                raise ApiError(response.status, status_message(response.data))
            self.watches += 1
            for line in self._lines(response):
                self._handle(line)
        finally:
            with self._response_lock:
                self._response = None
            response.release_conn()

    @staticmethod
    def _lines(response: Any) -> Iterator[bytes]:
        splitter = LineSplitter()
        for chunk in response.stream(amt=None, decode_content=True):
            yield from splitter.feed(chunk)

    def _handle(self, line: bytes) -> None:
        kind = self._resource.kind
        parsed = parse_watch_line(line)
        if parsed is None:
            return
        if isinstance(parsed, Malformed):
            self._sink(Unreadable(kind, f"watch {self._resource.path}", f"{parsed.reason}: {parsed.excerpt!r}"))
            return
        if isinstance(parsed, WatchFailure):
            if parsed.expired:
                raise Expired()
            raise ApiError(parsed.code, f"{parsed.reason}: {parsed.message}")
        new_version = parsed.resource_version or self.resource_version
        if parsed.type == "BOOKMARK":
            self._sink(Progressed(kind, new_version))
        elif parsed.type == "DELETED":
            ref = object_ref(with_kind(parsed.obj, self._resource))
            if ref is None:
                self._sink(Unreadable(kind, f"watch {self._resource.path}",
                                      "DELETED event for an object without a name"))
            else:
                self._sink(Deleted(ref, new_version))
        else:
            raw = with_kind(parsed.obj, self._resource)
            self._sink(Upserted(kind, object_ref(raw), decode(raw), new_version))
        self.resource_version = new_version


class KubernetesSource:
    """One reflector per kind the node needs, all feeding one sink."""

    def __init__(self, api: ApiConnection, sink: Sink, node_name: str, *,
                 kinds: tuple[Kind, ...] = CORE_KINDS + MESH_KINDS, all_pods: bool = False,
                 page_size: int = PAGE_SIZE, min_watch_timeout: int = 300,
                 backoff: Callable[[], Backoff] = Backoff) -> None:
        chosen = selections(node_name, all_pods)
        self.reflectors = {kind: Reflector(api, RESOURCES[kind], sink, chosen.get(kind, Selection()),
                                           page_size=page_size, min_watch_timeout=min_watch_timeout,
                                           backoff=backoff())
                           for kind in kinds}

    def start(self) -> KubernetesSource:
        """Start every reflector."""
        for reflector in self.reflectors.values():
            reflector.start()
        return self

    def failures(self) -> dict[Kind, str]:
        """Kinds whose last request failed (not listed since), with why: a missing CRD shows here."""
        return {kind: r.last_error for kind, r in self.reflectors.items() if r.last_error}

    def stop(self) -> None:
        """Stop every reflector."""
        for reflector in self.reflectors.values():
            reflector.request_stop()
        for reflector in self.reflectors.values():
            reflector.stop()
