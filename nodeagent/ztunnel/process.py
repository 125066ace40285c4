"""`nodeagent ztunnel`: the node tunnel as a process, kept in step with the cluster.

A source (the Kubernetes API with every node's pods, or a manifests directory) feeds a change tracker;
each new snapshot becomes a workload table (who is who, which local pods are enrolled), and a reconcile
opens listeners for every enrolled pod of this node whose network namespace is found and closes those
of pods that left. What cannot be served yet (no namespace, CA unreachable) is kept as a named state,
logged once per change, shown on the admin endpoint and retried on the next pass. Certificates are
renewed by a periodic pass in a thread, never on the path of a connection.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from nodeagent.events import Sink
from nodeagent.model import Kind
from nodeagent.state import ChangeTracker, Snapshot
from nodeagent.ztunnel import podnetns
from nodeagent.ztunnel.admin import serve_http, start_admin
from nodeagent.ztunnel.authz import Authorizer
from nodeagent.ztunnel.certs import Fetch
from nodeagent.ztunnel.services import ServiceTable, service_table
from nodeagent.ztunnel.telemetry import METRICS_PORT, metrics_routes
from nodeagent.ztunnel.tunnel import NodeTunnel
from nodeagent.ztunnel.workloads import Workload, WorkloadTable, workload_table

log = structlog.get_logger("nodeagent.ztunnel.process")
TABLE_KINDS = (Kind.POD, Kind.NAMESPACE)
RECONCILE_PERIOD = 5.0  # retry of unserved pods and certificate renewal check


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
    reconcile_period: float = RECONCILE_PERIOD


@dataclass
class TunnelProcess:
    """The tunnel, its admin endpoints, and the reconcile that keeps its pods in step with snapshots."""

    options: TunnelOptions
    fetch: Fetch
    make_source: Callable[[Sink], Any]
    table: WorkloadTable | None = None
    services: ServiceTable | None = None
    authorizer: Authorizer | None = None
    rejections: set[str] = field(default_factory=set)
    states: dict[str, str] = field(default_factory=dict)  # pod ip -> why it is not served ("" = served)
    netns_of: dict[str, str] = field(default_factory=dict)  # pod ip -> namespace path, as found
    tunnel: NodeTunnel = field(init=False)

    def __post_init__(self) -> None:
        self.tunnel = NodeTunnel(self.options.node, self.options.trust_domain, self.fetch, self.lookup,
                                 services=lambda: self.services, authorizer=lambda: self.authorizer)
        self._changed = asyncio.Event()

    def lookup(self, ip: str) -> Workload | None:
        """The workload holding `ip` in the current table (the tunnel's destination lookup)."""
        return self.table.lookup(ip) if self.table is not None else None

    def assigned(self) -> set[str]:
        """The local enrolled pods the tunnel must serve to be ready."""
        return set(self.table.local) if self.table is not None else {"(no snapshot yet)"}

    def status(self) -> dict[str, Any]:
        """Per-pod states and enrollment decisions, for the admin endpoint."""
        table = self.table
        return {"states": {ip: state or "served" for ip, state in sorted(self.states.items())},
                "rejected_annotations": sorted(self.rejections),
                "enrollment": {} if table is None else {name: {"enrolled": d.enrolled, "reason": d.reason}
                                                         for name, d in sorted(table.decisions.items())}}

    async def reconcile(self, snapshot: Snapshot) -> None:
        """Serve exactly the enrolled local pods of `snapshot` that can be served now."""
        if self.services is None or self.services.generation != snapshot.generation:
            self._follow(snapshot)
        table = self.table
        assert table is not None
        for ip in [ip for ip in self.tunnel.pods if ip not in table.local
                   or self.tunnel.pods[ip].workload.identity != table.local[ip].identity]:
            await self.tunnel.remove_pod(ip)
        for ip in [ip for ip in self.states if ip not in table.local]:
            del self.states[ip]
            self.netns_of.pop(ip, None)
        missing = [ip for ip in table.local if ip not in self.netns_of or not Path(self.netns_of[ip]).exists()]
        if missing:
            found = await asyncio.to_thread(podnetns.locate, missing, self.options.netns_dir,
                                            self.options.netns_prefix)
            self.netns_of.update(found)
        for ip, workload in table.local.items():
            if ip in self.tunnel.pods:
                self._set_state(workload, "")
                continue
            netns = self.netns_of.get(ip)
            if netns is None:
                self._set_state(workload, f"netns-missing: no namespace under {self.options.netns_dir} "
                                          f"holds {ip}")
                continue
            try:
                await self.tunnel.add_pod(replace(workload, netns=netns))
                self._set_state(workload, "")
            except Exception as exc:  # one pod's failure (CA, vanished netns) must not stop the others
                self.netns_of.pop(ip, None)
                self._set_state(workload, f"error: {type(exc).__name__}: {exc}")

    def _follow(self, snapshot: Snapshot) -> None:
        """New workload, Service and policy views for a new snapshot; report newly rejected annotations."""
        self.table = workload_table(snapshot, self.options.node, self.options.trust_domain)
        self.services = service_table(snapshot) if self.services is None else self.services.updated(snapshot)
        self.authorizer = Authorizer.from_snapshot(snapshot)
        self.tunnel.outbound.resilience.retain(self.services)
        rejections = {str(r) for r in self.services.all_rejections()}
        for rejection in sorted(rejections - self.rejections):
            log.warning("service annotation ignored", rejection=rejection)
        self.rejections = rejections

    def _set_state(self, workload: Workload, state: str) -> None:
        if self.states.get(workload.ip) != state:
            if state:
                log.warning("pod not served", pod=workload.name, pod_ip=workload.ip, state=state)
            self.states[workload.ip] = state

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set: then close every listener and pool (GOAWAY to peers)."""
        loop = asyncio.get_running_loop()

        def changed() -> None:
            loop.call_soon_threadsafe(self._changed.set)

        tracker = ChangeTracker(self.options.node, on_change=changed)
        source = self.make_source(tracker.apply)
        admin, readiness = await start_admin(self.tunnel, self.assigned, admin=self.options.admin,
                                             readiness=self.options.readiness, status=self.status)
        servers = [admin, readiness]
        if self.options.metrics is not None:
            servers.append(await serve_http(*self.options.metrics, metrics_routes(self.tunnel.metrics)))
        source.start()
        log.info("tunnel started", node=self.options.node, admin=f"{self.options.admin[0]}:{self.options.admin[1]}")
        retry = 0.1
        try:
            while not stop.is_set():
                snapshot = tracker.snapshot() or tracker.last()
                # Before pods and namespaces are fully listed, a pod missing from the table may exist.
                if snapshot is not None and snapshot.synced(TABLE_KINDS):
                    await self.reconcile(snapshot)
                    await self.tunnel.rotate()
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
            source.stop()
            for server in servers:
                server.close()
            await self.tunnel.close()
            log.info("tunnel stopped", node=self.options.node)


def run_forever(process: TunnelProcess) -> None:
    """Run `process` on uvloop until SIGTERM or SIGINT."""
    import uvloop

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await process.run(stop)

    uvloop.run(main())
