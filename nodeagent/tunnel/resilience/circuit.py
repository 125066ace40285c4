"""Circuit breaking per Service: a cap on connects in progress and on connections, refused at once beyond
it (Envoy's max_pending_requests and max_connections thresholds). Pure bookkeeping, no clock needed.

Each captured connection to a Service takes a `Slot` before its first connect attempt and gives it back
when it ends; the slot's state machine keeps the counts right whatever path the connection takes:

    slot = breaker.try_start_pending()     # None: refused (breaker.last_refusal says which limit)
    if slot is None: refuse
    try:
        connect (all attempts)             # the slot stays PENDING across retries
        slot.connected()                   # PENDING -> ACTIVE
        relay bytes
    finally:
        slot.closed()                      # PENDING or ACTIVE -> CLOSED; again on CLOSED is a no-op

A connection counts against `max_connections` from its first connect (pending or active, as an Envoy
upstream connection counts from when it is being established), and against `max_pending_connects`
while it is connecting. Lowering a limit never cuts what is open; it only refuses new connections until
the counts are back under it. Single-threaded (the tunnel's event loop); no locking.
"""

from __future__ import annotations

from enum import StrEnum

from nodeagent.errors import NodeAgentError


class CircuitError(NodeAgentError):
    """A slot was moved by an event its state has no transition for (a wiring bug): names both."""


class SlotState(StrEnum):
    """Where one connection is, as far as the breaker counts it."""

    PENDING = "PENDING"  # connecting (any attempt)
    ACTIVE = "ACTIVE"  # connected, relaying
    CLOSED = "CLOSED"  # done; counts nowhere


# (state, event) -> next state. Invariants: breaker.pending == number of PENDING slots, breaker.active ==
# number of ACTIVE slots; CLOSED is final and closing it again changes nothing (so `finally` may close).
TRANSITIONS: dict[tuple[SlotState, str], SlotState] = {
    (SlotState.PENDING, "connected"): SlotState.ACTIVE,
    (SlotState.PENDING, "closed"): SlotState.CLOSED,  # every attempt failed, or the client left
    (SlotState.ACTIVE, "closed"): SlotState.CLOSED,
    (SlotState.CLOSED, "closed"): SlotState.CLOSED,
}


class CircuitBreaker:
    """The limits and counts of one Service; assign the limits when the Service's config changes."""

    def __init__(self, max_connections: int, max_pending_connects: int) -> None:
        self.max_connections = max_connections
        self.max_pending_connects = max_pending_connects
        self.pending = 0
        self.active = 0
        self.last_refusal = ""
        self.cx_overflow_total = 0  # refused by max_connections (Envoy upstream_cx_overflow)
        self.pending_overflow_total = 0  # refused by max_pending_connects (Envoy upstream_rq_pending_overflow)
        self.connected_total = 0
        self.failed_total = 0  # slots closed while pending: no attempt connected

    def __repr__(self) -> str:
        return (f"<CircuitBreaker pending={self.pending}/{self.max_pending_connects} "
                f"connections={self.pending + self.active}/{self.max_connections} "
                f"refused={self.cx_overflow_total + self.pending_overflow_total}>")

    def refusal(self) -> str:
        """Why a new connection would be refused now ("" if it would not)."""
        if self.pending + self.active >= self.max_connections:
            return f"circuit breaker: max connections ({self.max_connections}) reached"
        if self.pending >= self.max_pending_connects:
            return f"circuit breaker: max pending connects ({self.max_pending_connects}) reached"
        return ""

    def try_start_pending(self) -> Slot | None:
        """A PENDING slot for a new connection, or None (counted, `last_refusal` set) beyond a limit."""
        reason = self.refusal()
        if reason:
            self.last_refusal = reason
            if self.pending + self.active >= self.max_connections:
                self.cx_overflow_total += 1
            else:
                self.pending_overflow_total += 1
            return None
        self.pending += 1
        return Slot(self)


class Slot:
    """One connection's place in its Service's breaker (see the module docstring for the states)."""

    __slots__ = ("_breaker", "state")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self.state = SlotState.PENDING

    def __repr__(self) -> str:
        return f"<Slot {self.state}>"

    def connected(self) -> None:
        """An attempt connected: PENDING -> ACTIVE."""
        self._move("connected")
        self._breaker.pending -= 1
        self._breaker.active += 1
        self._breaker.connected_total += 1

    def closed(self) -> None:
        """The connection is over (or never connected): its slot is free. Idempotent."""
        before = self.state
        self._move("closed")
        if before is SlotState.PENDING:
            self._breaker.pending -= 1
            self._breaker.failed_total += 1
        elif before is SlotState.ACTIVE:
            self._breaker.active -= 1

    def _move(self, event: str) -> None:
        after = TRANSITIONS.get((self.state, event))
        if after is None:
            raise CircuitError(f"a {self.state} slot cannot be {event}")
        self.state = after
