"""Endpoint choice benchmark: what the tunnel's pure logic costs per captured connection.

With N Services x E endpoints (default 10,000 x 10) in a snapshot, nodes in two zones, every Service
asking for zone locality and one Service in ten with an ejected endpoint:
- the Service table's full build (`service_table`), and its incremental update after one endpoint
  change (`ServiceTable.updated`), p50/p99;
- per connection, each call timed alone over many calls to random Services, p50/p99/mean in µs:
  `lookup+choose` (table lookup, the outlier detector's ejected set, `choose`), `attempts` (lookup,
  `Attempts`, first `next` and its `timeout`), `authz` (`Authorizer.check` with 50 policies around),
  `breaker` (a circuit breaker slot taken, connected and closed).
No sockets: this is the decision cost the tunnel adds before it dials.

    .venv/bin/python bench/endpoint_choice.py
    .venv/bin/python bench/endpoint_choice.py --services 1000 --calls 20000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodeagent import heap  # noqa: E402
from nodeagent.ca.identity import SpiffeId  # noqa: E402
from nodeagent.cluster.decode import decode, object_ref  # noqa: E402
from nodeagent.cluster.events import Listed, Upserted  # noqa: E402
from nodeagent.cluster.model import Kind, ObjectRef  # noqa: E402
from nodeagent.state.tracker import ChangeTracker, Snapshot  # noqa: E402
from nodeagent.tunnel.resilience.balance import Attempts, choose  # noqa: E402
from nodeagent.tunnel.resilience.circuit import CircuitBreaker  # noqa: E402
from nodeagent.tunnel.resilience.outlier import OutlierDetector  # noqa: E402
from nodeagent.tunnel.state.authz import Authorizer, AuthzRequest  # noqa: E402
from nodeagent.tunnel.state.services import ServiceTable, service_table  # noqa: E402
from tests.support.objects import node, scale_cluster, scale_slice  # noqa: E402

NODE = "node1"


def listed(kind: Kind, raws: list[dict[str, Any]]) -> Listed:
    return Listed(kind, tuple((object_ref(r), decode(r)) for r in raws), "1")


def cluster(services: int, endpoints: int) -> ChangeTracker:
    """The benchmark's cluster: `scale_cluster` asking for zone locality, 3 nodes in 2 zones, 50 policies."""
    svcs, slices = scale_cluster(services, endpoints)
    for raw in svcs:
        raw["spec"]["trafficDistribution"] = "PreferClose"
    nodes = [node(f"node{i}", f"172.18.0.{2 + i}", f"10.244.{i}.0/24") for i in range(3)]
    for i, raw in enumerate(nodes):
        raw["metadata"]["labels"] = {"topology.kubernetes.io/zone": f"zone-{i % 2}"}
    policies = [{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                 "metadata": {"name": f"p{i}", "namespace": "bench" if i % 5 == 0 else f"ns{i}"},
                 "spec": {"action": "DENY" if i % 2 else "ALLOW",
                          "selector": {"matchLabels": {"app": f"svc-{i}"}} if i % 3 else None,
                          "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/x{i}/sa/*"]}}],
                                     "to": [{"operation": {"ports": ["8080"]}}]}]}} for i in range(50)]
    for policy in policies:
        if policy["spec"]["selector"] is None:
            del policy["spec"]["selector"]
    tracker = ChangeTracker(NODE)
    tracker.apply_all([listed(Kind.SERVICE, svcs), listed(Kind.ENDPOINT_SLICE, slices), listed(Kind.NODE, nodes),
                       listed(Kind.AUTHORIZATION_POLICY, policies),
                       *(Listed(k, (), "1") for k in (Kind.POD, Kind.NAMESPACE, Kind.PEER_AUTHENTICATION))])
    return tracker


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] / 1000, 2)

    return {"p50": at(0.5), "p99": at(0.99), "mean": round(statistics.fmean(ordered) / 1000, 2)}


def timed(calls: int, one: Callable[[int], object]) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for i in range(calls):
        started = clock()
        one(i)
        samples.append(clock() - started)
    return samples


def run(services: int, endpoints: int, calls: int, changes: int, seed: int) -> dict[str, Any]:
    tracker = cluster(services, endpoints)
    snapshot = tracker.snapshot()
    assert snapshot is not None
    heap.settle()  # as the agent does once the initial state is in
    started = time.perf_counter()
    table = service_table(snapshot)
    build_s = time.perf_counter() - started
    assert len(table) == services, len(table)

    table, update_ms = update_times(tracker, table, changes, seed)
    snapshot = tracker.last()
    assert snapshot is not None
    rng = random.Random(seed)
    now = 1000.0
    detectors: dict[ObjectRef, OutlierDetector] = {}
    frontends = [(f"10.96.{(i >> 8) & 255}.{i & 255}", 80) for i in range(services)]
    for ip, port in frontends:
        target = table.lookup(ip, port)
        assert target is not None
        detector = detectors[target.service] = OutlierDetector(target.config.outlier)
        if rng.random() < 0.1:
            for _ in range(target.config.outlier.consecutive_failures):
                detector.record_failure(target.endpoints[0].key, now, len(target.endpoints))
    picks = [frontends[rng.randrange(services)] for _ in range(calls)]
    zone = table.zone

    def lookup_choose(i: int) -> object:
        target = table.lookup(*picks[i])
        assert target is not None
        return choose(target, rng, node=NODE, zone=zone, ejected=detectors[target.service].ejected(now))

    def attempts(i: int) -> object:
        target = table.lookup(*picks[i])
        assert target is not None
        plan = Attempts(target, now, node=NODE, zone=zone)
        choice = plan.next(now, rng, ejected=detectors[target.service].ejected(now))
        return choice, plan.timeout(now)

    authorizer = Authorizer.from_snapshot(snapshot)
    source = SpiffeId("cluster.local", "client", "default")
    requests = [AuthzRequest("bench", {"app": f"svc-{i}"}, "10.244.2.2", 8080, source, "10.244.1.5")
                for i in range(services)]

    def authz(i: int) -> object:
        return authorizer.check(requests[i % services])

    breaker = CircuitBreaker(1024, 1024)

    def slot(i: int) -> object:
        taken = breaker.try_start_pending()
        assert taken is not None
        taken.connected()
        taken.closed()
        return taken

    results = {name: percentiles(timed(calls, one)) for name, one in (
        ("lookup_choose_us", lookup_choose), ("attempts_us", attempts), ("authz_us", authz), ("breaker_us", slot))}
    return {"services": services, "endpoints": endpoints, "calls": calls, "changes": changes,
            "table_build_s": round(build_s, 3), "table_update_ms": update_ms, **results,
            "python": sys.version.split()[0], "cpus": os.cpu_count()}


def update_times(tracker: ChangeTracker, table: ServiceTable, changes: int,
                 seed: int) -> tuple[ServiceTable, dict[str, float]]:
    """One endpoint change at a time: tracker -> snapshot -> `ServiceTable.updated`, the last step timed."""
    samples = []
    rng = random.Random(seed)
    services = len(table)
    for i in range(changes):
        index = rng.randrange(services)
        raw = scale_slice(index)
        raw["endpoints"][0]["addresses"] = [f"10.99.{i >> 8 & 255}.{i & 255}"]
        tracker.apply(Upserted(Kind.ENDPOINT_SLICE, object_ref(raw), decode(raw), ""))
        snapshot: Snapshot | None = tracker.snapshot()
        assert snapshot is not None
        started = time.perf_counter_ns()
        table = table.updated(snapshot)
        samples.append(time.perf_counter_ns() - started)
        target = table.lookup(f"10.96.{(index >> 8) & 255}.{index & 255}", 80)
        assert target is not None and any(str(c.ip) == raw["endpoints"][0]["addresses"][0] for c in target.endpoints)
    if not samples:
        return table, {}
    in_us = percentiles(samples)
    return table, {key: round(value / 1000, 3) for key, value in in_us.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args()
    result = run(args.services, args.endpoints, args.calls, args.changes, args.seed)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['services']} Services x {result['endpoints']} endpoints, {result['calls']} calls each "
          f"(python {result['python']}, {result['cpus']} CPUs)")
    print(f"  table build            {result['table_build_s']:8.3f} s")
    if result["table_update_ms"]:
        print(f"  table update (1 change) p50 {result['table_update_ms']['p50']:7.3f} ms  "
              f"p99 {result['table_update_ms']['p99']:7.3f} ms")
    for key, label in (("lookup_choose_us", "lookup + choose"), ("attempts_us", "lookup + Attempts.next"),
                       ("authz_us", "authz check"), ("breaker_us", "breaker slot")):
        print(f"  {label:22} p50 {result[key]['p50']:7.2f} µs  p99 {result[key]['p99']:7.2f} µs  "
              f"mean {result[key]['mean']:7.2f} µs")


if __name__ == "__main__":
    main()
