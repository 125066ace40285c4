"""Peers refused at TLS by the HBONE server: each one refused, counted by reason, and an honest client
served right after (tls.py's checks, hbone.serve_tls's handshake)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time

import pytest
import structlog

from nodeagent.ca.identity import CertificateAuthority, SpiffeId, make_csr, new_key
from nodeagent.tunnel.hbone.limits import VIOLATIONS
from nodeagent.tunnel.identity.tls import client_context
from tests.security.hostile import CLIENT_ID, HANDSHAKE_TIMEOUT, Pki, Target, bare_client, target

pytestmark = pytest.mark.root

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


async def refused(served: Target, context: ssl.SSLContext) -> None:
    """The connection never carries HTTP/2: the handshake fails, or the server closes right after it."""
    try:
        raw = await served.raw(context)
    except (ssl.SSLError, ConnectionError):
        return
    raw.hello()
    try:
        await raw.closed()
    finally:
        raw.close()


async def check(served: Target, context: ssl.SSLContext, reason: str) -> None:
    await refused(served, context)
    assert await served.counted(reason) == 1
    await served.serves_honest_client()


async def test_a_wrong_trust_domain_signed_by_our_own_root_is_refused(served: Target, pki: Pki) -> None:
    await check(served, pki.forged("spiffe://evil.local/ns/demo/sa/client", NOW - DAY, NOW + DAY), "trust_domain")


async def test_a_certificate_of_another_mesh_is_refused_at_the_handshake(served: Target, pki: Pki) -> None:
    other = CertificateAuthority.generate("evil.local")
    key = new_key()
    chain = other.issue(make_csr(SpiffeId("evil.local", "demo", "client"), key))[1]
    await check(served, client_context(chain, key, pki.ca.root_pem), "certificate_untrusted")


async def test_an_expired_certificate_is_refused(served: Target, pki: Pki) -> None:
    await check(served, pki.forged(str(CLIENT_ID), NOW - 2 * DAY, NOW - DAY), "certificate_expired")


async def test_a_not_yet_valid_certificate_is_refused(served: Target, pki: Pki) -> None:
    await check(served, pki.forged(str(CLIENT_ID), NOW + DAY, NOW + 2 * DAY), "certificate_not_yet_valid")


async def test_a_client_without_a_certificate_is_refused(served: Target) -> None:
    await check(served, bare_client(alpn=["h2"]), "no_client_certificate")


async def test_tls_1_2_is_refused(served: Target) -> None:
    await check(served, bare_client(alpn=["h2"], tls12=True), "tls_version")


@pytest.mark.parametrize("alpn", [["http/1.1"], None], ids=["http1.1", "none"])
async def test_alpn_other_than_h2_is_refused(served: Target, pki: Pki, alpn: list[str] | None) -> None:
    context = pki.client()
    context.set_alpn_protocols(alpn or [])
    await check(served, context, "alpn")


async def test_a_stalled_handshake_is_aborted_after_the_handshake_timeout(served: Target) -> None:
    reader, writer = await asyncio.open_connection(sock=await served.socket())
    try:
        writer.write(b"\x16\x03\x01\x00")  # the first bytes of a ClientHello, then nothing
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), HANDSHAKE_TIMEOUT * 8) == b"", "the server closes"
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT * 4
    finally:
        writer.close()
    assert await served.counted("handshake_timeout") == 1
    await served.serves_honest_client()


def test_every_reason_counted_here_is_declared() -> None:
    for reason in ("trust_domain", "certificate_untrusted", "certificate_expired", "certificate_not_yet_valid",
                   "no_client_certificate", "tls_version", "alpn", "handshake_timeout"):
        assert reason in VIOLATIONS


def test_the_handshake_is_refused_and_counted_the_same_under_uvloop(netns: str, pki: Pki) -> None:
    """The tunnel runs on uvloop: serve_tls's paused-then-upgraded accept and its timeout behave alike."""
    import uvloop

    async def main() -> None:
        async with target(netns, pki) as served:
            await check(served, bare_client(alpn=["h2"], tls12=True), "tls_version")
            await check(served, pki.forged(str(CLIENT_ID), NOW - 2 * DAY, NOW - DAY), "certificate_expired")
            reader, writer = await asyncio.open_connection(sock=await served.socket())
            writer.write(b"\x16\x03")
            assert await asyncio.wait_for(reader.read(), HANDSHAKE_TIMEOUT * 8) == b""
            writer.close()
            assert await served.counted("handshake_timeout") == 1
            await served.serves_honest_client()

    uvloop.run(main())


async def test_a_refused_handshake_is_logged_naming_the_peer(served: Target) -> None:
    with structlog.testing.capture_logs() as logs:
        await refused(served, bare_client(alpn=["h2"], tls12=True))
        await served.counted("tls_version")
    entries = [e for e in logs if e["event"] == "hbone peer refused"]
    assert len(entries) == 1 and entries[0]["reason"] == "tls_version", logs
    assert entries[0]["peer"].startswith("('127.0.0.1', ") and entries[0]["log_level"] == "warning"
