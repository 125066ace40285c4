"""The agent's /healthz and /livez (kube-proxy's ProxyHealthServer: its rule, JSON, headers and codes, as its
healthcheck_test.go checks them)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from nodeagent.observability.health import (
    HEALTH_HEADERS,
    IPV4,
    IPV6,
    TO_BE_DELETED_TAINT,
    HealthState,
    go_time,
    health_routes,
    node_eligible,
)
from nodeagent.observability.http import RouteServer


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def answer(state: HealthState, path: str) -> tuple[int, dict[str, Any]]:
    status, content_type, body = health_routes(state)[path]()
    assert content_type == "application/json"
    assert b" " not in body  # Go's encoder: compact
    return status, json.loads(body)


def test_go_time_is_rfc3339_with_the_fraction_trimmed_and_z() -> None:
    assert go_time(None) == "0001-01-01T00:00:00Z"
    assert go_time(1_000_000.0) == "1970-01-12T13:46:40Z"
    assert go_time(1_000_000.25) == "1970-01-12T13:46:40.25Z"
    assert go_time(1_000_000.123456) == "1970-01-12T13:46:40.123456Z"


def test_healthz_and_livez_as_kube_proxys_health_server() -> None:
    """kube-proxy's TestHealthzServer/TestLivezServer, single family: healthy while nothing waits, 503 once a
    queued change has waited the timeout, `lastUpdated` now when 200 and the last update when 503."""
    clock = Clock()
    state = HealthState(grace=10.0, clock=clock)
    status, body = answer(state, "/healthz")  # starting: nothing synced, nothing queued
    assert status == 200 and list(body)[:4] == ["lastUpdated", "currentTime", "nodeEligible", "healthy"]
    assert body["lastUpdated"] == body["currentTime"] == "1970-01-12T13:46:40Z" and "status" not in body
    assert body["nodeEligible"] is True and body["healthy"] is True
    state.updated()
    clock.now += 25
    assert answer(state, "/healthz")[0] == 200  # nothing queued: no timeout, however long
    state.queued()
    clock.now += 25
    for path in ("/healthz", "/livez"):
        status, body = answer(state, path)
        assert status == 503 and body["healthy"] is False
        assert body["lastUpdated"] == "1970-01-12T13:46:40Z"  # the last update, not now
        assert body["currentTime"] == "1970-01-12T13:47:30Z"
        assert body["status"] == {"IPv4": {"lastUpdated": "1970-01-12T13:46:40Z", "healthy": False}}
        assert ("nodeEligible" in body) is (path == "/healthz")  # omitted on /livez
        assert body["oldestQueued"] == "1970-01-12T13:47:05Z" and body["gracePeriodSeconds"] == 10.0
    state.updated()
    clock.now += 5
    status, body = answer(state, "/healthz")
    assert status == 200 and body["lastUpdated"] == body["currentTime"] == "1970-01-12T13:47:35Z"
    assert body["status"] == {"IPv4": {"lastUpdated": "1970-01-12T13:47:30Z", "healthy": True}}
    assert body["oldestQueued"] == ""


def test_the_timeout_is_reached_at_exactly_the_grace_period() -> None:
    clock = Clock()
    state = HealthState(grace=60.0, clock=clock)
    state.queued()
    clock.now += 59.9
    assert answer(state, "/livez")[0] == 200
    clock.now += 0.1
    assert answer(state, "/livez")[0] == 503


def test_a_late_family_keeps_the_proxy_unhealthy_until_it_updates() -> None:
    """kube-proxy: "If IPv6 proxier is late ... updating IPv4 proxier should have no effect"."""
    clock = Clock()
    state = HealthState(grace=10.0, clock=clock)
    state.updated(IPV4)
    state.updated(IPV6)
    state.queued(IPV6)
    clock.now += 25
    state.updated(IPV4)
    status, body = answer(state, "/healthz")
    assert status == 503 and list(body["status"]) == ["IPv4", "IPv6"]
    assert body["status"]["IPv4"]["healthy"] is True and body["status"]["IPv6"]["healthy"] is False
    state.updated(IPV6)
    assert answer(state, "/healthz")[0] == 200


@pytest.mark.parametrize(("listed", "exists", "deleting", "taints", "eligible"), [
    (True, True, False, frozenset({"other"}), True),
    (True, True, False, frozenset({TO_BE_DELETED_TAINT}), False),
    (True, True, True, frozenset(), False),
    (True, False, False, frozenset(), False),  # no Node
    (False, False, False, frozenset(), True),  # the Nodes not listed yet: nothing known against it
])
def test_node_eligibility_as_kube_proxy(listed: bool, exists: bool, deleting: bool, taints: frozenset[str],
                                        eligible: bool) -> None:
    assert node_eligible(listed, exists, deleting, taints) is eligible


def test_an_ineligible_node_fails_healthz_only_and_says_healthy() -> None:
    """kube-proxy: ToBeDeletedTaint => /healthz 503 with `healthy: true, nodeEligible: false`; /livez 200."""
    state = HealthState(clock=Clock())
    state.set_node_eligible(False)
    status, body = answer(state, "/healthz")
    assert status == 503 and body["healthy"] is True and body["nodeEligible"] is False
    assert body["lastUpdated"] == "0001-01-01T00:00:00Z"  # not 200: the last update, none yet
    status, body = answer(state, "/livez")
    assert status == 200 and "nodeEligible" not in body


def test_another_change_while_one_waits_keeps_the_oldest_time() -> None:
    clock = Clock()
    state = HealthState(grace=10.0, clock=clock)
    state.queued()
    clock.now += 8
    state.queued()  # a newer change must not reset the wait
    clock.now += 3
    assert answer(state, "/healthz")[0] == 503


def test_health_answers_carry_kube_proxys_headers() -> None:
    state = HealthState()
    server = RouteServer(health_routes(state), "127.0.0.1", 0, "healthz-test", headers=HEALTH_HEADERS).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as response:
            assert response.status == 200
            assert response.headers.get_all("Content-Type") == ["application/json"]
            assert response.headers.get_all("X-Content-Type-Options") == ["nosniff"]
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
        assert missing.value.code == 404
    finally:
        server.stop()


def test_the_inspect_summary_keeps_the_real_last_sync() -> None:
    clock = Clock()
    state = HealthState(grace=10.0, clock=clock)
    assert state.report() == (True, {"lastUpdated": "", "currentTime": "1970-01-12T13:46:40Z",
                                     "nodeEligible": True, "oldestQueued": "", "gracePeriodSeconds": 10.0})
    state.updated()
    clock.now += 5
    healthy, summary = state.report()
    assert healthy and summary["lastUpdated"] == "1970-01-12T13:46:40Z"  # not now, unlike /healthz
