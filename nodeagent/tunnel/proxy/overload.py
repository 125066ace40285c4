"""Overload: beyond what the tunnel can carry, new connections are refused at once, and the ones it took are served.

A Python event loop that takes more connections than it can serve does not fail them: it serves every one of
them late, until clients time out and close connections the tunnel already accepted, with nothing said. Envoy's
overload manager answers that with resource monitors and actions (`envoy.overload_actions.
reject_incoming_connections`, `stop_accepting_requests`, and the response flag `OM` for "overload manager").
Here the two signals that say the loop is past its capacity are:
- **loop lag**: how late a periodic timer fires. The loop runs every callback in turn, so lag is the wait
  every accepted connection sees on each step. It is the signal Envoy's watchdog and ztunnel's runtime
  metrics read for the same reason.
- **pending connects**: connections accepted whose upstream is not reached yet, which hold memory and
  descriptors while they wait.
While either is over its limit, a new connection gets a fast, explicit refusal: a captured outbound
connection is reset at accept (the client sees ECONNRESET at once and may retry, instead of waiting seconds),
and an inbound HBONE stream gets 503, which the peer tunnel counts as a failed attempt and retries elsewhere.
Every refusal is counted (`nodeagent_tunnel_overload_refusals_total{listener}`); the state change is logged
once, not each refusal (a flood of log lines would deepen the overload). Lag counts only when it is sustained:
`trip_samples` samples in a row over the limit, so one long step (a table rebuilt at start, a garbage
collection, the process descheduled on a busy node) delays what is queued but refuses nothing, while a loop
that is late on every turn is overloaded within a second. Lag leaves the overloaded state only below a lower
threshold (hysteresis), so admission does not flap at the edge; pending connects recover as soon as they
drain.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

log = structlog.get_logger("nodeagent.tunnel.proxy.overload")

OVERLOAD = "OM"  # Envoy's response flag for a connection refused by the overload manager


class LoadState(enum.Enum):
    """Whether new connections are taken."""

    ADMITTING = "admitting"
    OVERLOADED = "overloaded"


@dataclass(frozen=True)
class OverloadLimits:
    """When the tunnel refuses new connections (per process: each worker has its own loop and limits)."""

    max_lag: float = 0.2  # seconds of loop lag above which new connections are refused
    resume_lag: float = 0.05  # ... and below which they are taken again
    max_pending: int = 1024  # connections accepted and still connecting upstream
    period: float = 0.05  # how often the lag is sampled
    trip_samples: int = 3  # samples in a row over max_lag before refusing (one late sample is a spike)


@dataclass
class OverloadGuard:
    """The decision, apart from the loop: feed it lag samples and pending counts, ask it before taking a
    connection."""

    limits: OverloadLimits = field(default_factory=OverloadLimits)
    lag: float = 0.0
    pending: int = 0
    lagging: bool = False
    late_samples: int = 0  # samples in a row over max_lag
    state: LoadState = LoadState.ADMITTING
    on_change: Callable[[LoadState, str], None] | None = None

    def observe_lag(self, lag: float) -> None:
        """A lag sample (seconds the sampling timer fired late)."""
        self.lag = lag
        self.late_samples = self.late_samples + 1 if lag > self.limits.max_lag else 0
        if self.lagging:
            self.lagging = lag > self.limits.resume_lag
        else:
            self.lagging = self.late_samples >= self.limits.trip_samples
        self._update()

    def started(self) -> None:
        """A connection was taken and is connecting upstream."""
        self.pending += 1
        self._update()

    def connected(self) -> None:
        """A connection taken earlier reached its upstream, or ended before it did."""
        self.pending = max(0, self.pending - 1)
        self._update()

    def reason(self) -> str | None:
        """Why a new connection must be refused now (None: take it)."""
        if self.lagging:
            return f"event loop {self.lag * 1000:.0f} ms late (limit {self.limits.max_lag * 1000:.0f} ms)"
        if self.pending >= self.limits.max_pending:
            return f"{self.pending} connections still connecting (limit {self.limits.max_pending})"
        return None

    def _update(self) -> None:
        reason = self.reason()
        state = LoadState.ADMITTING if reason is None else LoadState.OVERLOADED
        if state is not self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change(state, reason or "")


class OverloadMetrics:
    """The guard's counters and gauges, in the tunnel's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refusals = Counter("nodeagent_tunnel_overload_refusals", "New connections or HBONE streams refused "
                                "because the tunnel was overloaded (response flag OM)", ["listener"],
                                registry=registry)
        self.overloaded = Gauge("nodeagent_tunnel_overloaded", "1 while new connections are refused for overload",
                                registry=registry)
        self.lag = Gauge("nodeagent_tunnel_event_loop_lag_seconds", "The last sample of how late the tunnel's "
                         "event loop ran a timer", registry=registry)


class Overload:
    """The guard with its lag sampler on the running loop, its metrics and its log line per state change."""

    def __init__(self, registry: CollectorRegistry, node: str, limits: OverloadLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = OverloadMetrics(registry)
        self.guard = OverloadGuard(limits or OverloadLimits(), on_change=self._changed)
        self.node, self.clock = node, clock
        self._task: asyncio.Task[None] | None = None

    def _changed(self, state: LoadState, reason: str) -> None:
        self.metrics.overloaded.set(1 if state is LoadState.OVERLOADED else 0)
        if state is LoadState.OVERLOADED:
            log.warning("tunnel overloaded: refusing new connections", node=self.node, reason=reason)
        else:
            log.info("tunnel admitting new connections again", node=self.node)

    def start(self) -> None:
        """Sample the running loop's lag until `close` (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        period = self.guard.limits.period
        while True:
            before = self.clock()
            await asyncio.sleep(period)  # the probe itself: how late this wakes up is the lag
            lag = max(0.0, self.clock() - before - period)
            self.metrics.lag.set(lag)
            self.guard.observe_lag(lag)

    def refuse(self, listener: str) -> bool:
        """Whether a new connection on `listener` must be refused now (counted when it is)."""
        if self.guard.reason() is None:
            return False
        self.metrics.refusals.labels(listener=listener).inc()
        return True

    def close(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
