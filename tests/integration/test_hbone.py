"""HBONE on loopback: a real TLS 1.3 + HTTP/2 CONNECT server and client, a real upstream (root: SO_MARK)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from nodeagent.ca.identity import CertificateAuthority, IdentityError, SpiffeId, make_csr, new_key
from nodeagent.tunnel.hbone.client import hbone_connect
from nodeagent.tunnel.hbone.server import open_upstream, serve_connection
from nodeagent.tunnel.identity.tls import client_context
from tests.support.hbone import CLIENT_ID, SERVER_ID, contexts, upstream_echo

pytestmark = pytest.mark.root


class Rig:
    def __init__(self, echo_port: int, hbone_port: int, client_ctx: Any, denied: set[str],
                 ca: CertificateAuthority) -> None:
        self.echo_port, self.hbone_port, self.client_ctx, self.denied = echo_port, hbone_port, client_ctx, denied
        self.ca = ca

    async def connect(self, authority: str | None = None, expected: SpiffeId = SERVER_ID) -> Any:
        return await hbone_connect(("127.0.0.1", self.hbone_port), authority or f"127.0.0.1:{self.echo_port}",
                                   self.client_ctx, expected)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    ca = CertificateAuthority.generate()
    server_ctx, client_ctx = contexts(ca)
    denied: set[str] = set()
    echo = await asyncio.start_server(upstream_echo, "127.0.0.1", 0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_connection(reader, writer, trust_domain="cluster.local",
                               policy=lambda who, dest: dest not in denied, connect=open_upstream)

    hbone = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    yield Rig(echo.sockets[0].getsockname()[1], hbone.sockets[0].getsockname()[1], client_ctx, denied, ca)
    hbone.close()
    echo.close()


async def read_all(stream: Any) -> bytes:
    out = bytearray()
    while chunk := await stream.read():
        out += chunk
    return bytes(out)


async def test_bytes_cross_intact_both_ways_with_half_close(rig: Rig) -> None:
    stream = await rig.connect()
    payload = os.urandom(8 << 20)  # twice the stream window: flow control must work both ways
    sender = asyncio.create_task(stream.write(payload))
    received = bytearray()
    while len(received) < len(payload):
        received += await stream.read()
    await sender
    assert bytes(received) == payload
    stream.write_eof()
    assert await read_all(stream) == b"EOF:" + hashlib.sha256(payload).hexdigest().encode()


async def test_many_streams_in_parallel(rig: Rig) -> None:
    async def one(i: int) -> bool:
        stream = await rig.connect()
        data = f"stream {i}".encode() * 1000
        await stream.write(data)
        stream.write_eof()
        return (await read_all(stream)).startswith(data)

    assert all(await asyncio.gather(*(one(i) for i in range(20))))


@pytest.mark.parametrize(("authority", "status"), [("example.com:80", 400), ("127.0.0.1:0", 400),
                                                   ("127.0.0.1", 400)])
async def test_a_connect_that_is_not_to_an_address_gets_400(rig: Rig, authority: str, status: int) -> None:
    with pytest.raises(ConnectionRefusedError, match=f"status {status}"):
        await rig.connect(authority)


async def test_an_unreachable_upstream_gets_503_and_a_denied_one_401(rig: Rig) -> None:
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    with pytest.raises(ConnectionRefusedError, match="status 503"):
        await rig.connect(f"127.0.0.1:{port}")
    rig.denied.add(f"127.0.0.1:{rig.echo_port}")
    with pytest.raises(ConnectionRefusedError, match="status 401"):
        await rig.connect()


async def test_the_client_refuses_a_server_that_is_not_the_destination(rig: Rig) -> None:
    with pytest.raises(IdentityError, match="not the destination's"):
        await rig.connect(expected=SpiffeId("cluster.local", "demo", "db"))


async def test_plaintext_on_the_hbone_port_is_refused_and_the_server_goes_on(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.hbone_port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the TLS layer closes on a non-TLS hello
    writer.close()
    stream = await rig.connect()
    await stream.write(b"still here")
    stream.write_eof()
    assert (await read_all(stream)).startswith(b"still here")


async def test_rotation_keeps_open_connections_and_serves_new_ones_the_new_certificate() -> None:
    from cryptography import x509

    from nodeagent.tunnel.identity.certs import WorkloadCertificate, rotating_server_context

    ca = CertificateAuthority.generate()
    server_cert = WorkloadCertificate(SERVER_ID, lambda identity, key: ca.issue(make_csr(identity, key))[1])
    client_cert = WorkloadCertificate(CLIENT_ID, lambda identity, key: ca.issue(make_csr(identity, key))[1])
    echo = await asyncio.start_server(upstream_echo, "127.0.0.1", 0)
    hbone = await asyncio.start_server(
        lambda r, w: serve_connection(r, w, trust_domain="cluster.local", policy=lambda who, dest: True,
                                      connect=open_upstream),
        "127.0.0.1", 0, ssl=rotating_server_context(server_cert))
    peer = ("127.0.0.1", hbone.sockets[0].getsockname()[1])
    authority = f"127.0.0.1:{echo.sockets[0].getsockname()[1]}"

    def served_serial(stream: Any) -> int:
        der = stream.h2.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return int(x509.load_der_x509_certificate(der).serial_number)

    try:
        before = await hbone_connect(peer, authority, client_cert.contexts()[1], SERVER_ID)
        first_serial = served_serial(before)
        assert server_cert.refresh(force=True) and server_cert.leaf is not None
        assert server_cert.leaf.serial_number != first_serial
        await before.write(b"old connection still works")
        assert await before.read() == b"old connection still works"
        after = await hbone_connect(peer, authority, client_cert.contexts()[1], SERVER_ID)
        assert served_serial(after) == server_cert.leaf.serial_number, "new connections get the new certificate"
        before.write_eof()
        after.write_eof()
    finally:
        hbone.close()
        echo.close()


async def test_the_pool_shares_connections_up_to_the_stream_limit() -> None:
    from nodeagent.tunnel.hbone.client import HbonePool

    server_ctx, client_ctx = contexts()
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await serve_connection(reader, writer, trust_domain="cluster.local", policy=lambda who, dest: True,
                               connect=open_upstream)

    echo = await asyncio.start_server(upstream_echo, "127.0.0.1", 0)
    hbone = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    peer, authority = ("127.0.0.1", hbone.sockets[0].getsockname()[1]), f"127.0.0.1:{echo.sockets[0].getsockname()[1]}"
    pool = HbonePool(lambda: client_ctx, max_streams=5)
    try:
        streams = [await pool.connect(peer, authority, SERVER_ID) for _ in range(12)]
        assert accepted == 3, "12 concurrent streams at 5 per connection need 3 connections"
        for i, stream in enumerate(streams):
            await stream.write(f"s{i}".encode())
            stream.write_eof()
        for i, stream in enumerate(streams):
            assert (await read_all(stream)).startswith(f"s{i}".encode())
        later = await pool.connect(peer, authority, SERVER_ID)
        assert accepted == 3, "finished streams free their slots"
        later.write_eof()
    finally:
        await pool.close()
        hbone.close()
        echo.close()


async def test_a_wrong_alpn_or_an_expired_client_certificate_is_refused_and_others_go_on(rig: Rig) -> None:
    import datetime as dt
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes


    # Valid certificates of the rig's own CA: only the ALPN, then only the dates, are wrong.
    ca = rig.ca
    key = new_key()
    chain = ca.issue(make_csr(CLIENT_ID, key))[1]
    wrong_alpn = client_context(chain, key, ca.root_pem)
    wrong_alpn.set_alpn_protocols(["http/1.1"])
    with pytest.raises((ConnectionError, OSError, ssl.SSLError, IdentityError, asyncio.TimeoutError)):
        stream = await hbone_connect(("127.0.0.1", rig.hbone_port), f"127.0.0.1:{rig.echo_port}", wrong_alpn,
                                     SERVER_ID, timeout=3)
        await stream.write(b"x")
    now = dt.datetime.now(dt.UTC)
    expired = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.intermediate.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=2)).not_valid_after(now - dt.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(CLIENT_ID))]),
                              critical=True)
               .sign(ca.intermediate_key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization

    stale = client_context([expired.public_bytes(serialization.Encoding.PEM).decode(), *chain[1:]], key, ca.root_pem)
    with pytest.raises((ConnectionError, OSError, ssl.SSLError, asyncio.TimeoutError)):
        stream = await hbone_connect(("127.0.0.1", rig.hbone_port), f"127.0.0.1:{rig.echo_port}", stale, SERVER_ID,
                                     timeout=3)
        await stream.write(b"x")
    good = await rig.connect()
    await good.write(b"unaffected")
    good.write_eof()
    assert (await read_all(good)).startswith(b"unaffected")


async def test_pooled_connections_are_kept_alive_with_pings_and_a_silent_peer_is_dropped() -> None:
    from nodeagent.tunnel.hbone.client import HbonePool

    server_ctx, client_ctx = contexts()
    silent = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def go_silent() -> None:
            await silent.wait()
            writer.transport.pause_reading()  # a peer that no longer reads anything (a dead path)

        gate = asyncio.create_task(go_silent())
        await serve_connection(reader, writer, trust_domain="cluster.local", policy=lambda who, dest: True,
                               connect=open_upstream)
        gate.cancel()

    echo = await asyncio.start_server(upstream_echo, "127.0.0.1", 0)
    hbone = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    peer, authority = ("127.0.0.1", hbone.sockets[0].getsockname()[1]), f"127.0.0.1:{echo.sockets[0].getsockname()[1]}"
    pool = HbonePool(lambda: client_ctx, keepalive=0.1)
    try:
        stream = await pool.connect(peer, authority, SERVER_ID)
        connection = stream.h2
        deadline = asyncio.get_running_loop().time() + 5
        while connection.pings_acked < 3:
            assert asyncio.get_running_loop().time() < deadline, "PINGs are not answered"
            await asyncio.sleep(0.05)
        assert not connection.closed.is_set()
        silent.set()
        await asyncio.wait_for(connection.closed.wait(), 5)  # noticed without any stream traffic
    finally:
        await pool.close()
        hbone.close()
        echo.close()
