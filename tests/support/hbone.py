"""HBONE test helpers: the identities and TLS contexts of a server and a client tunnel, and an upstream echo."""

from __future__ import annotations

import asyncio
import hashlib
import ssl

from nodeagent.ca.identity import CertificateAuthority, SpiffeId, make_csr, new_key
from nodeagent.tunnel.identity.tls import client_context, server_context

SERVER_ID = SpiffeId("cluster.local", "demo", "echo")
CLIENT_ID = SpiffeId("cluster.local", "demo", "client")


def contexts(ca: CertificateAuthority | None = None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for SERVER_ID, client context for CLIENT_ID), both issued by `ca` (a new one if None)."""
    ca = ca or CertificateAuthority.generate()
    keys = {i: new_key() for i in (SERVER_ID, CLIENT_ID)}
    chains = {i: ca.issue(make_csr(i, k))[1] for i, k in keys.items()}
    return (server_context(chains[SERVER_ID], keys[SERVER_ID], ca.root_pem),
            client_context(chains[CLIENT_ID], keys[CLIENT_ID], ca.root_pem))


async def upstream_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then a digest of everything received, then close (proves the half-close crossed)."""
    digest = hashlib.sha256()
    while data := await reader.read(1 << 16):
        digest.update(data)
        writer.write(data)
        await writer.drain()
    writer.write(b"EOF:" + digest.hexdigest().encode())
    await writer.drain()
    writer.close()
