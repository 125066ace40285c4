"""Circuit breaking: limits refuse at once and are counted; slot transitions keep the counts exact."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.tunnel.resilience.circuit import CircuitBreaker, CircuitError, Slot, SlotState


def test_max_pending_connects_refuses_new_connects_until_one_connects() -> None:
    breaker = CircuitBreaker(max_connections=10, max_pending_connects=2)
    first, second = breaker.try_start_pending(), breaker.try_start_pending()
    assert first is not None and second is not None
    assert breaker.try_start_pending() is None
    assert breaker.pending_overflow_total == 1 and breaker.cx_overflow_total == 0
    assert breaker.last_refusal == "circuit breaker: max pending connects (2) reached"
    first.connected()
    assert (breaker.pending, breaker.active) == (1, 1)
    assert breaker.try_start_pending() is not None


def test_max_connections_counts_pending_and_active_and_frees_on_close() -> None:
    breaker = CircuitBreaker(max_connections=2, max_pending_connects=5)
    a, b = breaker.try_start_pending(), breaker.try_start_pending()
    assert a is not None and b is not None
    a.connected()
    assert breaker.refusal() == "circuit breaker: max connections (2) reached"
    assert breaker.try_start_pending() is None and breaker.cx_overflow_total == 1
    a.closed()
    assert breaker.try_start_pending() is not None
    assert "connections=2/2" in repr(breaker)


def test_a_slot_closed_while_pending_counts_a_failed_connect_and_closing_twice_is_harmless() -> None:
    breaker = CircuitBreaker(4, 4)
    slot = breaker.try_start_pending()
    assert slot is not None
    slot.closed()
    slot.closed()
    assert (breaker.pending, breaker.active, breaker.failed_total, breaker.connected_total) == (0, 0, 1, 0)
    assert slot.state is SlotState.CLOSED


@pytest.mark.parametrize("setup", [["connected"], ["closed"], ["connected", "closed"]])
def test_connecting_a_slot_that_is_not_pending_is_an_error_naming_the_state(setup: list[str]) -> None:
    slot = CircuitBreaker(4, 4).try_start_pending()
    assert slot is not None
    for event in setup:
        getattr(slot, event)()
    with pytest.raises(CircuitError, match=f"a {slot.state} slot cannot be connected"):
        slot.connected()


def test_lowering_a_limit_cuts_nothing_open_and_refuses_until_under_it() -> None:
    breaker = CircuitBreaker(4, 4)
    slots = [breaker.try_start_pending() for _ in range(3)]
    breaker.max_connections = 1
    assert breaker.try_start_pending() is None
    for slot in slots:
        assert slot is not None
        slot.closed()
    assert breaker.try_start_pending() is not None


@given(st.integers(1, 5), st.integers(1, 5),
       st.lists(st.tuples(st.sampled_from(["start", "connected", "closed"]), st.integers(0, 20)), max_size=80))
def test_counts_always_equal_the_slots_in_each_state_and_never_exceed_the_limits(
        max_connections: int, max_pending: int, events: list[tuple[str, int]]) -> None:
    breaker = CircuitBreaker(max_connections, max_pending)
    slots: list[Slot] = []
    refused = 0
    for event, index in events:
        if event == "start":
            slot = breaker.try_start_pending()
            if slot is None:
                refused += 1
            else:
                slots.append(slot)
        elif slots:
            slot = slots[index % len(slots)]
            if event == "connected" and slot.state is not SlotState.PENDING:
                with pytest.raises(CircuitError):
                    slot.connected()
            else:
                getattr(slot, event)()
        assert breaker.pending == sum(s.state is SlotState.PENDING for s in slots)
        assert breaker.active == sum(s.state is SlotState.ACTIVE for s in slots)
        assert breaker.pending <= max_pending and breaker.pending + breaker.active <= max_connections
    assert breaker.cx_overflow_total + breaker.pending_overflow_total == refused
