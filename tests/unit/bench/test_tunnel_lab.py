"""bench/tunnel_lab.py's pure parts: the added latency over bare and the ratios against Envoy's targets."""

from __future__ import annotations

from typing import Any

from bench.tunnel_lab import added, median, ratios


def _round(p50: float, p99: float) -> dict[str, Any]:
    return {"latency_us": {"p50": p50, "p99": p99}}


def test_added_latency_is_the_median_over_rounds_minus_bare_s() -> None:
    rounds = {"bare": [_round(100, 400), _round(110, 9000), _round(90, 500)],  # one round hit by other load
              "envoy": [_round(300, 900), _round(320, 1000), _round(5000, 50000)]}
    assert added(rounds, "envoy", "p50") == 320 - 100
    assert added(rounds, "envoy", "p99") == 1000 - 500
    assert median([]) is None and median([3.0, 1.0]) == 2.0


def _summary(gbit: float, per_gib: float, added_p50: float, added_p99: float, new_p99: float,
             per_conn: tuple[float, float]) -> dict[str, Any]:
    return {"single_stream": {"gbit_per_s": gbit, "cpu_s_per_gib": per_gib},
            "persistent": {"added_us": {"p50": added_p50, "p99": added_p99}},
            "new_connections": {"added_us": {"p50": 0.0, "p99": new_p99},
                                "cpu_ms_per_connection": {"client": per_conn[0], "server": per_conn[1]}}}


def test_ratios_are_nodeagent_over_envoy_against_each_target() -> None:
    summary = {phase: {"nodeagent": ours, "envoy": theirs} for phase, ours, theirs in zip(
        ("single_stream", "persistent", "new_connections"),
        _summary(2.7, 4.0, 500, 2000, 3000, (0.5, 0.7)).values(),
        _summary(3.0, 4.0, 1000, 1000, 2000, (0.5, 0.6)).values(), strict=True)}
    result = ratios(summary)
    assert result["single_stream_gbit"]["ratio"] == 0.9 and result["single_stream_gbit"]["met"]  # >= 0.9x
    assert result["cpu_s_per_gib"]["met"]  # equal: <= 1.0x
    assert result["added_p50_persistent"]["met"] and not result["added_p99_persistent"]["met"]
    assert result["added_p99_new_connections"]["ratio"] == 1.5 and result["added_p99_new_connections"]["met"]
    assert result["cpu_ms_per_new_connection_client"]["met"]
    assert not result["cpu_ms_per_new_connection_server"]["met"]


def test_no_ratio_when_envoy_adds_nothing_over_bare() -> None:
    ours, theirs = _summary(3.0, 4.0, 500, 2000, 3000, (0.5, 0.6)), _summary(3.0, 4.0, -20, 0, 2000, (0.5, 0.6))
    summary = {phase: {"nodeagent": ours[phase], "envoy": theirs[phase]} for phase in ours}
    result = ratios(summary)
    assert result["added_p50_persistent"]["ratio"] is None and result["added_p50_persistent"]["met"] is None


def test_a_latency_target_with_failed_requests_is_not_met() -> None:
    ours, theirs = _summary(3.0, 4.0, 500, 500, 1000, (0.5, 0.6)), _summary(3.0, 4.0, 1000, 1000, 2000, (0.5, 0.6))
    ours["new_connections"]["errors"] = 3
    summary = {phase: {"nodeagent": ours[phase], "envoy": theirs[phase]} for phase in ours}
    result = ratios(summary)
    assert result["added_p99_new_connections"]["ratio"] == 0.5 and result["added_p99_new_connections"]["met"] is False
    assert result["added_p99_persistent"]["met"] is True
    assert result["failed_requests"]["nodeagent"] == {"persistent": 0, "new_connections": 3}
