"""eBPF datapath benchmark, in a throwaway network namespace and cgroup (root, bcc).

With N Services x E endpoints in the maps (default 10,000 x 10):
- time to load all maps from empty;
- connect() latency through a VIP against connect() straight to the backend, in the same run, from a
  client inside the cgroup the programs are attached to (median of many connect+close);
- TCP connect rate (CRR: connect, 1-byte request, 1-byte response, close) both ways;
- the same two over IPv6 (connect6): an IPv6 VIP against the IPv6 backend, with the IPv6 maps holding as many
  Services as the IPv4 ones (each IPv4 Service and endpoint mirrored into fd00:96::/96 and fd00:98::/96);
- one endpoint change -> maps updated (the EndpointSlice folded into the tracker, the snapshot built,
  the changed frontends rewritten), p50/p99.

    sudo .venv/bin/python bench/ebpf_connect.py
    sudo .venv/bin/python bench/ebpf_connect.py --services 1000 --json
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.iptables_sync import percentile, tracker_for  # noqa: E402
from nodeagent import heap  # noqa: E402
from nodeagent.cluster.decode import decode, object_ref  # noqa: E402
from nodeagent.cluster.events import Upserted  # noqa: E402
from nodeagent.cluster.model import Kind  # noqa: E402
from nodeagent.kernel.bpf import loader  # noqa: E402
from nodeagent.observability.logs import configure_logging  # noqa: E402
from nodeagent.service.ebpf.desired import Backend, Frontend, ServiceEntry, desired_entries  # noqa: E402
from nodeagent.service.ebpf.maps import MapSync  # noqa: E402
from tests.support.objects import scale_slice  # noqa: E402

# The client, run inside the namespace and cgroup: a server on the backend address, then timed loops.
CLIENT = r"""
import json, socket, sys, threading, time
vip, backend, port, n, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
family = socket.AF_INET6 if ":" in vip else socket.AF_INET
server = socket.socket(family); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((backend, port)); server.listen(4096)
def serve():
    while True:
        c, _ = server.accept()
        try:
            if c.recv(1): c.sendall(b"y")
        finally:
            c.close()
threading.Thread(target=serve, daemon=True).start()
def connect_once(host):
    s = socket.socket(family); t = time.perf_counter(); s.connect((host, 80 if host == vip else port))
    elapsed = time.perf_counter() - t; s.close()
    return elapsed
def crr(host):
    end, done = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        s = socket.create_connection((host, 80 if host == vip else port)); s.sendall(b"x"); s.recv(1); s.close()
        done += 1
    return done / seconds
result = {"direct": [], "vip": []}
for i in range(n):  # alternate connect by connect, so drift on a shared machine hits both sides alike
    for host, key in ((backend, "direct"), (vip, "vip")) if i % 2 else ((vip, "vip"), (backend, "direct")):
        result[key].append(connect_once(host))
out = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in result.items()}
out["crr_direct"], out["crr_vip"] = crr(backend), crr(vip)
print(json.dumps(out))
"""


V6_SERVICES = ipaddress.IPv6Network("fd00:96::/96")
V6_ENDPOINTS = ipaddress.IPv6Network("fd00:98::/96")


def mirrored(ip: str, into: ipaddress.IPv6Network) -> str:
    """An IPv4 address's IPv6 twin in `into` (its 32 bits as the low ones): unique, and readable back."""
    return str(into[int(ipaddress.IPv4Address(ip))])


def ipv6_twin(desired: dict[Frontend, ServiceEntry]) -> dict[Frontend, ServiceEntry]:
    """The IPv4 entries mirrored into IPv6 (the same Services, ports and backend sets)."""
    return {Frontend(mirrored(f.ip, V6_SERVICES), f.port, f.protocol):
            ServiceEntry(e.port_name, tuple(Backend(mirrored(b.ip, V6_ENDPOINTS), b.port, b.weight)
                                            for b in e.backends), e.affinity_seconds)
            for f, e in desired.items()}


def run_client(netns: str, cgroup: Path, vip: str, backend: str, args: argparse.Namespace) -> dict[str, float]:
    """The client in the namespace and cgroup: medians of connect() through `vip` and direct, and both CRRs."""
    client = subprocess.run(
        [sys.executable, "-m", "nodeagent.lab.enter", "--netns", netns, "--cgroup", str(cgroup), "--",
         sys.executable, "-c", CLIENT, vip, backend, "9000", str(args.connects), str(args.crr_seconds)],
        capture_output=True, text=True, timeout=600, check=False)
    if client.returncode != 0:
        raise SystemExit(f"client failed: {client.stderr[-2000:]}")
    measured: dict[str, float] = json.loads(client.stdout)
    return measured


@contextlib.contextmanager
def sandbox() -> Iterator[tuple[str, Path, str]]:
    """A network namespace with loopback up, a cgroup, and a pin scope; all removed on exit."""
    name = f"bench-ebpf-{secrets.token_hex(3)}"
    cgroup = loader.cgroup2_root() / name
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        cgroup.mkdir()
        try:
            yield name, cgroup, name
        finally:
            loader.detach(cgroup)
            cgroup.rmdir()
            loader.remove_pins(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--connects", type=int, default=8000, help="connects each way, alternating")
    parser.add_argument("--crr-seconds", type=float, default=3.0)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging(level="warning")
    tracker = tracker_for(args.services, args.endpoints)
    snapshot = tracker.snapshot()
    assert snapshot is not None
    heap.settle()
    report: dict[str, Any] = {"services": args.services, "endpoints_per_service": args.endpoints}
    with sandbox() as (netns, cgroup, scope):
        datapath = loader.load(scope)
        loader.attach(datapath, cgroup)
        maps = MapSync(datapath.maps)
        desired = desired_entries(snapshot.service_ports, snapshot.endpoints, node_ips=[], family=4)
        # The measured Service (svc-0, 10.96.0.0:80) gets one live backend: the client's server.
        (probe,) = [f for f in desired if f.ip == "10.96.0.0" and f.port == 80]
        desired[probe] = type(desired[probe])(desired[probe].port_name, (type(desired[probe].backends[0])(
            "127.0.0.1", 9000),), 0)
        # IPv6: the same Services mirrored, the measured one (fd00:96::a60:0, svc-0's twin) to the IPv6 loopback
        desired6 = ipv6_twin(desired)
        probe6 = Frontend(mirrored(probe.ip, V6_SERVICES), probe.port, probe.protocol)
        desired6[probe6] = ServiceEntry(desired[probe].port_name, (Backend("::1", 9000),), 0)
        started = time.perf_counter()
        stats = maps.apply(desired)
        report["load_maps_s"] = round(time.perf_counter() - started, 3)
        report["map_updates"] = stats.map_updates
        started = time.perf_counter()
        stats6 = MapSync(datapath.maps, family=6).apply(desired6)
        report["load_maps_ipv6_s"] = round(time.perf_counter() - started, 3)
        report["map_updates_ipv6"] = stats6.map_updates

        for key, vip, backend in (("", probe.ip, "127.0.0.1"), ("_ipv6", probe6.ip, "::1")):
            measured = run_client(netns, cgroup, vip, backend, args)
            report[f"connect_us{key}"] = {"direct": round(measured["direct"], 1), "vip": round(measured["vip"], 1),
                                          "ratio": round(measured["vip"] / measured["direct"], 3)}
            report[f"crr_per_s{key}"] = {"direct": round(measured["crr_direct"]), "vip": round(measured["crr_vip"])}

        latencies = []
        for i in range(args.changes):
            index = 1 + (i * 7919) % (args.services - 1)
            changed = scale_slice(index, args.endpoints)
            changed["endpoints"][0]["addresses"] = [f"10.98.{(i >> 8) & 255}.{i & 255}"]
            started = time.perf_counter()
            tracker.apply(Upserted(Kind.ENDPOINT_SLICE, object_ref(changed), decode(changed), str(i)))
            next_snapshot = tracker.snapshot()
            assert next_snapshot is not None
            ports = {n for n in next_snapshot.changed_ports}
            part = desired_entries(next_snapshot.service_ports, next_snapshot.endpoints, node_ips=[], only=ports,
                                   family=4)
            maps.apply(part, only={str(n) for n in ports})
            latencies.append(time.perf_counter() - started)
        report["change_ms"] = {"p50": round(percentile(latencies, .5) * 1000, 3),
                               "p99": round(percentile(latencies, .99) * 1000, 3),
                               "mean": round(statistics.fmean(latencies) * 1000, 3), "n": len(latencies)}
        datapath.close()
    if args.json:
        print(json.dumps(report))
        return
    c, r, ch = report["connect_us"], report["crr_per_s"], report["change_ms"]
    c6, r6 = report["connect_us_ipv6"], report["crr_per_s_ipv6"]
    print(f"{args.services} Services x {args.endpoints} endpoints in the maps (each family)")
    print(f"  load maps from empty        {report['load_maps_s']:.2f} s ({report['map_updates']} map updates); "
          f"IPv6 {report['load_maps_ipv6_s']:.2f} s")
    print(f"  connect() median            direct {c['direct']} us, through the VIP {c['vip']} us, "
          f"ratio {c['ratio']} (goal <= 1.05)")
    print(f"  connect rate (CRR)          direct {r['direct']}/s, through the VIP {r['vip']}/s")
    print(f"  IPv6 connect() median       direct {c6['direct']} us, through the VIP {c6['vip']} us, "
          f"ratio {c6['ratio']} (goal <= 1.05)")
    print(f"  IPv6 connect rate (CRR)     direct {r6['direct']}/s, through the VIP {r6['vip']}/s")
    print(f"  endpoint change -> maps     p50 {ch['p50']} ms, p99 {ch['p99']} ms (n={ch['n']}, goal p99 <= 50 ms)")


if __name__ == "__main__":
    main()
