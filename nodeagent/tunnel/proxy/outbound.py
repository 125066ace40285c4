"""Captured outbound connections (15001): where they go and how they get there (ztunnel's outbound.rs).

The original destination decides:
- a **Service frontend** (`ServiceTable.lookup`): the Service's circuit breaker admits the connection or
  refuses it at once (`UO`); then up to `connect_attempts` *different* endpoints are tried within the
  Service's connect timeout (`balance.Attempts`: healthy, weighted, closest first), each failure
  counted by the Service's outlier detector (which ejects an endpoint after consecutive failures) and
  each retry counted; nothing eligible is `UH`, every attempt failed is `UF`, the deadline is `UT`.
  A 401 from the peer tunnel is policy, not a failure: it is not retried and ejects nothing.
- an **enrolled pod** address: HBONE to that pod's tunnel, as the pod's own identity.
- **anything else**: plain TCP from the pod's namespace (passthrough), as ztunnel does for
  destinations outside the mesh.
Endpoints that are enrolled pods are reached over HBONE, others as plain TCP.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from nodeagent.cluster.model import ObjectRef
from nodeagent.errors import NodeAgentError
from nodeagent.tunnel.hbone.client import ConnectRefused
from nodeagent.tunnel.hbone.request import AuthorityError, format_authority
from nodeagent.tunnel.resilience.balance import Attempts
from nodeagent.tunnel.resilience.circuit import CircuitBreaker, Slot
from nodeagent.tunnel.resilience.outlier import OutlierDetector
from nodeagent.tunnel.state.services import ServiceTable, ServiceTarget
from nodeagent.tunnel.state.workloads import Workload
from nodeagent.tunnel.telemetry import (
    NO_HEALTHY_UPSTREAM,
    UPSTREAM_FAILURE,
    UPSTREAM_OVERFLOW,
    UPSTREAM_TIMEOUT,
    Connection,
    TunnelMetrics,
)

log = structlog.get_logger("nodeagent.tunnel.proxy.outbound")

# dial(destination workload or None, ip, port, timeout) -> an upstream the caller carries bytes over
Dial = Callable[[Workload | None, str, int, float], Awaitable[object]]


@dataclass
class ServiceState:
    """What the tunnel keeps per Service between connections: its breaker and its outlier detector."""

    breaker: CircuitBreaker
    detector: OutlierDetector


@dataclass
class Resilience:
    """Per-Service state, created on first use and following the Service's settings as they change."""

    states: dict[ObjectRef, ServiceState] = field(default_factory=dict)

    def of(self, target: ServiceTarget) -> ServiceState:
        """The state of `target`'s Service with its current limits."""
        config = target.config
        state = self.states.get(target.service)
        if state is None:
            state = self.states[target.service] = ServiceState(
                CircuitBreaker(config.max_connections, config.max_pending_connects), OutlierDetector(config.outlier))
        else:
            state.breaker.max_connections = config.max_connections
            state.breaker.max_pending_connects = config.max_pending_connects
            state.detector.config = config.outlier
        return state

    def retain(self, table: ServiceTable) -> None:
        """Forget Services the table no longer has (their counts go with them)."""
        for ref in [ref for ref in self.states if table.config(ref) is None]:
            del self.states[ref]


def _address(host: str, port: int) -> str:
    """`ip:port`, `[v6]:port`, as logs, metrics and HBONE write an address."""
    try:
        return format_authority(host, port)
    except AuthorityError:
        return f"{host}:{port}"


class Refused(NodeAgentError):
    """The connection cannot be carried; `flags` (Envoy's response flag) and the message say why."""

    def __init__(self, flags: str, reason: str) -> None:
        super().__init__(reason)
        self.flags = flags


@dataclass
class Outbound:
    """Resolves a captured destination to an upstream, with the Service's resilience rules."""

    node: str
    lookup: Callable[[str], Workload | None]
    services: Callable[[], ServiceTable | None]
    metrics: TunnelMetrics
    resilience: Resilience = field(default_factory=Resilience)
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    direct_timeout: float = 10.0  # connect timeout for destinations that are not Services

    async def connect(self, connection: Connection, host: str, port: int, dial: Dial) -> tuple[object, Slot | None]:
        """The upstream for `connection` to `host:port`, and the breaker slot it holds (close it when the
        connection ends); raises `Refused` with the response flag when there is none."""
        table = self.services()
        target = table.lookup(host, port) if table is not None else None
        if target is None:
            destination = self.lookup(host)
            address = _address(host, port)
            connection.destination, connection.endpoint, connection.attempts = destination, address, 1
            if destination is not None:
                connection.destination_principal = str(destination.identity)
            try:
                return await asyncio.wait_for(dial(destination, host, port, self.direct_timeout),
                                              self.direct_timeout), None
            except TimeoutError as exc:
                raise Refused(UPSTREAM_TIMEOUT, f"connect to {address} timed out") from exc
            except OSError as exc:
                raise Refused(UPSTREAM_FAILURE, f"connect to {address}: {exc}") from exc
        assert table is not None
        return await self._connect_service(connection, table, target, dial)

    async def _connect_service(self, connection: Connection, table: ServiceTable, target: ServiceTarget,
                               dial: Dial) -> tuple[object, Slot | None]:
        service = target.service.key
        connection.service, connection.idle_timeout = service, target.config.idle_timeout
        state = self.resilience.of(target)
        slot = state.breaker.try_start_pending()
        if slot is None:
            self.metrics.overflows.labels(destination_service=service, limit=state.breaker.last_refusal).inc()
            raise Refused(UPSTREAM_OVERFLOW, state.breaker.last_refusal)
        attempts = Attempts(target, self.clock(), node=table.node, zone=table.zone)
        last_error = ""
        try:
            while (choice := attempts.next(self.clock(), self.rng,
                                           ejected=state.detector.ejected(self.clock()))) is not None:
                endpoint = choice.endpoint
                ip = str(endpoint.ip)
                connection.attempts += 1
                if connection.attempts > 1:
                    self.metrics.retries.labels(destination_service=service).inc()
                destination = self.lookup(ip)
                timeout = attempts.timeout(self.clock())
                try:
                    upstream = await asyncio.wait_for(dial(destination, ip, endpoint.port, timeout), timeout)
                except (OSError, TimeoutError) as exc:
                    last_error = f"{endpoint.address}: {type(exc).__name__} {exc}".strip()
                    if isinstance(exc, ConnectRefused) and exc.status == 401:
                        raise Refused(UPSTREAM_FAILURE, f"{endpoint.address}: denied by the destination's "
                                                        "policy (401)") from exc
                    ejection = state.detector.record_failure(endpoint.key, self.clock(), len(target.endpoints))
                    if ejection is not None:
                        self.metrics.ejections.labels(destination_service=service).inc()
                        log.warning("endpoint ejected", service=service, endpoint=endpoint.address,
                                    seconds=round(ejection.seconds, 1), nth=ejection.nth)
                    log.info("connect attempt failed", service=service, endpoint=endpoint.address,
                             attempt=connection.attempts, reason=last_error)
                    continue
                state.detector.record_success(endpoint.key, self.clock())
                slot.connected()
                connection.destination, connection.endpoint = destination, endpoint.address
                if destination is not None:
                    connection.destination_principal = str(destination.identity)
                return upstream, slot
        except BaseException:
            slot.closed()
            raise
        slot.closed()
        reason = attempts.stop_reason + (f" (last: {last_error})" if last_error else "")
        if self.clock() >= attempts.deadline:
            raise Refused(UPSTREAM_TIMEOUT, reason)
        raise Refused(UPSTREAM_FAILURE if attempts.tried else NO_HEALTHY_UPSTREAM, reason)
