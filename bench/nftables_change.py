"""Where one endpoint change's time goes in nftables mode, inside a network namespace it creates (root).

At N Services x E endpoints (default 10,000 x 10) the table is loaded once by a full sync; then, interleaved
per change (`--changes` of them, so the machine's drift hits every series alike):

- product: an EndpointSlice update folded into the tracker, the snapshot built, the partial sync planned and
  sent through `nft -f` as the agent sends it (each chain's rules in a chain block) -> rules in the kernel;
- lines: the same transaction replayed in kube-proxy's one-command-a-line form (`add rule ...`), which makes
  nft 1.0 fetch every chain of the table before it evaluates the first rule (the agent's earlier wire form);
- blocks: the same transaction replayed in the agent's form by a bare `nft -f` (no agent work);
- floor, counter rule: `nft -f` of one rule without a NAT or jump statement into a scratch chain: the nft
  process and a commit that does not revalidate the table;
- floor, dnat rule: the same with a `dnat` rule: the kernel revalidates every chain reachable from the base
  chains (nf_tables_validate) whenever a transaction adds a rule with a NAT statement, a jump or a verdict map,
  so this is the least any service or endpoint change can cost at this table size, whoever sends it.

    sudo .venv/bin/python bench/nftables_change.py --out bench/results/nftables-change-10k-$(date +%Y%m%d).json
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from iptables_sync import tracker_for  # noqa: E402
from nftables_sync import empty_tables_nft, endpoint_change, summary  # noqa: E402

from nodeagent.kernel.nftables import Nft  # noqa: E402
from nodeagent.observability.logs import configure_logging  # noqa: E402
from nodeagent.service.config import ProxyConfig  # noqa: E402
from nodeagent.service.nftables.proxier import NftablesProxier  # noqa: E402
from nodeagent.service.nftables.ruleset import wire_text  # noqa: E402

SCRATCH = "bench-scratch"


def nft_f(text: str) -> float:
    """Seconds for one `nft -f -` of `text` (it must be accepted)."""
    started = time.perf_counter()
    subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True)
    return time.perf_counter() - started


def inside(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging(level="warning")
    tracker = tracker_for(args.services, args.endpoints)
    snapshot = tracker.snapshot()
    assert snapshot is not None
    config = ProxyConfig(node_name="node1", node_ip=ipaddress.ip_address("172.18.0.2"),
                         cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),))
    empty_tables_nft()
    proxier = NftablesProxier(Nft(), sync_period=1e9)
    started = time.perf_counter()
    full = proxier.sync(snapshot, config, snapshot.changed_services)
    full_s = time.perf_counter() - started
    print(f"full sync {full_s:.1f} s", file=sys.stderr, flush=True)
    series: dict[str, list[float]] = {"product": [], "lines": [], "blocks": [], "floor_counter_rule": [],
                                      "floor_dnat_rule": []}
    load: list[float] = []
    prefix = "ip kube-proxy"
    counter = f"flush chain {prefix} {SCRATCH}\nadd chain {prefix} {SCRATCH} {{\n\tip saddr 10.200.0.1 counter\n}}\n"
    dnat = (f"flush chain {prefix} {SCRATCH}\nadd chain {prefix} {SCRATCH} {{\n"
            f"\tmeta l4proto tcp dnat to 10.200.0.1:80\n}}\n")
    Nft().run(f"add chain {prefix} {SCRATCH}\n")
    for i in range(args.changes):
        load.append(os.getloadavg()[0])
        seconds, report = endpoint_change(tracker, proxier, config, (i * 7919) % args.services, args.endpoints, i)
        series["product"].append(seconds)
        assert f"dnat to 10.99.{(i >> 8) & 255}.{i & 255}:" in report.transaction
        # a replay: the chain deletions already happened (the rest is idempotent: add, flush, refill)
        replay = [line for line in report.plan.lines if not line.startswith("delete chain ")]
        series["lines"].append(nft_f("".join(line + "\n" for line in replay)))
        series["blocks"].append(nft_f(wire_text(replay)))
        series["floor_counter_rule"].append(nft_f(counter))
        series["floor_dnat_rule"].append(nft_f(dnat))
    Nft().run(f"delete chain {prefix} {SCRATCH}\n")
    empty_tables_nft()
    result: dict[str, Any] = {
        "services": args.services, "endpoints_per_service": args.endpoints, "changes": args.changes,
        "nft_version": subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip(),
        "kernel": os.uname().release, "full_sync_s": round(full_s, 2),
        "full_transaction_operations": len(full.plan.lines),
        "load_1min": {"min": min(load), "max": max(load)},
        "ms": {name: summary(values) for name, values in series.items()},
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="also write the raw JSON here")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(inside(args)))
        return
    name = f"bench-nftc-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        out = subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, "--inside", *sys.argv[1:]],
                             stdout=subprocess.PIPE, text=True, check=False)
        if out.returncode != 0:
            sys.exit("benchmark failed (see above)")
        report = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    r = report
    print(f"{r['services']} Services x {r['endpoints_per_service']} endpoints ({r['full_transaction_operations']} "
          f"operations, full sync {r['full_sync_s']} s); {r['nft_version']}, kernel {r['kernel']}; "
          f"load {r['load_1min']['min']:.1f}-{r['load_1min']['max']:.1f}")
    for name, s in r["ms"].items():
        print(f"  {name:20} p50 {s['p50']:7.1f} ms  p99 {s['p99']:7.1f} ms  max {s['max']:7.1f} ms  (n={s['n']})")


if __name__ == "__main__":
    main()
