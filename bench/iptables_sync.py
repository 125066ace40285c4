"""iptables datapath benchmark, in throwaway network namespaces (root).

For N Services x E endpoints (default 10,000 x 10), per backend:
- full sync: the agent's first sync (jump rules, render, iptables-save for stale chains, restore; on
  iptables-nft in batches) against the reference, a bare `iptables-restore --noflush` of the same
  rules in one go, each into a fresh namespace. The nft reference is quadratic (measured: over
  16 minutes at 10,000), so it runs only up to --nft-reference-max Services.
- one endpoint change -> rules in the kernel: an EndpointSlice update folded into the tracker, the
  snapshot built, the partial sync rendered and restored (minSyncPeriod 0: no rate limiter), p50/p99.
- RSS of this process (the agent's state at that size).

    sudo .venv/bin/python bench/iptables_sync.py                       # 10,000 x 10, legacy and nft
    sudo .venv/bin/python bench/iptables_sync.py --services 1000 --backend nft --json
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodeagent import heap  # noqa: E402
from nodeagent.cluster.decode import decode, object_ref  # noqa: E402
from nodeagent.cluster.discovery.bulk import decode_items  # noqa: E402
from nodeagent.cluster.events import Listed, Upserted  # noqa: E402
from nodeagent.cluster.model import Kind  # noqa: E402
from nodeagent.kernel.netfilter import Iptables, supports_random_fully  # noqa: E402
from nodeagent.observability.logs import configure_logging  # noqa: E402
from nodeagent.service.config import ProxyConfig  # noqa: E402
from nodeagent.service.iptables.proxier import IptablesProxier  # noqa: E402
from nodeagent.service.iptables.render import render  # noqa: E402
from nodeagent.state.tracker import ChangeTracker  # noqa: E402
from tests.support.objects import scale_cluster, scale_slice  # noqa: E402


@contextlib.contextmanager
def scratch_netns() -> Iterator[str]:
    name = f"bench-ipt-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def tracker_for(services: int, endpoints: int) -> ChangeTracker:
    svcs, slices = scale_cluster(services, endpoints)
    tracker = ChangeTracker("node1")
    tracker.apply_all([Listed(Kind.SERVICE, tuple(decode_items(svcs)), "1"),
                       Listed(Kind.ENDPOINT_SLICE, tuple(decode_items(slices)), "1"),
                       *(Listed(kind, (), "1") for kind in Kind if kind not in (Kind.SERVICE, Kind.ENDPOINT_SLICE))])
    return tracker


def run_backend(backend: str, tracker: ChangeTracker, config: ProxyConfig, services: int, endpoints: int,
                changes: int, reference: bool, seed: int, repeats: int) -> dict[str, Any]:
    """Full sync (and its reference) and `changes` endpoint changes; `seed` keeps changes new per run."""
    snapshot = tracker.last()
    assert snapshot is not None
    result: dict[str, Any] = {"backend": backend}
    # Restore times on a shared 2-core machine vary by +-20% from run to run: alternate the two
    # measurements `repeats` times, each into a fresh namespace, and compare medians.
    bare, ours = [], []
    text = render(snapshot.service_ports, snapshot.endpoints, config).text() if reference else ""
    for _ in range(repeats):
        if reference:
            with scratch_netns() as ns:
                started = time.perf_counter()
                Iptables(backend, ns).restore(text)
                bare.append(time.perf_counter() - started)
        with scratch_netns() as ns:
            started = time.perf_counter()
            IptablesProxier(Iptables(backend, ns), sync_period=1e9).sync(snapshot, config, snapshot.changed_services)
            ours.append(time.perf_counter() - started)
    if bare:
        result["bare_restore_s"] = round(statistics.median(bare), 3)
    with scratch_netns() as ns:
        ipt = Iptables(backend, ns)
        proxier = IptablesProxier(ipt, sync_period=1e9)
        report = proxier.sync(snapshot, config, snapshot.changed_services)
        result["full_sync_s"] = round(statistics.median(ours), 3)
        result["full_sync_runs_s"] = [round(x, 2) for x in ours]
        result["bare_restore_runs_s"] = [round(x, 2) for x in bare]
        result["nat_rules"] = len(report.rendered.nat.rules)
        if "bare_restore_s" in result:
            result["full_vs_bare"] = round(result["full_sync_s"] / result["bare_restore_s"], 3)
        latencies = []
        for i in range(changes):
            index = (i * 7919) % services
            changed = scale_slice(index, endpoints)
            k = seed + i
            changed["endpoints"][0]["addresses"] = [f"10.99.{(k >> 8) & 255}.{k & 255}"]
            started = time.perf_counter()
            tracker.apply(Upserted(Kind.ENDPOINT_SLICE, object_ref(changed), decode(changed), str(i)))
            next_snapshot = tracker.snapshot()
            assert next_snapshot is not None
            proxier.sync(next_snapshot, config, next_snapshot.changed_services)
            latencies.append(time.perf_counter() - started)
        if latencies:
            result["change_ms"] = {"p50": round(percentile(latencies, .5) * 1000, 1),
                                   "p99": round(percentile(latencies, .99) * 1000, 1),
                                   "mean": round(statistics.fmean(latencies) * 1000, 1), "n": len(latencies)}
        live = ipt.save("nat")
        k = seed + changes - 1
        assert not changes or f"10.99.{(k >> 8) & 255}.{k & 255}:" in live, "the last change is in the kernel"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--backend", choices=["legacy", "nft", "both"], default="both")
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--nft-reference-max", type=int, default=2000,
                        help="largest Service count at which the (quadratic) one-restore nft reference runs")
    parser.add_argument("--repeats", type=int, default=3, help="full syncs (and bare restores) to take the median of")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging(level="warning")  # results on stdout, problems on stderr
    process = psutil.Process()
    started = time.perf_counter()
    tracker = tracker_for(args.services, args.endpoints)
    snapshot = tracker.snapshot()
    heap.settle()
    ingest_s = time.perf_counter() - started
    config = ProxyConfig(node_name="node1", node_ip=ipaddress.ip_address("172.18.0.2"),
                         cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),), random_fully=supports_random_fully())
    assert snapshot is not None
    results = []
    for n, backend in enumerate(("legacy", "nft") if args.backend == "both" else (args.backend,)):
        reference = backend == "legacy" or args.services <= args.nft_reference_max
        results.append(run_backend(backend, tracker, config, args.services, args.endpoints, args.changes, reference,
                                   seed=n * 1000, repeats=args.repeats))
    report = {"services": args.services, "endpoints_per_service": args.endpoints,
              "state_build_s": round(ingest_s, 2), "rss_mb": round(process.memory_info().rss / 2**20, 1),
              "backends": results}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.services} Services x {args.endpoints} endpoints (state built in {report['state_build_s']} s, "
          f"RSS {report['rss_mb']} MB)")
    for r in results:
        bare = f"{r['bare_restore_s']:.2f} s" if "bare_restore_s" in r else "skipped (quadratic)"
        ratio = f"{r['full_vs_bare']:.2f}x" if "full_vs_bare" in r else "-"
        print(f"  {r['backend']:6} full sync {r['full_sync_s']:.2f} s, bare restore {bare}, ratio {ratio} "
              f"(goal <= 1.2x; medians of {r['full_sync_runs_s']} and {r['bare_restore_runs_s']}); "
              f"{r['nat_rules']} nat rules")
        if "change_ms" in r:
            c = r["change_ms"]
            print(f"  {r['backend']:6} one endpoint change -> kernel: p50 {c['p50']} ms, p99 {c['p99']} ms "
                  f"(n={c['n']}, goal p99 <= 200 ms)")


if __name__ == "__main__":
    main()
