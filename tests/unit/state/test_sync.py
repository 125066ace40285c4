"""The rate-limited sync runner: kube-proxy's minSyncPeriod / syncPeriod semantics."""

from __future__ import annotations

import threading

import pytest

from nodeagent.state.sync import SyncRunner, SyncSchedule


def test_schedule_runs_first_sync_at_once_then_bounds_frequency() -> None:
    schedule = SyncSchedule(min_interval=1.0, max_interval=30.0)
    assert schedule.delay(now=100.0, last_run=None, requested=False) == 0
    assert schedule.delay(now=100.2, last_run=100.0, requested=True) == pytest.approx(0.8)
    assert schedule.delay(now=101.5, last_run=100.0, requested=True) == 0
    assert schedule.delay(now=101.5, last_run=100.0, requested=False) == pytest.approx(28.5)
    assert schedule.delay(now=131.0, last_run=100.0, requested=False) == 0


def test_schedule_rejects_impossible_periods_with_the_flag_names() -> None:
    with pytest.raises(ValueError, match="min-sync-period"):
        SyncSchedule(min_interval=5, max_interval=1)
    with pytest.raises(ValueError, match="sync-period"):
        SyncSchedule(min_interval=0, max_interval=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_runner_coalesces_requests_until_min_interval_has_passed() -> None:
    clock = FakeClock()
    ran = threading.Semaphore(0)
    runner = SyncRunner(ran.release, SyncSchedule(min_interval=1.0, max_interval=30.0), clock=clock)
    runner.start()
    try:
        assert ran.acquire(timeout=5), "the first sync runs at once"
        for _ in range(10):
            runner.request()
        # the fake clock has not moved: min_interval has not passed, so nothing may run
        assert not ran.acquire(timeout=0.2)
        clock.now += 1.0
        runner.request()  # wakes the runner to look at the clock again
        assert ran.acquire(timeout=5)
        assert not ran.acquire(timeout=0.2), "ten requests made one sync"
    finally:
        runner.stop()
    assert runner.runs == 2


def test_runner_retries_a_failed_sync() -> None:
    attempts: list[int] = []
    done = threading.Event()

    def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("iptables-restore failed")
        done.set()

    runner = SyncRunner(flaky, SyncSchedule(min_interval=0.0, max_interval=30.0)).start()
    try:
        assert done.wait(5)
    finally:
        runner.stop()
    assert runner.failures == 1 and len(attempts) == 2
