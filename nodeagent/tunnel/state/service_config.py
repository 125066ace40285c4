"""Per-Service tunnel settings (timeouts, retries, circuit breaking, outlier ejection, locality), from the
Service's annotations and spec. Pure.

A Service owner tunes how the node tunnel treats connections to it with annotations; anything absent
takes the default, chosen like Istio ztunnel / Envoy's. An annotation that does not parse or is out of
range is rejected alone (a `Rejection` naming the Service, `metadata.annotations[<name>]` and why) and
its default applies; the other settings of the Service are unaffected.

Every annotation is `nodeagent.io/<name>`:

| name                           | value                     | default | meaning                                      |
|--------------------------------|---------------------------|---------|----------------------------------------------|
| `connect-timeout`              | duration                  | 10s     | deadline to connect upstream, all attempts   |
| `connect-attempts`             | integer 1-10              | 3       | endpoints tried (all different) in that time |
| `idle-timeout`                 | duration, `0s` = none     | 1h      | close a connection silent both ways this long|
| `max-connections`              | integer 1-1000000         | 1024    | open + connecting upstreams (per node)       |
| `max-pending-connects`         | integer 1-1000000         | 1024    | connects in progress (per node)              |
| `outlier-consecutive-failures` | integer 0-1000, `0` = off | 5       | consecutive connect failures that eject      |
| `outlier-base-ejection-time`   | duration                  | 30s     | first ejection; each next one doubles        |
| `outlier-max-ejection-time`    | duration >= the base time | 300s    | cap of the doubling                          |
| `outlier-max-ejected-percent`  | integer 1-100             | 10      | share ejected at once (one always may be)    |
| `locality`                     | `none`, `zone`, `node`    | (spec)  | which endpoints are tried first, see below   |
| `endpoint-weights`             | JSON `{"pod": weight}`    | all 1   | weight 0 = never chosen (blue/green flips)   |

Where the defaults come from: ztunnel's 10 s connect timeout; Envoy's tcp_proxy idle timeout (1 h),
circuit breaker thresholds (max_connections and max_pending_requests, 1024), and outlier detection
(consecutive_5xx 5, base_ejection_time 30 s, max_ejection_time 300 s, max_ejection_percent 10). The
circuit breaker and the outlier detector count per Service in this node's tunnel, as each Envoy counts
per cluster. `endpoint-weights` is parsed by `nodeagent.cluster.decode` (it feeds the eBPF datapath too; its
rejections are the snapshot's) and only carried here.

Durations are Go's (`1m30s`, `1.5s`, `250ms`; units ms, s, m, h), as Kubernetes and Istio write them.

Locality, as Kubernetes expresses it: `spec.trafficDistribution: PreferClose` (and its 1.33 name
`PreferSameZone`) means this zone first, `PreferSameNode` this node first; the annotation overrides the
spec (e.g. `none` to turn a PreferClose off for the tunnel only). Both are preferences: when nothing
eligible is close, any endpoint is used. `internalTrafficPolicy: Local` is not a preference but a
restriction (only this node's endpoints, none means refused, as kube-proxy does); `services.py` applies
it to the cluster IPs. Topology-aware hints (`service.kubernetes.io/topology-mode`) are kube-proxy's
business and are not read here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from nodeagent.cluster.model import Rejection, Service

PREFIX = "nodeagent.io/"
CONNECT_TIMEOUT = PREFIX + "connect-timeout"
CONNECT_ATTEMPTS = PREFIX + "connect-attempts"
IDLE_TIMEOUT = PREFIX + "idle-timeout"
MAX_CONNECTIONS = PREFIX + "max-connections"
MAX_PENDING_CONNECTS = PREFIX + "max-pending-connects"
OUTLIER_CONSECUTIVE_FAILURES = PREFIX + "outlier-consecutive-failures"
OUTLIER_BASE_EJECTION_TIME = PREFIX + "outlier-base-ejection-time"
OUTLIER_MAX_EJECTION_TIME = PREFIX + "outlier-max-ejection-time"
OUTLIER_MAX_EJECTED_PERCENT = PREFIX + "outlier-max-ejected-percent"
LOCALITY = PREFIX + "locality"

TRAFFIC_DISTRIBUTION_FIELD = "spec.trafficDistribution"


class Locality(StrEnum):
    """Which endpoints are tried first: any (NONE), this zone's (ZONE), this node's then this zone's (NODE)."""

    NONE = "none"
    ZONE = "zone"
    NODE = "node"


# spec.trafficDistribution -> preference (PreferClose is PreferSameZone's older name, KEP-3015)
TRAFFIC_DISTRIBUTIONS = {"PreferClose": Locality.ZONE, "PreferSameZone": Locality.ZONE,
                         "PreferSameNode": Locality.NODE}


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Outlier ejection of one Service's endpoints (see `nodeagent.tunnel.resilience.outlier`)."""

    consecutive_failures: int = 5  # 0: never eject
    base_ejection_seconds: float = 30.0
    max_ejection_seconds: float = 300.0
    max_ejected_percent: int = 10

    @property
    def enabled(self) -> bool:
        """Whether endpoints of this Service are ever ejected."""
        return self.consecutive_failures > 0


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """How the tunnel connects to one Service; the defaults are the table of the module docstring."""

    connect_timeout: float = 10.0
    connect_attempts: int = 3
    idle_timeout: float | None = 3600.0  # None: never
    max_connections: int = 1024
    max_pending_connects: int = 1024
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    locality: Locality = Locality.NONE
    endpoint_weights: tuple[tuple[str, int], ...] = ()  # pod name -> weight, as model.Service holds them

    def weight(self, pod_name: str | None) -> int:
        """An endpoint's relative weight: as annotated for its pod, else 1."""
        if pod_name is None or not self.endpoint_weights:
            return 1
        for name, weight in self.endpoint_weights:
            if name == pod_name:
                return weight
        return 1


DEFAULT = ServiceConfig()

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Seconds in a Go duration (`10s`, `1m30s`, `250ms`, `0s`), or None if it is not one."""
    text = text.strip()
    if text in ("0", "0s"):
        return 0.0
    position, total = 0, 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total if text else None


def _int(low: int, high: int) -> Callable[[str], tuple[Any, str]]:
    def parse(text: str) -> tuple[Any, str]:
        value = text.strip()
        if not re.fullmatch(r"\d+", value) or not low <= int(value) <= high:
            return None, f"must be an integer {low}-{high}, got {text!r}"
        return int(value), ""
    return parse


def _duration(low: float, high: float, zero_is_none: bool = False) -> Callable[[str], tuple[Any, str]]:
    def parse(text: str) -> tuple[Any, str]:
        seconds = parse_duration(text)
        if seconds is None:
            return None, f"{text!r} is not a duration like 10s, 500ms or 1m30s"
        if seconds == 0 and zero_is_none:
            return None, ""
        if not low <= seconds <= high:
            return None, f"must be between {_show(low)} and {_show(high)}, got {text!r}"
        return seconds, ""
    return parse


def _locality(text: str) -> tuple[Any, str]:
    try:
        return Locality(text.strip()), ""
    except ValueError:
        return None, f"must be one of {', '.join(m.value for m in Locality)}, got {text!r}"


def _show(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


# annotation -> (field of ServiceConfig or OutlierConfig, parser returning (value, problem))
_ANNOTATIONS: dict[str, tuple[str, Callable[[str], tuple[Any, str]]]] = {
    CONNECT_TIMEOUT: ("connect_timeout", _duration(0.001, 3600.0)),
    CONNECT_ATTEMPTS: ("connect_attempts", _int(1, 10)),
    IDLE_TIMEOUT: ("idle_timeout", _duration(1.0, 7 * 86400.0, zero_is_none=True)),
    MAX_CONNECTIONS: ("max_connections", _int(1, 1_000_000)),
    MAX_PENDING_CONNECTS: ("max_pending_connects", _int(1, 1_000_000)),
    OUTLIER_CONSECUTIVE_FAILURES: ("consecutive_failures", _int(0, 1000)),
    OUTLIER_BASE_EJECTION_TIME: ("base_ejection_seconds", _duration(0.001, 3600.0)),
    OUTLIER_MAX_EJECTION_TIME: ("max_ejection_seconds", _duration(0.001, 86400.0)),
    OUTLIER_MAX_EJECTED_PERCENT: ("max_ejected_percent", _int(1, 100)),
    LOCALITY: ("locality", _locality),
}
_OUTLIER_FIELDS = {f.name for f in fields(OutlierConfig)}


def service_config(service: Service) -> tuple[ServiceConfig, tuple[Rejection, ...]]:
    """The tunnel settings of `service` and a rejection for every annotation that could not be used."""
    annotations = service.annotations
    if not service.traffic_distribution and annotations.keys().isdisjoint(_ANNOTATIONS):
        # the common case, and the whole cost of building the tunnel's table at 10,000 Services
        return (ServiceConfig(endpoint_weights=service.endpoint_weights) if service.endpoint_weights
                else DEFAULT), ()
    rejections: list[Rejection] = []
    top: dict[str, Any] = {}
    outlier: dict[str, Any] = {}
    for name in annotations.keys() & _ANNOTATIONS.keys():
        attribute, parse = _ANNOTATIONS[name]
        value, problem = parse(annotations[name])
        if problem:
            default = getattr(DEFAULT.outlier if attribute in _OUTLIER_FIELDS else DEFAULT, attribute)
            rejections.append(Rejection(service.ref, f"metadata.annotations[{name}]",
                                        f"{problem}; using the default {_describe(default)}"))
        else:
            (outlier if attribute in _OUTLIER_FIELDS else top)[attribute] = value
    ejection = replace(DEFAULT.outlier, **outlier)
    if ejection.max_ejection_seconds < ejection.base_ejection_seconds:
        # A cap below the first ejection would make the doubling meaningless: the cap gives way.
        field_name = (OUTLIER_MAX_EJECTION_TIME if "max_ejection_seconds" in outlier else OUTLIER_BASE_EJECTION_TIME)
        rejections.append(Rejection(
            service.ref, f"metadata.annotations[{field_name}]",
            f"the max ejection time ({_show(ejection.max_ejection_seconds)}) is below the base ejection time "
            f"({_show(ejection.base_ejection_seconds)}); ejections are capped at the base time"))
        ejection = replace(ejection, max_ejection_seconds=ejection.base_ejection_seconds)
    if "locality" not in top and service.traffic_distribution:
        preference = TRAFFIC_DISTRIBUTIONS.get(service.traffic_distribution)
        if preference is None:
            rejections.append(Rejection(service.ref, TRAFFIC_DISTRIBUTION_FIELD,
                                        f"unknown value {service.traffic_distribution!r} (known: "
                                        f"{', '.join(TRAFFIC_DISTRIBUTIONS)}); no locality preference"))
        else:
            top["locality"] = preference
    config = ServiceConfig(**top, outlier=ejection, endpoint_weights=service.endpoint_weights)
    return config, tuple(sorted(rejections, key=lambda r: r.field))


def _describe(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return _show(value)
    return str(value)
