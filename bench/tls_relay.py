"""A plain mutual-TLS 1.3 byte relay pair (no HTTP/2), the floor reference for bench/hbone_lab.py: what
Python (uvloop, stdlib ssl) pays for TLS and two TCP hops alone, so the HBONE tunnel's own cost
(HTTP/2 framing, flow control, streams) is the difference.

    tls_relay.py server --listen HOST:PORT --upstream HOST:PORT --pki DIR   # TLS in, TCP out
    tls_relay.py client --listen HOST:PORT --peer HOST:PORT --pki DIR       # TCP in, TLS out

Bytes move in protocol callbacks with backpressure both ways (a transport is paused while its partner
is above its high-water mark), as the tunnel's data path does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hbone_peer import address, load  # noqa: E402
from nodeagent.tunnel.identity.tls import client_context, server_context  # noqa: E402


class Half(asyncio.Protocol):
    """One side of a relayed connection; `partner` is the other side once it is connected."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.partner: Half | None = None
        self.early: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def join(self, partner: Half) -> None:
        self.partner, partner.partner = partner, self
        for half in (self, partner):
            other = half.partner
            assert other is not None and other.transport is not None
            for data in half.early:
                other.transport.write(data)
            if half.eof and other.transport.can_write_eof():
                other.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        if self.partner is None or self.partner.transport is None:
            self.early.append(data)
        else:
            self.partner.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.partner is not None and self.partner.transport is not None and self.partner.transport.can_write_eof():
            self.partner.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--listen", type=address, required=True)
    parser.add_argument("--peer", type=address, help="client: the relay server")
    parser.add_argument("--upstream", type=address, help="server: where to relay to")
    parser.add_argument("--pki", type=Path, required=True)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    if args.role == "server":
        chain, key, root = load(args.pki, "server")
        context = server_context(chain, key, root)  # type: ignore[arg-type]
        target, tls = args.upstream, None
    else:
        chain, key, root = load(args.pki, "client")
        context, target, tls = None, args.peer, client_context(chain, key, root)  # type: ignore[arg-type]
    if target is None:
        parser.error("the server needs --upstream, the client --peer")

    dialing: set[asyncio.Task[None]] = set()

    def accepted() -> Half:
        inbound = Half()

        async def dial() -> None:
            try:
                _, outbound = await loop.create_connection(Half, *target, ssl=tls,
                                                           server_hostname="" if tls else None)
            except OSError:
                if inbound.transport is not None:
                    inbound.transport.close()
                return
            inbound.join(outbound)

        task = loop.create_task(dial())
        dialing.add(task)
        task.add_done_callback(dialing.discard)
        return inbound

    server = await loop.create_server(accepted, *args.listen, ssl=context, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
