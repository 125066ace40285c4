"""The mesh over IPv6 against the kernel, in namespaces each test makes.

- The in-pod capture written with ip6tables reads back exactly as rendered (both backends), beside the
  IPv4 set, with the `ip -6` policy route; removal leaves neither family's rules.
- A captured pod's connection to an IPv6 address crosses two tunnels over HBONE and reaches the app at that
  original IPv6 destination, from the client's IPv6 address; an AuthorizationPolicy by IPv6 ipBlock admits
  one client and refuses another of the same identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from nodeagent.ca.identity import CertificateAuthority, SpiffeId, make_csr
from nodeagent.cluster.decode import decode
from nodeagent.cluster.model import AuthorizationPolicy
from nodeagent.kernel.netns import command_in
from nodeagent.mesh.capture import CaptureStatus
from nodeagent.mesh.iptables.apply import (
    apply_capture,
    apply_probe_snat,
    live_state,
    probe_snat_state,
    remove_capture,
    remove_probe_snat,
    rule_counters,
)
from nodeagent.mesh.iptables.render import pod_capture
from nodeagent.tunnel.proxy.node import NodeTunnel
from nodeagent.tunnel.proxy.sockets import client_socket as kernel_client_socket
from nodeagent.tunnel.proxy.sockets import listening_socket
from nodeagent.tunnel.state.authz import Authorizer
from nodeagent.tunnel.state.workloads import Workload
from tests.integration.conftest import unique_lab_name

pytestmark = pytest.mark.root
BACKENDS = ["nft", "legacy"]


@pytest.fixture
def netns() -> Iterator[str]:
    """A throw-away namespace's path (with lo up, as a pod's)."""
    name = unique_lab_name() + "-m6"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ns(path: str, *argv: str) -> str:
    return subprocess.run(command_in(path, argv), check=True, capture_output=True, text=True).stdout


def ours6(path: str, backend: str) -> list[str]:
    text = "".join(ns(path, f"ip6tables-{backend}-save", "-t", t) for t in ("mangle", "nat"))
    return [line for line in text.splitlines() if line.startswith("-A") and "NODEAGENT" in line]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_capture_reads_back_exactly_as_rendered_and_is_removed(netns: str, backend: str) -> None:
    state = apply_capture(netns, backend=backend, pod="demo/client", ipv6=True)
    assert state.status is CaptureStatus.INSTALLED, state.missing + state.unexpected
    desired = pod_capture(family=6)
    expected = [f"-A {h.source} {desired.jump_spec(h)}" for h in desired.hooks]
    expected += [r.line for r in desired.rules]
    assert sorted(ours6(netns, backend)) == sorted(expected)
    assert "fwmark 0x111/0xfff lookup 100" in ns(netns, "ip", "-6", "rule", "show")
    assert "local default dev lo" in ns(netns, "ip", "-6", "route", "show", "table", "100")
    assert live_state(netns, backend=backend, ipv6=True).status is CaptureStatus.INSTALLED

    # IPv6 rules deleted by hand: the pod is no longer captured as a whole, and one apply repairs it.
    ns(netns, f"ip6tables-{backend}", "-t", "nat", "-F", "NODEAGENT_OUTPUT")
    assert live_state(netns, backend=backend, ipv6=True).status is CaptureStatus.DRIFTED
    assert apply_capture(netns, backend=backend, ipv6=True).status is CaptureStatus.INSTALLED

    assert remove_capture(netns, backend=backend, ipv6=True).status is CaptureStatus.ABSENT
    assert ours6(netns, backend) == []
    assert "lookup 100" not in ns(netns, "ip", "-6", "rule", "show")


# --- the tunnel over IPv6 -------------------------------------------------------------------------------------
# Three pods in namespaces of this test, on one bridge (a fabric namespace), each dual-stack; the two client pods
# are served by one NodeTunnel ("node1"), the server pod by another ("node2"), both run by this test's event loop.
# Every pod holds the real capture (iptables and ip6tables). A client app connects to the server's IPv6 address;
# its ip6tables REDIRECT hands it to node1's IPv6 outbound listener, which reads the original IPv6 destination,
# and carries it over HBONE to [server]:15008 with the authority [server]:8080; node2 connects to the app at that
# IPv6 address, from the client's own IPv6 address (transparent). An ALLOW policy by IPv6 ipBlock admits the
# first client and refuses the second.

CLIENT1_V6, CLIENT2_V6, SERVER_V6 = "fd00:99::5", "fd00:99::7", "fd00:99::6"
CLIENT1_V4, CLIENT2_V4, SERVER_V4 = "10.99.0.5", "10.99.0.7", "10.99.0.6"
APP_PORT = 8080
CLIENT_ID = SpiffeId("cluster.local", "demo", "client")
SERVER_ID = SpiffeId("cluster.local", "demo", "echo")


@dataclass
class Pods:
    fabric: str
    netns: dict[str, str]  # pod -> /run/netns path


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    base = unique_lab_name()
    fabric = f"{base}-m6fab"
    names = {"client1": f"{base}-m6c1", "client2": f"{base}-m6c2", "server": f"{base}-m6s"}
    addresses = {"client1": (CLIENT1_V4, CLIENT1_V6), "client2": (CLIENT2_V4, CLIENT2_V6),
                 "server": (SERVER_V4, SERVER_V6)}
    made: list[str] = []
    try:
        for name in (fabric, *names.values()):
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", fabric, "link", "add", "br0", "type", "bridge"], check=True)
        subprocess.run(["ip", "-n", fabric, "link", "set", "br0", "up"], check=True)
        for i, (pod, name) in enumerate(names.items()):
            v4, v6 = addresses[pod]
            subprocess.run(["ip", "-n", fabric, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
                            "netns", name], check=True)
            for argv in (["ip", "-n", fabric, "link", "set", f"p{i}", "master", "br0", "up"],
                         ["ip", "-n", name, "addr", "add", f"{v4}/24", "dev", "eth0"],
                         ["ip", "-n", name, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad"],
                         ["ip", "-n", name, "link", "set", "eth0", "up"]):
                subprocess.run(argv, check=True)
        paths = {pod: f"/run/netns/{name}" for pod, name in names.items()}
        for pod, path in paths.items():
            state = apply_capture(path, backend="nft", pod=f"demo/{pod}", ipv6=True)
            assert state.status is CaptureStatus.INSTALLED, state.missing + state.unexpected
        yield Pods(f"/run/netns/{fabric}", paths)
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def workloads(pods: Pods) -> dict[str, Workload]:
    def pod(name: str, identity: SpiffeId, node: str, v4: str, v6: str) -> Workload:
        return Workload(v4, identity, node, pods.netns[name], name=f"demo/{name}", labels={"app": name},
                        transparent=True, ips=(v4, v6))

    return {"client1": pod("client1", CLIENT_ID, "node1", CLIENT1_V4, CLIENT1_V6),
            "client2": pod("client2", CLIENT_ID, "node1", CLIENT2_V4, CLIENT2_V6),
            "server": pod("server", SERVER_ID, "node2", SERVER_V4, SERVER_V6)}


def allow_ipv6_block(block: str) -> AuthorizationPolicy:
    decoded = decode({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                      "metadata": {"name": "only-client1", "namespace": "demo"},
                      "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                               "rules": [{"from": [{"source": {"ipBlocks": [block]}}]}]}})
    assert isinstance(decoded.obj, AuthorizationPolicy), decoded.rejections
    return decoded.obj


async def _app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The server pod's app: answers the address it was reached at and the client's, as `local|peer`."""
    local, peer = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
    with contextlib.suppress(ConnectionError):
        await reader.read(100)
        writer.write(f"{local[0]}:{local[1]}|{peer[0]}".encode())
        await writer.drain()
    writer.close()


async def _call(netns: str, host: str) -> bytes:
    """What the app answers a client app in `netns` (an ordinary socket: captured) connecting to host:8080."""
    sock = kernel_client_socket(netns, 0, host=host)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, APP_PORT)), 10)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"hello")
        await writer.drain()
        return await asyncio.wait_for(reader.read(200), 10)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def mesh(pods: Pods, authorizer: Authorizer) -> AsyncIterator[tuple[NodeTunnel, NodeTunnel]]:
    ca = CertificateAuthority.generate()
    table = workloads(pods)
    by_ip = {ip: w for w in table.values() for ip in w.addresses}

    def fetch(identity: SpiffeId, key: Any) -> list[str]:
        return ca.issue(make_csr(identity, key))[1]

    node1 = NodeTunnel("node1", "cluster.local", fetch, by_ip.get, authorizer=lambda: authorizer)
    node2 = NodeTunnel("node2", "cluster.local", fetch, by_ip.get, authorizer=lambda: authorizer)
    app = await asyncio.start_server(_app, sock=listening_socket(pods.netns["server"], APP_PORT,
                                                                 family=socket.AF_INET6))
    app4 = await asyncio.start_server(_app, sock=listening_socket(pods.netns["server"], APP_PORT))
    try:
        await node1.add_pod(table["client1"])
        await node1.add_pod(table["client2"])
        await node2.add_pod(table["server"])
        yield node1, node2
    finally:
        await node1.close()
        await node2.close()
        app.close()
        app4.close()


def _sample(tunnel: NodeTunnel, name: str, **labels: str) -> float:
    return sum(s.value for family in tunnel.metrics.registry.collect() for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_a_captured_ipv6_connection_crosses_hbone_with_its_original_ipv6_destination(pods: Pods) -> None:
    async with mesh(pods, Authorizer([], [])) as (node1, node2):
        answer = (await _call(pods.netns["client1"], SERVER_V6)).decode()
        # The app was reached at the original IPv6 destination, from the client pod's own IPv6 address.
        assert answer == f"{SERVER_V6}:{APP_PORT}|{CLIENT1_V6}"
        # ... over HBONE (mTLS counted on both sides), not around the tunnel.
        assert _sample(node1, "istio_tcp_connections_opened_total", reporter="source",
                       connection_security_policy="mutual_tls") == 1
        assert _sample(node2, "istio_tcp_connections_opened_total", reporter="destination",
                       connection_security_policy="mutual_tls") == 1
        # The same tunnels carry IPv4 as before.
        assert (await _call(pods.netns["client1"], SERVER_V4)).decode() == f"{SERVER_V4}:{APP_PORT}|{CLIENT1_V4}"
        # The ip6tables rules, not the IPv4 ones, captured the IPv6 connection.
        counters = rule_counters(pods.netns["client1"], backend="nft", table="nat", ipv6=True)
        redirect = next(k for k in counters if "--to-ports 15001" in k)
        assert counters[redirect] >= 1


async def test_an_ipv6_ipblock_policy_admits_one_client_and_refuses_the_other(pods: Pods) -> None:
    authorizer = Authorizer([allow_ipv6_block(f"{CLIENT1_V6}/128")], [])
    async with mesh(pods, authorizer) as (_, node2):
        assert (await _call(pods.netns["client1"], SERVER_V6)).decode() == f"{SERVER_V6}:{APP_PORT}|{CLIENT1_V6}"
        # client2 holds the same identity: only its IPv6 address tells it apart, and the policy refuses it.
        try:
            refused = await _call(pods.netns["client2"], SERVER_V6)
        except ConnectionError:
            refused = b""
        assert refused == b""
        assert _sample(node2, "nodeagent_tunnel_policy_denials_total", destination_workload_namespace="demo") == 1


def test_an_ipv6_only_pod_does_not_stop_the_ipv4_pods_probe_snat(netns: str) -> None:
    state = apply_probe_snat(netns, ["10.244.1.5", "fd00:10:244:1::9"], backend="nft")
    assert state.status is CaptureStatus.INSTALLED, state.missing + state.unexpected
    rules = [line for line in ns(netns, "iptables-nft-save", "-t", "nat").splitlines() if "NODEAGENT_POSTRT" in line]
    assert any("-d 10.244.1.5/32" in line for line in rules)
    assert probe_snat_state(netns, ["10.244.1.5", "fd00:10:244:1::9"], backend="nft").status is CaptureStatus.INSTALLED
    assert remove_probe_snat(netns, backend="nft").status is CaptureStatus.ABSENT
