"""Endpoint choice: eligibility, weights, ejection and panic, locality, retries on different endpoints."""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.cluster.model import Kind, ObjectRef, Protocol
from nodeagent.state.translation import ServicePortName
from nodeagent.tunnel.resilience.balance import Attempts, Tier, choose
from nodeagent.tunnel.state.service_config import Locality, ServiceConfig
from nodeagent.tunnel.state.services import Candidate, ServiceTarget


def ep(n: int, node: str = "n1", zone: str | None = "z1", *, weight: int = 1, ready: bool = True,
       serving: bool = True, terminating: bool = False) -> Candidate:
    return Candidate((ip_address(f"10.244.0.{n}"), 8080), 8080, node, zone, weight, ready, serving, terminating,
                     ObjectRef(Kind.POD, "shop", f"web-{n}"))


def target(*endpoints: Candidate, locality: Locality = Locality.NONE, **config: Any) -> ServiceTarget:
    return ServiceTarget(ObjectRef(Kind.SERVICE, "shop", "web"), ServicePortName("shop", "web", "http", Protocol.TCP),
                         ServiceConfig(locality=locality, **config), tuple(endpoints))


def names(t: ServiceTarget, draws: int = 2000, seed: int = 1, **kwargs: Any) -> Counter[str]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    for _ in range(draws):
        choice = choose(t, rng, node="n1", zone="z1", **kwargs)
        counts[str(choice.endpoint) if choice else "none"] += 1
    return counts


def test_weights_split_traffic_in_proportion_and_zero_gets_nothing() -> None:
    counts = names(target(ep(1, weight=1), ep(2, weight=3), ep(3, weight=0)), draws=4000)
    assert set(counts) == {"10.244.0.1:8080", "10.244.0.2:8080"}
    assert 0.70 < counts["10.244.0.2:8080"] / 4000 < 0.80


def test_a_blue_green_flip_moves_everything_and_all_zero_is_nothing() -> None:
    assert set(names(target(ep(1, weight=0), ep(2, weight=100)))) == {"10.244.0.2:8080"}
    assert names(target(ep(1, weight=0), ep(2, weight=0))) == {"none": 2000}


def test_not_ready_endpoints_are_skipped_and_terminating_ones_serve_only_when_nothing_is_ready() -> None:
    assert set(names(target(ep(1, ready=False), ep(2)))) == {"10.244.0.2:8080"}
    draining = target(ep(1, ready=False, terminating=True), ep(2, ready=False, serving=False, terminating=True))
    choice = choose(draining, random.Random(0), node="n1", zone="z1")
    assert choice is not None and str(choice.endpoint) == "10.244.0.1:8080" and choice.terminating
    assert choose(target(ep(1, ready=False, serving=False)), random.Random(0), node="n1", zone="z1") is None
    assert choose(target(), random.Random(0), node="n1", zone="z1") is None


def test_ejected_endpoints_are_skipped_until_none_is_left_then_panic_uses_them() -> None:
    a, b = ep(1), ep(2)
    assert set(names(target(a, b), ejected={a.key})) == {"10.244.0.2:8080"}
    choice = choose(target(a, b), random.Random(0), node="n1", zone="z1", ejected={a.key, b.key})
    assert choice is not None and choice.panic
    healthy = choose(target(a, b), random.Random(0), node="n1", zone="z1", ejected={a.key})
    assert healthy is not None and not healthy.panic


def test_exclude_leaves_out_endpoints_already_tried() -> None:
    a, b = ep(1), ep(2)
    assert set(names(target(a, b), exclude={a.key})) == {"10.244.0.2:8080"}
    assert names(target(a, b), exclude={a.key, b.key}) == {"none": 2000}


@pytest.mark.parametrize(("locality", "endpoints", "expected", "tier"), [
    (Locality.NODE, [ep(1, "n1"), ep(2, "n2"), ep(3, "n3", "z2")], {"10.244.0.1:8080"}, Tier.NODE),
    (Locality.NODE, [ep(2, "n2"), ep(3, "n3", "z2")], {"10.244.0.2:8080"}, Tier.ZONE),
    (Locality.NODE, [ep(3, "n3", "z2"), ep(4, "n4", None)], {"10.244.0.3:8080", "10.244.0.4:8080"}, Tier.ANY),
    (Locality.ZONE, [ep(1, "n1"), ep(2, "n2"), ep(3, "n3", "z2")], {"10.244.0.1:8080", "10.244.0.2:8080"}, Tier.ZONE),
    (Locality.ZONE, [ep(3, "n3", "z2")], {"10.244.0.3:8080"}, Tier.ANY),
    (Locality.NONE, [ep(1, "n1"), ep(3, "n3", "z2")], {"10.244.0.1:8080", "10.244.0.3:8080"}, Tier.ANY),
])
def test_locality_prefers_this_node_then_this_zone_then_any(locality: Locality, endpoints: list[Candidate],
                                                            expected: set[str], tier: Tier) -> None:
    t = target(*endpoints, locality=locality)
    assert set(names(t, draws=300)) == expected
    choice = choose(t, random.Random(0), node="n1", zone="z1")
    assert choice is not None and choice.tier is tier


def test_health_comes_before_locality_and_a_node_without_zone_skips_the_zone_tier() -> None:
    local, near = ep(1, "n1"), ep(2, "n2")
    assert set(names(target(local, near, locality=Locality.NODE), ejected={local.key})) == {"10.244.0.2:8080"}
    rng = random.Random(0)
    seen = {str(c.endpoint) for _ in range(200)
            if (c := choose(target(ep(2, "n2"), ep(3, "n3", "z2"), locality=Locality.ZONE), rng, node="n1",
                            zone=None)) is not None}
    assert seen == {"10.244.0.2:8080", "10.244.0.3:8080"}


def test_the_same_seed_gives_the_same_choices() -> None:
    t = target(*(ep(n, weight=n) for n in range(1, 8)))
    assert names(t, draws=50, seed=7) == names(t, draws=50, seed=7)


@given(st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.booleans(), st.booleans(), st.sampled_from(
    ["n1", "n2", "n3"]), st.sampled_from(["z1", "z2", None])), max_size=8),
       st.sets(st.integers(0, 7)), st.sets(st.integers(0, 7)), st.sampled_from(list(Locality)), st.integers(0, 2**32))
def test_a_choice_is_always_an_eligible_endpoint(spec: list[tuple[int, bool, bool, bool, str, str | None]],
                                                 ejected: set[int], excluded: set[int], locality: Locality,
                                                 seed: int) -> None:
    endpoints = [ep(i + 1, node, zone, weight=w, ready=r, serving=s, terminating=t)
                 for i, (w, r, s, t, node, zone) in enumerate(spec)]
    t = target(*endpoints, locality=locality)
    ejected_keys = {endpoints[i].key for i in ejected if i < len(endpoints)}
    excluded_keys = {endpoints[i].key for i in excluded if i < len(endpoints)}
    choice = choose(t, random.Random(seed), node="n1", zone="z1", ejected=ejected_keys, exclude=excluded_keys)
    usable = [e for e in endpoints if e.weight > 0 and e.key not in excluded_keys]
    servable = [e for e in usable if e.ready] or [e for e in usable if e.serving and e.terminating]
    if not servable:
        assert choice is None
        return
    assert choice is not None and choice.endpoint in servable
    assert choice.panic == all(e.key in ejected_keys for e in servable)
    assert choice.panic or choice.endpoint.key not in ejected_keys
    if locality is Locality.NODE and any(e.node == "n1" for e in servable if choice.panic or e.key not in ejected_keys):
        assert choice.endpoint.node == "n1"


def test_attempts_try_different_endpoints_within_the_limit() -> None:
    t = target(ep(1), ep(2), ep(3), ep(4), connect_attempts=3, connect_timeout=9.0)
    attempts = Attempts(t, 100.0, node="n1", zone="z1")
    rng = random.Random(3)
    tried = []
    while (choice := attempts.next(100.0, rng)) is not None:
        tried.append(str(choice.endpoint))
    assert len(tried) == len(set(tried)) == 3
    assert attempts.stop_reason == "3 attempts failed"
    assert "tried=" in repr(attempts)


def test_attempts_share_the_deadline_and_stop_when_it_passes() -> None:
    attempts = Attempts(target(ep(1), ep(2), ep(3), connect_timeout=9.0), 0.0, node="n1", zone="z1")
    rng = random.Random(0)
    assert attempts.next(0.0, rng) is not None and attempts.timeout(0.0) == 3.0
    assert attempts.next(1.0, rng) is not None and attempts.timeout(1.0) == 4.0  # 8 s left for 2 attempts
    assert attempts.next(9.0, rng) is None and "connect timeout (9s)" in attempts.stop_reason
    assert attempts.timeout(10.0) == 0.0


def test_attempts_stop_early_when_no_other_endpoint_can_take_the_connection() -> None:
    one = Attempts(target(ep(1), ep(2, weight=0)), 0.0, node="n1", zone="z1")
    assert one.next(0.0, random.Random(0)) is not None and one.timeout(0.0) == 10.0  # one usable: all the time
    assert one.next(0.0, random.Random(0)) is None and one.stop_reason == "1 attempts failed"
    down = Attempts(target(ep(1, ready=False, serving=False), ep(2)), 0.0, node="n1", zone="z1")
    assert down.next(0.0, random.Random(0)) is not None
    assert down.next(0.0, random.Random(0)) is None and "no other ready or serving endpoint" in down.stop_reason
    empty = Attempts(target(), 0.0, node="n1", zone="z1")
    assert empty.next(0.0, random.Random(0)) is None and empty.stop_reason == "the Service has no endpoints"
    zero = Attempts(target(ep(1, weight=0)), 0.0, node="n1", zone="z1")
    assert zero.next(0.0, random.Random(0)) is None and zero.stop_reason == "every endpoint has weight 0"


def test_attempts_skip_ejected_endpoints_they_are_told_about() -> None:
    a, b = ep(1), ep(2)
    attempts = Attempts(target(a, b), 0.0, node="n1", zone="z1")
    choice = attempts.next(0.0, random.Random(0), ejected={a.key})
    assert choice is not None and choice.endpoint == b and not choice.panic
