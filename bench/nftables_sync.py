"""nftables datapath benchmark, inside a network namespace it creates (root; never the root namespace).

The script re-runs itself under `ip netns exec` in a throwaway namespace and deletes it afterwards, so every
table it writes (and libnftables, which reaches only its own process's namespace) stays in there.

For N Services x E endpoints (default 10,000 x 10), interleaved `--repeats` times in one run, each from an empty
table (the previous one deleted):
- full sync: the agent's first sync (list chains and sets, render, plan, one `nft -f -`) ...
- ... against the reference: a bare `nft -f -` of the same transaction text (goal: full sync <= 1.2x it);
- the same full sync through libnftables in this process (no fork/exec of nft, no pipe);
- the iptables-legacy full sync of the same snapshot (the iptables mode, for comparison).
- one endpoint change -> rules in the kernel: an EndpointSlice update folded into the tracker, the snapshot
  built, the partial sync planned and loaded (minSyncPeriod 0), p50/p99 (goal p99 <= 50 ms), through the nft
  binary and through libnftables.
- RSS of this process (the agent's state at that size).

    sudo .venv/bin/python bench/nftables_sync.py                       # 10,000 x 10
    sudo .venv/bin/python bench/nftables_sync.py --services 1000 --json --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodeagent import heap  # noqa: E402
from nodeagent.cluster.decode import decode, object_ref  # noqa: E402
from nodeagent.cluster.events import Upserted  # noqa: E402
from nodeagent.cluster.model import Kind  # noqa: E402
from nodeagent.errors import NodeAgentError  # noqa: E402
from nodeagent.kernel.netfilter import Iptables  # noqa: E402
from nodeagent.kernel.nftables import LibNftables, Nft  # noqa: E402
from nodeagent.observability.logs import configure_logging  # noqa: E402
from nodeagent.service.config import ProxyConfig  # noqa: E402
from nodeagent.service.iptables import cleanup as iptables_cleanup  # noqa: E402
from nodeagent.service.iptables.proxier import IptablesProxier  # noqa: E402
from nodeagent.service.nftables.proxier import NftablesProxier  # noqa: E402
from nodeagent.state.tracker import ChangeTracker  # noqa: E402
from tests.support.objects import scale_slice  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from iptables_sync import percentile, tracker_for  # noqa: E402


class LibRunner:
    """The proxier's runner with transactions through libnftables (listing still through nft --json)."""

    netns: str | None = None

    def __init__(self) -> None:
        self._lib = LibNftables()
        self._cli = Nft()

    def run(self, transaction: str) -> None:
        self._lib.run(transaction)

    def list_names(self, kind: str, family: str, table: str) -> set[str]:
        return self._cli.list_names(kind, family, table)

    def chain_exists(self, family: str, table: str, chain: str) -> bool:
        return self._cli.chain_exists(family, table, chain)


def empty_tables_nft() -> None:
    Nft().delete_table("ip", "kube-proxy")


def empty_tables() -> None:
    empty_tables_nft()
    ipt = Iptables("legacy")
    if iptables_cleanup.has_our_chains(ipt):
        iptables_cleanup.cleanup(ipt)


def timed(work: Any) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def endpoint_change(tracker: ChangeTracker, proxier: NftablesProxier, config: ProxyConfig, index: int,
                    endpoints: int, k: int) -> tuple[float, Any]:
    """Service `index`'s first endpoint moved to 10.99.x.y (from `k`): the EndpointSlice update folded into the
    tracker, the snapshot built, the partial sync loaded. Returns the seconds and the sync's report."""
    changed = scale_slice(index, endpoints)
    changed["endpoints"][0]["addresses"] = [f"10.99.{(k >> 8) & 255}.{k & 255}"]
    started = time.perf_counter()
    tracker.apply(Upserted(Kind.ENDPOINT_SLICE, object_ref(changed), decode(changed), f"change-{k}"))
    snapshot = tracker.snapshot()
    assert snapshot is not None
    report = proxier.sync(snapshot, config, snapshot.changed_services)
    seconds = time.perf_counter() - started
    assert not report.full
    return seconds, report


def change_latencies(tracker: ChangeTracker, proxier: NftablesProxier, config: ProxyConfig, services: int,
                     endpoints: int, changes: int, seed: int) -> list[float]:
    latencies = [endpoint_change(tracker, proxier, config, (i * 7919 + seed) % services, endpoints, seed + i)[0]
                 for i in range(changes)]
    listing = Nft().list_table("ip", "kube-proxy") or ""
    k = seed + changes - 1
    assert not changes or f"dnat to 10.99.{(k >> 8) & 255}.{k & 255}:" in listing, "the last change is in the kernel"
    return latencies


def summary(latencies: list[float]) -> dict[str, Any]:
    return {"p50": round(percentile(latencies, .5) * 1000, 1), "p99": round(percentile(latencies, .99) * 1000, 1),
            "mean": round(statistics.fmean(latencies) * 1000, 1), "max": round(max(latencies) * 1000, 1),
            "n": len(latencies)}


def inside(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging(level="warning")  # results on stdout, problems on stderr
    process = psutil.Process()
    started = time.perf_counter()
    tracker = tracker_for(args.services, args.endpoints)
    snapshot = tracker.snapshot()
    assert snapshot is not None
    heap.settle()
    state_s = time.perf_counter() - started
    config = ProxyConfig(node_name="node1", node_ip=ipaddress.ip_address("172.18.0.2"),
                         cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),))
    ours: list[float] = []
    bare: list[float] = []
    lib: list[float] = []
    legacy: list[float] = []
    legacy_lock_retries: list[str] = []
    transaction = ""
    operations = 0
    for _ in range(args.repeats):
        # interleaved: the shared 2-core machine's speed drifts, each round measures all four under it
        empty_tables_nft()
        proxier = NftablesProxier(Nft(), sync_period=1e9)
        ours.append(timed(lambda p=proxier: p.sync(snapshot, config, snapshot.changed_services)))
        if not transaction:
            empty_tables_nft()
            report = NftablesProxier(Nft(), sync_period=1e9).sync(snapshot, config, snapshot.changed_services)
            transaction, operations = report.transaction, len(report.plan.lines)
        empty_tables_nft()
        bare.append(timed(lambda text=transaction: Nft().run(text)))
        empty_tables_nft()
        lib_proxier = NftablesProxier(LibRunner(), sync_period=1e9)
        lib.append(timed(lambda p=lib_proxier: p.sync(snapshot, config, snapshot.changed_services)))
        if not args.skip_legacy:
            # the xtables lock is the machine's, not the namespace's: another iptables user (a test elsewhere)
            # can hold it past iptables' 5 s wait; such a round is retried, and counted
            for _ in range(3):
                try:
                    empty_tables()
                    ipt_proxier = IptablesProxier(Iptables("legacy"), sync_period=1e9)
                    legacy.append(timed(lambda p=ipt_proxier: p.sync(snapshot, config, snapshot.changed_services)))
                    break
                except NodeAgentError as exc:
                    legacy_lock_retries.append(str(exc).splitlines()[-1][:200])
        print(f"round done: ours {ours[-1]:.1f} s, bare {bare[-1]:.1f} s, libnftables {lib[-1]:.1f} s, "
              f"legacy {legacy[-1] if legacy else float('nan'):.1f} s", file=sys.stderr, flush=True)
        heap.settle()
    empty_tables_nft()
    proxier = NftablesProxier(Nft(), sync_period=1e9)
    proxier.sync(snapshot, config, snapshot.changed_services)
    cli_changes = change_latencies(tracker, proxier, config, args.services, args.endpoints, args.changes, 0)
    rss_mb = round(process.memory_info().rss / 2**20, 1)
    empty_tables_nft()
    lib_proxier = NftablesProxier(LibRunner(), sync_period=1e9)
    snapshot = tracker.snapshot() or tracker.last()
    assert snapshot is not None
    lib_proxier.sync(snapshot, config, snapshot.changed_services)
    lib_changes = change_latencies(tracker, lib_proxier, config, args.services, args.endpoints, args.changes, 5000)
    empty_tables_nft()
    result: dict[str, Any] = {
        "services": args.services, "endpoints_per_service": args.endpoints, "repeats": args.repeats,
        "nft_version": subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip(),
        "kernel": os.uname().release, "state_build_s": round(state_s, 2),
        "transaction_operations": operations, "transaction_bytes": len(transaction),
        "full_sync_s": round(statistics.median(ours), 3), "full_sync_runs_s": [round(x, 3) for x in ours],
        "bare_nft_f_s": round(statistics.median(bare), 3), "bare_nft_f_runs_s": [round(x, 3) for x in bare],
        "full_vs_bare": round(statistics.median(ours) / statistics.median(bare), 3),
        "full_sync_libnftables_s": round(statistics.median(lib), 3),
        "full_sync_libnftables_runs_s": [round(x, 3) for x in lib],
        "change_ms_nft_binary": summary(cli_changes), "change_ms_libnftables": summary(lib_changes),
        "rss_mb_after_sync_and_changes": rss_mb,
    }
    result["iptables_legacy_retries"] = legacy_lock_retries
    if legacy:
        result["iptables_legacy_full_sync_s"] = round(statistics.median(legacy), 3)
        result["iptables_legacy_full_sync_runs_s"] = [round(x, 3) for x in legacy]
    return result


def rss_only(args: argparse.Namespace) -> dict[str, Any]:
    """The agent's RSS in nftables mode alone: state built, one full sync, `--changes` endpoint changes (the
    interleaved run's RSS also holds what the iptables-legacy references allocated)."""
    configure_logging(level="warning")
    tracker = tracker_for(args.services, args.endpoints)
    snapshot = tracker.snapshot()
    assert snapshot is not None
    heap.settle()
    config = ProxyConfig(node_name="node1", node_ip=ipaddress.ip_address("172.18.0.2"),
                         cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),))
    empty_tables_nft()
    proxier = NftablesProxier(Nft(), sync_period=1e9)
    proxier.sync(snapshot, config, snapshot.changed_services)
    heap.settle()
    after_full = psutil.Process().memory_info().rss
    latencies = change_latencies(tracker, proxier, config, args.services, args.endpoints, args.changes, 9000)
    heap.settle()
    empty_tables_nft()
    return {"rss_mb_after_full_sync": round(after_full / 2**20, 1),
            "rss_mb_after_changes": round(psutil.Process().memory_info().rss / 2**20, 1),
            "change_ms_nft_binary_alone": summary(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds to take the medians of")
    parser.add_argument("--skip-legacy", action="store_true", help="leave out the iptables-legacy reference")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the raw JSON here")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(rss_only(args) if args.rss_only else inside(args)))
        return
    name = f"bench-nft-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        argv = [a for a in sys.argv[1:] if a not in ("--json",)]
        out = subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, "--inside", *argv],
                             stdout=subprocess.PIPE, text=True, check=False)  # (progress on stderr, as it goes)
        if out.returncode != 0:
            sys.exit("benchmark failed (see above)")
        report = json.loads(out.stdout.strip().splitlines()[-1])
        # the agent's memory measured apart, in a process that never ran the iptables references
        out = subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, "--inside", "--rss-only", *argv],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"benchmark (RSS) failed:\n{out.stderr}")
        report.update(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report))
        return
    r = report
    print(f"{r['services']} Services x {r['endpoints_per_service']} endpoints, {r['transaction_operations']} "
          f"operations ({r['transaction_bytes'] / 2**20:.1f} MB) per full transaction; {r['nft_version']}, "
          f"kernel {r['kernel']}")
    print(f"  full sync {r['full_sync_s']:.2f} s vs bare nft -f {r['bare_nft_f_s']:.2f} s: {r['full_vs_bare']:.2f}x "
          f"(goal <= 1.2x; medians of {r['full_sync_runs_s']} and {r['bare_nft_f_runs_s']})")
    print(f"  full sync through libnftables {r['full_sync_libnftables_s']:.2f} s {r['full_sync_libnftables_runs_s']}")
    if "iptables_legacy_full_sync_s" in r:
        print(f"  iptables-legacy full sync {r['iptables_legacy_full_sync_s']:.2f} s "
              f"{r['iptables_legacy_full_sync_runs_s']}")
    for runner in ("nft_binary", "libnftables"):
        c = r[f"change_ms_{runner}"]
        print(f"  one endpoint change -> kernel ({runner}): p50 {c['p50']} ms, p99 {c['p99']} ms, max {c['max']} ms "
              f"(n={c['n']}, goal p99 <= 50 ms)")
    print(f"  agent RSS (nftables alone): {r['rss_mb_after_full_sync']} MB after the full sync, "
          f"{r['rss_mb_after_changes']} MB after the changes (the interleaved process: "
          f"{r['rss_mb_after_sync_and_changes']} MB)")


if __name__ == "__main__":
    main()
