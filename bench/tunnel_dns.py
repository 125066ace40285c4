"""DNS proxy benchmark: what the tunnel's DNS proxy costs (root: it makes a scratch network namespace).

- the table's build (`dns_table`) from a snapshot of N Services (default 10,000), and its update after one
  Service changed (`dns_table(..., since=...)`), ms;
- UDP questions from C clients (default 8) on the proxy's own event loop to 127.0.0.1:15053 inside the
  namespace: a Service name (answered from the table) and an external name (forwarded to a resolver the
  benchmark runs in the namespace, which answers with a canned reply): questions per second, p50/p99 µs.
Clients, proxy and resolver share one loop and one core, as a worst case for the tunnel's thread.

    .venv/bin/python bench/tunnel_dns.py
    .venv/bin/python bench/tunnel_dns.py --services 1000 --queries 5000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dns.message  # noqa: E402
import dns.rrset  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from nodeagent.cluster.decode import decode, object_ref  # noqa: E402
from nodeagent.cluster.events import Listed, Upserted  # noqa: E402
from nodeagent.cluster.model import Kind  # noqa: E402
from nodeagent.kernel.netns import in_netns, netns_path  # noqa: E402
from nodeagent.state.tracker import ChangeTracker  # noqa: E402
from nodeagent.tunnel.dns.records import DnsTable, dns_table  # noqa: E402
from nodeagent.tunnel.dns.server import DNS_PORT, DnsOptions, DnsProxy  # noqa: E402
from tests.support.objects import namespace, service  # noqa: E402

RESOLVER = ("127.0.0.53", 5353)


class _Resolver(asyncio.DatagramProtocol):
    """Answers every question with one A record, from bytes made once (its cost is not the proxy's)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]
        self.replies: dict[bytes, bytes] = {}

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.replies.get(data[2:])
        if reply is None:
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(query.question[0].name, 30, "IN", "A", "203.0.113.7"))
            reply = self.replies[data[2:]] = response.to_wire()
        self.transport.sendto(data[:2] + reply[2:], addr)


def _udp(netns: str, bind: tuple[str, int] | None = None) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if bind is not None:
            sock.bind(bind)
        sock.setblocking(False)
        return sock
    return in_netns(netns_path(netns), make)


async def _client(netns: str, name: str, count: int) -> list[float]:
    loop = asyncio.get_running_loop()
    sock = _udp(netns)
    wire = dns.message.make_query(name, "A").to_wire()
    took = []
    try:
        await loop.sock_connect(sock, ("127.0.0.1", DNS_PORT))
        for _ in range(count):
            started = time.perf_counter()
            await loop.sock_sendall(sock, wire)
            await loop.sock_recv(sock, 4096)
            took.append(time.perf_counter() - started)
    finally:
        sock.close()
    return took


async def _measure(netns: str, table: DnsTable, queries: int, clients: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    resolver, _ = await loop.create_datagram_endpoint(_Resolver, sock=_udp(netns, RESOLVER))
    proxy = DnsProxy(DnsOptions(upstreams=(RESOLVER,)), lambda: table, CollectorRegistry())
    await proxy.add_pod("10.244.1.2", "bench/client", netns_path(netns))
    results: dict[str, Any] = {}
    try:
        for label, name in (("local", "s7.bench.svc.cluster.local."), ("forwarded", "www.example.com.")):
            started = time.perf_counter()
            parts = await asyncio.gather(*(_client(netns, name, queries // clients) for _ in range(clients)))
            elapsed = time.perf_counter() - started
            took = sorted(t for part in parts for t in part)
            results[label] = {"queries": len(took), "per_second": round(len(took) / elapsed),
                              "p50_us": round(took[len(took) // 2] * 1e6),
                              "p99_us": round(took[int(len(took) * 0.99)] * 1e6)}
    finally:
        await proxy.close()
        resolver.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=4_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tracker = ChangeTracker("node1")
    objects = [namespace("bench"), *(service(f"s{i}", "bench", f"10.96.{i // 250}.{i % 250 + 1}")
                                     for i in range(args.services))]
    by_kind: dict[Kind, list[Any]] = {kind: [] for kind in Kind}
    for raw in objects:
        by_kind[Kind(raw["kind"])].append((object_ref(raw), decode(raw)))
    tracker.apply_all(Listed(kind, tuple(items), "1") for kind, items in by_kind.items())
    snapshot = tracker.snapshot()
    assert snapshot is not None
    started = time.perf_counter()
    table = dns_table(snapshot)
    build_ms = (time.perf_counter() - started) * 1000
    assert table is not None
    changed = service("s7", "bench", "10.96.200.7")
    tracker.apply(Upserted(Kind.SERVICE, object_ref(changed), decode(changed)))
    following = tracker.snapshot()
    assert following is not None
    started = time.perf_counter()
    updated = dns_table(following, since=(table, snapshot))
    update_ms = (time.perf_counter() - started) * 1000
    assert updated is not None and updated is not table
    name = f"na-dnsbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        results = asyncio.run(_measure(name, table, args.queries, args.clients))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    results = {"services": args.services, "table_build_ms": round(build_ms), "table_update_ms": round(update_ms, 1),
               "clients": args.clients, **results}
    if args.json:
        print(json.dumps(results))
        return
    print(f"dns_table, {args.services} Services: {results['table_build_ms']} ms; after one Service changed: "
          f"{results['table_update_ms']} ms")
    for label in ("local", "forwarded"):
        r = results[label]
        print(f"{label:>9}: {r['queries']} questions, {args.clients} clients: {r['per_second']}/s, "
              f"p50 {r['p50_us']} us, p99 {r['p99_us']} us")


if __name__ == "__main__":
    main()
