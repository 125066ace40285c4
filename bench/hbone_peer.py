"""One side of a nodeagent HBONE tunnel pair, as its own process, for bench/hbone_throughput.py.

    hbone_peer.py server PORT UPSTREAM_PORT PKI_DIR   # HBONE (mTLS, h2 CONNECT) in, TCP out
    hbone_peer.py client PORT HBONE_PORT UPSTREAM_PORT PKI_DIR   # TCP in, HBONE out
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from nodeagent.ztunnel.hbone import HbonePool, open_upstream, serve_connection  # noqa: E402
from nodeagent.ztunnel.identity import SpiffeId  # noqa: E402
from nodeagent.ztunnel.tls import client_context, server_context  # noqa: E402
from nodeagent.ztunnel.tunnel import _bridge_hbone  # noqa: E402

SERVER_ID = SpiffeId("cluster.local", "bench", "server")


def load(pki: Path, name: str) -> tuple[list[str], object, str]:
    """(chain leaf first and root last, as the tunnel's TLS contexts take it; key; root)."""
    pems = [p.strip() + "\n" for p in (pki / f"{name}-chain.pem").read_text().split("\n\n") if p.strip()]
    key = serialization.load_pem_private_key((pki / f"{name}-key.pem").read_bytes(), password=None)
    root = (pki / "root.pem").read_text()
    return [*pems, root], key, root


async def main() -> None:
    role = sys.argv[1]
    if role == "server":
        port, upstream, pki = int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
        chain, key, root = load(pki, "server")
        context = server_context(chain, key, root)  # type: ignore[arg-type]
        server = await asyncio.start_server(
            lambda r, w: serve_connection(r, w, trust_domain="cluster.local", policy=lambda who, dest: True,
                                          connect=open_upstream), "127.0.0.1", port, ssl=context)
    else:
        port, hbone, upstream, pki = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
        chain, key, root = load(pki, "client")
        pool = HbonePool(lambda: client_context(chain, key, root))  # type: ignore[arg-type]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stream = await pool.connect(("127.0.0.1", hbone), f"127.0.0.1:{upstream}", SERVER_ID)
            try:
                await _bridge_hbone(reader, writer, stream)
            except OSError:
                pass  # the benchmark client closes right after the sink's confirmation
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", port, limit=256 << 10)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop  # the tunnel's event loop where installed (libuv: fewer copies, faster TLS transport)

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
