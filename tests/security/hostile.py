"""Hostile HBONE peers for the adversarial suite: a target wired as the tunnel wires 15008, raw TLS
clients that speak hand-made HTTP/2 frames, and certificates no honest workload has.

Everything runs in one throw-away network namespace (`throwaway_netns`): the target's listener, its
upstream echo server and every client socket are made inside it, the test's event loop serves them.
Nothing is added to the root namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from nodeagent.ca.identity import CertificateAuthority, SpiffeId, make_csr, new_key
from nodeagent.kernel.netns import client_socket, listening_socket
from nodeagent.tunnel.hbone.client import open_connection, open_stream
from nodeagent.tunnel.hbone.limits import SOCKET_MARK
from nodeagent.tunnel.hbone.server import TlsListener, serve_connection, serve_tls
from nodeagent.tunnel.identity.tls import client_context, server_context
from nodeagent.tunnel.telemetry import TunnelMetrics

SERVER_ID = SpiffeId("cluster.local", "demo", "echo")
CLIENT_ID = SpiffeId("cluster.local", "demo", "client")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
VIOLATIONS_METRIC = "nodeagent_hbone_protocol_violations_total"
# The target's timeouts: short, so the slowloris cases take a second, not the production ten.
HANDSHAKE_TIMEOUT = REQUEST_TIMEOUT = 0.5


@contextlib.contextmanager
def throwaway_netns() -> Iterator[str]:
    """A fresh network namespace with loopback up; its path. Deleted afterwards, also on failure."""
    name = "sec-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Pki:
    """The mesh's CA and the contexts of an honest server and client, plus the dishonest kinds."""

    ca: CertificateAuthority = field(default_factory=CertificateAuthority.generate)

    def chain(self, identity: SpiffeId) -> tuple[list[str], ec.EllipticCurvePrivateKey]:
        key = new_key()
        return self.ca.issue(make_csr(identity, key))[1], key

    def server(self) -> ssl.SSLContext:
        return server_context(*self.chain(SERVER_ID), self.ca.root_pem)

    def client(self) -> ssl.SSLContext:
        return client_context(*self.chain(CLIENT_ID), self.ca.root_pem)

    def forged(self, uri: str, not_before: dt.datetime, not_after: dt.datetime) -> ssl.SSLContext:
        """A client context whose leaf our own intermediate signed (so the chain verifies) with any
        SPIFFE URI and validity: what a CA bug or a stolen intermediate would give."""
        key = new_key()
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.ca.intermediate.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
                .sign(self.ca.intermediate_key, hashes.SHA256()))
        return client_context([_pem(leaf), _pem(self.ca.intermediate), self.ca.root_pem], key, self.ca.root_pem)


def bare_client(*, alpn: list[str] | None = None, tls12: bool = False) -> ssl.SSLContext:
    """A client context with no certificate of its own that trusts anything (an outsider)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.close()


class Target:
    """An HBONE server inside `netns`, wired as the tunnel should wire its 15008 listener: `serve_tls`
    (handshake refusals counted) then `serve_connection` (protocol refusals counted), both into a
    TunnelMetrics registry. Upstreams are dialled inside the namespace; `gate`, when set, holds every
    upstream connect until it opens (a slow upstream), and `inflight` / `peak` count them."""

    def __init__(self, netns: str, pki: Pki) -> None:
        self.netns, self.pki = netns, pki
        self.metrics = TunnelMetrics()
        self.gate: asyncio.Event | None = None
        self.inflight = self.peak = self.connects = 0
        self.servers: list[asyncio.Server | TlsListener] = []
        self.port = self.echo_port = 0
        self.idle_timeout: float | None = 3600.0

    async def start(self) -> None:
        echo_sock = listening_socket(self.netns, 0)
        self.echo_port = echo_sock.getsockname()[1]
        self.servers.append(await asyncio.start_server(_echo, sock=echo_sock))
        hbone_sock = listening_socket(self.netns, 0)
        self.port = hbone_sock.getsockname()[1]
        self.servers.append(await serve_tls(hbone_sock, self.pki.server(), self._serve,
                                            handshake_timeout=HANDSHAKE_TIMEOUT, violation=self.count))

    def count(self, reason: str) -> None:
        self.metrics.protocol_violations.labels(reason=reason).inc()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_connection(reader, writer, trust_domain="cluster.local", policy=lambda who, target: True,
                               connect=self._connect, violation=self.count, request_timeout=REQUEST_TIMEOUT,
                               idle_timeout=self.idle_timeout)

    async def _connect(self, host: str, port: int) -> socket.socket:
        self.inflight += 1
        self.connects += 1
        self.peak = max(self.peak, self.inflight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            sock = client_socket(self.netns, SOCKET_MARK)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
            except BaseException:
                sock.close()
                raise
            return sock
        finally:
            self.inflight -= 1

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    def violations(self, reason: str) -> float:
        """nodeagent_hbone_protocol_violations_total{reason} as Prometheus would read it."""
        return self.metrics.registry.get_sample_value(VIOLATIONS_METRIC, {"reason": reason}) or 0.0

    async def counted(self, reason: str, at_least: float = 1, timeout: float = 5.0) -> float:
        """Poll the counter until it reaches `at_least` (the server counts as it closes, maybe after the
        client saw the close); its value."""
        deadline = time.monotonic() + timeout
        while self.violations(reason) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"{VIOLATIONS_METRIC}{{reason={reason!r}}} stayed at {self.violations(reason)}")
            await asyncio.sleep(0.02)  # polling a condition with a deadline
        return self.violations(reason)

    async def socket(self) -> socket.socket:
        """A TCP connection to the listener from inside the namespace."""
        sock = client_socket(self.netns, 0)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def tls(self, context: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw TLS connection (no HTTP/2 yet)."""
        return await asyncio.wait_for(asyncio.open_connection(sock=await self.socket(), ssl=context,
                                                              server_hostname=""), 5)

    async def raw(self, context: ssl.SSLContext | None = None) -> RawH2:
        """An honest TLS connection that will then speak whatever frames the test writes."""
        return RawH2(*await self.tls(context or self.pki.client()))

    async def serves_honest_client(self) -> None:
        """The target still does its job: a fresh mTLS connection, a CONNECT, bytes echoed back."""
        h2 = await open_connection(("127.0.0.1", self.port), self.pki.client(), SERVER_ID, timeout=5,
                                   make_socket=lambda: client_socket(self.netns, 0))
        try:
            stream = await open_stream(h2, f"127.0.0.1:{self.echo_port}", timeout=5)
            await stream.write(b"still serving")
            assert await asyncio.wait_for(stream.read(), 5) == b"still serving"
            stream.close()
        finally:
            h2.writer.close()


@contextlib.asynccontextmanager
async def target(netns: str, pki: Pki) -> AsyncIterator[Target]:
    served = Target(netns, pki)
    await served.start()
    try:
        yield served
    finally:
        await served.close()


def connect_headers(authority: str) -> list[tuple[str, str]]:
    return [(":method", "CONNECT"), (":authority", authority)]


@dataclass
class RawH2:
    """An HTTP/2 client made of hand-written frames over one TLS connection (hyperframe + hpack), so a
    test can send what no well-behaved library would."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    encoder: Encoder = field(default_factory=Encoder)
    buffer: bytearray = field(default_factory=bytearray)

    def send(self, *frames: Frame | bytes) -> None:
        self.writer.write(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    def hello(self) -> None:
        """The client preface and an empty SETTINGS, as every client starts."""
        self.send(PREFACE, SettingsFrame(0))

    def block(self, headers: list[tuple[str, str]], *, huffman: bool = True) -> bytes:
        """An HPACK header block from this connection's encoder (plain literals with huffman=False: the
        encoded size is then the text's)."""
        return self.encoder.encode(headers, huffman=huffman)

    @staticmethod
    def headers(stream_id: int, block: bytes, *, end_headers: bool = True, end_stream: bool = False) -> HeadersFrame:
        frame = HeadersFrame(stream_id, data=block)
        if end_headers:
            frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    def connect(self, stream_id: int, authority: str) -> HeadersFrame:
        return self.headers(stream_id, self.block(connect_headers(authority)))

    @staticmethod
    def continuation(stream_id: int, data: bytes = b"", *, end_headers: bool = False) -> ContinuationFrame:
        frame = ContinuationFrame(stream_id, data=data)
        if end_headers:
            frame.flags.add("END_HEADERS")
        return frame

    @staticmethod
    def reset(stream_id: int, code: int = 8) -> RstStreamFrame:  # 8: CANCEL
        return RstStreamFrame(stream_id, error_code=code)

    @staticmethod
    def ping(n: int) -> PingFrame:
        return PingFrame(0, opaque_data=n.to_bytes(8, "big"))

    @staticmethod
    def data(stream_id: int, payload: bytes) -> DataFrame:
        return DataFrame(stream_id, data=payload)

    async def frames(self, until: type[Frame] | None = None, timeout: float = 5.0,
                     match: object = None) -> list[Frame]:
        """Frames the server sent, until one of type `until` (for which `match(frame)` holds, if given)
        arrives, or until the connection closes; AssertionError at the deadline."""
        seen: list[Frame] = []
        deadline = time.monotonic() + timeout
        while True:
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(bytes(self.buffer[9:9 + length])))
                del self.buffer[:9 + length]
                seen.append(frame)
                if until is not None and isinstance(frame, until) and (match is None or match(frame)):  # type: ignore[operator]
                    return seen
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {until.__name__ if until else 'close'} within {timeout} s: "
                                     f"{[type(f).__name__ for f in seen]}")
            try:
                chunk = await asyncio.wait_for(self.reader.read(1 << 16), left)
            except (ConnectionError, ssl.SSLError):
                chunk = b""
            except TimeoutError:
                continue
            if not chunk:
                if until is None:
                    return seen
                raise AssertionError(f"closed before a {until.__name__}: {[type(f).__name__ for f in seen]}")
            self.buffer += chunk

    async def goaway(self, timeout: float = 5.0) -> GoAwayFrame:
        """The server's GOAWAY, then the close after it."""
        frame = (await self.frames(GoAwayFrame, timeout))[-1]
        assert isinstance(frame, GoAwayFrame)
        await self.closed(timeout)
        return frame

    async def closed(self, timeout: float = 5.0) -> None:
        """The server closes the connection within `timeout`."""
        await self.frames(None, timeout)

    def close(self) -> None:
        self.writer.close()
