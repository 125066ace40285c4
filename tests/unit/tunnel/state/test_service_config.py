"""Per-Service tunnel settings: defaults, every annotation, per-field rejections, locality from the spec."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.cluster.decode import decode
from nodeagent.cluster.model import Service
from nodeagent.tunnel.state.service_config import (
    DEFAULT,
    Locality,
    OutlierConfig,
    ServiceConfig,
    parse_duration,
    service_config,
)
from tests.support.objects import service


def svc(annotations: dict[str, str] | None = None, **spec: Any) -> Service:
    raw = service("web", **spec)
    raw["metadata"]["annotations"] = annotations or {}
    decoded = decode(raw)
    assert isinstance(decoded.obj, Service), decoded.rejections
    return decoded.obj


def test_a_service_without_annotations_gets_the_documented_defaults() -> None:
    config, rejections = service_config(svc())
    assert rejections == ()
    assert config == DEFAULT == ServiceConfig(
        connect_timeout=10.0, connect_attempts=3, idle_timeout=3600.0, max_connections=1024,
        max_pending_connects=1024, outlier=OutlierConfig(5, 30.0, 300.0, 10), locality=Locality.NONE)
    assert config.outlier.enabled


def test_every_annotation_is_read() -> None:
    config, rejections = service_config(svc({
        "nodeagent.io/connect-timeout": "2.5s", "nodeagent.io/connect-attempts": "5",
        "nodeagent.io/idle-timeout": "1m30s", "nodeagent.io/max-connections": "100",
        "nodeagent.io/max-pending-connects": "7", "nodeagent.io/outlier-consecutive-failures": "0",
        "nodeagent.io/outlier-base-ejection-time": "500ms", "nodeagent.io/outlier-max-ejection-time": "1h",
        "nodeagent.io/outlier-max-ejected-percent": "50", "nodeagent.io/locality": "node",
        "nodeagent.io/endpoint-weights": '{"web-blue": 100, "web-green": 0}',
    }))
    assert rejections == ()
    assert config == ServiceConfig(
        connect_timeout=2.5, connect_attempts=5, idle_timeout=90.0, max_connections=100, max_pending_connects=7,
        outlier=OutlierConfig(0, 0.5, 3600.0, 50), locality=Locality.NODE,
        endpoint_weights=(("web-blue", 100), ("web-green", 0)))
    assert not config.outlier.enabled
    assert (config.weight("web-blue"), config.weight("web-green"), config.weight("other"), config.weight(None)) == (
        100, 0, 1, 1)


def test_an_idle_timeout_of_zero_means_none() -> None:
    config, _ = service_config(svc({"nodeagent.io/idle-timeout": "0s"}))
    assert config.idle_timeout is None


@pytest.mark.parametrize(("name", "value", "attribute", "reason"), [
    ("connect-timeout", "ten", "connect_timeout", "not a duration"),
    ("connect-timeout", "2h", "connect_timeout", "between 1ms and 3600s"),
    ("connect-timeout", "-1s", "connect_timeout", "not a duration"),
    ("connect-attempts", "0", "connect_attempts", "integer 1-10"),
    ("connect-attempts", "3.5", "connect_attempts", "integer 1-10"),
    ("idle-timeout", "10", "idle_timeout", "not a duration"),
    ("max-connections", "-5", "max_connections", "integer 1-1000000"),
    ("max-pending-connects", "lots", "max_pending_connects", "integer"),
    ("outlier-consecutive-failures", "1001", "consecutive_failures", "0-1000"),
    ("outlier-base-ejection-time", "0s", "base_ejection_seconds", "between"),
    ("outlier-max-ejected-percent", "0", "max_ejected_percent", "1-100"),
    ("locality", "region", "locality", "none, zone, node"),
])
def test_a_bad_annotation_is_rejected_alone_and_its_default_applies(name: str, value: str, attribute: str,
                                                                      reason: str) -> None:
    other = (("nodeagent.io/connect-attempts", "4") if name != "connect-attempts"
             else ("nodeagent.io/max-connections", "9"))
    service_ = svc({f"nodeagent.io/{name}": value, other[0]: other[1]})
    config, rejections = service_config(service_)
    (rejection,) = rejections
    assert rejection.ref == service_.ref and rejection.field == f"metadata.annotations[nodeagent.io/{name}]"
    assert reason in rejection.reason and "using the default" in rejection.reason and not rejection.whole_object
    where, default = (config.outlier, DEFAULT.outlier) if hasattr(DEFAULT.outlier, attribute) else (config, DEFAULT)
    assert getattr(where, attribute) == getattr(default, attribute)
    # the other annotation still applies
    assert (config.connect_attempts == 4) if name != "connect-attempts" else (config.max_connections == 9)


def test_a_max_ejection_time_below_the_base_is_rejected_and_the_base_caps() -> None:
    config, rejections = service_config(svc({"nodeagent.io/outlier-base-ejection-time": "60s",
                                             "nodeagent.io/outlier-max-ejection-time": "10s"}))
    (rejection,) = rejections
    assert rejection.field == "metadata.annotations[nodeagent.io/outlier-max-ejection-time]"
    assert config.outlier.base_ejection_seconds == config.outlier.max_ejection_seconds == 60.0
    # a base above the default cap names the base
    config, rejections = service_config(svc({"nodeagent.io/outlier-base-ejection-time": "10m"}))
    assert [r.field for r in rejections] == ["metadata.annotations[nodeagent.io/outlier-base-ejection-time]"]
    assert config.outlier.max_ejection_seconds == 600.0


@pytest.mark.parametrize(("distribution", "expected"), [
    ("PreferClose", Locality.ZONE), ("PreferSameZone", Locality.ZONE), ("PreferSameNode", Locality.NODE),
    (None, Locality.NONE),
])
def test_locality_comes_from_the_traffic_distribution(distribution: str | None, expected: Locality) -> None:
    spec = {} if distribution is None else {"trafficDistribution": distribution}
    config, rejections = service_config(svc(**spec))
    assert config.locality is expected and rejections == ()


def test_the_locality_annotation_overrides_the_spec_and_unknown_distributions_are_reported() -> None:
    config, rejections = service_config(svc({"nodeagent.io/locality": "none"}, trafficDistribution="PreferClose"))
    assert config.locality is Locality.NONE and rejections == ()
    config, rejections = service_config(svc(trafficDistribution="PreferNearby"))
    (rejection,) = rejections
    assert config.locality is Locality.NONE and rejection.field == "spec.trafficDistribution"
    assert "PreferNearby" in rejection.reason


@pytest.mark.parametrize(("text", "seconds"), [
    ("10s", 10.0), ("500ms", 0.5), ("1m30s", 90.0), ("1.5h", 5400.0), ("0", 0.0), ("0s", 0.0), (".5s", 0.5),
    ("", None), ("10", None), ("s", None), ("1d", None), ("1s2", None), ("-1s", None), ("1 s", None),
])
def test_durations_parse_as_go_writes_them(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@given(st.dictionaries(st.sampled_from([
    "nodeagent.io/connect-timeout", "nodeagent.io/connect-attempts", "nodeagent.io/idle-timeout",
    "nodeagent.io/max-connections", "nodeagent.io/max-pending-connects", "nodeagent.io/outlier-consecutive-failures",
    "nodeagent.io/outlier-base-ejection-time", "nodeagent.io/outlier-max-ejection-time",
    "nodeagent.io/outlier-max-ejected-percent", "nodeagent.io/locality"]), st.text(max_size=12)))
def test_any_annotation_values_give_a_usable_config_and_a_reason_for_each_one_ignored(values: dict[str, str]) -> None:
    config, rejections = service_config(svc(values))
    assert config.connect_timeout > 0 and 1 <= config.connect_attempts <= 10
    assert config.max_connections >= 1 and config.max_pending_connects >= 1
    assert 0 < config.outlier.base_ejection_seconds <= config.outlier.max_ejection_seconds
    assert 1 <= config.outlier.max_ejected_percent <= 100
    assert all(r.field.startswith("metadata.annotations[nodeagent.io/") and r.reason for r in rejections)
    assert len({r.field for r in rejections}) == len(rejections)
