"""The tunnel's DNS proxy in a network namespace of the test's (root): a Service name resolves with no cluster
DNS, an external name is forwarded to a resolver the test runs in the namespace, over UDP and TCP, straight
to 15053 and through port 53 capture rules like the ones the mesh installs (marked packets skipped); and a
real stub resolver (glibc's getaddrinfo, with kubelet's search list) walks its search path through it."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from prometheus_client import CollectorRegistry

from nodeagent.kernel.netns import in_netns, netns_path
from nodeagent.tunnel.dns.records import DnsTable, dns_table
from nodeagent.tunnel.dns.server import DNS_PORT, DnsOptions, DnsProxy
from tests.support.netns import netns_run, scratch_netns
from tests.support.objects import namespace, service
from tests.support.services import snapshot_of

pytestmark = pytest.mark.root

RESOLVER = "10.96.0.10"  # the pod's resolver (kube-dns's usual address): here, the test's fake upstream
EXTERNAL = "www.example.com."
EXTERNAL_IP = "203.0.113.7"
SERVICE_IP = "10.96.5.5"


@dataclass
class FakeResolver:
    """The upstream: answers EXTERNAL only and stays silent for everything else (no cluster DNS here)."""

    asked: list[tuple[str, str]] = field(default_factory=list)  # (name, transport)

    def reply(self, data: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(data)
        name = query.question[0].name.to_text().lower()
        self.asked.append((name, transport))
        if name != EXTERNAL:
            return None
        response = dns.message.make_response(query)
        if query.question[0].rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(EXTERNAL, 30, "IN", "A", EXTERNAL_IP))
        return response.to_wire()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: FakeResolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        answer = self.resolver.reply(data, "udp")
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


def _bound(netns: str, kind: socket.SocketKind, address: tuple[str, int]) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(16)
        sock.setblocking(False)
        return sock
    return in_netns(netns_path(netns), make)


@asynccontextmanager
async def fake_resolver(netns: str) -> AsyncIterator[FakeResolver]:
    resolver = FakeResolver()
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(resolver),
                                                 sock=_bound(netns, socket.SOCK_DGRAM, (RESOLVER, 53)))

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = int.from_bytes(await reader.readexactly(2), "big")
            answer = resolver.reply(await reader.readexactly(size), "tcp")
            if answer is not None:
                writer.write(len(answer).to_bytes(2, "big") + answer)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(tcp, sock=_bound(netns, socket.SOCK_STREAM, (RESOLVER, 53)))
    try:
        yield resolver
    finally:
        udp.close()
        server.close()


@pytest.fixture
def pod_netns() -> Iterator[str]:
    """A pod's namespace: loopback, and the resolver's address on a link (the test's upstream binds it)."""
    with scratch_netns("na-dns") as name:
        # a veth pair with both ends here (this kernel may lack the dummy link type)
        netns_run(name, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        netns_run(name, "ip", "addr", "add", f"{RESOLVER}/16", "dev", "v0")
        netns_run(name, "ip", "link", "set", "v0", "up")
        netns_run(name, "ip", "link", "set", "v1", "up")
        yield name


def _capture(netns: str) -> None:
    """The pod's port 53 captured into the proxy, the tunnel's own (marked) queries skipped: what the mesh's
    capture must install (see docs/dns.md)."""
    for proto in ("udp", "tcp"):
        netns_run(netns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", proto, "-m", proto, "--dport", "53",
                  "!", "-d", "127.0.0.1/32", "-m", "mark", "!", "--mark", "0x539/0xfff", "-j", "REDIRECT",
                  "--to-ports", str(DNS_PORT))


def _table() -> DnsTable:
    table = dns_table(snapshot_of(namespace("demo"), service("echo", "demo", SERVICE_IP),
                                  service("dual", "demo", "10.96.5.6", clusterIPs=["10.96.5.6", "fd00:96::6"],
                                          ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="PreferDualStack")))
    assert table is not None
    return table


async def _udp_query(netns: str, name: str, server: tuple[str, int], timeout: float = 5.0, rdtype: str = "A"
                     ) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    sock = in_netns(netns_path(netns), lambda: socket.socket(family, socket.SOCK_DGRAM))
    sock.setblocking(False)
    try:
        query = dns.message.make_query(name, rdtype)
        await loop.sock_connect(sock, server)
        await loop.sock_sendall(sock, query.to_wire())
        async with asyncio.timeout(timeout):
            data = await loop.sock_recv(sock, 65535)
        reply = dns.message.from_wire(data)
        assert reply.id == query.id
        return reply
    finally:
        sock.close()


async def _tcp_query(netns: str, name: str, server: tuple[str, int]) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    sock = in_netns(netns_path(netns), lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await loop.sock_connect(sock, server)
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        query = dns.message.make_query(name, "A").to_wire()
        writer.write(len(query).to_bytes(2, "big") + query)
        async with asyncio.timeout(5):
            size = int.from_bytes(await reader.readexactly(2), "big")
            return dns.message.from_wire(await reader.readexactly(size))
    finally:
        writer.close()


def _addresses(reply: dns.message.Message) -> list[str]:
    return [rr.to_text() for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset]


@asynccontextmanager
async def served(netns: str, registry: CollectorRegistry) -> AsyncIterator[DnsProxy]:
    table = _table()
    proxy = DnsProxy(DnsOptions(upstreams=((RESOLVER, 53),), timeout=1.0), lambda: table, registry, node="n1",
                     reuse_port=True)
    await proxy.add_pod("10.244.1.2", "demo/client", netns_path(netns))
    try:
        yield proxy
    finally:
        await proxy.close()


def test_service_answered_locally_and_external_forwarded(pod_netns: str) -> None:
    registry = CollectorRegistry()

    async def scenario() -> None:
        async with fake_resolver(pod_netns) as resolver, served(pod_netns, registry):
            direct = ("127.0.0.1", DNS_PORT)
            for ask in (_udp_query, _tcp_query):
                local = await ask(pod_netns, "echo.demo.svc.cluster.local.", direct)
                assert (local.rcode(), _addresses(local)) == (dns.rcode.NOERROR, [SERVICE_IP])
                missing = await ask(pod_netns, "nope.demo.svc.cluster.local.", direct)
                assert missing.rcode() == dns.rcode.NXDOMAIN
                external = await ask(pod_netns, EXTERNAL, direct)
                assert _addresses(external) == [EXTERNAL_IP]
            if os.path.exists("/proc/net/if_inet6"):  # the IPv6 loopback listener, and an AAAA answer
                six = await _udp_query(pod_netns, "dual.demo.svc.cluster.local.", ("::1", DNS_PORT), rdtype="AAAA")
                assert [rr.to_text() for rrset in six.answer for rr in rrset] == ["fd00:96::6"]
            # the cluster's names never reached the resolver; the external one did, once per transport (TCP dialled
            # straight has no original destination: the configured resolver, over TCP)
            assert resolver.asked == [(EXTERNAL, "udp"), (EXTERNAL, "tcp")]

    asyncio.run(scenario())
    total = registry.get_sample_value
    assert total("nodeagent_tunnel_dns_requests_total", {"outcome": "local", "type": "A", "protocol": "udp"}) == 2
    assert total("nodeagent_tunnel_dns_requests_total", {"outcome": "forwarded", "type": "A", "protocol": "tcp"}) == 1


def test_captured_port_53_and_marked_forwards(pod_netns: str) -> None:
    """Through REDIRECT: UDP forwarded to the configured resolver, TCP to its original destination; the proxy's
    own queries carry mark 0x539 and so leave uncaptured (without it they would loop back into the proxy)."""
    _capture(pod_netns)
    registry = CollectorRegistry()

    async def scenario() -> None:
        async with fake_resolver(pod_netns) as resolver, served(pod_netns, registry):
            cluster_dns = (RESOLVER, 53)
            for ask, transport in ((_udp_query, "udp"), (_tcp_query, "tcp")):
                local = await ask(pod_netns, "echo.demo.svc.cluster.local.", cluster_dns)
                assert _addresses(local) == [SERVICE_IP]
                external = await ask(pod_netns, EXTERNAL, cluster_dns)
                assert _addresses(external) == [EXTERNAL_IP]
                assert resolver.asked[-1] == (EXTERNAL, transport)
            assert [name for name, _ in resolver.asked] == [EXTERNAL, EXTERNAL]

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("getent") is None, reason="needs getent (glibc's stub resolver)")
def test_stub_resolver_walks_its_search_path(pod_netns: str) -> None:
    """glibc's getaddrinfo in the namespace with kubelet's resolv.conf for a pod of `demo`: the short forms of
    a Service resolve without any cluster DNS, an external name comes from the resolver."""
    _capture(pod_netns)
    etc = Path("/etc/netns") / pod_netns  # `ip netns exec` binds this resolv.conf over /etc/resolv.conf
    etc.mkdir(parents=True)
    (etc / "resolv.conf").write_text(f"nameserver {RESOLVER}\nsearch demo.svc.cluster.local svc.cluster.local "
                                     "cluster.local\noptions ndots:5 timeout:3 attempts:1\n")
    registry = CollectorRegistry()

    async def getent(name: str) -> str:
        process = await asyncio.create_subprocess_exec("ip", "netns", "exec", pod_netns, "getent", "ahostsv4", name,
                                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        async with asyncio.timeout(20):
            out, _ = await process.communicate()
        return out.decode().split()[0] if out else f"(exit {process.returncode})"

    async def scenario() -> None:
        async with fake_resolver(pod_netns), served(pod_netns, registry):
            for name in ("echo", "echo.demo", "echo.demo.svc", "echo.demo.svc.cluster.local"):
                assert await getent(name) == SERVICE_IP, name
            assert await getent(EXTERNAL.rstrip(".")) == EXTERNAL_IP

    try:
        asyncio.run(scenario())
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        if not os.listdir(etc.parent):
            etc.parent.rmdir()


def test_hostile_datagrams_never_stop_the_listener(pod_netns: str) -> None:
    registry = CollectorRegistry()

    async def scenario() -> None:
        async with fake_resolver(pod_netns), served(pod_netns, registry):
            loop = asyncio.get_running_loop()
            sock = in_netns(netns_path(pod_netns), lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", DNS_PORT))
                junk = [b"", b"\x00", os.urandom(11), b"\x12\x34\x81\x00" + bytes(8), os.urandom(3000),
                        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"]
                for _ in range(50):
                    for packet in junk:
                        await loop.sock_sendall(sock, packet)
            finally:
                sock.close()
            # The flood overflowed the socket's receive queue (the kernel drops, as for any UDP server): ask again
            # after a timeout as a stub resolver does (attempts), until the listener answers.
            for _attempt in range(5):
                try:
                    reply = await _udp_query(pod_netns, "echo.demo.svc.cluster.local.", ("127.0.0.1", DNS_PORT),
                                             timeout=1.0)
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError("the listener no longer answers after the flood")
            assert _addresses(reply) == [SERVICE_IP]

    asyncio.run(scenario())
    value = registry.get_sample_value
    assert (value("nodeagent_tunnel_dns_dropped_total", {"reason": "short"}) or 0) > 0
    assert (value("nodeagent_tunnel_dns_dropped_total", {"reason": "response"}) or 0) > 0
    assert (value("nodeagent_tunnel_dns_requests_total", {"outcome": "malformed", "type": "none",
                                                          "protocol": "udp"}) or 0) > 0
