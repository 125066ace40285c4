"""Choosing the endpoint for one connection to a Service, and retrying on different ones. Pure.

`choose()` picks among a `ServiceTarget`'s candidates, in this order:
1. eligible: weight above 0 (weight 0 is never chosen: a blue/green `{"blue": 1, "green": 0}` flip sends
   nothing to green) and not in `exclude` (endpoints this connection already tried);
2. ready ones; if none is ready, serving-terminating ones (kube-proxy's fallback, so a rollout's last
   pods keep serving until they stop);
3. not ejected by the outlier detector. If every one left is ejected, choose among them anyway and say
   so (`Choice.panic`): Envoy's panic mode, with the threshold at "nothing healthy left" rather than
   Envoy's 50% healthy, because `max_ejected_percent` already bounds what ejection takes away, and at 50%
   a two-endpoint Service could never route around its broken half;
4. closest first when the Service asks (`Locality`): same node, then same zone, then any (`node`); same
   zone, then any (`zone`). An endpoint or node without a zone label is in no zone;
5. weighted random among what is left, with the injected `random.Random`.
It returns None when nothing is eligible; the caller refuses the connection (HBONE 503, or a reset).

`Attempts` runs one captured connection's connects: up to `connect_attempts` endpoints, each different,
all within `connect_timeout` of the connection's arrival; each attempt gets an even share of what is
left of that time (`timeout()`), so one black-holed endpoint cannot use up the whole budget. Wiring:

    attempts = Attempts(target, now(), node=table.node, zone=table.zone)
    while (choice := attempts.next(now(), rng, ejected=detector.ejected(now()))) is not None:
        try:
            connect to choice.endpoint within attempts.timeout(now())
        except failure:
            detector.record_failure(choice.endpoint.key, now(), len(target.endpoints)); continue
        detector.record_success(choice.endpoint.key, now()); break
    else: refuse with attempts.stop_reason
"""

from __future__ import annotations

import random
from collections.abc import Container, Hashable, Sequence
from enum import StrEnum
from typing import NamedTuple

from nodeagent.tunnel.state.service_config import Locality
from nodeagent.tunnel.state.services import Candidate, ServiceTarget

_NOTHING: frozenset[Hashable] = frozenset()


class Tier(StrEnum):
    """How close the chosen endpoint is to this node, as far as the Service's locality preference looked."""

    NODE = "node"
    ZONE = "zone"
    ANY = "any"


class Choice(NamedTuple):
    """The endpoint chosen for one attempt, and how it was chosen (for logs and metrics).

    A named tuple: one is made per connection, at a sixth of a frozen dataclass's cost.
    """

    endpoint: Candidate
    tier: Tier
    panic: bool = False  # every eligible endpoint was ejected: chosen among the ejected ones
    terminating: bool = False  # no ready endpoint: chosen among serving-terminating ones


def choose(target: ServiceTarget, rng: random.Random, *, node: str, zone: str | None,
           ejected: Container[Hashable] = _NOTHING, exclude: Container[Hashable] = _NOTHING) -> Choice | None:
    """The endpoint for one connect to `target` (see the module docstring), or None if none is eligible."""
    # (list passes over namedtuples, fast paths for the common case: this runs for every connection)
    usable = [c for c in target.endpoints if c.key not in exclude] if exclude else target.endpoints
    pool = [c for c in usable if c.ready and c.weight]
    terminating = not pool
    if terminating:
        pool = [c for c in usable if c.serving and c.terminating and c.weight]
        if not pool:
            return None
    healthy = [c for c in pool if c.key not in ejected] if ejected else pool
    panic = not healthy
    if panic:
        healthy = pool
    tier, closest = _closest(healthy, target.config.locality, node, zone)
    return Choice(_weighted(closest, rng, target.weighted), tier, panic, terminating)


# enum members read through the class cost a dictionary walk each; these are read per connection
_NODE, _NONE = Locality.NODE, Locality.NONE
_TIER_NODE, _TIER_ZONE, _TIER_ANY = Tier.NODE, Tier.ZONE, Tier.ANY


def _closest(candidates: Sequence[Candidate], locality: Locality, node: str,
             zone: str | None) -> tuple[Tier, Sequence[Candidate]]:
    if locality is _NONE:
        return _TIER_ANY, candidates
    if locality is _NODE:
        same_node = [c for c in candidates if c.node == node]
        if same_node:
            return _TIER_NODE, same_node
    if zone is not None:
        same_zone = [c for c in candidates if c.zone == zone]
        if same_zone:
            return _TIER_ZONE, same_zone
    return _TIER_ANY, candidates


def _weighted(candidates: Sequence[Candidate], rng: random.Random, weighted: bool) -> Candidate:
    count = len(candidates)
    if count == 1:
        return candidates[0]
    if not weighted:  # every weight is 1
        return candidates[min(int(rng.random() * count), count - 1)]
    point = rng.random() * sum([c.weight for c in candidates])
    for candidate in candidates:
        point -= candidate.weight
        if point < 0:
            return candidate
    return candidates[-1]  # only reached through rounding at the very top of the range


class Attempts:
    """The connects of one captured connection: different endpoints, one deadline (module docstring)."""

    def __init__(self, target: ServiceTarget, now: float, *, node: str, zone: str | None) -> None:
        self.target, self.node, self.zone = target, node, zone
        self.deadline = now + target.config.connect_timeout
        self.tried: list[Candidate] = []
        self.stop_reason = ""
        # attempts cannot outnumber the endpoints that could ever be chosen
        self._limit = min(target.config.connect_attempts, sum(1 for c in target.endpoints if c.weight > 0))

    def __repr__(self) -> str:
        return (f"<Attempts service={self.target.service.key} tried={[str(c) for c in self.tried]} "
                f"limit={self._limit} stop={self.stop_reason!r}>")

    def next(self, now: float, rng: random.Random, *, ejected: Container[Hashable] = _NOTHING) -> Choice | None:
        """The endpoint for the next attempt, or None (and `stop_reason` says why) when there is none."""
        if not self.target.endpoints:
            self.stop_reason = "the Service has no endpoints"
        elif len(self.tried) >= self._limit:
            self.stop_reason = (f"{len(self.tried)} attempts failed" if self.tried
                                else "every endpoint has weight 0")
        elif now >= self.deadline:
            self.stop_reason = f"connect timeout ({self.target.config.connect_timeout:g}s) reached"
        else:
            choice = choose(self.target, rng, node=self.node, zone=self.zone, ejected=ejected,
                            exclude={c.key for c in self.tried})
            if choice is not None:
                self.tried.append(choice.endpoint)
                return choice
            self.stop_reason = ("no ready or serving endpoint left" if not self.tried
                                else f"no other ready or serving endpoint after {len(self.tried)} attempts")
        return None

    def timeout(self, now: float) -> float:
        """Seconds the current attempt may take: an even share of what is left before the deadline."""
        left = max(1, self._limit - len(self.tried) + 1)
        return max(0.0, self.deadline - now) / left
