"""One side of a nodeagent HBONE tunnel pair, as its own process, for bench/hbone_throughput.py and
bench/hbone_lab.py (which runs each side in its lab node's network namespace).

    hbone_peer.py server --listen HOST:PORT --pki DIR
        HBONE in (mTLS, h2 CONNECT), TCP out to each CONNECT's :authority
    hbone_peer.py client --listen HOST:PORT --peer HOST:PORT --authority HOST:PORT --pki DIR
        TCP in, each connection one CONNECT stream to --authority through the peer (pooled connections)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from nodeagent.ca.identity import SpiffeId  # noqa: E402
from nodeagent.tunnel.hbone.client import HbonePool  # noqa: E402
from nodeagent.tunnel.hbone.server import serve_connection, upstream_socket  # noqa: E402
from nodeagent.tunnel.identity.tls import client_context, server_context  # noqa: E402

SERVER_ID = SpiffeId("cluster.local", "bench", "server")


def load(pki: Path, name: str) -> tuple[list[str], object, str]:
    """(chain leaf first and root last, as the tunnel's TLS contexts take it; key; root)."""
    pems = [p.strip() + "\n" for p in (pki / f"{name}-chain.pem").read_text().split("\n\n") if p.strip()]
    key = serialization.load_pem_private_key((pki / f"{name}-key.pem").read_bytes(), password=None)
    root = (pki / "root.pem").read_text()
    return [*pems, root], key, root


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--listen", type=address, required=True)
    parser.add_argument("--peer", type=address)
    parser.add_argument("--authority")
    parser.add_argument("--pki", type=Path, required=True)
    args = parser.parse_args()
    host, port = args.listen
    if args.role == "server":
        chain, key, root = load(args.pki, "server")
        context = server_context(chain, key, root)  # type: ignore[arg-type]
        server = await asyncio.start_server(
            lambda r, w: serve_connection(r, w, trust_domain="cluster.local", policy=lambda who, dest: True,
                                          connect=upstream_socket), host, port, ssl=context, backlog=1024)
    else:
        if args.peer is None or args.authority is None:
            parser.error("a client needs --peer and --authority")
        chain, key, root = load(args.pki, "client")
        pool = HbonePool(lambda: client_context(chain, key, root))  # type: ignore[arg-type]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                stream = await pool.connect(args.peer, args.authority, SERVER_ID)
                await stream.splice(reader, writer)
            except OSError:
                pass  # the benchmark client closes right after the sink's confirmation
            finally:
                writer.close()

        server = await asyncio.start_server(handle, host, port, limit=256 << 10, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop  # the tunnel's event loop where installed (libuv: fewer copies, faster TLS transport)

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
