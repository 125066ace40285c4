"""The open-loop generator's schedule and accounting (bench/openloop.py): latency counts from the due time."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.openloop import Outcome, _Pipelined, due_ns, measured_range, percentiles, summarize

MS = 1_000_000


def test_request_k_is_due_at_start_plus_k_over_rate() -> None:
    assert due_ns(5 * MS, 0, 1000.0) == 5 * MS
    assert due_ns(5 * MS, 1500, 1000.0) == 5 * MS + 1500 * MS
    assert due_ns(0, 3, 300.0) == 10 * MS  # 3/300 s, no drift from adding a rounded step each time


def test_the_measured_window_follows_the_warmup() -> None:
    assert measured_range(300.0, 1.0, 8.0) == range(300, 2700)
    assert len(measured_range(1000.0, 0.5, 3.0)) == 3000


def test_latency_counts_from_the_due_time_not_the_send() -> None:
    # Sent 5 ms late (the path or the generator stalled), answered 1 ms after the send: 6 ms of latency.
    summary = summarize([Outcome(due=0, sent=5 * MS, completed=6 * MS)], seconds=1.0)
    assert summary["latency_us"]["p50"] == 6000.0
    assert summary["service_us"]["p50"] == 1000.0
    assert summary["lateness_us"]["p50"] == 5000.0


def test_failed_requests_are_counted_apart_from_the_latencies() -> None:
    outcomes = [Outcome(0, 0, 2 * MS), Outcome(MS, MS, error="ConnectionRefusedError"), Outcome(2 * MS, 2 * MS)]
    outcomes[2].error = "Timeout"
    summary = summarize(outcomes, seconds=1.0)
    assert (summary["scheduled"], summary["completed"], summary["errors"]) == (3, 1, 2)
    assert summary["errors_by_kind"] == {"ConnectionRefusedError": 1, "Timeout": 1}
    assert summary["latency_us"]["max"] == 2000.0


def test_percentiles_are_nearest_rank_in_microseconds() -> None:
    samples = [k * 1000 for k in range(1, 101)]  # 1..100 µs
    p = percentiles(samples)
    assert (p["p50"], p["p99"], p["max"], p["mean"]) == (51.0, 100.0, 100.0, 50.5)
    assert percentiles([]) == {}


class _Transport:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data


def test_pipelined_answers_complete_their_requests_in_order_across_chunk_boundaries() -> None:
    async def scenario() -> tuple[list[Outcome], Any]:
        client = _Pipelined(4)
        transport = _Transport()
        client.connection_made(transport)  # type: ignore[arg-type]
        outcomes = [Outcome(0, 0), Outcome(1, 1)]
        client.send(None)  # a warm-up request: answered, not recorded
        client.send(outcomes[0])
        client.send(outcomes[1])  # written before the earlier answers arrived
        client.data_received(b"rrrrrr")  # the warm-up answer and half of the next
        assert outcomes[0].completed == 0
        client.data_received(b"rr")
        assert outcomes[0].completed and not outcomes[1].completed
        client.data_received(b"rr")
        client.connection_lost(None)  # the last request lost its answer
        return outcomes, transport.written

    outcomes, written = asyncio.run(scenario())
    assert written == b"E\x00\x00\x00\x04" + b"q" * 12
    assert outcomes[0].completed and not outcomes[0].error
    assert not outcomes[1].completed and outcomes[1].error == "ClosedBeforeAnswer"
