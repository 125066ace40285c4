"""Outlier ejection: threshold, doubling with a cap, decay, the max ejected share, expiry."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nodeagent.tunnel.resilience.outlier import Ejection, OutlierDetector
from nodeagent.tunnel.state.service_config import OutlierConfig

CONFIG = OutlierConfig(consecutive_failures=3, base_ejection_seconds=10.0, max_ejection_seconds=50.0,
                       max_ejected_percent=10)


def fail(detector: OutlierDetector, key: str, now: float, times: int, endpoints: int = 10) -> Ejection | None:
    results = [detector.record_failure(key, now, endpoints) for _ in range(times)]
    assert all(r is None for r in results[:-1])
    return results[-1]


def test_consecutive_failures_eject_for_the_base_time_then_the_endpoint_comes_back() -> None:
    detector = OutlierDetector(CONFIG)
    assert fail(detector, "a", 100.0, 2) is None and detector.ejected(100.0) == frozenset()
    assert detector.record_failure("a", 100.0, 10) == Ejection("a", 110.0, 10.0, 1)
    assert detector.ejected(109.9) == {"a"} and detector.is_ejected("a", 105.0)
    assert detector.ejected(110.0) == frozenset()
    assert detector.ejections_total == 1


def test_a_success_resets_the_consecutive_count() -> None:
    detector = OutlierDetector(CONFIG)
    fail(detector, "a", 0.0, 2)
    detector.record_success("a", 0.0)
    assert fail(detector, "a", 0.0, 2) is None
    assert detector.record_failure("a", 0.0, 10) is not None


def test_each_further_ejection_doubles_up_to_the_cap() -> None:
    detector = OutlierDetector(CONFIG)
    now, lengths = 0.0, []
    for _ in range(5):
        ejection = fail(detector, "a", now, 3)
        assert ejection is not None
        lengths.append(ejection.seconds)
        now = ejection.until  # fails again the moment it is back
    assert lengths == [10.0, 20.0, 40.0, 50.0, 50.0]


def test_time_back_in_service_lowers_the_multiplier() -> None:
    detector = OutlierDetector(CONFIG)
    for now in (0.0, 10.0, 30.0):  # ejected three times back to back: 10, 20, 40 s
        assert fail(detector, "a", now, 3) is not None
    # back at 70; 25 s later (two base periods) the next ejection is the second again, not the fourth
    ejection = fail(detector, "a", 95.0, 3)
    assert ejection is not None and (ejection.nth, ejection.seconds) == (2, 20.0)
    ejection = fail(detector, "a", 1000.0, 3)
    assert ejection is not None and (ejection.nth, ejection.seconds) == (1, 10.0)


def test_at_most_the_max_share_is_ejected_but_always_one() -> None:
    detector = OutlierDetector(CONFIG)
    assert fail(detector, "a", 0.0, 3, endpoints=3) is not None  # 10% of 3 endpoints: still one
    assert fail(detector, "b", 0.0, 3, endpoints=3) is None
    assert detector.overflow_total == 1 and detector.ejected(0.0) == {"a"}
    assert detector.record_failure("b", 0.0, 3) is None and detector.overflow_total == 2  # tried at every failure
    assert detector.record_failure("b", 10.0, 3) is not None  # "a" came back at 10: room again
    wide = OutlierDetector(CONFIG)
    assert [fail(wide, k, 0.0, 3, endpoints=20) is not None for k in "abc"] == [True, True, False]


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    detector = OutlierDetector(CONFIG)
    fail(detector, "a", 0.0, 3)
    assert fail(detector, "a", 5.0, 10) is None
    assert detector.ejected(10.0) == frozenset()


def test_zero_consecutive_failures_turns_ejection_off_and_config_can_change() -> None:
    detector = OutlierDetector(OutlierConfig(consecutive_failures=0))
    assert fail(detector, "a", 0.0, 100) is None
    detector.config = CONFIG
    assert fail(detector, "a", 0.0, 3) is not None


def test_retain_forgets_endpoints_that_left() -> None:
    detector = OutlierDetector(CONFIG)
    fail(detector, "a", 0.0, 3)
    fail(detector, "b", 0.0, 1)
    detector.retain({"b"})
    assert detector.ejected(0.0) == frozenset()
    assert fail(detector, "b", 0.0, 2) is not None  # b's count was kept
    assert "tracked=1 ejected=1" in repr(detector)


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.booleans(), st.floats(0, 30)), max_size=200),
       st.integers(1, 100), st.integers(1, 8))
def test_the_ejected_set_never_exceeds_the_share_and_matches_the_ejections_made(
        events: list[tuple[str, bool, float]], percent: int, threshold: int) -> None:
    config = OutlierConfig(consecutive_failures=threshold, base_ejection_seconds=5.0, max_ejection_seconds=40.0,
                           max_ejected_percent=percent)
    detector, endpoints, now = OutlierDetector(config), 8, 0.0
    until: dict[str, float] = {}
    for key, ok, step in events:
        now += step
        if ok:
            detector.record_success(key, now)
        else:
            ejection = detector.record_failure(key, now, endpoints)
            if ejection is not None:
                assert until.get(key, 0.0) <= now, "ejected twice at once"
                assert 5.0 <= ejection.seconds <= 40.0 and ejection.until == now + ejection.seconds
                until[key] = ejection.until
        ejected = detector.ejected(now)
        assert ejected == {k for k, u in until.items() if u > now}
        assert len(ejected) <= max(1, percent * endpoints // 100)
