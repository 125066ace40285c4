"""`nodeagent ztunnel`: the node tunnel as a process, kept in step with the cluster.

A source (the Kubernetes API with every node's pods, or a manifests directory) feeds a change tracker;
each new snapshot becomes a workload table (who is who, which local pods are enrolled), and a reconcile
opens listeners for every enrolled pod of this node whose network namespace is found and closes those
of pods that left. What cannot be served yet (no namespace, CA unreachable) is kept as a named state,
logged once per change, shown on the admin endpoint and retried on the next pass. Certificates are
renewed by a periodic pass in a thread, never on the path of a connection.

Authorization fails closed: until AuthorizationPolicy and PeerAuthentication are both listed there is no
authorizer, every inbound connection is refused with 503 and readiness says why (a missing CRD names
itself there). `--no-policy-crds` is the operator saying the cluster has none: both kinds count as listed
and empty, and that is logged at start. A new snapshot whose policies or pod labels differ re-checks
every open inbound connection (`NodeTunnel.reevaluate`), as does an identity whose last pod left (a
certificate of an identity no pod holds is refused: a deleted pod's leftover).

With `--workers N` (N > 1) this process is the coordinator: everything above stays here (source, tracker,
control stream, reconcile, admin, certificates from the CA), and where a single process calls its
NodeTunnel it calls a WorkerSet (`daemon.workers`) of N worker processes that carry the connections, one
core each. One worker is today's single process: no coordinator split, no extra process.

The DNS proxy (`nodeagent.tunnel.dns`, on unless `--no-dns`) is served by this process in both modes: a served
pod gets its DNS listeners once the tunnel serves it, loses them when the tunnel releases it, and all of them
close when the drain starts. Its table of names is rebuilt from the snapshot when Services, EndpointSlices or
Namespaces change; its counters are the tunnel's (with workers: added to the coordinator's /metrics).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, generate_latest

from nodeagent.ca.identity import SpiffeId
from nodeagent.ca.service import request_certificate
from nodeagent.cluster.events import Listed, Sink
from nodeagent.cluster.model import Kind
from nodeagent.control.assignments import Assignment
from nodeagent.control.client import ControlClient
from nodeagent.daemon.errors import StartError
from nodeagent.daemon.sources import SourceOptions, source_factory
from nodeagent.daemon.tunnel_wire import State
from nodeagent.daemon.workers import WorkerSet, process_spawner
from nodeagent.kernel import podnetns
from nodeagent.kernel.netns import netns_path
from nodeagent.state.tracker import ChangeTracker, Snapshot
from nodeagent.tunnel.admin import serve_http, start_admin
from nodeagent.tunnel.dns.records import CLUSTER_DOMAIN, DnsTable, dns_table
from nodeagent.tunnel.dns.server import DnsOptions, DnsProxy, Upstream, system_upstreams
from nodeagent.tunnel.identity.certs import Fetch
from nodeagent.tunnel.proxy.node import DrainResult, NodeTunnel
from nodeagent.tunnel.state.authz import Authorizer
from nodeagent.tunnel.state.services import ServiceTable, service_table
from nodeagent.tunnel.state.workloads import Workload, WorkloadTable, workload_table
from nodeagent.tunnel.telemetry import METRICS_PORT, metrics_routes

log = structlog.get_logger("nodeagent.daemon.tunnel")
TABLE_KINDS = (Kind.POD, Kind.NAMESPACE)
POLICY_KINDS = (Kind.AUTHORIZATION_POLICY, Kind.PEER_AUTHENTICATION)
RECONCILE_PERIOD = 5.0  # retry of unserved pods and certificate renewal check
DRAIN_DEADLINE = 5.0


@dataclass(frozen=True)
class TunnelOptions:
    """The flags of `nodeagent ztunnel`."""

    node: str
    trust_domain: str = "cluster.local"
    netns_dir: Path = Path("/run/netns")
    netns_prefix: str = ""
    admin: tuple[str, int] = ("127.0.0.1", 15000)
    readiness: tuple[str, int] = ("0.0.0.0", 15021)
    metrics: tuple[str, int] | None = ("0.0.0.0", METRICS_PORT)
    # /healthz/ready also on this unix socket: the kubelet's exec probe asks this process, never the tunnel that
    # shares the node's ports with it during a rollout
    readiness_socket: str | None = None
    control_socket: str | None = None  # the agent's control stream; None: decide from the snapshot alone
    reconcile_period: float = RECONCILE_PERIOD
    no_policy_crds: bool = False  # the cluster has no policy CRDs: serve with no policies (said at start)
    workers: int = 1  # processes carrying connections; 1: this process alone (no coordinator split)
    # SIGTERM: listeners close at once, open connections get this long to finish (ztunnel's drain, 5 s there too)
    drain_deadline: float = DRAIN_DEADLINE
    log_level: str = "info"  # the workers' (they log as this process does)
    dns: bool = True  # the DNS proxy on 15053 in every served pod
    # where forwarded UDP questions go (and TCP ones not captured); empty: this process's /etc/resolv.conf
    dns_upstreams: tuple[Upstream, ...] = ()
    cluster_domain: str = CLUSTER_DOMAIN


class ServedPod(Protocol):
    """A pod the tunnel serves, as the reconcile reads it."""

    @property
    def workload(self) -> Workload: ...


class TunnelBackend(Protocol):
    """What the reconcile drives: a NodeTunnel (one process) or a WorkerSet (its workers)."""

    @property
    def pods(self) -> Mapping[str, ServedPod]: ...
    async def add_pod(self, workload: Workload) -> None: ...
    async def remove_pod(self, ip: str) -> None: ...
    async def rotate(self) -> int: ...
    def reevaluate(self) -> int: ...
    async def drain(self, deadline: float) -> DrainResult: ...
    async def close(self) -> None: ...


class Source(Protocol):
    """What the tunnel needs of a source (the Kubernetes API or a manifests directory)."""

    def start(self) -> object: ...
    def stop(self) -> None: ...


def source_failures(source: object) -> dict[Kind, str]:
    """The kinds a source failed to list, with why (sources that cannot fail have no `failures`)."""
    failures = getattr(source, "failures", None)
    return dict(failures()) if callable(failures) else {}


@dataclass
class TunnelProcess:
    """The tunnel, its admin endpoints, and the reconcile that keeps its pods in step with snapshots."""

    options: TunnelOptions
    fetch: Fetch
    make_source: Callable[[Sink], Source]
    table: WorkloadTable | None = None
    services: ServiceTable | None = None
    authorizer: Authorizer | None = None
    rejections: set[str] = field(default_factory=set)
    states: dict[str, str] = field(default_factory=dict)  # pod ip -> why it is not served ("" = served)
    netns_of: dict[str, str] = field(default_factory=dict)  # pod ip -> namespace path, as found
    assignments: dict[str, Assignment] | None = None  # uid -> pod, when the agent streams them
    version: int = 0
    agent_run: str = ""
    on_reconciled: Callable[[], None] | None = None
    policies_synced: bool = False
    source: Source | None = None
    dns_table: DnsTable | None = None
    tunnel: NodeTunnel | WorkerSet = field(init=False)
    dns: DnsProxy | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.options.workers > 1:
            self.tunnel = WorkerSet(self.options.node, self.options.trust_domain, self.options.workers,
                                    process_spawner(self.options.node, self.options.trust_domain,
                                                    self.options.log_level),
                                    lambda: State(self.table, self.services, self.authorizer), self.fetch)
        else:
            # reuse_port: a new tunnel of the node listens in the pods beside this one before this one drains
            # (a rollout), as ztunnel's in-pod listeners do (INPOD_PORT_REUSE, on by default).
            self.tunnel = NodeTunnel(self.options.node, self.options.trust_domain, self.fetch, self.lookup,
                                     services=lambda: self.services, authorizer=lambda: self.authorizer,
                                     identity_known=lambda identity: self.table is not None
                                     and self.table.holds(identity), reuse_port=True)
        if self.options.dns:
            # One registry with the tunnel's when this process carries the connections; with workers, the
            # coordinator's own, added to what it serves on /metrics.
            registry = self.tunnel.metrics.registry if isinstance(self.tunnel, NodeTunnel) else CollectorRegistry()
            upstreams = self.options.dns_upstreams or system_upstreams()
            if not upstreams:
                log.warning("dns proxy has no upstream resolver: names it does not hold get SERVFAIL",
                            node=self.options.node)
            self.dns = DnsProxy(DnsOptions(upstreams=upstreams, domain=self.options.cluster_domain),
                                lambda: self.dns_table, registry, node=self.options.node, reuse_port=True)
        self._dns_snapshot: Snapshot | None = None  # the snapshot the DNS table was last made from
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._synced_kinds: frozenset[Kind] = frozenset()
        self._authz_inputs: object = None  # what the current authorizer and served labels were built from

    def lookup(self, ip: str) -> Workload | None:
        """The workload holding `ip` in the current table (the tunnel's destination lookup)."""
        return self.table.lookup(ip) if self.table is not None else None

    def desired(self) -> dict[str, Workload]:
        """The pods to serve, by IP: the agent's assignments when it streams them, else the enrolled
        local pods of the tunnel's own snapshot (standalone mode; namespaces found by address)."""
        if self.assignments is not None:
            out = {}
            for assignment in self.assignments.values():
                known = self.lookup(assignment.ip)
                out[assignment.ip] = Workload(
                    assignment.ip, SpiffeId(self.options.trust_domain, assignment.namespace,
                                            assignment.service_account),
                    self.options.node, netns=assignment.netns, name=assignment.uid,
                    labels=known.labels if known is not None else {}, transparent=assignment.transparent)
            return out
        return dict(self.table.local) if self.table is not None else {}

    def assigned(self) -> set[str]:
        """The pods the tunnel must serve to be ready."""
        if self.assignments is None and self.table is None:
            return {"(no snapshot yet)"}
        return set(self.desired())

    def blockers(self) -> list[str]:
        """Why the tunnel is not ready beyond its pods: policies not synced (and why, when listing failed)."""
        if self.policies_synced:
            return []
        failures = source_failures(self.source) if self.source is not None else {}
        return [f"policies not synced: {kind} not listed" + (f" ({failures[kind]})" if kind in failures else "")
                for kind in POLICY_KINDS if kind not in self._synced_kinds] or ["policies not synced"]

    def status(self) -> dict[str, object]:
        """Per-pod states and enrollment decisions, for the admin endpoint."""
        table = self.table
        return {"states": {ip: state or "served" for ip, state in sorted(self.states.items())},
                "policies_synced": self.policies_synced, "blockers": self.blockers(),
                "control": None if self.assignments is None else {"agent_run": self.agent_run,
                                                                  "version": self.version},
                "rejected_annotations": sorted(self.rejections),
                "enrollment": {} if table is None else {name: {"enrolled": d.enrolled, "reason": d.reason}
                                                         for name, d in sorted(table.decisions.items())}}

    def pod_statuses(self) -> list[tuple[str, bool, str]]:
        """(uid, served, reason) of every assigned pod, for the acknowledgement to the agent."""
        return [(a.uid, a.ip in self.backend.pods and not self.states.get(a.ip), self.states.get(a.ip, ""))
                for a in (self.assignments or {}).values()]

    async def apply(self, version: int, agent_run: str, full_state: bool, add: list[Assignment],
                    remove: list[str]) -> None:
        """Take an update of the agent's stream and serve accordingly (returns once reconciled)."""
        current = {} if full_state or self.assignments is None else dict(self.assignments)
        for uid in remove:
            current.pop(uid, None)
        for assignment in add:
            current[assignment.uid] = assignment
        self.assignments, self.version, self.agent_run = current, version, agent_run
        await self.reconcile(None)

    @property
    def backend(self) -> TunnelBackend:
        """The tunnel as the reconcile drives it, whichever it is."""
        return self.tunnel

    async def reconcile(self, snapshot: Snapshot | None) -> None:
        """Serve exactly the desired pods that can be served now (one pass at a time)."""
        async with self._lock:
            if snapshot is not None and (self.services is None or self.services.generation != snapshot.generation):
                self._follow(snapshot)
            desired = self.desired()
            backend = self.backend
            for ip in [ip for ip, pod in backend.pods.items() if ip not in desired
                       or _must_readd(pod.workload, desired[ip])]:
                await backend.remove_pod(ip)
            for ip in [ip for ip in self.states if ip not in desired]:
                del self.states[ip]
                self.netns_of.pop(ip, None)
            missing = [ip for ip, w in desired.items() if not w.netns
                       and (ip not in self.netns_of or not Path(self.netns_of[ip]).exists())]
            if missing:
                found = await asyncio.to_thread(podnetns.locate, missing, self.options.netns_dir,
                                                self.options.netns_prefix)
                self.netns_of.update(found)
            for ip, workload in desired.items():
                if ip in backend.pods:
                    self._set_state(workload, "")
                    continue
                netns = workload.netns or self.netns_of.get(ip)
                if netns is None:
                    self._set_state(workload, f"netns-missing: no namespace under {self.options.netns_dir} "
                                              f"holds {ip}")
                    continue
                if not Path(netns).exists():
                    self._set_state(workload, f"netns-missing: {netns} does not exist")
                    continue
                try:
                    await backend.add_pod(replace(workload, netns=netns))
                    self._set_state(workload, "")
                except Exception as exc:  # one pod's failure (CA, vanished netns) must not stop the others
                    self.netns_of.pop(ip, None)
                    self._set_state(workload, f"error: {type(exc).__name__}: {exc}")
            await self._reconcile_dns(backend)
        if self.on_reconciled is not None:
            self.on_reconciled()

    async def _reconcile_dns(self, backend: TunnelBackend) -> None:
        """DNS listeners in exactly the pods the tunnel serves now (a failure is retried on the next pass)."""
        if self.dns is None:
            return
        for ip in [ip for ip, pod in self.dns.pods.items() if ip not in backend.pods
                   or netns_path(backend.pods[ip].workload.netns or "") != pod.netns.path]:
            self.dns.remove_pod(ip)
        for ip, served in backend.pods.items():
            workload = served.workload
            if ip in self.dns.pods or not workload.netns:
                continue
            try:
                await self.dns.add_pod(ip, workload.name, workload.netns)
            except Exception as exc:  # the pod's other traffic is served: only its DNS waits for the next pass
                log.warning("dns proxy not serving pod", pod=workload.name, pod_ip=ip,
                            reason=f"{type(exc).__name__}: {exc}")

    def _follow_dns(self, snapshot: Snapshot) -> None:
        """The DNS table for a new snapshot."""
        if self.dns is None:
            return
        # Only what changed since the last snapshot is redone; the same table when nothing DNS reads did (the
        # proxy keeps its answers while the table object stays the same).
        since = None if self.dns_table is None or self._dns_snapshot is None else (self.dns_table,
                                                                                  self._dns_snapshot)
        self.dns_table = dns_table(snapshot, self.options.cluster_domain, since)
        self._dns_snapshot = snapshot if self.dns_table is not None else None

    def _follow(self, snapshot: Snapshot) -> None:
        """New workload, Service and policy views for a new snapshot; report newly rejected annotations."""
        self._follow_dns(snapshot)
        self.table = workload_table(snapshot, self.options.node, self.options.trust_domain)
        self.services = service_table(snapshot) if self.services is None else self.services.updated(snapshot)
        self._synced_kinds = snapshot.synced_kinds
        if snapshot.synced(POLICY_KINDS):
            # Rebuilt only when its inputs change; then every open inbound connection is judged again.
            inputs = (snapshot.authorization_policies, snapshot.peer_authentications, self.table.identities,
                      tuple(sorted((ip, w.name, tuple(sorted(w.labels.items())))
                                   for ip in self.backend.pods if (w := self.table.by_ip.get(ip)) is not None)))
            if inputs != self._authz_inputs:
                self.authorizer = Authorizer.from_snapshot(snapshot)
                if not self.policies_synced:
                    log.info("policies synced, serving inbound", node=self.options.node,
                             authorization_policies=len(snapshot.authorization_policies),
                             peer_authentications=len(snapshot.peer_authentications))
                self.policies_synced = True
                closed = self.backend.reevaluate() if self._authz_inputs is not None else 0
                self._authz_inputs = inputs
                if closed:
                    log.info("connections closed after a policy change", node=self.options.node, closed=closed)
        if isinstance(self.tunnel, NodeTunnel):
            self.tunnel.outbound.resilience.retain(self.services)
        else:
            self.tunnel.retain()  # each worker retains for itself, from the tables pushed now
        rejections = {str(r) for r in self.services.all_rejections()}
        for rejection in sorted(rejections - self.rejections):
            log.warning("service annotation ignored", rejection=rejection)
        self.rejections = rejections

    async def _coordinator_metrics(self) -> tuple[int, str, bytes]:
        """/metrics with workers: theirs summed, then the coordinator's DNS proxy's."""
        assert isinstance(self.tunnel, WorkerSet)
        status, content_type, body = await self.tunnel.metrics_route()
        if self.dns is not None:
            body += generate_latest(self.dns.metrics.registry)
        return status, content_type, body

    def prime(self, tracker: ChangeTracker) -> None:
        """Before the source starts: with --no-policy-crds, both policy kinds count as listed and empty (the
        source does not watch them), which is said once at start."""
        if self.options.no_policy_crds:
            log.warning("no policy CRDs (--no-policy-crds): serving with no AuthorizationPolicy and no "
                        "PeerAuthentication; every peer of the trust domain is allowed", node=self.options.node)
            for kind in POLICY_KINDS:
                tracker.apply(Listed(kind, (), ""))

    def _set_state(self, workload: Workload, state: str) -> None:
        if self.states.get(workload.ip) != state:
            if state:
                log.warning("pod not served", pod=workload.name, pod_ip=workload.ip, state=state)
            self.states[workload.ip] = state

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set: then drain (`NodeTunnel.drain`: listeners closed, GOAWAY to peers, open
        connections given `options.drain_deadline`) and close every pool."""
        loop = asyncio.get_running_loop()

        def changed() -> None:
            loop.call_soon_threadsafe(self._changed.set)

        tracker = ChangeTracker(self.options.node, on_change=changed)
        self.prime(tracker)
        source = self.source = self.make_source(tracker.apply)
        if isinstance(self.tunnel, WorkerSet):
            await self.tunnel.start()
        servers = await start_admin(self.tunnel, self.assigned, admin=self.options.admin,
                                    readiness=self.options.readiness, status=self.status, blockers=self.blockers,
                                    readiness_socket=self.options.readiness_socket)
        if self.options.metrics is not None:
            routes = metrics_routes(self.tunnel.metrics) if isinstance(self.tunnel, NodeTunnel) else {
                "/metrics": self._coordinator_metrics}
            servers.append(await serve_http(*self.options.metrics, routes))
        source.start()
        control = None
        if self.options.control_socket is not None:
            self.assignments = {}  # the agent decides what to serve; nothing until it says
            control = ControlClient(self.options.control_socket, self.options.node, self.apply, self.pod_statuses)
            self.on_reconciled = control.notify
            control_task = asyncio.create_task(control.run(stop))
        log.info("tunnel started", node=self.options.node, admin=f"{self.options.admin[0]}:{self.options.admin[1]}",
                 control=self.options.control_socket, workers=self.options.workers)
        retry = 0.1
        try:
            while not stop.is_set():
                snapshot = tracker.snapshot() or tracker.last()
                # Before pods and namespaces are fully listed, a pod missing from the table may exist.
                if snapshot is not None and snapshot.synced(TABLE_KINDS):
                    await self.reconcile(snapshot)
                elif self.assignments:
                    await self.reconcile(None)
                await self.backend.rotate()
                # Pods not served yet (the CA starting beside us, a namespace being made) are retried
                # soon, then less often; a served node only reconciles on change or the period.
                retry = min(retry * 2, self.options.reconcile_period) if any(self.states.values()) else 0.1
                waiters = [asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(stop.wait())]
                await asyncio.wait(waiters, timeout=retry if any(self.states.values()) else
                                   self.options.reconcile_period, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                self._changed.clear()
        finally:
            # Not ready from now on; the ports are the next tunnel's. Then the drain: this tunnel takes no new
            # connection and its open ones get the deadline.
            for server in servers:
                server.close()
            if self.dns is not None:
                self.dns.stop_listening()
            drained = await self.backend.drain(self.options.drain_deadline)
            if control is not None:
                await control_task
            source.stop()
            await self.backend.close()
            if self.dns is not None:
                await self.dns.close()
            log.info("tunnel stopped", node=self.options.node, finished=drained.finished,
                     closed_at_deadline=drained.closed)


def _must_readd(served: Workload, wanted: Workload) -> bool:
    """Whether a served pod must be re-added to match what is wanted now."""
    return (served.identity, served.transparent) != (wanted.identity, wanted.transparent) or bool(
        wanted.netns and served.netns != wanted.netns)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit of open files to the hard one, as ztunnel and Envoy do at start: every proxied
    connection holds two or three descriptors, and the usual soft limit of 1,024 ends a busy tunnel."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def run_forever(process: TunnelProcess) -> None:
    """Run `process` on uvloop until SIGTERM or SIGINT."""
    import uvloop

    limit = raise_open_files_limit()
    log.info("open files limit", soft=limit[0], hard=limit[1])

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await process.run(stop)

    uvloop.run(main())


@dataclass(frozen=True)
class CaCredentials:
    """How the tunnel reaches the mesh CA: its address, the token it authenticates with (a projected
    ServiceAccount token the kubelet rotates on disk, so read for every request) and the mesh root."""

    address: str
    token_file: Path
    root_file: Path

    def fetcher(self) -> Fetch:
        """The certificate fetch of the tunnel; raises StartError when either file cannot be read now."""
        try:
            root_pem = self.root_file.read_text()
            self.token_file.read_text()
        except OSError as exc:
            raise StartError(f"tunnel credentials: {exc}") from exc

        def fetch(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> list[str]:
            # Read per request: the kubelet rotates a projected token on disk; no restart needed.
            return request_certificate(self.address, self.token_file.read_text().strip(), identity, key, root_pem)

        return fetch


def main(options: TunnelOptions, credentials: CaCredentials, source: SourceOptions) -> int:
    """`nodeagent ztunnel`: run the tunnel until SIGTERM or SIGINT; the exit status. Raises StartError when
    its credentials cannot be read."""
    from nodeagent.cluster.discovery.kubernetes import CORE_KINDS, MESH_KINDS

    fetch = credentials.fetcher()
    if options.workers > 1:
        log.info("tunnel workers", node=options.node, workers=options.workers)
    # Every node's pods: the tunnel checks the identity of destinations on other nodes.
    make_source = source_factory(source, options.node, all_pods=True,
                                 kinds=CORE_KINDS if options.no_policy_crds else CORE_KINDS + MESH_KINDS)
    run_forever(TunnelProcess(options, fetch, make_source))
    return 0
