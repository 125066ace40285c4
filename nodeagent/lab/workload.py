"""The lab's pod workload: an echo server that says who answered and whom it saw, and its client.

Tests prove where a connection landed (which pod) and what source address the server saw (so SNAT,
masquerade or a tunnel that loses the client address shows). Every answer is one JSON object:
  {"pod": "ns/name", "node": ..., "peer": "ip:port", "local": "ip:port", "proto": ..., "echo": ...}
TCP: each line received is answered with one JSON line; a request starting with an HTTP method gets
an HTTP/1.1 response with the JSON as body (so curl works). UDP: each datagram gets one JSON datagram.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any, cast

HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")
MAX_LINE = 64 * 1024


def identity() -> dict[str, str]:
    """Who this workload is, from the environment the lab (or a Downward API) sets."""
    pod = os.environ.get("POD_NAME") or socket.gethostname()
    namespace = os.environ.get("POD_NAMESPACE", "default")
    return {"pod": f"{namespace}/{pod}", "node": os.environ.get("NODE_NAME", ""),
            "lab": os.environ.get("NODEAGENT_LAB", "")}


def _addr(sockname: Any) -> str:
    if not sockname:
        return ""
    host = str(sockname[0])
    return f"[{host}]:{sockname[1]}" if ":" in host else f"{host}:{sockname[1]}"


def split_target(target: str) -> tuple[str, int]:
    """`ip:port` or `[ipv6]:port` -> (ip, port)."""
    host, _, port = target.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _udp6_socket(port: int) -> socket.socket | None:
    """An IPv6-only UDP socket on [::]:port beside the IPv4 one (IPV6_V6ONLY, so IPv4 peers keep their plain
    addresses); None where the kernel has no IPv6."""
    if not socket.has_ipv6:
        return None
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        return None
    return sock


def answer(who: Mapping[str, str], proto: str, peer: Any, local: Any, echo: str) -> dict[str, str]:
    """The JSON object a request is answered with."""
    return {**who, "proto": proto, "peer": _addr(peer), "local": _addr(local), "echo": echo}


async def _serve_tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    who = identity()
    peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    try:
        first = await reader.readline()
        if first.startswith(HTTP_METHODS):
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            body = json.dumps(answer(who, "http", peer, local, first.decode(errors="replace").strip())) + "\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            await writer.drain()
            return
        line = first
        while line:
            text = line.decode(errors="replace").rstrip("\r\n")
            writer.write((json.dumps(answer(who, "tcp", peer, local, text)) + "\n").encode())
            await writer.drain()
            line = await reader.readline()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, port: int) -> None:
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport, hence the cast.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is None:
            return
        local = ("::" if ":" in addr[0] else "0.0.0.0", self.port)
        reply = answer(identity(), "udp", addr, local, data.decode(errors="replace").strip())
        self.transport.sendto(json.dumps(reply).encode(), addr)


async def serve(port: int, udp_port: int | None, host: str | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve TCP on `port` (and UDP on `udp_port`) until SIGTERM/SIGINT, or until `stop` is set if given. Without
    `host`, on every address of both families (a dual-stack pod answers over each; IPv4 as before)."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    # host None: asyncio binds 0.0.0.0 and [::] (IPV6_V6ONLY) apart, so IPv4 peers show plain IPv4 addresses
    server = await asyncio.start_server(_serve_tcp_client, host, port, limit=MAX_LINE, reuse_address=True)
    transports = []
    if udp_port is not None:
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpEcho(udp_port),
                                                           local_addr=(host or "0.0.0.0", udp_port))
        transports.append(transport)
        sock6 = _udp6_socket(udp_port) if host is None else None
        if sock6 is not None:
            transport6, _ = await loop.create_datagram_endpoint(lambda: _UdpEcho(udp_port), sock=sock6)
            transports.append(transport6)
    sys.stdout.write(json.dumps({**identity(), "serving": {"tcp": port, "udp": udp_port}}) + "\n")
    sys.stdout.flush()
    async with server:
        await stop.wait()
    for transport in transports:
        transport.close()


async def request_tcp(host: str, port: int, message: str, timeout: float) -> dict[str, Any]:
    """Connect, send one line, return the server's JSON answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(message.encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError(f"{host}:{port} closed the connection without answering")
        result: dict[str, Any] = json.loads(line)
        return result
    finally:
        writer.close()


def request_udp(host: str, port: int, message: str, timeout: float) -> dict[str, Any]:
    """Send one datagram, return the JSON datagram that answers it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.send(message.encode())
        result: dict[str, Any] = json.loads(sock.recv(65535))
        return result


def idle() -> None:
    """Wait for SIGTERM: the client pod's main process, so that tests can exec into a live pod."""
    wanted = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    signal.sigwait(wanted)
    sys.exit(0)
