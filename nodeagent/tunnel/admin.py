"""The tunnel's admin (15000, localhost: config dump) and readiness (15021: /healthz/ready) endpoints.

As ztunnel's: the dump lists the pods served with their identities and certificates (subject SAN,
serial, expiry) and the HBONE pools; ready means every assigned pod has its listeners and certificate,
and nothing blocks serving (policies not synced yet: the answer names the kind and why).
A minimal HTTP/1.1 responder on asyncio (two GET paths do not justify a web framework).

The tunnel is one NodeTunnel, or a `TunnelView` of several (`nodeagent ztunnel --workers N`: the
coordinator's WorkerSet, whose dump asks its workers, so routes may be coroutines). /status shows the
reconcile's view and, with workers, each worker's pid, pods served and restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from nodeagent.observability.http import Route
from nodeagent.tunnel.proxy.node import NodeTunnel

ADMIN_PORT, READINESS_PORT = 15000, 15021
Answer = tuple[int, str, bytes]  # status, content type, body
AdminRoute = Route | Callable[[], Awaitable[Answer]]


class TunnelView(Protocol):
    """A tunnel of several processes as the admin endpoints see it."""

    @property
    def node(self) -> str:
        """The node the tunnel serves."""
        ...

    @property
    def trust_domain(self) -> str:
        """The mesh's trust domain."""
        ...

    async def dump(self) -> dict[str, Any]:
        """The config dump (pods, listeners, certificates, pools; and the workers)."""
        ...

    def ready(self, assigned: set[str]) -> tuple[bool, list[str]]:
        """(ready, what is missing) for the pod IPs the tunnel is assigned."""
        ...

    def workers_status(self) -> list[dict[str, Any]]:
        """Each worker's pid, pods served and restarts."""
        ...


def _address(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def config_dump(tunnel: NodeTunnel) -> dict[str, Any]:
    """What the tunnel serves now, as JSON-able data."""
    pods = []
    for ip, pod in sorted(tunnel.pods.items()):
        leaf = pod.certificate.leaf
        pods.append({
            "ip": ip, "identity": str(pod.workload.identity), "node": pod.workload.node,
            # the ports (each may be open in both families: one socket per family, see NodeTunnel.add_pod)...
            "listeners": sorted({s.sockets[0].getsockname()[1] for s in pod.servers if s.sockets}),
            # ...and every listening socket's address
            "listen_addresses": sorted(_address(s.sockets[0].getsockname()) for s in pod.servers if s.sockets),
            "certificate": None if leaf is None else {
                "serial": f"{leaf.serial_number:x}", "not_after": leaf.not_valid_after_utc.isoformat(),
                "renewals": pod.certificate.renewals},
            "pools": [{"peer": f"{peer[0]}:{peer[1]}", "identity": str(identity),
                       "connections": len(conns), "streams": sum(c.conn.open_outbound_streams for c in conns)}
                      for (peer, identity), conns in pod.pool.connections.items()],
        })
    return {"node": tunnel.node, "trust_domain": tunnel.trust_domain, "pods": pods}


def ready(tunnel: NodeTunnel, assigned: set[str]) -> tuple[bool, list[str]]:
    """(ready, what is missing) for the pod IPs the tunnel is assigned."""
    missing = [ip for ip in sorted(assigned)
               if ip not in tunnel.pods or tunnel.pods[ip].certificate.leaf is None or len(tunnel.pods[ip].servers) < 3]
    return not missing, missing


def json_route(body: Callable[[], tuple[int, Any]]) -> Route:
    """A route answering JSON from `body()`'s (status, data)."""
    def route() -> tuple[int, str, bytes]:
        status, data = body()
        return status, "application/json", json.dumps(data, indent=1).encode()
    return route


def _http_handler(routes: Mapping[str, AdminRoute]
                  ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split()
            route = routes.get(path.split("?")[0]) if method == "GET" else None
            answer = route() if route is not None else (
                404, "application/json", json.dumps({"error": f"no route {path}"}).encode())
            status, content_type, data = await answer if inspect.isawaitable(answer) else answer
            writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {content_type}"
                         f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle


async def serve_http(host: str, port: int, routes: Mapping[str, AdminRoute]) -> asyncio.Server:
    """Answer GET <path> with the route's (status, content type, body) (a route may be a coroutine function);
    404 otherwise. On the tunnel's event loop, so a route reads the tunnel's state between two steps of its
    connections, never mid-way. SO_REUSEPORT: during a rollout the next tunnel of the node binds the same
    port beside this one (in the node's network namespace) before this one drains and closes it."""
    return await asyncio.start_server(_http_handler(routes), host, port, reuse_port=True)


async def serve_http_unix(path: str, routes: Mapping[str, AdminRoute]) -> asyncio.Server:
    """`serve_http` on a unix socket at `path` (replaced if it exists): reachable only through the filesystem
    it is in, so a probe run in this tunnel's container asks this very process, never a tunnel beside it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return await asyncio.start_unix_server(_http_handler(routes), path)


async def start_admin(tunnel: NodeTunnel | TunnelView, assigned: Callable[[], set[str]], *, admin: tuple[str, int] =
                      ("127.0.0.1", ADMIN_PORT), readiness: tuple[str, int] = ("0.0.0.0", READINESS_PORT),
                      status: Callable[[], dict[str, Any]] | None = None,
                      blockers: Callable[[], list[str]] = list, readiness_socket: str | None = None
                      ) -> list[asyncio.Server]:
    """The admin and readiness endpoints (the admin one on localhost only), and readiness again on the unix
    socket `readiness_socket` if given. `status` adds the reconcile's view (why pods are or are not served)
    to the config dump; `blockers` are reasons not to be ready beyond the pods."""
    def readiness_route() -> tuple[int, Any]:
        ok, missing = ready(tunnel, assigned()) if isinstance(tunnel, NodeTunnel) else tunnel.ready(assigned())
        blocked = blockers()
        ok = ok and not blocked
        return (200 if ok else 503), {"ready": ok, "missing": missing, "blockers": blocked}

    def state() -> dict[str, Any]:
        return {**(status() if status is not None else {}),
                "workers": [] if isinstance(tunnel, NodeTunnel) else tunnel.workers_status()}

    async def dump() -> Answer:
        served = config_dump(tunnel) if isinstance(tunnel, NodeTunnel) else await tunnel.dump()
        body = {"node": tunnel.node, "trust_domain": tunnel.trust_domain, **state(), **served}
        return 200, "application/json", json.dumps(body, indent=1).encode()

    admin_server = await serve_http(*admin, {"/config_dump": dump, "/status": json_route(lambda: (200, state()))})
    ready_routes = {"/healthz/ready": json_route(readiness_route)}
    servers = [admin_server, await serve_http(*readiness, ready_routes)]
    if readiness_socket is not None:
        servers.append(await serve_http_unix(readiness_socket, ready_routes))
    return servers
