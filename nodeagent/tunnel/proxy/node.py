"""The node tunnel's per-pod listeners and the paths between them (ztunnel's inbound/outbound split).

For every enrolled pod on the node, two listeners are opened *inside the pod's network namespace* and
served from this process:
- **15008 inbound (HBONE)**: mutual TLS with the pod's own certificate; a CONNECT to `ip:port` is
  connected to from inside the pod's namespace (so the application sees a local connection).
- **15006 inbound (captured plaintext)**: connections to the pod that its capture rules redirected
  here without HBONE; allowed only where the pod's peer authentication is PERMISSIVE, then connected
  to the original destination from inside the pod's namespace.
- **15001 outbound (captured)**: connections the pod's capture rules redirected here; the original
  destination (SO_ORIGINAL_DST) decides: an enrolled destination is reached over HBONE to its pod's
  15008 with the source pod's identity (pooled per source pod); anything else is passed through as
  plain TCP from the pod's namespace. Every socket the tunnel opens carries mark 0x539, which capture
  rules skip.
Inbound, whatever the peer asks for, the tunnel connects only to the served pod's own address and never to
the tunnel's own ports (`admission.check_target`: 400 / 503, counted), and only once policies are synced
(fail closed: 503 until then). Every inbound connection stays registered while it lasts, so a policy or
label change that now denies it closes it (`reevaluate`, as ztunnel's connection manager does).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import structlog
from prometheus_client import Counter

from nodeagent.ca.identity import SpiffeId
from nodeagent.kernel.netns import (
    Namespaces,
    NamespaceSwitchError,
    OpenNetns,
    migrate_requests_on_close,
)
from nodeagent.tunnel.hbone.client import HbonePool, HboneStream
from nodeagent.tunnel.hbone.limits import SOCKET_MARK
from nodeagent.tunnel.hbone.request import format_authority
from nodeagent.tunnel.hbone.server import TlsListener, serve_connection, serve_tls
from nodeagent.tunnel.identity.certs import Certificates, Fetch, WorkloadCertificate, rotating_server_context
from nodeagent.tunnel.proxy.admission import NotAdmitted, Refusal, check_target
from nodeagent.tunnel.proxy.outbound import Outbound, Refused
from nodeagent.tunnel.proxy.overload import Overload, OverloadLimits
from nodeagent.tunnel.proxy.sockets import client_socket, listening_families, listening_socket, original_destination
from nodeagent.tunnel.state.authz import Authorizer, AuthzRequest, Verdict
from nodeagent.tunnel.state.services import ServiceTable
from nodeagent.tunnel.state.workloads import Workload, with_known_addresses
from nodeagent.tunnel.telemetry import POLICY_DENIED, UPSTREAM_FAILURE, Connection, TunnelMetrics

log = structlog.get_logger("nodeagent.tunnel.proxy.node")
T = TypeVar("T")

OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT = 15001, 15006, 15008
CHUNK = 256 << 10
HANDSHAKE_TIMEOUT = 10.0  # a peer that stalls mid-handshake is dropped after this


__all__ = ["NodeTunnel", "Workload"]


@dataclass
class _Pod:
    workload: Workload
    certificate: WorkloadCertificate
    pool: HbonePool
    netns: OpenNetns  # held open while served: each socket of the pod is made in it without resolving a path
    servers: list[asyncio.Server | TlsListener] = field(default_factory=list)


@dataclass(eq=False)
class _Carried:
    """Any connection being carried (inbound or outbound), for the drain: closed at its deadline."""

    connection: Connection
    abort: Callable[[], None]


@dataclass(frozen=True)
class DrainResult:
    """How a drain ended: connections that finished within the deadline, and those closed at it."""

    finished: int
    closed: int
    seconds: float


@dataclass(eq=False)
class _Live:
    """An inbound connection (HBONE stream or captured plaintext) being carried, for re-evaluation."""

    pod: _Pod
    port: int
    source: SpiffeId | None  # None: plaintext
    source_ip: str | None
    abort: Callable[[], None]


class NodeTunnel:
    """One node's tunnel: listeners for its pods, HBONE to the other pods' tunnels."""

    def __init__(self, node: str, trust_domain: str, fetch: Fetch, lookup: Callable[[str], Workload | None], *,
                 services: Callable[[], ServiceTable | None] = lambda: None,
                 authorizer: Callable[[], Authorizer | None] = lambda: None,
                 metrics: TunnelMetrics | None = None,
                 identity_known: Callable[[SpiffeId], bool] = lambda _: True, reuse_port: bool = False,
                 overload: OverloadLimits | None = None) -> None:
        self.node, self.trust_domain, self.fetch, self.lookup = node, trust_domain, fetch, lookup
        self.identity_known = identity_known  # does some pod still hold this identity (see WorkloadTable.holds)
        self.reuse_port = reuse_port  # listeners shared with other tunnel processes on the node (SO_REUSEPORT)
        self.authorizer = authorizer
        self.metrics = metrics or TunnelMetrics()
        self.outbound = Outbound(node, lookup, services, self.metrics)
        self.pods: dict[str, _Pod] = {}
        self.live: set[_Live] = set()  # inbound connections open now, re-checked when policy changes
        self.certificates = Certificates(fetch)
        self._namespaces: Namespaces | None = None  # made on the event loop's thread, the one that switches
        self.overload = Overload(self.metrics.registry, node, overload)
        self.carrying: set[_Carried] = set()  # every connection open now, inbound or outbound (the drain's)
        self.draining = asyncio.Event()  # set by drain(): HBONE connections send GOAWAY, listeners are closed
        self.drain_closed = Counter("nodeagent_tunnel_drain_closed_connections", "Connections still open at the "
                                    "end of the tunnel's drain deadline, closed then", registry=self.metrics.registry)

    def _switch(self) -> Namespaces:
        if self._namespaces is None:
            self._namespaces = Namespaces()
        return self._namespaces

    def _socket_in(self, pod_netns: OpenNetns, source: str | None = None, host: str | None = None) -> socket.socket:
        """An unconnected socket of the tunnel's made in the pod's namespace on this thread (two setns calls,
        no thread). Not getting back to the tunnel's namespace is fatal: every later socket would be made in
        the pod's (ztunnel panics there too)."""
        try:
            return client_socket(pod_netns, SOCKET_MARK, source, host=host, namespaces=self._switch())
        except NamespaceSwitchError as exc:
            log.critical("tunnel thread stranded in a pod's network namespace; exiting", netns=pod_netns.path,
                         reason=str(exc), node=self.node)
            os._exit(70)

    async def rotate(self) -> int:
        """Renew every certificate past half life (in a thread: the CA call blocks); returns how many."""
        return len(await self.certificates.renew())

    async def add_pod(self, workload: Workload) -> None:
        """Fetch the pod's certificate and open its listeners (idempotent)."""
        if workload.ip in self.pods:
            return
        if not workload.netns:
            raise ValueError(f"pod {workload.ip}: a pod served by the tunnel needs its network namespace")
        certificate = await self.certificates.ready(workload.identity)
        if workload.ip in self.pods:
            return  # added concurrently while the certificate was fetched
        self.overload.start()
        namespaces = self._switch()
        netns = namespaces.open(workload.netns)
        # Connections to other tunnels start in the pod's own namespace, as the pod's traffic would.
        pool = HbonePool(lambda: certificate.contexts()[1], socket_for=lambda host: self._socket_in(netns, host=host))
        pod = _Pod(workload, certificate, pool, netns)
        sockets: list[socket.socket] = []
        if self.reuse_port:
            # Another tunnel of the node may share these ports (a rollout, or the workers): when one closes its
            # listener, connections queued on it move to the others instead of being reset.
            migrate_requests_on_close(netns, namespaces)
        try:
            for family in listening_families():
                opened = [listening_socket(netns, port, family=family, namespaces=namespaces,
                                           reuse_port=self.reuse_port)
                          for port in (HBONE_PORT, OUTBOUND_PORT, INBOUND_PLAIN_PORT)]
                sockets += opened
                inbound, outbound, plaintext = opened
                # The handshake is served by hbone.server.serve_tls, not start_server(ssl=...), so a refused or
                # stalled one is counted (asyncio reports those only in debug mode).
                pod.servers.append(await serve_tls(inbound, rotating_server_context(certificate),
                                                   lambda r, w: self._inbound(pod, r, w),
                                                   handshake_timeout=HANDSHAKE_TIMEOUT, violation=self._violation))
                pod.servers.append(await asyncio.start_server(lambda r, w: self._outbound(pod, r, w), sock=outbound))
                pod.servers.append(await asyncio.start_server(lambda r, w: self._inbound_plaintext(pod, r, w),
                                                              sock=plaintext))
        except BaseException:  # a half-served pod holds nothing: the next reconcile retries it whole
            for server in pod.servers:
                server.close()
            for sock in sockets:
                sock.close()
            netns.close()
            raise
        self.pods[workload.ip] = pod
        log.info("pod served", pod=workload.name, pod_ip=workload.ip, identity=str(workload.identity), node=self.node)

    async def remove_pod(self, ip: str) -> None:
        """Close the pod's listeners and its pool; other pods are untouched."""
        pod = self.pods.pop(ip, None)
        if pod is None:
            return
        for server in pod.servers:
            server.close()
        await pod.pool.close()
        pod.netns.close()
        if not any(p.workload.identity == pod.workload.identity for p in self.pods.values()):
            self.certificates.pop(pod.workload.identity, None)
        log.info("pod released", pod=pod.workload.name, pod_ip=ip, node=self.node)

    def _carry(self, connection: Connection, abort: Callable[[], None]) -> _Carried:
        carried = _Carried(connection, abort)
        self.carrying.add(carried)
        return carried

    async def drain(self, deadline: float) -> DrainResult:
        """Stop taking new connections and let the open ones finish within `deadline` seconds (ztunnel's
        drain): every listener closes at once, so new connections go to the other tunnel listening beside
        this one (SO_REUSEPORT, a rollout); every HBONE connection served sends a graceful GOAWAY, so peers
        open their next streams elsewhere; the open connections go on. Those still open at the deadline are
        closed, counted and logged with their reason. Pods stay registered: `close` releases them."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.draining.set()
        for pod in self.pods.values():
            for server in pod.servers:
                server.close()
            pod.servers.clear()
        before = len(self.carrying)
        log.info("tunnel draining", node=self.node, open_connections=before, deadline=deadline)
        # Polled: connections end on their own schedule and there is no event for "the last one ended".
        while self.carrying and loop.time() - start < deadline:
            await asyncio.sleep(min(0.05, max(deadline - (loop.time() - start), 0)))
        left = list(self.carrying)
        for carried in left:
            carried.connection.reason = f"closed at the tunnel's drain deadline ({deadline:g}s)"
            carried.abort()
            self.drain_closed.inc()
        self.carrying.clear()
        result = DrainResult(before - len(left), len(left), loop.time() - start)
        log.info("tunnel drained", node=self.node, finished=result.finished, closed_at_deadline=result.closed,
                 seconds=round(result.seconds, 3))
        return result

    async def close(self) -> None:
        """Release every pod, and stop watching the loop's lag."""
        for ip in list(self.pods):
            await self.remove_pod(ip)
        self.overload.close()

    async def _connect_pending(self, connect: Awaitable[T]) -> T:
        """`connect`, counted as pending (the overload guard's limit) until it is done either way."""
        guard = self.overload.guard
        guard.started()
        try:
            return await connect
        finally:
            guard.connected()

    async def _connect_socket(self, pod: _Pod, host: str, port: int, source: str | None = None) -> socket.socket:
        """A connected socket from inside the pod's namespace; from `source` (transparently) when the
        pod's capture routes replies back, so the app sees its real client."""
        sock = self._socket_in(pod.netns, source if pod.workload.transparent else None, host)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:  # also a connect cancelled by the peer's reset: never leak the socket
            sock.close()
            raise
        return sock

    def _served(self, pod: _Pod) -> Workload:
        """The served pod with every address the current table knows for it (IPv6 too, for a dual-stack pod)."""
        return with_known_addresses(pod.workload, self.lookup(pod.workload.ip))

    def _violation(self, reason: str) -> None:
        """Count an HBONE peer refused at TLS or for abusing HTTP/2 (hbone.limits.VIOLATIONS names the reasons)."""
        self.metrics.protocol_violations.labels(reason=reason).inc()

    async def _connect_from(self, pod: _Pod, host: str, port: int, source: str | None = None
                            ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """`_connect_socket` as a (reader, writer) pair."""
        return await asyncio.open_connection(sock=await self._connect_socket(pod, host, port, source), limit=CHUNK)

    def _verdict(self, workload: Workload, port: int, source: SpiffeId | None, source_ip: str | None
                 ) -> Verdict | NotAdmitted:
        """Policy for a connection to `workload`:`port` from `source` (None: plaintext) at `source_ip`.

        Fails closed: before the policy kinds are synced there is no authorizer and nothing is allowed.
        The workload's labels are read from the current table, not from when the pod was first served, so
        a relabelled pod is judged by the policies that select it now."""
        authorizer = self.authorizer()
        if authorizer is None:
            return NotAdmitted(Refusal.POLICIES_NOT_SYNCED, "policies not synced yet: AuthorizationPolicy and "
                                                        "PeerAuthentication must be listed before serving")
        current = self.lookup(workload.ip)
        if current is None or current.name != workload.name:
            return NotAdmitted(Refusal.POD_UNKNOWN, f"{workload.name or workload.ip} is no longer a known pod")
        if source is not None and not self.identity_known(source):
            return NotAdmitted(Refusal.IDENTITY_UNKNOWN, f"no pod holds {source} any more (its pods were deleted): "
                                                         "the certificate is a leftover")
        return authorizer.check(AuthzRequest(current.namespace, current.labels, workload.ip, port, source,
                                             source_ip))

    def _refuse(self, workload: Workload, outcome: Verdict | NotAdmitted, peer: object, source: SpiffeId | None
                ) -> None:
        """Count and log a refused inbound connection (by policy, or before it)."""
        who = str(source) if source else "plaintext"
        if isinstance(outcome, NotAdmitted):
            self.metrics.refusals.labels(reason=str(outcome.refusal)).inc()
            log.info("inbound connection refused", pod=workload.name, peer=str(peer), source=who,
                     reason=outcome.reason, refusal=str(outcome.refusal))
            return
        self.metrics.denials.labels(destination_workload_namespace=workload.namespace,
                                    policy=outcome.policy.key if outcome.policy else "-").inc()
        log.info("connection denied by policy", pod=workload.name, peer=str(peer), source=who,
                 reason=outcome.reason)

    def admit(self, pod: _Pod, host: str, port: int, source: SpiffeId | None, source_ip: str | None,
              peer: object) -> Verdict | NotAdmitted:
        """The whole inbound decision for one connection: the target check, then policy; refusals are
        counted and logged here."""
        outcome: Verdict | NotAdmitted | None = check_target(self._served(pod).addresses, host, port)
        if outcome is None:
            outcome = self._verdict(pod.workload, port, source, source_ip)
        if isinstance(outcome, NotAdmitted) or not outcome.allowed:
            self._refuse(pod.workload, outcome, peer, source)
        return outcome

    def reevaluate(self) -> int:
        """Re-check every open inbound connection against the current policies and labels; close those
        now refused (ztunnel closes connections a new policy denies). Returns how many were closed."""
        closed = 0
        for live in list(self.live):
            outcome = self._verdict(live.pod.workload, live.port, live.source, live.source_ip)
            if isinstance(outcome, NotAdmitted) and outcome.refusal is Refusal.POLICIES_NOT_SYNCED:
                continue  # policies lost (a relist in progress): keep what was admitted, admit nothing new
            if isinstance(outcome, NotAdmitted) or not outcome.allowed:
                self.live.discard(live)
                self.metrics.revocations.labels(destination_workload_namespace=live.pod.workload.namespace).inc()
                log.info("open connection closed: policy now denies it", pod=live.pod.workload.name,
                         source=str(live.source) if live.source else "plaintext", port=live.port,
                         reason=outcome.reason)
                live.abort()
                closed += 1
        return closed

    async def _inbound(self, pod: _Pod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        # The client tunnel dials from inside the client pod, so the peer address is the client pod's.
        source = peer[0] if peer else None

        def policy(identity: SpiffeId, target: str) -> bool | int:
            if self.overload.refuse("hbone"):
                return 503  # the peer tunnel counts a failed attempt and retries another endpoint
            host, _, port = target.rpartition(":")
            outcome = self.admit(pod, host.strip("[]"), int(port), identity, source, peer)
            if isinstance(outcome, NotAdmitted):
                return outcome.refusal.status
            return outcome.allowed

        def observe(who: SpiffeId, target: str, abort: Callable[[], None]) -> Callable[[int, int], None]:
            connection = Connection("destination", self.lookup(source) if source else None, pod.workload,
                                    source_principal=str(who), destination_principal=str(pod.workload.identity),
                                    address=target, endpoint=target, attempts=1)
            self.metrics.opened(connection)
            live = _Live(pod, int(target.rpartition(":")[2]), who, source, abort)
            self.live.add(live)
            carried = self._carry(connection, abort)

            def finished(request_bytes: int, response_bytes: int) -> None:
                self.live.discard(live)
                self.carrying.discard(carried)
                connection.request_bytes, connection.response_bytes = request_bytes, response_bytes
                self.metrics.closed(connection, was_open=True)
            return finished

        # Whatever the authority's host, only the served pod's own address is ever dialled (policy has
        # already refused any other with 400; this keeps it so even if that check were bypassed).
        await serve_connection(reader, writer, trust_domain=self.trust_domain, policy=policy,
                               connect=lambda host, port: self._connect_pending(
                                   self._connect_socket(pod, self._served(pod).address_for(host), port, source)),
                               observe=observe, violation=self._violation, draining=self.draining)

    async def _inbound_plaintext(self, pod: _Pod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                                 ) -> None:
        if self.overload.refuse("inbound-plaintext"):
            _reset(writer)
            return
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        try:
            host, port = original_destination(sock)
        except OSError as exc:  # not captured (dialled straight), so there is no target to serve
            self.metrics.refusals.labels(reason="no-original-destination").inc()
            log.warning("captured inbound connection without an original destination", pod=pod.workload.name,
                        peer=str(peer), reason=str(exc))
            writer.close()
            return
        connection = Connection("destination", self.lookup(peer[0]) if peer else None, pod.workload,
                                destination_principal=str(pod.workload.identity),
                                address=format_authority(host, port), endpoint=format_authority(host, port),
                                mtls=False, attempts=1)
        opened, live, carried = False, None, None
        source_ip = peer[0] if peer else None
        try:
            outcome = self.admit(pod, host, port, None, source_ip, peer)
            if isinstance(outcome, NotAdmitted):
                connection.flags, connection.reason = UPSTREAM_FAILURE, outcome.reason
                return
            if not outcome.allowed:
                connection.flags, connection.reason = POLICY_DENIED, outcome.reason
                return
            target = self._served(pod).address_for(host)
            up_reader, up_writer = await self._connect_pending(self._connect_from(pod, target, port, source_ip))
            self.metrics.opened(connection)
            opened = True

            def abort() -> None:
                writer.close()
                up_writer.close()

            live = _Live(pod, port, None, source_ip, abort)
            self.live.add(live)
            carried = self._carry(connection, abort)
            # No Service tells this path its idle timeout: the default (Envoy's tcp_proxy 1 h) bounds a silent
            # client, which otherwise held its app connection for ever.
            await _until_idle(_bridge_tcp(reader, writer, up_reader, up_writer, connection),
                              lambda: connection.request_bytes + connection.response_bytes, connection, abort)
        except (OSError, ConnectionError) as exc:
            if not opened:
                connection.flags = UPSTREAM_FAILURE
            connection.reason = str(exc)
        finally:
            if live is not None:
                self.live.discard(live)
            if carried is not None:
                self.carrying.discard(carried)
            writer.close()
            self.metrics.closed(connection, was_open=opened)

    async def _outbound(self, pod: _Pod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.overload.refuse("outbound"):
            _reset(writer)
            return
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        if not peer or not any(_from_pod_itself(peer[0], ip) for ip in self._served(pod).addresses):
            # 15001 carries the pod's own captured connections out *with the pod's identity*: a connection
            # from anywhere else (another pod dialling the port) must never borrow that identity.
            self.metrics.refusals.labels(reason="outbound-not-from-pod").inc()
            log.warning("outbound listener reached from outside its pod", pod=pod.workload.name, peer=str(peer))
            writer.close()
            return
        try:
            host, port = original_destination(sock)
        except OSError as exc:
            log.warning("outbound connection without an original destination", pod=pod.workload.name,
                        reason=str(exc))
            writer.close()
            return
        connection = Connection("source", pod.workload, None, source_principal=str(pod.workload.identity),
                                address=format_authority(host, port))

        async def dial(destination: Workload | None, ip: str, port: int, timeout: float) -> object:
            if destination is not None and destination.enrolled:
                return await pod.pool.connect((destination.address_for(ip), HBONE_PORT), format_authority(ip, port),
                                              destination.identity, timeout)
            connection.mtls = False
            return await self._connect_from(pod, ip, port)

        opened, slot, carried = False, None, None
        try:
            upstream, slot = await self._connect_pending(self.outbound.connect(connection, host, port, dial))
            self.metrics.opened(connection)
            opened = True
            if isinstance(upstream, HboneStream):
                connection.mtls = True
                stream = upstream

                def hbone_abort() -> None:
                    stream.close()
                    writer.close()

                carried = self._carry(connection, hbone_abort)
                moved = await _until_idle(stream.splice(reader, writer), lambda: stream.carried(), connection,
                                          hbone_abort)
                connection.request_bytes, connection.response_bytes = moved
            else:
                up_reader, up_writer = cast(tuple[asyncio.StreamReader, asyncio.StreamWriter], upstream)

                def tcp_abort() -> None:
                    writer.close()
                    up_writer.close()

                carried = self._carry(connection, tcp_abort)
                await _until_idle(_bridge_tcp(reader, writer, up_reader, up_writer, connection),
                                  lambda: connection.request_bytes + connection.response_bytes, connection, tcp_abort)
        except Refused as exc:
            connection.flags, connection.reason = exc.flags, str(exc)
            log.info("outbound connection refused", pod=pod.workload.name, destination=format_authority(host, port),
                     flags=exc.flags, reason=str(exc))
        except (OSError, ConnectionError) as exc:
            connection.reason = str(exc)
        finally:
            if carried is not None:
                self.carrying.discard(carried)
            writer.close()
            if slot is not None:
                slot.closed()
            self.metrics.closed(connection, was_open=opened)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Refuse an accepted connection at once with a reset (SO_LINGER 0), so the client learns now rather than
    after a timeout, and nothing of it lingers in TIME_WAIT."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _from_pod_itself(address: str, pod_ip: str) -> bool:
    """Whether a connection to the outbound listener came from its own pod: the pod's address, or loopback
    (where a cgroup capture may send it)."""
    try:
        ip = ipaddress.ip_address(address)
        return ip.is_loopback or ip == ipaddress.ip_address(pod_ip)
    except ValueError:
        return False


async def _until_idle(carry: Awaitable[T], progress: Callable[[], int], connection: Connection,
                      abort: Callable[[], None]) -> T:
    """Await `carry`, aborting it once no byte moved either way for the connection's idle timeout (Envoy's
    tcp_proxy idle_timeout; checked at a quarter of the timeout, so it fires within 1.25x of it)."""
    task = asyncio.ensure_future(carry)
    idle = connection.idle_timeout
    if idle is None:
        return await task
    loop = asyncio.get_running_loop()
    seen, since = progress(), loop.time()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=max(idle / 4, 0.05))
            if task in done:
                return task.result()
            now = progress()
            if now != seen:
                seen, since = now, loop.time()
            elif loop.time() - since >= idle:
                connection.reason = f"idle for {idle:g}s (the Service's idle timeout)"
                abort()
                return await task
    except BaseException:
        task.cancel()
        raise


async def _bridge_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter,
                      connection: Connection | None = None) -> None:
    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, request: bool) -> None:
        while data := await source.read(CHUNK):
            sink.write(data)
            if connection is not None:
                if request:
                    connection.request_bytes += len(data)
                else:
                    connection.response_bytes += len(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()

    try:
        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
    finally:
        up_writer.close()
