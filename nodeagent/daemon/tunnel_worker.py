"""One worker of `nodeagent ztunnel --workers N` (N > 1): a NodeTunnel on its own event loop and core.

Started by the coordinator (`nodeagent.daemon.workers`) as `python -m nodeagent.daemon.tunnel_worker`,
with one end of a private socketpair. It holds its own listeners in every served pod's namespace
(SO_REUSEPORT: the kernel spreads new connections over the workers' sockets, as Envoy's and ztunnel's
worker threads share a port) and its own HBONE pools, and answers lookups, Services and policies from the
latest tables the coordinator pushed. It never talks to the agent, the API server or the CA: certificates
arrive installed (key and chain) with the pod and on every renewal. It exits when the coordinator's socket
reaches its end, on SIGTERM, or when the coordinator dies (PR_SET_PDEATHSIG), closing its listeners first.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import sys
from typing import Any

import structlog

from nodeagent.ca.identity import SpiffeId
from nodeagent.daemon.tunnel_wire import (
    AddPod,
    Certificate,
    Drain,
    Reevaluate,
    RemovePod,
    Reply,
    Request,
    Scrape,
    State,
    Status,
    Tables,
    dumps,
    frame,
    load_request,
    read_frame,
)
from nodeagent.observability.logs import configure_logging
from nodeagent.tunnel.admin import config_dump
from nodeagent.tunnel.identity.certs import WorkloadCertificate
from nodeagent.tunnel.proxy.node import NodeTunnel
from nodeagent.tunnel.state.services import ServiceTable
from nodeagent.tunnel.state.workloads import Workload

log = structlog.get_logger("nodeagent.daemon.tunnel_worker")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _never_fetch(identity: SpiffeId, _key: object) -> list[str]:
    """A worker's tunnel fetches nothing: its certificates are installed before their pods are added."""
    raise RuntimeError(f"a tunnel worker does not call the CA (no certificate installed for {identity})")


class TunnelWorker:
    """A NodeTunnel driven by the coordinator's requests, one at a time."""

    def __init__(self, node: str, trust_domain: str, index: int) -> None:
        self.index = index
        self.state = State(None, None, None)
        self.tunnel = NodeTunnel(node, trust_domain, _never_fetch, self.lookup,
                                 services=lambda: self.state.services, authorizer=lambda: self.state.authorizer,
                                 identity_known=lambda identity: self.state.table is not None
                                 and self.state.table.holds(identity), reuse_port=True)

    def lookup(self, ip: str) -> Workload | None:
        """The workload holding `ip` in the latest table pushed."""
        return self.state.table.lookup(ip) if self.state.table is not None else None

    def install(self, certificate: Certificate) -> None:
        """Install `certificate` for its identity (replacing the one held, which open connections keep)."""
        held = self.tunnel.certificates.get(certificate.identity)
        if held is None:
            self.tunnel.certificates[certificate.identity] = WorkloadCertificate.installed(
                certificate.identity, certificate.key_pem, certificate.chain)
        elif held.chain != certificate.chain:
            held.install(certificate.key_pem, certificate.chain)

    def connections_opened(self) -> int:
        """Connections this worker carried since it started (inbound and outbound), for the admin dump."""
        return int(sum(sample.value for family in self.tunnel.metrics.opened_total.collect()
                       for sample in family.samples if sample.name.endswith("_total")))

    async def handle(self, request: Request) -> Any:
        """Carry out one request; its reply's value."""
        if isinstance(request, Tables):
            held = self.state
            services = held.services if isinstance(request.services, str) else (
                None if request.services is None else ServiceTable.from_delta(held.services, request.services))
            self.state = State(held.table if isinstance(request.table, str) else request.table, services,
                               held.authorizer if isinstance(request.authorizer, str) else request.authorizer)
            if services is not None and services is not held.services:
                self.tunnel.outbound.resilience.retain(services)
            return None
        if isinstance(request, Certificate):
            # Only identities this worker holds: a certificate for a pod not added yet comes with its AddPod.
            if request.identity in self.tunnel.certificates:
                self.install(request)
            return None
        if isinstance(request, AddPod):
            self.install(request.certificate)
            await self.tunnel.add_pod(request.workload)
            return len(self.tunnel.pods)
        if isinstance(request, RemovePod):
            await self.tunnel.remove_pod(request.ip)
            return len(self.tunnel.pods)
        if isinstance(request, Reevaluate):
            closed = self.tunnel.reevaluate()
            if closed:
                log.info("connections closed after a policy change", worker=self.index, closed=closed)
            return closed
        if isinstance(request, Drain):
            drained = await self.tunnel.drain(request.deadline)
            return drained.finished, drained.closed
        if isinstance(request, Scrape):
            return list(self.tunnel.metrics.registry.collect())
        if isinstance(request, Status):
            return {"pid": os.getpid(), "connections_opened": self.connections_opened(), **config_dump(self.tunnel)}
        raise TypeError(f"unknown request {type(request).__name__}")

    async def serve(self, sock: socket.socket) -> None:
        """Answer the coordinator's requests in order until its end of the socket closes."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            while (received := await read_frame(reader)) is not None:
                request_id, payload = received
                try:
                    reply = Reply(await self.handle(load_request(payload)))
                except Exception as exc:  # one request's failure (a vanished netns) is the coordinator's to judge
                    log.warning("request failed", worker=self.index, reason=f"{type(exc).__name__}: {exc}")
                    reply = Reply(error=f"{type(exc).__name__}: {exc}")
                writer.write(frame(request_id, dumps(reply)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            # Also a coordinator closing while a reply is on its way: either way this worker stops.
            log.info("coordinator connection lost", worker=self.index, reason=str(exc))
        finally:
            writer.close()


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when the thread that started it (the coordinator's) dies; exit at once when
    the coordinator is already gone (it may die before this call)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        sys.exit(0)


async def run(worker: TunnelWorker, sock: socket.socket) -> None:
    """Serve until the coordinator goes or SIGTERM; then close every listener and pool."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    serving = asyncio.ensure_future(worker.serve(sock))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        serving.cancel()
        stopping.cancel()
        await worker.tunnel.close()
        log.info("tunnel worker stopped", worker=worker.index, pid=os.getpid())


def main(argv: list[str] | None = None) -> int:
    """The worker's entry point (its argv is the coordinator's business, not an operator's)."""
    import uvloop

    from nodeagent.daemon.tunnel import raise_open_files_limit

    parser = argparse.ArgumentParser(prog="nodeagent.daemon.tunnel_worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--trust-domain", required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    configure_logging(json=True, level=args.log_level)
    # Every line of this process (the tunnel's own, the access log) names the worker: its connections'
    # tasks inherit the context from the event loop's main task.
    structlog.contextvars.bind_contextvars(tunnel_worker=args.index)
    raise_open_files_limit()
    sock = socket.socket(fileno=args.fd)
    worker = TunnelWorker(args.node, args.trust_domain, args.index)
    log.info("tunnel worker started", worker=args.index, pid=os.getpid(), node=args.node)
    uvloop.run(run(worker, sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
