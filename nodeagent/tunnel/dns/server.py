"""The tunnel's DNS proxy: a UDP and TCP server on port 15053 inside each served pod's network namespace.

As ztunnel's in-pod DNS proxy (src/dns/server.rs): the pod's port 53 traffic is captured to 127.0.0.1:15053
(REDIRECT maps locally made packets to loopback, so the listeners bind loopback only: another pod cannot use
them); A and AAAA questions the tunnel's tables hold (`records.resolve`: Services by name, as CoreDNS answers
them) are answered at once, everything else is forwarded to the pod's resolver and its answer passed back:
- over TCP, to the connection's original destination (SO_ORIGINAL_DST: the resolver the pod dialled);
- over UDP the original destination is not recoverable under REDIRECT (no conntrack lookup from a datagram
  socket), so to the resolvers of the tunnel's own /etc/resolv.conf, as ztunnel does, or `--dns-upstream`.
Upstream sockets are made in the pod's namespace (the query leaves as the pod's would) and carry the tunnel's
mark 0x539, which the capture rules skip; each forwarded query gets an id of its own, and only a response
with that id and the same question, from the resolver asked, is taken.

Bounded: a forward waits `timeout` per resolver (then the next one; none answering: SERVFAIL); at most
`max_forwards` are in flight (beyond: REFUSED at once), at most `max_pending` datagrams are being handled
(beyond: dropped, counted); a pod has at most `max_tcp_connections` TCP connections, each closed after
`tcp_idle` seconds without a query. Hostile input (see `wire.parse`) is dropped or answered FORMERR/NOTIMP
and counted; nothing a client sends ends a listener. Each pod's listeners close on `remove_pod`, all of them
on `stop_listening` (the tunnel's drain: a new tunnel listening beside this one with SO_REUSEPORT takes over).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.message
import dns.rcode
import dns.rrset
import structlog
from prometheus_client import CollectorRegistry

from nodeagent.kernel.netns import Namespaces, NamespaceSwitchError, OpenNetns, original_destination
from nodeagent.tunnel.dns.metrics import FAILED, FORWARDED, LOCAL, MALFORMED, REFUSED, DnsMetrics
from nodeagent.tunnel.dns.records import CLUSTER_DOMAIN, DnsTable, Outcome, Resolution, resolve
from nodeagent.tunnel.dns.wire import (
    Malformed,
    Query,
    answers_query,
    encode,
    error_answer,
    local_answer,
    lookup_query,
    parse,
    read_answer,
    type_label,
    with_id,
)
from nodeagent.tunnel.hbone.limits import SOCKET_MARK

log = structlog.get_logger("nodeagent.tunnel.dns")

DNS_PORT = 15053  # ztunnel's DNS proxy port
RESOLV_CONF = "/etc/resolv.conf"
CACHE_ENTRIES = 4096  # local answers kept for repeated questions (cleared when full or when the table changes)
_LOOPBACKS = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))

Upstream = tuple[str, int]


@dataclass(frozen=True)
class DnsOptions:
    """How the DNS proxy answers and forwards."""

    upstreams: tuple[Upstream, ...] = ()  # UDP questions go here (and TCP ones without an original destination)
    domain: str = CLUSTER_DOMAIN
    port: int = DNS_PORT
    timeout: float = 2.0  # per resolver asked
    max_forwards: int = 256  # in flight, all pods together
    max_pending: int = 1024  # datagrams being handled, all pods together
    max_tcp_connections: int = 32  # per pod
    tcp_idle: float = 10.0
    max_chain: int = 8  # CNAMEs followed from an ExternalName


def parse_upstream(text: str, default_port: int = 53) -> Upstream:
    """`IP`, `IP:PORT`, `[IPv6]:PORT` or a bare IPv6 address as (ip, port); ValueError otherwise."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{text!r}: expected [IPv6]:PORT")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: expected IP:PORT")
        port = int(port_text)
    ipaddress.ip_address(host.split("%", 1)[0])  # raises ValueError for a name: resolvers are given by address
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port out of range")
    return host, port


def resolv_conf_upstreams(text: str) -> tuple[Upstream, ...]:
    """The `nameserver` lines of a resolv.conf, as upstreams (unreadable entries skipped)."""
    found = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append(parse_upstream(fields[1]))
    return tuple(found)


def system_upstreams(path: str = RESOLV_CONF) -> tuple[Upstream, ...]:
    """The resolvers of this process's resolv.conf (none when it cannot be read)."""
    try:
        with open(path) as handle:
            return resolv_conf_upstreams(handle.read())
    except OSError:
        return ()


@dataclass(eq=False)
class _DnsPod:
    ip: str
    name: str
    netns: OpenNetns
    transports: list[asyncio.DatagramTransport] = field(default_factory=list)
    servers: list[asyncio.Server] = field(default_factory=list)
    connections: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False


class _Listener(asyncio.DatagramProtocol):
    """A pod's UDP listener: each datagram handed to the proxy."""

    def __init__(self, proxy: DnsProxy, pod: _DnsPod) -> None:
        self.proxy, self.pod = proxy, pod
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.transport is not None:
            self.proxy.datagram(self.pod, self.transport, data, addr)

    def error_received(self, exc: Exception) -> None:  # an ICMP error for an earlier answer: nothing to do
        log.debug("dns listener error", pod=self.pod.name, reason=str(exc))


class _Exchange(asyncio.DatagramProtocol):
    """One forwarded UDP question: the first datagram that answers it resolves `future`."""

    def __init__(self, ident: int, query: Query, future: asyncio.Future[bytes]) -> None:
        self.ident, self.query, self.future = ident, query, future

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if answers_query(data, self.ident, self.query) and not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable: this resolver is not there
        if not self.future.done():
            self.future.set_exception(exc)


class DnsProxy:
    """The DNS proxy of one tunnel, for every pod it serves."""

    def __init__(self, options: DnsOptions, table: Callable[[], DnsTable | None], registry: CollectorRegistry, *,
                 node: str = "", reuse_port: bool = False, mark: int = SOCKET_MARK) -> None:
        self.options, self.table, self.node, self.reuse_port, self.mark = options, table, node, reuse_port, mark
        self.metrics = DnsMetrics(registry)
        self.pods: dict[str, _DnsPod] = {}
        self.in_flight = 0
        self.pending = 0
        self._namespaces: Namespaces | None = None  # made on the event loop's thread, the one that switches
        self._cache: dict[tuple[str, bytes], tuple[str, bytes]] = {}  # (protocol, query but its id) -> answer
        self._cached_for: DnsTable | None = None

    def _switch(self) -> Namespaces:
        if self._namespaces is None:
            self._namespaces = Namespaces()
        return self._namespaces

    def _socket_in(self, pod: _DnsPod, family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
        """A socket made in the pod's namespace (on this thread, as the tunnel's others), not blocking."""
        if pod.closed:  # its namespace descriptor is closed, and its number may already be another file's
            raise OSError(f"pod {pod.name} is no longer served")
        try:
            sock = self._switch().run(pod.netns, lambda: socket.socket(family, kind))
        except NamespaceSwitchError as exc:
            log.critical("tunnel thread stranded in a pod's network namespace; exiting", netns=pod.netns.path,
                         reason=str(exc), node=self.node)
            os._exit(70)
        sock.setblocking(False)
        return sock

    async def add_pod(self, ip: str, name: str, netns: str) -> None:
        """Open the pod's DNS listeners, UDP and TCP on 127.0.0.1 and ::1 (where the pod has it) (idempotent)."""
        if ip in self.pods:
            return
        namespaces = self._switch()
        pod = _DnsPod(ip, name, namespaces.open(netns))
        loop = asyncio.get_running_loop()
        try:
            for family, address in _LOOPBACKS:
                try:
                    udp = self._listener(pod, family, socket.SOCK_DGRAM, address)
                except OSError as exc:
                    if family == socket.AF_INET6:  # no IPv6 loopback in this pod: IPv4 only, as it resolves
                        log.debug("no IPv6 DNS listener", pod=name, reason=str(exc))
                        continue
                    raise
                try:
                    transport, _ = await loop.create_datagram_endpoint(lambda: _Listener(self, pod), sock=udp)
                except BaseException:
                    udp.close()
                    raise
                pod.transports.append(transport)
                tcp = self._listener(pod, family, socket.SOCK_STREAM, address)
                try:
                    pod.servers.append(await asyncio.start_server(lambda r, w: self._connection(pod, r, w),
                                                                  sock=tcp))
                except BaseException:
                    tcp.close()
                    raise
        except BaseException:
            self._release(pod)
            raise
        self.pods[ip] = pod
        log.info("dns proxy serving pod", pod=name, pod_ip=ip, port=self.options.port, node=self.node)

    def _listener(self, pod: _DnsPod, family: socket.AddressFamily, kind: socket.SocketKind, address: str
                  ) -> socket.socket:
        sock = self._socket_in(pod, family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:  # shared with the next tunnel during a rollout, as the other listeners
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, self.options.port))
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    def remove_pod(self, ip: str) -> None:
        """Close the pod's listeners, connections and questions in progress."""
        pod = self.pods.pop(ip, None)
        if pod is not None:
            self._release(pod)
            log.info("dns proxy released pod", pod=pod.name, pod_ip=ip, node=self.node)

    def _release(self, pod: _DnsPod) -> None:
        self._stop(pod)
        pod.closed = True
        for writer in list(pod.connections):
            writer.close()
        for task in list(pod.tasks):
            task.cancel()
        pod.netns.close()

    def _stop(self, pod: _DnsPod) -> None:
        for transport in pod.transports:
            transport.close()
        for server in pod.servers:
            server.close()
        pod.transports.clear()
        pod.servers.clear()

    def stop_listening(self) -> None:
        """Close every listener (the drain): questions already received are still answered."""
        for pod in self.pods.values():
            self._stop(pod)

    async def close(self) -> None:
        """Release every pod."""
        for ip in list(self.pods):
            self.remove_pod(ip)
        await asyncio.sleep(0)  # let the cancelled questions unwind
        if self._namespaces is not None:
            self._namespaces.close()
            self._namespaces = None

    # -- the way in: datagrams and TCP connections

    def datagram(self, pod: _DnsPod, transport: asyncio.DatagramTransport, data: bytes,
                 addr: tuple[str | object, ...]) -> None:
        """One datagram from the pod: answered in a task of its own (bounded by `max_pending`)."""
        if self.pending >= self.options.max_pending:
            self.metrics.dropped.labels(reason="busy").inc()
            return
        self.pending += 1

        async def handle() -> None:
            try:
                reply = await self.answer(pod, data, "udp")
                if reply is not None and not transport.is_closing():
                    transport.sendto(reply, addr)
            except Exception as exc:  # never let one question take the listener down
                log.warning("dns question failed", pod=pod.name, reason=f"{type(exc).__name__}: {exc}")

        def done(task: asyncio.Task[None]) -> None:
            # here, not in a `finally` of handle(): a task cancelled before it started never runs its body
            pod.tasks.discard(task)
            self.pending -= 1

        task = asyncio.ensure_future(handle())
        pod.tasks.add(task)
        task.add_done_callback(done)

    async def _connection(self, pod: _DnsPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A TCP connection from the pod: length-prefixed questions, answered in turn (RFC 7766)."""
        if len(pod.connections) >= self.options.max_tcp_connections or pod.closed:
            self.metrics.dropped.labels(reason="tcp-connections").inc()
            writer.close()
            return
        # Not cancelled on release (asyncio logs a cancelled connection handler as an error): closing the writer
        # ends its read, and a forward under way finds the pod released before it makes a socket.
        pod.connections.add(writer)
        original = self._original(writer)
        try:
            while True:
                async with asyncio.timeout(self.options.tcp_idle):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                reply = await self.answer(pod, data, "tcp", original)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass  # the client went away, stalled, or the pod was released
        except Exception as exc:  # never let one connection take the listener down
            log.warning("dns connection failed", pod=pod.name, reason=f"{type(exc).__name__}: {exc}")
        finally:
            pod.connections.discard(writer)
            writer.close()

    def _original(self, writer: asyncio.StreamWriter) -> Upstream | None:
        """Where a captured TCP question was going (the pod's resolver); None when dialled straight."""
        sock = writer.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_INET:
            return None
        try:
            host, port = original_destination(sock)
        except OSError:
            return None
        local = writer.get_extra_info("sockname")
        if local is not None and (host, port) == tuple(local[:2]):
            return None  # not redirected: the client asked 15053 itself
        return host, port

    # -- answering

    async def answer(self, pod: _DnsPod, data: bytes, protocol: str, original: Upstream | None = None
                     ) -> bytes | None:
        """The answer to one message from the pod (None: drop it), counted."""
        table = self.table()
        if table is not self._cached_for:  # answers of the previous table are stale
            self._cache.clear()
            self._cached_for = table
        # Everything of a message but its id decides the table's answer (question, flags, EDNS), so a repeated
        # question is answered from the bytes of the last answer with the new id: dnspython takes ~250 us to
        # read a question and write an answer, a dict lookup ~1 us. Only local answers are kept.
        key = (protocol, data[2:])
        hit = self._cache.get(key)
        if hit is not None:
            self.metrics.count(LOCAL, hit[0], protocol)
            return data[:2] + hit[1][2:]
        parsed = parse(data)
        if isinstance(parsed, Malformed):
            if parsed.reply is None:
                self.metrics.dropped.labels(reason=parsed.reason).inc()
            else:
                self.metrics.count(MALFORMED, type_label(parsed.rdtype), protocol)
            return parsed.reply
        query = parsed
        label = type_label(query.rdtype)
        family = query.family
        if family is not None:
            resolution = resolve(table, query.name.to_text(), family)
            if table is not None and resolution.outcome is not Outcome.FORWARD:
                response = await self._local(pod, query, resolution, table, family, protocol, original)
                self.metrics.count(LOCAL, label, protocol)
                reply = encode(response, query.udp_limit if protocol == "udp" else None)
                if resolution.outcome is not Outcome.CNAME and table is self._cached_for:  # a CNAME's target
                    # may have been asked upstream: not the table's alone to repeat
                    if len(self._cache) >= CACHE_ENTRIES:
                        self._cache.clear()
                    self._cache[key] = (label, reply)
                return reply
        if self.in_flight >= self.options.max_forwards:
            self.metrics.count(REFUSED, label, protocol)
            return error_answer(query, dns.rcode.REFUSED)
        got = await self._ask(pod, query, protocol, original)
        if got is None:
            self.metrics.count(FAILED, label, protocol)
            log.debug("dns question not answered upstream", pod=pod.name, name=query.name.to_text(), type=label)
            return error_answer(query, dns.rcode.SERVFAIL)
        self.metrics.count(FORWARDED, label, protocol)
        return with_id(got, query.message.id)

    async def _local(self, pod: _DnsPod, query: Query, resolution: Resolution, table: DnsTable, family: int,
                     protocol: str, original: Upstream | None) -> dns.message.Message:
        """The table's answer; an ExternalName's CNAME is followed, through the table while it holds the names,
        then by asking the pod's resolver (as CoreDNS's kubernetes plugin resolves the target upstream)."""
        chain: list[tuple[str, Resolution]] = []
        current, extra, rcode = resolution, list[dns.rrset.RRset](), None
        for _ in range(self.options.max_chain):
            if current.outcome is not Outcome.CNAME:
                break
            following = resolve(table, current.cname, family)
            if following.outcome is Outcome.FORWARD:
                if self.in_flight < self.options.max_forwards:
                    got = await self._ask(pod, lookup_query(current.cname, query.rdtype), protocol, original)
                    answer = None if got is None else read_answer(got)
                    if answer is not None and answer.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                        extra, rcode = list(answer.answer), answer.rcode()
                break
            chain.append((current.cname, following))
            current = following
        response = local_answer(query, resolution, serial=table.generation, chain=tuple(chain))
        response.answer.extend(extra)
        if rcode == dns.rcode.NXDOMAIN:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    async def _ask(self, pod: _DnsPod, query: Query, protocol: str, original: Upstream | None
                   ) -> bytes | None:
        """Forward `query` to the pod's resolver(s) in turn until one answers it; None if none did."""
        targets = [original] if protocol == "tcp" and original is not None else list(self.options.upstreams)
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        self.metrics.in_flight.inc()
        started = loop.time()
        try:
            for host, port in targets:
                ident = secrets.randbelow(1 << 16)  # an id of our own: a reply must match it, not the pod's guess
                try:
                    async with asyncio.timeout(self.options.timeout):
                        if protocol == "tcp":
                            got = await self._tcp_exchange(pod, host, port, query, ident)
                        else:
                            got = await self._udp_exchange(pod, host, port, query, ident)
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    log.debug("dns upstream did not answer", pod=pod.name, upstream=f"{host}:{port}",
                              reason=f"{type(exc).__name__}: {exc}")
                    continue
                if got is not None:
                    return got
            return None
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            self.metrics.upstream_seconds.inc(loop.time() - started)

    async def _udp_exchange(self, pod: _DnsPod, host: str, port: int, query: Query, ident: int
                            ) -> bytes:
        loop = asyncio.get_running_loop()
        sock = self._socket_in(pod, _family(host), socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            sock.connect((host, port))  # UDP: only the resolver asked may answer (the kernel filters the rest)
        except BaseException:
            sock.close()
            raise
        future: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Exchange(ident, query, future), sock=sock)
        try:
            transport.sendto(with_id(query.data, ident))
            return await future
        finally:
            transport.close()

    async def _tcp_exchange(self, pod: _DnsPod, host: str, port: int, query: Query, ident: int
                            ) -> bytes | None:
        loop = asyncio.get_running_loop()
        sock = self._socket_in(pod, _family(host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            payload = with_id(query.data, ident)
            writer.write(len(payload).to_bytes(2, "big") + payload)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(size)
        finally:
            writer.close()
        return data if answers_query(data, ident, query) else None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host.split("%", 1)[0]).version == 6 else socket.AF_INET
