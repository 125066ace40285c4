"""kube-proxy's service health server: one HTTP listener per Service with `externalTrafficPolicy: Local` on its
`healthCheckNodePort`, which cloud load balancers probe to send traffic only to nodes with a local endpoint.

Every path answers (kube-proxy registers no mux): `Content-Type: application/json`, `X-Content-Type-Options:
nosniff`, `X-Load-Balancing-Endpoint-Weight: <local endpoints>`, 200 when the node has local ready endpoints and
the proxy is healthy, else 503, and kube-proxy's body byte for byte (tab-indented, no trailing newline).

Which Services, ports and counts is decided elsewhere (`nodeagent.service.healthcheck`, pure); this module only
opens and closes the listeners and answers. A port that cannot be bound is logged with its Service and port and
tried again at the next sync, as kube-proxy does; the other Services' listeners are not affected.

Per family, as kube-proxy's ServiceHealthServer in each family's proxier: a listener on an IPv6 address answers
with the Service's local endpoints of IPv6, one on an IPv4 address with those of IPv4 (`sync_endpoints(...,
family)`); the IPv6 wildcard [::] is an IPv6-only socket (IPV6_V6ONLY), so it and 0.0.0.0 both bind the port,
as kube-proxy binds each family's instance to a socket of its own family.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial

import structlog

from nodeagent.observability.http import (
    DEFAULT_LIMITS,
    BoundedHTTPServer,
    BoundedRequestHandler,
    ConnectionLimits,
    Refusals,
    respond,
)

log = structlog.get_logger("nodeagent.observability.service_health")


@dataclass(frozen=True, order=True)
class ServiceName:
    """A Service's namespace and name (kube-proxy's NamespacedName)."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Listen:
    """Where one Service's health check answers: its healthCheckNodePort on each of `hosts`."""

    port: int
    hosts: tuple[str, ...] = ("0.0.0.0",)


def service_health_answer(service: ServiceName, local_endpoints: int,
                          proxy_healthy: bool) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) as kube-proxy's service health handler writes them. Pure."""
    headers = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff",
               "X-Load-Balancing-Endpoint-Weight": str(local_endpoints)}
    status = 200 if local_endpoints != 0 and proxy_healthy else 503
    body = ("{\n"
            "\t\"service\": {\n"
            f"\t\t\"namespace\": {json.dumps(service.namespace)},\n"
            f"\t\t\"name\": {json.dumps(service.name)}\n"
            "\t},\n"
            f"\t\"localEndpoints\": {local_endpoints},\n"
            f"\t\"serviceProxyHealthy\": {'true' if proxy_healthy else 'false'}\n"
            "}")
    return status, headers, body.encode()


class _Server6(BoundedHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # IPv6 only: [::] must not take the IPv4 side of the port, which the 0.0.0.0 listener binds
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class _Listener:
    """One Service's listeners (one per host), each serving from its own daemon thread."""

    def __init__(self, service: ServiceName, listen: Listen,
                 answer: Callable[[int], tuple[int, dict[str, str], bytes]], limits: ConnectionLimits,
                 refusals: Refusals) -> None:
        def handler(family: int) -> type[BoundedRequestHandler]:
            class Handler(BoundedRequestHandler):
                def do_GET(self) -> None:
                    status, headers, data = answer(family)
                    respond(self, status, headers, data)

            return Handler

        self.listen = listen
        self.servers: list[BoundedHTTPServer] = []
        try:
            for host in listen.hosts:
                ipv6 = ":" in host
                kind = _Server6 if ipv6 else BoundedHTTPServer
                self.servers.append(kind((host, listen.port), handler(6 if ipv6 else 4), limits, refusals))
        except OSError:
            for server in self.servers:  # bound but never served: nothing to shut down
                server.server_close()
            raise
        for server in self.servers:
            threading.Thread(target=server.serve_forever, name=f"healthcheck-{service}", daemon=True).start()

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple((str(s.server_address[0]), int(s.server_address[1])) for s in self.servers)

    def close(self) -> None:
        """Stop serving and release the ports."""
        for server in self.servers:
            server.shutdown()
            server.server_close()
        self.servers = []


class ServiceHealthServers:
    """The health check listeners of the node's Services; `sync_services` and `sync_endpoints` as kube-proxy's
    ServiceHealthServer. `proxy_healthy` is the proxy's health without node eligibility (kube-proxy's
    Health().Healthy). Thread-safe: the handlers read the counts while the sync thread changes them.

    Each listener's clients are bounded by `limits` (`observability.http.BoundedHTTPServer`: a head deadline, a
    head size, a connection cap per listener); what they turned away is counted over all listeners, also closed
    ones (`refusals`)."""

    def __init__(self, proxy_healthy: Callable[[], bool], limits: ConnectionLimits = DEFAULT_LIMITS) -> None:
        self._proxy_healthy = proxy_healthy
        self._limits = limits
        self._refusals = Refusals()
        self._lock = threading.Lock()
        self._listeners: dict[ServiceName, _Listener] = {}
        self._endpoints: dict[int, dict[ServiceName, int]] = {4: {}, 6: {}}

    def sync_services(self, wanted: Mapping[ServiceName, Listen]) -> None:
        """Open a listener for every Service in `wanted` that has none (or listens elsewhere: closed and
        reopened, its count reset to 0), close those of Services no longer wanted."""
        with self._lock:
            gone = {service: listener for service, listener in self._listeners.items()
                    if wanted.get(service) != listener.listen}
            for service in gone:
                del self._listeners[service]
                for counts in self._endpoints.values():
                    counts.pop(service, None)
        _close_all(gone.values())
        for service, listener in gone.items():
            log.info("service health check closed", service=str(service), port=listener.listen.port)
        for service, listen in sorted(wanted.items()):
            if service in self._listeners:
                continue
            try:
                opened = _Listener(service, listen, partial(self.answer, service), self._limits, self._refusals)
            except OSError as exc:
                log.warning("service health check cannot listen; trying again at the next sync",
                            service=str(service), port=listen.port, hosts=list(listen.hosts), error=str(exc))
                continue
            with self._lock:
                self._listeners[service] = opened
                for counts in self._endpoints.values():
                    counts.setdefault(service, 0)
            log.info("service health check listening", service=str(service), port=listen.port,
                     hosts=list(listen.hosts))

    def sync_endpoints(self, local_endpoints: Mapping[ServiceName, int], family: int = 4) -> None:
        """Set every listened Service's count of local ready endpoints of `family` (absent: 0), what its listeners
        of that family answer with."""
        with self._lock:
            for service in self._listeners:
                self._endpoints[family][service] = local_endpoints.get(service, 0)

    def answer(self, service: ServiceName, family: int = 4) -> tuple[int, dict[str, str], bytes]:
        """What `service`'s health check answers now on its listeners of `family`."""
        with self._lock:
            count = self._endpoints[family].get(service, 0)
        return service_health_answer(service, count, self._proxy_healthy())

    def refusals(self) -> dict[str, int]:
        """Connections the health check listeners turned away, by reason (`observability.http.REFUSAL_REASONS`:
        head not in by the deadline, head too large, evicted by a newer connection over the cap, refused)."""
        return self._refusals.counts()

    def addresses(self) -> dict[ServiceName, tuple[tuple[str, int], ...]]:
        """The bound (host, port) of each Service's listeners."""
        with self._lock:
            return {service: listener.addresses for service, listener in self._listeners.items()}

    def close(self) -> None:
        """Close every listener."""
        with self._lock:
            listeners, self._listeners = list(self._listeners.values()), {}
            for counts in self._endpoints.values():
                counts.clear()
        _close_all(listeners)


def _close_all(listeners: Iterable[_Listener]) -> None:
    """Close listeners side by side: each waits up to its serving loop's poll interval (0.5 s) to stop, so one
    after the other would hold an agent's exit for half a second per Service."""
    closing = [threading.Thread(target=listener.close, name="healthcheck-close") for listener in listeners]
    for thread in closing:
        thread.start()
    for thread in closing:
        thread.join()
