"""Outlier ejection of one Service's endpoints from consecutive connect failures (Envoy's consecutive_5xx
for TCP, where a failed connect is the 5xx). Pure: the caller reports outcomes with the time; the
detector answers which endpoints are ejected at a given time.

Rules (the numbers are the Service's `OutlierConfig`, see `service_config`):
- every failed connect to an endpoint adds one to its consecutive failures; a successful one resets
  them to zero. `consecutive_failures` of them in a row eject the endpoint (0 turns ejection off);
- the n-th ejection lasts `base * 2**(n-1)`, capped at `max_ejection_seconds` (Envoy multiplies the
  base by n instead; doubling backs off faster from an endpoint that keeps failing).
  n decays by one for every `base` seconds the endpoint has been back in service, as Envoy lowers its
  multiplier while a host stays healthy, so an endpoint that failed once last week starts again at base;
- at most `max_ejected_percent` of the Service's endpoints are ejected at once, but one always may be
  (Envoy, and without that exemption a Service of fewer than 10 endpoints could never eject any); an
  ejection refused by that cap is counted in `overflow_total` and tried again at the next failure;
- an ejection ends by itself when its time is up; the endpoint comes back with no failures counted.
  Failures while ejected (the balancer used it in panic mode) are counted but do not extend it.

The balancer skips ejected endpoints and falls back to them only when nothing else is left
(`nodeagent.tunnel.resilience.balance`). Endpoints are named by any hashable key (the tunnel uses
`Candidate.key`, `(ip, target port)`), so outlier state survives a Service's endpoints being rebuilt.
Reference: envoy source/common/upstream/outlier_detection_impl.cc (ejectHost, the max ejection percent
check, the ejection time multiplier).
"""

from __future__ import annotations

import math
from collections.abc import Container, Hashable
from dataclasses import dataclass

from nodeagent.tunnel.state.service_config import OutlierConfig

Key = Hashable


@dataclass(frozen=True, slots=True)
class Ejection:
    """An endpoint was just ejected: for how long, and which ejection of it this is (for logs and metrics)."""

    key: Key
    until: float
    seconds: float
    nth: int


@dataclass(slots=True)
class _Endpoint:
    failures: int = 0  # consecutive, since the last success or the end of the last ejection
    ejections: int = 0  # n of the last ejection, before decay
    ejected_until: float | None = None
    back_since: float | None = None  # when the last ejection ended


class OutlierDetector:
    """Consecutive-failure ejection for the endpoints of one Service; assign `config` when it changes."""

    def __init__(self, config: OutlierConfig) -> None:
        self.config = config
        self._endpoints: dict[Key, _Endpoint] = {}
        self._ejected: dict[Key, float] = {}  # key -> until
        self._ejected_now: frozenset[Key] = frozenset()
        self._next_expiry = math.inf
        self.ejections_total = 0
        self.overflow_total = 0  # ejections refused by the max ejected percent

    def __repr__(self) -> str:
        return (f"<OutlierDetector tracked={len(self._endpoints)} ejected={len(self._ejected)} "
                f"ejections={self.ejections_total} overflow={self.overflow_total}>")

    def record_success(self, key: Key, now: float) -> None:
        """A connect to `key` succeeded: its consecutive failures start again from zero."""
        state = self._endpoints.get(key)
        if state is None:
            return
        state.failures = 0
        if state.ejections == 0 and state.ejected_until is None:
            del self._endpoints[key]  # nothing left to remember

    def record_failure(self, key: Key, now: float, endpoint_count: int) -> Ejection | None:
        """A connect to `key` failed; the ejection this causes, if any.

        `endpoint_count` is how many endpoints the Service has now (`len(target.endpoints)`), which the
        max ejected percent is a share of.
        """
        config = self.config
        if not config.enabled:
            return None
        self._expire(now)
        state = self._endpoints.setdefault(key, _Endpoint())
        state.failures += 1
        if state.ejected_until is not None or state.failures < config.consecutive_failures:
            return None
        ejected = len(self._ejected)
        if ejected and (ejected + 1) * 100 > config.max_ejected_percent * endpoint_count:
            self.overflow_total += 1
            return None
        nth = state.ejections
        if state.back_since is not None:
            nth = max(0, nth - int((now - state.back_since) // config.base_ejection_seconds))
        nth += 1
        seconds = min(config.base_ejection_seconds * 2.0 ** (nth - 1), config.max_ejection_seconds)
        state.ejections, state.failures = nth, 0
        state.ejected_until = until = now + seconds
        self._ejected[key] = until
        self._ejected_now = frozenset(self._ejected)
        self._next_expiry = min(self._next_expiry, until)
        self.ejections_total += 1
        return Ejection(key, until, seconds, nth)

    def ejected(self, now: float) -> frozenset[Key]:
        """The endpoints ejected at `now` (cheap: recomputed only when an ejection starts or ends)."""
        if now >= self._next_expiry:
            self._expire(now)
        return self._ejected_now

    def is_ejected(self, key: Key, now: float) -> bool:
        """Whether `key` is ejected at `now`."""
        return key in self.ejected(now)

    def retain(self, keys: Container[Key]) -> None:
        """Forget endpoints that are no longer the Service's (their ejection and history go with them)."""
        for key in [k for k in self._endpoints if k not in keys]:
            del self._endpoints[key]
            self._ejected.pop(key, None)
        self._ejected_now = frozenset(self._ejected)
        self._next_expiry = min(self._ejected.values(), default=math.inf)

    def _expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        for key, until in [(k, u) for k, u in self._ejected.items() if u <= now]:
            del self._ejected[key]
            state = self._endpoints[key]
            state.ejected_until, state.back_since, state.failures = None, until, 0
        self._ejected_now = frozenset(self._ejected)
        self._next_expiry = min(self._ejected.values(), default=math.inf)
