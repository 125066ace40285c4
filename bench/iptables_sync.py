"""iptables datapath benchmark, in throwaway network namespaces (root).

For N Services x E endpoints (default 10,000 x 10), per backend:
- full sync: the agent's first sync (jump rules, render, iptables-save for stale chains, restore; on
  iptables-nft in batches) against the reference, a bare `iptables-restore --noflush` of the same
  rules in one go, each into a fresh namespace. The nft reference is quadratic (measured: over
  16 minutes at 10,000), so it runs only up to --nft-reference-max Services.
- one endpoint change -> rules in the kernel: an EndpointSlice update folded into the tracker, the
  snapshot built, the partial sync rendered and restored (minSyncPeriod 0: no rate limiter), p50/p99.
- RSS of this process (the agent's state at that size).

With --dual-stack every Service is PreferDualStack (an IPv4 and an IPv6 cluster IP, an IPv4 and an IPv6
EndpointSlice of E endpoints each) and a full sync is the agent's: the IPv4 proxier's sync, then the IPv6
proxier's (ip6tables of the same backend), against the bare restores of the same rules (iptables-restore, then
ip6tables-restore), each pair into a fresh namespace; an endpoint change is one of the IPv6 slice, synced by
both proxiers as the agent does (the IPv4 one finds nothing to write).

    sudo .venv/bin/python bench/iptables_sync.py                       # 10,000 x 10, legacy and nft
    sudo .venv/bin/python bench/iptables_sync.py --services 1000 --backend nft --json
    sudo .venv/bin/python bench/iptables_sync.py --dual-stack --backend legacy --json
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
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


def dual_stack_cluster(services: int, endpoints: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`scale_cluster` made dual-stack as kube-apiserver and the EndpointSlice controller would: each Service
    PreferDualStack with an IPv6 cluster IP after its IPv4 one, and an IPv6 slice beside its IPv4 slice."""
    svcs, slices = scale_cluster(services, endpoints)
    for i, svc in enumerate(svcs):
        spec = svc["spec"]
        spec["clusterIPs"] = [spec["clusterIP"], f"fd00:10:96::{i:x}"]
        spec["ipFamilies"], spec["ipFamilyPolicy"] = ["IPv4", "IPv6"], "PreferDualStack"
    return svcs, slices + [ipv6_slice(i, endpoints) for i in range(services)]


def ipv6_slice(i: int, endpoints: int, first: str | None = None) -> dict[str, Any]:
    """The IPv6 EndpointSlice of Service `svc-{i}` (its first address `first` when given)."""
    body = scale_slice(i, endpoints)
    body["metadata"]["name"] = f"svc-{i}-v6xyz"
    body["addressType"] = "IPv6"
    for j, endpoint in enumerate(body["endpoints"]):
        endpoint["addresses"] = [f"fd00:{100 + j:x}::{i:x}"]
    if first is not None:
        body["endpoints"][0]["addresses"] = [first]
    return body


def tracker_for(services: int, endpoints: int, dual_stack: bool = False) -> ChangeTracker:
    svcs, slices = (dual_stack_cluster if dual_stack else scale_cluster)(services, endpoints)
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


def run_dual_stack(backend: str, tracker: ChangeTracker, configs: dict[int, ProxyConfig], services: int,
                   endpoints: int, changes: int, reference: bool, seed: int, repeats: int) -> dict[str, Any]:
    """Full sync of both families (IPv4 proxier, then IPv6) against iptables-restore + ip6tables-restore of the
    same rules, alternated `repeats` times into fresh namespaces; then `changes` IPv6 endpoint changes."""
    snapshot = tracker.last()
    assert snapshot is not None
    result: dict[str, Any] = {"backend": backend, "families": ["IPv4", "IPv6"]}
    texts = {family: render(snapshot.service_ports, snapshot.endpoints, config).text() if reference else ""
             for family, config in configs.items()}
    bare, ours = [], []
    for _ in range(repeats):
        if reference:
            with scratch_netns() as ns:
                started = time.perf_counter()
                for family in (4, 6):
                    Iptables(backend, ns, ipv6=family == 6).restore(texts[family])
                bare.append(time.perf_counter() - started)
        with scratch_netns() as ns:
            started = time.perf_counter()
            for family in (4, 6):
                IptablesProxier(Iptables(backend, ns, ipv6=family == 6), sync_period=1e9).sync(
                    snapshot, configs[family], snapshot.changed_services)
            ours.append(time.perf_counter() - started)
    result["full_sync_s"] = round(statistics.median(ours), 3)
    result["full_sync_runs_s"] = [round(x, 2) for x in ours]
    result["bare_restore_runs_s"] = [round(x, 2) for x in bare]
    if bare:
        result["bare_restore_s"] = round(statistics.median(bare), 3)
        result["full_vs_bare"] = round(result["full_sync_s"] / result["bare_restore_s"], 3)
    with scratch_netns() as ns:
        tables = {family: Iptables(backend, ns, ipv6=family == 6) for family in (4, 6)}
        proxiers = {family: IptablesProxier(tables[family], sync_period=1e9) for family in (4, 6)}
        for family in (4, 6):
            report = proxiers[family].sync(snapshot, configs[family], snapshot.changed_services)
            result[f"nat_rules_ipv{family}"] = len(report.rendered.nat.rules)
        latencies = []
        for i in range(changes):
            index = (i * 7919) % services
            k = seed + i
            changed = ipv6_slice(index, endpoints, first=f"fd00:99::{k:x}")
            started = time.perf_counter()
            tracker.apply(Upserted(Kind.ENDPOINT_SLICE, object_ref(changed), decode(changed), str(i)))
            next_snapshot = tracker.snapshot()
            assert next_snapshot is not None
            for family in (4, 6):  # as the agent: each family's proxier syncs the changed Services
                proxiers[family].sync(next_snapshot, configs[family], next_snapshot.changed_services)
            latencies.append(time.perf_counter() - started)
        if latencies:
            result["change_ms"] = {"p50": round(percentile(latencies, .5) * 1000, 1),
                                   "p99": round(percentile(latencies, .99) * 1000, 1),
                                   "mean": round(statistics.fmean(latencies) * 1000, 1), "n": len(latencies)}
        k = seed + changes - 1
        assert not changes or f"[fd00:99::{k:x}]:" in tables[6].save("nat"), "the last change is in the kernel"
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
    parser.add_argument("--dual-stack", action="store_true",
                        help="PreferDualStack Services, both families synced (iptables and ip6tables)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging(level="warning")  # results on stdout, problems on stderr
    process = psutil.Process()
    load_start = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    tracker = tracker_for(args.services, args.endpoints, args.dual_stack)
    snapshot = tracker.snapshot()
    heap.settle()
    ingest_s = time.perf_counter() - started
    config = ProxyConfig(node_name="node1", node_ip=ipaddress.ip_address("172.18.0.2"),
                         cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),), random_fully=supports_random_fully())
    assert snapshot is not None
    # the IPv6 proxier's configuration: the node's IPv6 address and pod range (the lab's dual-stack defaults)
    config6 = replace(config, node_ip=ipaddress.ip_address("fd00:18::2"), family=6,
                      cluster_cidrs=(*config.cluster_cidrs, ipaddress.ip_network("fd00:10:244::/56")))
    if args.dual_stack:
        config = replace(config, cluster_cidrs=config6.cluster_cidrs)
    results = []
    for n, backend in enumerate(("legacy", "nft") if args.backend == "both" else (args.backend,)):
        reference = backend == "legacy" or args.services <= args.nft_reference_max
        if args.dual_stack:
            results.append(run_dual_stack(backend, tracker, {4: config, 6: config6}, args.services, args.endpoints,
                                          args.changes, reference, seed=n * 1000, repeats=args.repeats))
            continue
        results.append(run_backend(backend, tracker, config, args.services, args.endpoints, args.changes, reference,
                                   seed=n * 1000, repeats=args.repeats))
    # the machine is shared: the load around the run says how much the figures can be trusted
    report = {"services": args.services, "endpoints_per_service": args.endpoints, "dual_stack": args.dual_stack,
              "state_build_s": round(ingest_s, 2), "rss_mb": round(process.memory_info().rss / 2**20, 1),
              "load_avg_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)}, "backends": results}
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
              + (f"{r['nat_rules']} nat rules" if "nat_rules" in r else
                 f"{r['nat_rules_ipv4']} + {r['nat_rules_ipv6']} nat rules (IPv4 + IPv6)"))
        if "change_ms" in r:
            c = r["change_ms"]
            print(f"  {r['backend']:6} one endpoint change -> kernel: p50 {c['p50']} ms, p99 {c['p99']} ms "
                  f"(n={c['n']}, goal p99 <= 200 ms)")


if __name__ == "__main__":
    main()
