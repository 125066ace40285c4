"""Tunnel benchmark on the lab topology: pod -> node1 -> fabric -> node2 -> pod, same run:

  bare       the routed veth path, no proxy (the ceiling)
  envoy      two Envoys doing HBONE (tcp_proxy tunneling -> HCM CONNECT termination, mTLS 1.3, --concurrency 1)
  nodeagent  two nodeagent HBONE peers (bench/hbone_peer.py: the tunnel's hbone module, splice fast path)
  tls-relay  a plain mutual-TLS byte relay pair in Python (bench/tls_relay.py, no HTTP/2): the floor of a
             Python tunnel here; nodeagent minus this is what HBONE itself costs (--no-tls-relay: skip)
  compare    (with --compare PEER_SCRIPT) another version of the nodeagent peer, for before/after

Each tunnel side is its own process in its node's network namespace and cgroup (node1 takes the client
pod's connections on its pod gateway address, node2 connects to the server pod). The lab is created for
the run and removed afterwards; nothing touches the root network namespace. Measures, variants
interleaved round by round (the machine is shared, so noise hits all of them alike):
  - single-stream throughput: the client pod pushes for --seconds into a sink in the server pod; Gbit/s,
    median of --runs;
  - request/response at --rate req/s (--connections persistent connections, --size bytes each way, each
    connection one tunnel stream, as the fortio keep-alive load behind ztunnel's published figures):
    latency p50/p99 (median of --rounds), the latency the tunnels add over bare, each tunnel process's CPU
    (vCPU over the measured window, from /proc/<pid>/stat) and RSS above its idle baseline (after start,
    before any traffic).

    .venv/bin/python bench/hbone_lab.py            (root; ~4 min)
    .venv/bin/python bench/hbone_lab.py --quick    (~40 s, for a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hbone_throughput import envoy_configs, write_pki  # noqa: E402
from nodeagent.kernel.netns import in_netns  # noqa: E402
from nodeagent.lab import cgroups, processes  # noqa: E402
from nodeagent.lab import lab as labs  # noqa: E402
from nodeagent.lab.plan import NodePlan, PodPlan  # noqa: E402

LOAD = str(ROOT / "bench" / "hbone_load.py")
PEER = str(ROOT / "bench" / "hbone_peer.py")
LOAD_PORT = 5201
PORTS = {"nodeagent": (15001, 15008), "envoy": (16001, 16008), "tls-relay": (17001, 17008),
         "compare": (18001, 18008)}  # (entry on node1, tunnel port on node2)
RELAY = str(ROOT / "bench" / "tls_relay.py")
VARIANTS = ("bare", "envoy", "nodeagent", "tls-relay", "compare")
GOALS = {"throughput_vs_envoy": 1.0, "vcpu": 0.06, "rss_mb": 12.0}


def manifests(directory: Path) -> None:
    """Two nodes, a client pod on node1, the load server pod on node2 (the lab allocates the addresses)."""
    def node(name: str, cidr: str, address: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDR": cidr},
                "status": {"addresses": [{"type": "InternalIP", "address": address}]}}

    def pod(name: str, node_name: str, command: list[str], ports: list[int]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "bench"},
                "spec": {"nodeName": node_name, "containers": [{
                    "name": name, "command": command,
                    "ports": [{"containerPort": p, "protocol": "TCP"} for p in ports]}]}}

    docs = [node("node1", "10.244.1.0/24", "172.18.0.2"), node("node2", "10.244.2.0/24", "172.18.0.3"),
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}},
            pod("client", "node1", ["nodeagent", "workload", "idle"], []),
            pod("server", "node2", [sys.executable, LOAD, "serve", "--port", str(LOAD_PORT)], [LOAD_PORT])]
    (directory / "bench.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))


@dataclass
class Variant:
    """One path under test: where the client pod connects, and the tunnel processes (side -> pid)."""

    name: str
    target: tuple[str, int]
    pids: dict[str, int] = field(default_factory=dict)


@dataclass
class Rig:
    """The lab and everything started in it; `close` stops the processes (the lab goes in `lab_up`)."""

    lab: labs.Lab
    scratch: Path
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    variants: dict[str, Variant] = field(default_factory=dict)

    @property
    def client(self) -> PodPlan:
        return self.lab.plan.pod("bench/client")

    @property
    def server(self) -> PodPlan:
        return self.lab.plan.pod("bench/server")

    def node(self, name: str) -> NodePlan:
        return self.lab.plan.node(name)

    def start(self, node: NodePlan, name: str, argv: list[str], port: int) -> int:
        """Start `argv` in the node's namespace and cgroup; return its pid once it listens on `port`."""
        log = open(self.scratch / f"{name}.log", "wb")  # noqa: SIM115 (closed below, the child keeps its copy)
        with log:
            child = subprocess.Popen(processes.enter_argv(node.netns, cgroups.path_of(node.cgroup), argv),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=processes.child_env({}))
        self.children.append(child)
        wanted = os.stat(f"/run/netns/{node.netns}").st_ino
        deadline = time.monotonic() + 30
        while True:  # the enter shim execs the command in place: same pid, once in the node's namespace
            with contextlib.suppress(OSError):
                inside = os.stat(f"/proc/{child.pid}/ns/net").st_ino == wanted
                if inside and port in processes.bound_ports([child.pid], "TCP"):
                    return child.pid
            if child.poll() is not None or time.monotonic() > deadline:
                tail = (self.scratch / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} ({argv[0]}) did not listen on {port} in {node.netns}:\n{tail}")
            time.sleep(0.02)

    def close(self) -> None:
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            child.wait()


@contextlib.contextmanager
def lab_up(scratch: Path) -> Iterator[Rig]:
    """A fresh lab with the load server running, always removed afterwards."""
    (scratch / "manifests").mkdir()
    manifests(scratch / "manifests")
    name = "hb" + secrets.token_hex(4)
    lab = labs.up(name, scratch / "manifests")
    rig = Rig(lab, scratch)
    try:
        yield rig
    finally:
        rig.close()
        labs.down(name)


def start_tunnels(rig: Rig, envoy: str | None, relay: bool, compare: str | None) -> None:
    """Both sides of both tunnels; the bare variant connects straight to the server pod."""
    node1, node2 = rig.node("node1"), rig.node("node2")
    server_ip, gateway, peer_ip = str(rig.server.pod.ip), str(node1.node.gateway), str(node2.node.address)
    authority = f"{server_ip}:{LOAD_PORT}"
    rig.variants["bare"] = Variant("bare", (server_ip, LOAD_PORT))
    write_pki(rig.scratch)
    if envoy is not None:
        rig.variants["envoy"] = start_envoy(rig, envoy, server_ip)
    for name, script in (("nodeagent", PEER), *((("compare", compare),) if compare else ())):
        entry, hbone = PORTS[name]
        variant = rig.variants[name] = Variant(name, (gateway, entry))
        variant.pids["server"] = rig.start(node2, f"{name}-server", [
            sys.executable, script, "server", "--listen", f"0.0.0.0:{hbone}", "--pki", str(rig.scratch)], hbone)
        variant.pids["client"] = rig.start(node1, f"{name}-client", [
            sys.executable, script, "client", "--listen", f"0.0.0.0:{entry}", "--peer", f"{peer_ip}:{hbone}",
            "--authority", authority, "--pki", str(rig.scratch)], entry)
    if relay:
        entry, tls = PORTS["tls-relay"]
        variant = rig.variants["tls-relay"] = Variant("tls-relay", (gateway, entry))
        variant.pids["server"] = rig.start(node2, "relay-server", [
            sys.executable, RELAY, "server", "--listen", f"0.0.0.0:{tls}", "--upstream", authority,
            "--pki", str(rig.scratch)], tls)
        variant.pids["client"] = rig.start(node1, "relay-client", [
            sys.executable, RELAY, "client", "--listen", f"0.0.0.0:{entry}", "--peer", f"{peer_ip}:{tls}",
            "--pki", str(rig.scratch)], entry)


def start_envoy(rig: Rig, envoy: str, server_ip: str) -> Variant:
    """The Envoy HBONE pair (--concurrency 1, PKI already in rig.scratch): node1 takes TCP on its pod gateway
    address, node2 terminates the CONNECT and connects to `server_ip`:LOAD_PORT."""
    node1, node2 = rig.node("node1"), rig.node("node2")
    entry, hbone = PORTS["envoy"]
    client_cfg, server_cfg = envoy_configs(rig.scratch, entry, hbone, LOAD_PORT, listen="0.0.0.0",
                                           peer=str(node2.node.address), upstream=server_ip)
    variant = Variant("envoy", (str(node1.node.gateway), entry))
    for side, cfg, node, port in (("server", server_cfg, node2, hbone), ("client", client_cfg, node1, entry)):
        path = rig.scratch / f"envoy-{side}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        variant.pids[side] = rig.start(node, f"envoy-{side}", [envoy, "-c", str(path), "--disable-hot-restart",
                                                               "--concurrency", "1", "-l", "error"], port)
    return variant


def transfer(rig: Rig, target: tuple[str, int], seconds: float, netns: str | None = None) -> tuple[float, int]:
    """(Gbit/s, bytes) of one stream pushed from the client pod (or the pod namespace `netns`) for `seconds`,
    until the sink in the server pod has confirmed every byte (it acknowledges each MiB: no half-close
    needed, which a TLS relay lacks)."""
    sock = in_netns(f"/run/netns/{netns or rig.client.netns}", socket.socket)  # a socket of the pod's namespace
    block = memoryview(bytearray(1 << 20))
    confirmed, answers = 0, bytearray()
    with sock:
        sock.settimeout(60)
        sock.connect(target)
        sock.settimeout(None)  # plain blocking sends (a timeout would make every call poll first)
        sock.sendall(b"A")
        sent = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            sock.sendall(block)
            sent += len(block)
            if select.select([sock], [], [], 0)[0]:  # take the acknowledgements as they come
                answers += sock.recv(65536)
        sock.settimeout(60)
        while True:
            whole = len(answers) // 8 * 8
            if whole:
                confirmed = int.from_bytes(answers[whole - 8:whole], "big")
            if confirmed >= sent:
                break
            if not (chunk := sock.recv(65536)):
                break
            answers += chunk
        elapsed = time.perf_counter() - started
    if confirmed != sent:
        raise RuntimeError(f"sink at {target} confirmed {confirmed} of {sent} bytes")
    return sent * 8 / elapsed / 1e9, sent


def _lines(stream: IO[bytes], deadline: float) -> Iterator[str]:
    """Lines of a child's stdout as they come, giving up at `deadline` (monotonic)."""
    pending = b""
    while True:
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.decode()
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            raise TimeoutError("the load generator did not answer in time")
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            return
        pending += chunk


def _cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process so far, all its threads."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user), float(times.system)


def _rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def request_response(rig: Rig, variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """One round of the request/response load through `variant`, with its tunnels' CPU and RSS."""
    host, port = variant.target
    argv = processes.enter_argv(rig.client.netns, cgroups.path_of(rig.client.cgroup), [
        sys.executable, LOAD, "rr", "--target", f"{host}:{port}", "--rate", str(args.rate),
        "--connections", str(args.connections), "--size", str(args.size), "--seconds", str(args.rr_seconds),
        "--warmup", str(args.warmup), *(["--new-connections"] if args.new_connections else [])])
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=processes.child_env({}))
    try:
        assert child.stdout is not None
        lines = _lines(child.stdout, time.monotonic() + args.warmup + args.rr_seconds + 60)
        cpu0: dict[str, tuple[float, float]] = {}
        began = 0.0
        report: dict[str, Any] | None = None
        for line in lines:
            if line == "start":
                began, cpu0 = time.monotonic(), {side: _cpu(pid) for side, pid in variant.pids.items()}
            elif line.startswith("{"):
                ended = time.monotonic()
                report = json.loads(line)
                cpu1 = {side: _cpu(pid) for side, pid in variant.pids.items()}
                window = ended - began
                report["vcpu"] = {side: round((sum(cpu1[side]) - sum(cpu0[side])) / window, 4) for side in cpu1}
                report["vcpu_system"] = {side: round((cpu1[side][1] - cpu0[side][1]) / window, 4) for side in cpu1}
                report["rss_mb"] = {side: round(_rss_mb(pid), 2) for side, pid in variant.pids.items()}
                break
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if report is None or child.returncode != 0:
        assert child.stderr is not None
        raise RuntimeError(f"request/response through {variant.name} failed: {child.stderr.read().decode()[-2000:]}")
    return report


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4 if max(values, default=0) < 1 else 2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the lab, measure every variant interleaved, remove the lab; the report (see the module doc)."""
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hbone-lab-") as scratch, lab_up(Path(scratch)) as rig:
        start_tunnels(rig, envoy, args.tls_relay, args.compare)
        names = [v for v in VARIANTS if v in rig.variants]
        idle = {name: {side: round(_rss_mb(pid), 2) for side, pid in rig.variants[name].pids.items()} for name in names}
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rounds[name].append(request_response(rig, rig.variants[name], args))
        gbit: dict[str, list[float]] = {name: [] for name in names}
        per_gib: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.runs):
            for name in names[r % len(names):] + names[:r % len(names)]:
                pids = rig.variants[name].pids.values()
                before = sum(sum(_cpu(pid)) for pid in pids)
                rate, sent = transfer(rig, rig.variants[name].target, args.seconds)
                gbit[name].append(round(rate, 3))
                if pids:
                    per_gib[name].append((sum(sum(_cpu(pid)) for pid in pids) - before) / (sent / 2**30))
    load_after = os.getloadavg()

    latency = {name: {q: _median([x["latency_us"][q] for x in rounds[name]]) for q in ("p50", "p90", "p99")}
               for name in names}
    tunnels = {}
    for name in names:
        sides = sorted(rig.variants[name].pids)
        if not sides:
            continue
        tunnels[name] = {side: {
            "vcpu": _median([x["vcpu"][side] for x in rounds[name]]),
            "vcpu_system": _median([x["vcpu_system"][side] for x in rounds[name]]),  # the kernel's part
            "rss_mb_idle": idle[name][side],
            "rss_mb_above_idle": round(max(x["rss_mb"][side] for x in rounds[name]) - idle[name][side], 2),
        } for side in sides}
    throughput = {name: _median(values) for name, values in gbit.items()}
    report: dict[str, Any] = {
        "topology": "lab: client pod -> node1 -> fabric bridge -> node2 -> server pod; tunnels in the node netns",
        "loadavg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "cpus": os.cpu_count(),
        "throughput": {"seconds": args.seconds, "runs": args.runs, "gbit_per_s": throughput, "samples": gbit,
                       # CPU seconds of both tunnel processes per GiB carried: what bounds throughput on a
                       # machine without spare cores, and far less sensitive to other load than Gbit/s
                       "tunnel_cpu_s_per_gib": {name: _median(v) for name, v in per_gib.items() if v}},
        "request_response": {
            "mode": "new connection per request" if args.new_connections else "persistent connections",
            "rate": args.rate, "connections": args.connections, "size": args.size, "seconds": args.rr_seconds,
            "rounds": args.rounds, "latency_us": latency,
            "added_latency_us": {name: {q: round(latency[name][q] - latency["bare"][q], 1) for q in ("p50", "p99")}
                                 for name in names if name != "bare"},
            "achieved_rate": {name: _median([x["rate"] for x in rounds[name]]) for name in names},
            "errors": {name: sum(x["errors"] for x in rounds[name]) for name in names},
            "tunnels": tunnels},
    }
    if "envoy" in throughput:
        report["throughput"]["vs_envoy"] = {name: round(gbit / throughput["envoy"], 2)
                                            for name, gbit in throughput.items()}
        cost = report["throughput"]["tunnel_cpu_s_per_gib"]
        report["throughput"]["cpu_per_gib_vs_envoy"] = {name: round(c / cost["envoy"], 2) for name, c in cost.items()}
        report["nodeagent_vs_envoy"] = report["throughput"]["vs_envoy"]["nodeagent"]
        added, ours = report["request_response"]["added_latency_us"], tunnels["nodeagent"].values()
        report["goals"] = {
            "throughput >= 1.0x envoy": report["nodeagent_vs_envoy"] >= GOALS["throughput_vs_envoy"],
            "added p50 <= envoy's": added["nodeagent"]["p50"] <= added["envoy"]["p50"],
            "added p99 <= envoy's": added["nodeagent"]["p99"] <= added["envoy"]["p99"],
            f"vCPU per tunnel <= {GOALS['vcpu']}": all(side["vcpu"] <= GOALS["vcpu"] for side in ours),
            f"RSS above idle <= {GOALS['rss_mb']} MB": all(side["rss_mb_above_idle"] <= GOALS["rss_mb"]
                                                           for side in ours),
        }
    return report


def print_table(report: dict[str, Any]) -> None:
    t, rr = report["throughput"], report["request_response"]
    print(f"loadavg before {report['loadavg']['before']}, after {report['loadavg']['after']} "
          f"({report['cpus']} CPUs)")
    print(f"{report['topology']}")
    print(f"single stream: {t['seconds']} s x {t['runs']} runs (median), request/response: {rr['rate']:g} req/s, "
          f"{rr['connections']} {rr['mode']}, {rr['size']} B each way, {rr['seconds']} s x {rr['rounds']} rounds")
    print(f"{'':10} {'Gbit/s':>7} {'xEnvoy':>6} {'CPU s/GiB':>9} {'p50 µs':>7} {'p99 µs':>7} {'+p50':>6} {'+p99':>6}   "
          f"{'vCPU cli/srv (sys)':>24} {'RSS+ MB cli/srv':>16}")
    for name, gbit in t["gbit_per_s"].items():
        lat, added = rr["latency_us"][name], rr["added_latency_us"].get(name, {})
        cost = t["tunnel_cpu_s_per_gib"].get(name)
        row = (f"{name:10} {gbit:7.2f} {t.get('vs_envoy', {}).get(name, 0):6.2f} "
               f"{f'{cost:9.2f}' if cost is not None else '':9} {lat['p50']:7.0f} {lat['p99']:7.0f} ")
        row += f"{added.get('p50', 0):6.0f} {added.get('p99', 0):6.0f}   " if added else f"{'':6} {'':6}   "
        if name in rr["tunnels"]:
            sides = rr["tunnels"][name]
            row += (f"{sides['client']['vcpu']:6.3f}/{sides['server']['vcpu']:.3f} "
                    f"({sides['client']['vcpu_system']:.3f}/{sides['server']['vcpu_system']:.3f}) ")
            row += f"{sides['client']['rss_mb_above_idle']:8.1f}/{sides['server']['rss_mb_above_idle']:.1f}"
        print(row)
    for goal, met in report.get("goals", {}).items():
        print(f"  nodeagent: {goal:32} {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one single-stream transfer")
    parser.add_argument("--runs", type=int, default=5, help="single-stream transfers per variant")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second in total")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024, help="bytes of each request and each response")
    parser.add_argument("--rr-seconds", type=float, default=8.0, help="measured window of one round")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="request/response rounds per variant")
    parser.add_argument("--new-connections", action="store_true", help="one connection per request")
    parser.add_argument("--no-tls-relay", dest="tls_relay", action="store_false",
                        help="skip the plain TLS relay reference")
    parser.add_argument("--compare", metavar="PEER_SCRIPT",
                        help="also run this hbone_peer.py (another version of the tunnel, same arguments) as "
                             "variant 'compare', interleaved with the others: before/after in one run")
    parser.add_argument("--quick", action="store_true", help="one short round of everything (smoke run)")
    parser.add_argument("--json", action="store_true", help="the report as one JSON line")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.runs, args.rr_seconds, args.warmup, args.rounds = 0.5, 1, 1.5, 0.5, 1
    if os.geteuid() != 0:
        parser.error("the benchmark builds a lab (network namespaces, cgroups): run it as root")
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
