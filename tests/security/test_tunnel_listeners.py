"""Slow and silent peers against a real NodeTunnel's listeners (15006 plaintext, 15008 HBONE), served from
this test's event loop for one pod in a throw-away namespace: its loopback holds the pod's address,
the app is an echo server inside it, and one iptables REDIRECT in that namespace captures plaintext to the
app into 15006 (the tunnel's own connections carry mark 0x539 and pass)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from nodeagent.ca.identity import SpiffeId, make_csr
from nodeagent.cluster.decode import decode
from nodeagent.cluster.model import PeerAuthentication
from nodeagent.kernel.netns import client_socket, listening_socket
from nodeagent.tunnel.hbone.client import open_connection, open_stream
from nodeagent.tunnel.hbone.limits import SOCKET_MARK
from nodeagent.tunnel.proxy import node as tunnels
from nodeagent.tunnel.proxy.node import NodeTunnel
from nodeagent.tunnel.state.authz import Authorizer
from nodeagent.tunnel.state.workloads import Workload
from tests.security.hostile import SERVER_ID, Pki, bare_client, throwaway_netns

pytestmark = pytest.mark.root

POD_IP, APP_PORT = "10.99.0.2", 8080
SILENT = 50  # silent plaintext connections held at once


def peer_authentication(mode: str) -> PeerAuthentication:
    decoded = decode({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                      "metadata": {"name": "mtls", "namespace": "demo"}, "spec": {"mtls": {"mode": mode}}})
    assert isinstance(decoded.obj, PeerAuthentication), decoded.rejections
    return decoded.obj


@pytest.fixture(scope="module")
def pod_netns() -> Iterator[str]:
    with throwaway_netns() as path:
        name = path.rsplit("/", 1)[1]
        for argv in (["ip", "-n", name, "addr", "add", f"{POD_IP}/32", "dev", "lo"],
                     ["ip", "netns", "exec", name, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", POD_IP,
                      "--dport", str(APP_PORT), "-m", "mark", "!", "--mark", hex(SOCKET_MARK), "-j", "REDIRECT",
                      "--to-ports", "15006"]):
            subprocess.run(argv, check=True)
        yield path


class App:
    """The pod's application: an echo server that counts the connections it holds."""

    def __init__(self) -> None:
        self.open = self.accepted = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()


class Rig:
    def __init__(self, netns: str, pki: Pki, tunnel: NodeTunnel, app: App) -> None:
        self.netns, self.pki, self.tunnel, self.app = netns, pki, tunnel, app

    async def plaintext(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the app as a non-mesh client would make it (captured into 15006)."""
        sock = client_socket(self.netns, 0)
        await asyncio.get_running_loop().sock_connect(sock, (POD_IP, APP_PORT))
        return await asyncio.open_connection(sock=sock)

    async def hbone_echo(self) -> None:
        """An honest mesh client: mTLS to 15008, CONNECT to the app, bytes echoed."""
        h2 = await open_connection((POD_IP, tunnels.HBONE_PORT), self.pki.client(), SERVER_ID, timeout=5,
                                   make_socket=lambda: client_socket(self.netns, 0))
        try:
            stream = await open_stream(h2, f"{POD_IP}:{APP_PORT}", timeout=5)
            await stream.write(b"mesh")
            assert await asyncio.wait_for(stream.read(), 5) == b"mesh"
            stream.close()
        finally:
            h2.writer.close()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return sum(metric.value for family in self.tunnel.metrics.registry.collect() for metric in family.samples
                   if metric.name == name and all(metric.labels.get(k) == v for k, v in (labels or {}).items()))


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)  # polling a condition with a deadline


@contextlib.asynccontextmanager
async def rig(netns: str, mode: str) -> AsyncIterator[Rig]:
    pki = Pki()
    workload = Workload(POD_IP, SERVER_ID, "node1", netns, name="demo/echo", labels={"app": "echo"})
    authorizer = Authorizer([], [peer_authentication(mode)])

    def fetch(identity: SpiffeId, key: Any) -> list[str]:
        return pki.ca.issue(make_csr(identity, key))[1]

    tunnel = NodeTunnel("node1", "cluster.local", fetch, {POD_IP: workload}.get, authorizer=lambda: authorizer)
    app = App()
    server = await asyncio.start_server(app, sock=listening_socket(netns, APP_PORT))
    try:
        await tunnel.add_pod(workload)
        yield Rig(netns, pki, tunnel, app)
    finally:
        await tunnel.close()
        server.close()


async def test_silent_plaintext_clients_cost_one_upstream_each_and_release_it(pod_netns: str) -> None:
    """PERMISSIVE: a plaintext client that never sends holds exactly what it would hold without the mesh
    (one app connection, no amplification, nothing dialled twice) and gives it all back when it goes;
    meanwhile the tunnel serves plaintext and HBONE clients."""
    async with rig(pod_netns, "PERMISSIVE") as r:
        silent = [await r.plaintext() for _ in range(SILENT)]
        try:
            await until(lambda: r.app.open == SILENT, "every silent client reached the app once")
            assert r.sample("nodeagent_tunnel_active_connections", {"reporter": "destination"}) == SILENT
            reader, writer = await r.plaintext()
            writer.write(b"plain")
            assert await asyncio.wait_for(reader.read(5), 5) == b"plain"
            writer.close()
            await r.hbone_echo()
        finally:
            for _, writer in silent:
                writer.close()
        await until(lambda: r.app.open == 0, "the app's connections closed with their clients")
        await until(lambda: r.sample("nodeagent_tunnel_active_connections", {"reporter": "destination"}) == 0,
                    "the tunnel holds nothing for them")
        assert r.app.accepted == SILENT + 2  # the silent ones, the plaintext echo, the HBONE stream


async def test_silent_plaintext_under_strict_is_closed_at_once_and_never_dialled(pod_netns: str) -> None:
    async with rig(pod_netns, "STRICT") as r:
        silent = [await r.plaintext() for _ in range(SILENT)]
        try:
            for reader, _ in silent:
                assert await asyncio.wait_for(reader.read(), 5) == b"", "closed by the tunnel, unprompted"
        finally:
            for _, writer in silent:
                writer.close()
        assert r.app.accepted == 0
        assert r.sample("nodeagent_tunnel_policy_denials_total") == SILENT
        await r.hbone_echo()
        assert r.app.accepted == 1


async def test_a_stalled_handshake_on_15008_is_dropped_after_the_handshake_timeout(
        pod_netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnels, "HANDSHAKE_TIMEOUT", 0.5)  # read when the pod's listeners open
    async with rig(pod_netns, "STRICT") as r:
        sock = client_socket(pod_netns, 0)
        await asyncio.get_running_loop().sock_connect(sock, (POD_IP, tunnels.HBONE_PORT))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(b"\x16\x03\x01\x00")  # a ClientHello's first bytes, then nothing
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert time.monotonic() - started < 2.0
        finally:
            writer.close()
        await r.hbone_echo()


async def test_the_tunnel_counts_refused_handshakes(pod_netns: str) -> None:
    async with rig(pod_netns, "STRICT") as r:
        sock = client_socket(pod_netns, 0)
        await asyncio.get_running_loop().sock_connect(sock, (POD_IP, tunnels.HBONE_PORT))
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            _, writer = await asyncio.open_connection(sock=sock, ssl=bare_client(alpn=["h2"], tls12=True),
                                                      server_hostname="")
            writer.close()
        sock.close()
        await until(lambda: r.sample("nodeagent_hbone_protocol_violations_total", {"reason": "tls_version"}) == 1,
                    "the refused handshake is counted", timeout=1)
