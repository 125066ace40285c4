"""Overload: the decision (lag with hysteresis, pending connects), the lag sampler on a real loop, and a captured
connection reset at accept while overloaded, then served again once the load falls."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.ca.identity import SpiffeId
from nodeagent.tunnel.proxy.node import NodeTunnel, _Pod
from nodeagent.tunnel.proxy.overload import LoadState, Overload, OverloadGuard, OverloadLimits
from nodeagent.tunnel.state.workloads import Workload
from nodeagent.tunnel.telemetry import TunnelMetrics

LIMITS = OverloadLimits(max_lag=0.2, resume_lag=0.05, max_pending=3, period=0.01)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_lag_refuses_above_the_limit_and_admits_again_only_below_the_lower_one() -> None:
    changes: list[LoadState] = []
    guard = OverloadGuard(LIMITS, on_change=lambda state, _reason: changes.append(state))
    guard.observe_lag(0.1)
    assert guard.reason() is None
    for _ in range(LIMITS.trip_samples):
        guard.observe_lag(0.25)
    assert guard.reason() is not None and "250 ms late" in guard.reason()  # type: ignore[operator]
    guard.observe_lag(0.1)  # below the limit, above the resume threshold: still refusing (no flapping)
    assert guard.reason() is not None
    guard.observe_lag(0.04)
    assert guard.reason() is None
    assert changes == [LoadState.OVERLOADED, LoadState.ADMITTING]


def test_one_late_step_is_a_spike_not_an_overload() -> None:
    """A single long step (a table rebuilt, a collection, the process descheduled) refuses nothing; only a loop
    late sample after sample is overloaded. (Refusing on one spike reset connections of a tunnel starting on a
    busy node.)"""
    guard = OverloadGuard(LIMITS)
    for lag in (0.9, 0.01, 0.5, 0.3, 0.01, 0.25, 0.25, 0.01):
        guard.observe_lag(lag)
        assert guard.reason() is None, lag


def test_pending_connects_over_the_limit_refuse_until_one_is_done() -> None:
    guard = OverloadGuard(LIMITS)
    for _ in range(3):
        assert guard.reason() is None
        guard.started()
    assert guard.state is LoadState.OVERLOADED and "3 connections still connecting" in (guard.reason() or "")
    guard.connected()
    after: LoadState = guard.state  # read again: connected() changed it
    assert guard.reason() is None and after is LoadState.ADMITTING
    for _ in range(5):
        guard.connected()
    assert guard.pending == 0  # never negative, whatever the order of ends


async def test_the_sampler_sees_a_blocked_loop_and_recovers_after_it() -> None:
    registry = CollectorRegistry()
    overload = Overload(registry, "node1", LIMITS)
    overload.start()
    try:
        await asyncio.sleep(0.05)
        assert not overload.refuse("outbound")
        refused = []
        for _ in range(LIMITS.trip_samples + 2):  # the loop is busy turn after turn: every timer fires late
            time.sleep(0.25)
            await asyncio.sleep(0.001)  # a turn: the sampler's overdue timer runs
            refused.append(overload.refuse("outbound"))
        assert refused[0] is False, "the first late sample alone refuses nothing"
        assert refused[-1] is True, refused
        assert value(registry, "nodeagent_tunnel_overloaded") == 1
        assert value(registry, "nodeagent_tunnel_overload_refusals_total", listener="outbound") == sum(refused)
        deadline = time.monotonic() + 2
        while overload.guard.reason() is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not overload.refuse("outbound")
        assert value(registry, "nodeagent_tunnel_overloaded") == 0
    finally:
        overload.close()


async def test_an_overloaded_tunnel_resets_a_captured_connection_at_once_and_counts_it() -> None:
    client = Workload("127.0.0.1", SpiffeId("cluster.local", "demo", "client"), "node1", "/run/netns/x",
                      name="demo/client")
    tunnel = NodeTunnel("node1", "cluster.local", cast(Any, None), lambda _ip: None, metrics=TunnelMetrics(),
                        overload=LIMITS)
    pod = _Pod(client, cast(Any, None), cast(Any, None), cast(Any, None))
    server = await asyncio.start_server(lambda r, w: tunnel._outbound(pod, r, w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(LIMITS.max_pending):
            tunnel.overload.guard.started()  # the tunnel is full of connections still connecting
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
        assert time.monotonic() - started < 1
        writer.close()
        registry = tunnel.metrics.registry
        assert value(registry, "nodeagent_tunnel_overload_refusals_total", listener="outbound") == 1
        # the load falls: the next connection is taken (and, with no original destination here, closed normally)
        tunnel.overload.guard.connected()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(1), 5) == b""
        writer.close()
        assert value(registry, "nodeagent_tunnel_overload_refusals_total", listener="outbound") == 1
    finally:
        server.close()
        await tunnel.close()
