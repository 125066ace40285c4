"""How `nodeagent ztunnel --workers N` scales: closed-loop (saturating) load through the lab's mesh path,
for each worker count, rounds interleaved.

Path: demo/client (node1, enrolled, captured by the agents' iptables REDIRECT) -> node1's tunnel (15001,
HBONE client) -> node2's tunnel (15008, mTLS + HTTP/2 CONNECT) -> a load server in demo/echo-1 (node2).
A fresh lab per round and worker count (`start_agents(..., tunnel_workers=N)`); the generator and the
server are uvloop processes of their own in the pods' namespaces and cgroups. Each round runs:
  - connections: C concurrent loops, each connect, 64 bytes out, 64 back, close, for --seconds: the
    completed connections per second;
  - throughput: S concurrent connections each pushing 64 KiB writes for --seconds into a sink: the bytes
    the server received per second (aggregate);
with every tunnel process's CPU seconds (coordinator and workers, from /proc/PID/stat) and resident memory.
The machine's cores are shared by the generator, the server, both nodes' tunnels and whatever else runs:
the ratios say what N workers bought on *this* machine, not what a tunnel alone would do.

    sudo .venv/bin/python bench/tunnel_workers.py --workers 1 2 --rounds 2
Writes bench/results/tunnel-workers-<UTC>.json (or --output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodeagent.lab import cgroups, processes  # noqa: E402
from nodeagent.lab import lab as labs  # noqa: E402
from nodeagent.lab.agents import TUNNEL_OWNER, start_agents  # noqa: E402
from nodeagent.lab.manifests import load_default  # noqa: E402

PORT = 7000
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

SERVER = r"""
import asyncio, sys, uvloop
async def handle(reader, writer):
    try:
        kind = await reader.readexactly(1)
        if kind == b"R":
            await reader.readexactly(64)
            writer.write(b"x" * 64)
        else:
            total = 0
            while data := await reader.read(1 << 18):
                total += len(data)
            writer.write(str(total).encode())
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()
uvloop.run(main())
"""

GENERATOR = r"""
import asyncio, json, sys, time, uvloop
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
concurrency, seconds = int(sys.argv[4]), float(sys.argv[5])
done = errors = sent = 0
async def rr(end):
    global done, errors
    while time.monotonic() < end:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            writer.write(b"R" + b"y" * 64)
            await asyncio.wait_for(reader.readexactly(64), 5)
            writer.close()
            done += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            errors += 1
async def stream(end):
    global sent, errors
    chunk = b"z" * (64 << 10)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"S")
        while time.monotonic() < end:
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        # the total first, then the sum: `sent += int(await ...)` reads `sent` before the await, so streams ending
        # together overwrite each other and only the last one's total was counted
        total = int(await asyncio.wait_for(reader.read(), 30))
        sent += total
        writer.close()
    except (OSError, ValueError, TimeoutError):
        errors += 1
async def main():
    start = time.monotonic()
    end = start + seconds
    await asyncio.gather(*((rr if mode == "rr" else stream)(end) for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    print(json.dumps({"completed": done, "bytes": sent, "errors": errors, "elapsed": elapsed}))
uvloop.run(main())
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / (1 << 20)


def tunnel_processes(lab: labs.Lab, node: str) -> dict[str, int]:
    """role -> pid of the tunnel of `node`: "coordinator" (or "single") and "worker-<pid>"."""
    record = labs.load(lab.record.name).record
    shim = next(p.pid for p in reversed(record.processes) if p.owner == TUNNEL_OWNER + node)
    main = next(c for c in psutil.Process(shim).children(recursive=True) if "ztunnel" in c.cmdline())
    workers = [c.pid for c in main.children() if "nodeagent.daemon.tunnel_worker" in c.cmdline()]
    out = {("coordinator" if workers else "single"): main.pid}
    out.update({f"worker-{i}": pid for i, pid in enumerate(sorted(workers))})
    return out


def in_pod(lab: labs.Lab, pod: str, argv: list[str]) -> list[str]:
    plan = lab.plan.pod(pod)
    return processes.enter_argv(plan.netns, cgroups.path_of(plan.cgroup), argv)


def measure(lab: labs.Lab, target: str, mode: str, concurrency: int, seconds: float) -> dict[str, Any]:
    tunnels = {node: tunnel_processes(lab, node) for node in ("node1", "node2")}
    before = {node: {role: cpu_seconds(pid) for role, pid in roles.items()} for node, roles in tunnels.items()}
    started = time.monotonic()
    out = subprocess.run(in_pod(lab, "demo/client", [sys.executable, "-c", GENERATOR, target, str(PORT), mode,
                                                     str(concurrency), str(seconds)]),
                         env=processes.child_env({}), capture_output=True, text=True, timeout=seconds + 120, check=True)
    wall = time.monotonic() - started
    result: dict[str, Any] = json.loads(out.stdout)
    result["tunnel_cpu_seconds"] = {node: {role: round(cpu_seconds(pid) - before[node][role], 3)
                                           for role, pid in roles.items()} for node, roles in tunnels.items()}
    result["tunnel_rss_mb"] = {node: {role: round(rss_mb(pid), 1) for role, pid in roles.items()}
                               for node, roles in tunnels.items()}
    result["tunnel_vcpu"] = {node: round(sum(cpu.values()) / wall, 3)
                             for node, cpu in result["tunnel_cpu_seconds"].items()}
    if mode == "rr":
        result["connections_per_s"] = round(result["completed"] / result["elapsed"], 1)
    else:
        result["mbit_per_s"] = round(result["bytes"] * 8 / result["elapsed"] / 1e6, 1)
    return result


def one_round(workers: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    name = "tw" + os.urandom(3).hex()
    directory = scratch / name
    directory.mkdir()
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all([dict(d.body) for d in load_default()]))
    labs.up(name, directory)
    server = None
    try:
        lab = start_agents(name, "iptables", mesh=True, tunnel_workers=workers, timeout=120)
        server = subprocess.Popen(in_pod(lab, "demo/echo-1", [sys.executable, "-c", SERVER, str(PORT)]),
                                  env=processes.child_env({}), stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        target = str(lab.plan.pod("demo/echo-1").pod.ip)
        idle = {node: {role: round(rss_mb(pid), 1) for role, pid in tunnel_processes(lab, node).items()}
                for node in ("node1", "node2")}
        measure(lab, target, "rr", args.connections, 1.0)  # warm the pools and certificates
        rr = measure(lab, target, "rr", args.connections, args.seconds)
        stream = measure(lab, target, "stream", args.streams, args.seconds)
        print(f"  workers {workers}: {rr['connections_per_s']} conn/s (errors {rr['errors']}, tunnel vCPU "
              f"{rr['tunnel_vcpu']}), {stream['mbit_per_s']} Mbit/s (tunnel vCPU {stream['tunnel_vcpu']})",
              flush=True)
        return {"workers": workers, "idle_rss_mb": idle, "connections": rr, "throughput": stream}
    finally:
        if server is not None:
            server.kill()
            server.wait()
        labs.down(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=64, help="concurrent connect/request/close loops")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streaming connections")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("the benchmark builds a lab: run it as root")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    report: dict[str, Any] = {"benchmark": "tunnel_workers", "commit": commit, "cpus": os.cpu_count(),
                              "settings": vars(args) | {"output": str(args.output)},
                              "loadavg_before": os.getloadavg(), "rounds": []}
    with tempfile.TemporaryDirectory(prefix="tunnel-workers-") as scratch:
        for round_index in range(args.rounds):
            order = args.workers if round_index % 2 == 0 else list(reversed(args.workers))
            print(f"round {round_index}", flush=True)
            for workers in order:
                report["rounds"].append(one_round(workers, args, Path(scratch)))
    report["loadavg_after"] = os.getloadavg()
    summary: dict[str, Any] = {}
    for workers in args.workers:
        runs = [r for r in report["rounds"] if r["workers"] == workers]
        summary[str(workers)] = {
            "connections_per_s": statistics.median(r["connections"]["connections_per_s"] for r in runs),
            "mbit_per_s": statistics.median(r["throughput"]["mbit_per_s"] for r in runs),
            "tunnel_vcpu_connections": {n: statistics.median(r["connections"]["tunnel_vcpu"][n] for r in runs)
                                        for n in ("node1", "node2")},
            "tunnel_vcpu_throughput": {n: statistics.median(r["throughput"]["tunnel_vcpu"][n] for r in runs)
                                       for n in ("node1", "node2")},
            "idle_rss_mb": runs[-1]["idle_rss_mb"],
            "loaded_rss_mb": runs[-1]["connections"]["tunnel_rss_mb"]}
    base = summary.get("1")
    if base:
        for s in summary.values():
            s["connection_rate_ratio_vs_1"] = round(s["connections_per_s"] / base["connections_per_s"], 3)
            s["throughput_ratio_vs_1"] = round(s["mbit_per_s"] / base["mbit_per_s"], 3)
    report["summary"] = summary
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.output or ROOT / "bench" / "results" / f"tunnel-workers-{stamp}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
