"""The coordinator's side of `nodeagent ztunnel --workers N` (N > 1): N worker processes, one per core.

One Python process carries connections on at most one core, so a busy node's tunnel runs N workers
(`nodeagent.daemon.tunnel_worker`), each with its own listeners in every served pod's namespace
(SO_REUSEPORT spreads new connections over them) and its own HBONE pools, as Envoy's and ztunnel's worker
threads each own their connections. The coordinator (`daemon.tunnel.TunnelProcess`) keeps everything
that talks to the outside (the agent's control stream, the API server, the CA) and calls this `WorkerSet`
where a single-process tunnel calls its NodeTunnel: add_pod, remove_pod, rotate, reevaluate, close, pods.

- State: before every request (and on every snapshot) what changed of the tables (workloads, Services as
  a delta, authorizer) is pushed to every worker, so a worker judges a connection by what the coordinator
  last decided.
- Certificates: the coordinator fetches each identity's certificate and renews it at half life; workers
  get the key and chain with the pod and on every renewal (over their private socket), never the CA.
- A pod is served once every live worker acknowledged it; a failed add is undone in every worker.
- A worker that dies is logged, counted and restarted (backing off when it dies young), and given the
  current tables and pods; its siblings keep serving meanwhile (only its own connections are lost).
- Metrics: a scrape asks every worker for its samples (a short timeout; a silent worker is skipped and
  counted) and answers their sum, with each worker's resident memory and restarts.
- Outlier ejection and circuit breakers are per worker: Envoy shares a cluster's across its workers; here
  each worker counts its own share of the traffic (a documented simplification).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nodeagent.daemon.tunnel_wire import (
    KEEP,
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
    load_reply,
    read_frame,
)
from nodeagent.tunnel.identity.certs import Certificates, Fetch, WorkloadCertificate
from nodeagent.tunnel.proxy.node import DrainResult
from nodeagent.tunnel.state.workloads import Workload
from nodeagent.tunnel.telemetry import Families, exposition, merge_families

log = structlog.get_logger("nodeagent.daemon.workers")

REQUEST_TIMEOUT = 30.0  # a worker silent this long on a pod change is killed (and restarted)
SCRAPE_TIMEOUT = 1.0  # a scrape or dump skips a worker silent this long
STOP_TIMEOUT = 10.0  # a worker gets this long to close its listeners and pools after its socket closes
RESTART_BACKOFF = (0.1, 5.0)  # first and longest wait before restarting a worker that died young
YOUNG = 10.0  # a worker that lived less than this died young (the next restart waits twice as long)


class WorkerGone(ConnectionError):
    """The worker's process ended (or its socket did) before it answered."""


@dataclass
class Channel:
    """A started worker: its pid, its end of the socket, and how to reap or kill it."""

    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    wait: Callable[[], Awaitable[int | None]]  # the exit status, once it exited
    kill: Callable[[], None]


Spawn = Callable[[int], Awaitable[Channel]]


def process_spawner(node: str, trust_domain: str, log_level: str = "info") -> Spawn:
    """Start worker `index` as `python -m nodeagent.daemon.tunnel_worker` with one end of a new socketpair
    (the only descriptor it inherits). Spawned from the event loop's thread: PR_SET_PDEATHSIG follows the
    thread that forked, so a worker forked from a short-lived thread would be killed with that thread.

    With `subprocess.Popen` (vfork and exec in C), not the loop's `create_subprocess_exec`: uvloop's runs
    `PyOS_AfterFork_Child` and `uv_loop_fork` in the child between fork and exec, and in the coordinator, which
    has other threads (certificate calls run in the default executor), that child sometimes died of SIGSEGV
    before it reached exec (seen as a restarted worker exiting with -11 after 0.0 s)."""
    import socket

    async def spawn(index: int) -> Channel:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "nodeagent.daemon.tunnel_worker", "--fd", str(child.fileno()),
                 "--parent", str(os.getpid()), "--index", str(index), "--node", node, "--trust-domain", trust_domain,
                 "--log-level", log_level], pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        try:
            wait = exit_waiter(process)
            reader, writer = await asyncio.open_unix_connection(sock=parent)
        except BaseException:
            process.kill()
            process.wait()
            raise
        return Channel(process.pid, reader, writer, wait, process.kill)

    return spawn


def exit_waiter(process: subprocess.Popen[bytes]) -> Callable[[], Awaitable[int | None]]:
    """An awaitable for `process`'s exit status (negative: the signal), from a pidfd the event loop watches:
    no thread and no SIGCHLD handler. Call it on the loop's thread."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int | None] = loop.create_future()
    pidfd = os.pidfd_open(process.pid)

    def readable() -> None:  # a pidfd is readable once its process has exited
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not exited.done():
            exited.set_result(process.wait())

    loop.add_reader(pidfd, readable)

    async def wait() -> int | None:
        return await asyncio.shield(exited)

    return wait


@dataclass
class ServedPod:
    """A pod every live worker serves, and its identity's certificate (held by the coordinator)."""

    workload: Workload
    certificate: WorkloadCertificate


@dataclass(eq=False)
class _Worker:
    index: int
    channel: Channel
    started: float = field(default_factory=time.monotonic)
    alive: bool = True
    pods: set[str] = field(default_factory=set)  # what it acknowledged serving
    pending: dict[int, asyncio.Future[Reply]] = field(default_factory=dict)
    state: State | None = None  # the last tables sent to it
    reading: asyncio.Task[None] | None = None


class WorkerSet:
    """N tunnel workers behind the surface of one NodeTunnel (see the module docstring)."""

    def __init__(self, node: str, trust_domain: str, count: int, spawn: Spawn, state: Callable[[], State],
                 fetch: Fetch, *, request_timeout: float = REQUEST_TIMEOUT, scrape_timeout: float = SCRAPE_TIMEOUT,
                 backoff: tuple[float, float] = RESTART_BACKOFF) -> None:
        if count < 2:
            raise ValueError("a WorkerSet is for two workers or more (one is the single-process tunnel)")
        self.node, self.trust_domain = node, trust_domain
        self.count, self.spawn, self.state, self.fetch = count, spawn, state, fetch
        self.request_timeout, self.scrape_timeout, self.backoff = request_timeout, scrape_timeout, backoff
        self.pods: dict[str, ServedPod] = {}
        self.certificates = Certificates(fetch)
        self.workers: dict[int, _Worker] = {}
        self.restarts: dict[int, int] = dict.fromkeys(range(count), 0)
        self._wanted: dict[str, Workload] = {}  # pods being added or served: what a restarted worker is given
        self._ids = itertools.count(1)
        self._closing = False
        self._restarting: dict[int, asyncio.Task[None]] = {}
        self.registry = CollectorRegistry()
        self.rss = Gauge("nodeagent_tunnel_worker_resident_memory_bytes", "Resident memory of each tunnel worker",
                         ["worker"], registry=self.registry)
        self.restart_total = Counter("nodeagent_tunnel_worker_restarts", "Tunnel workers restarted after they "
                                     "exited", ["worker"], registry=self.registry)
        self.skipped = Counter("nodeagent_tunnel_worker_scrapes_skipped", "Scrapes that went without a worker's "
                               "samples (it did not answer in time)", ["worker"], registry=self.registry)
        for index in range(count):
            self.restart_total.labels(worker=str(index))
            self.skipped.labels(worker=str(index))

    # -- workers --

    async def start(self) -> None:
        """Start every worker (each gets the current tables; no pods yet)."""
        channels = await asyncio.gather(*(self.spawn(index) for index in range(self.count)))
        for index, channel in enumerate(channels):
            self._attach(index, channel)
        log.info("tunnel workers started", workers=[w.channel.pid for w in self.workers.values()])

    def _attach(self, index: int, channel: Channel) -> _Worker:
        """Register a started worker and queue the current tables for it (no await until then: whatever is
        sent to it afterwards, a restart's pods first, reaches it after them)."""
        worker = _Worker(index, channel)
        self.workers[index] = worker
        worker.reading = asyncio.ensure_future(self._read(worker))
        self._push_state(worker)
        return worker

    def running(self) -> list[_Worker]:
        """The workers running now, by index."""
        return [w for _, w in sorted(self.workers.items()) if w.alive]

    async def _read(self, worker: _Worker) -> None:
        reason = "end of stream"
        try:
            while (received := await read_frame(worker.channel.reader)) is not None:
                request_id, payload = received
                future = worker.pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(load_reply(payload))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            worker.alive = False
            gone = WorkerGone(f"tunnel worker {worker.index} (pid {worker.channel.pid}) is gone: {reason}")
            for future in worker.pending.values():
                if not future.done():
                    future.set_exception(gone)
            worker.pending.clear()
            worker.channel.writer.close()
            if not self._closing:
                self._restarting[worker.index] = asyncio.ensure_future(self._restart(worker, reason))

    async def _restart(self, dead: _Worker, reason: str) -> None:
        """Reap `dead`, then start its replacement with the current tables and pods."""
        try:
            status = await asyncio.wait_for(dead.channel.wait(), STOP_TIMEOUT)
        except TimeoutError:
            dead.channel.kill()
            status = await dead.channel.wait()
        lived = time.monotonic() - dead.started
        self.restarts[dead.index] += 1
        self.restart_total.labels(worker=str(dead.index)).inc()
        log.warning("tunnel worker exited; restarting it", worker=dead.index, pid=dead.channel.pid, status=status,
                    reason=reason, lived_seconds=round(lived, 1), restarts=self.restarts[dead.index])
        delay = 0.0 if lived >= YOUNG else self.backoff[0]
        while not self._closing:
            if delay:
                await asyncio.sleep(delay)  # a worker dying at start is not restarted in a tight loop
            try:
                channel = await self.spawn(dead.index)
            except OSError as exc:
                log.error("tunnel worker could not be started", worker=dead.index, reason=str(exc))
                delay = min(max(delay * 2, self.backoff[0]), self.backoff[1])
                continue
            if self._closing:
                channel.kill()
                await channel.wait()
                return
            worker = self._attach(dead.index, channel)
            replay = [(ip, self._send(worker, self._add_request(workload)))
                      for ip, workload in self._wanted.items()]
            for ip, future in replay:
                reply = await self._settle(worker, future, self.request_timeout)
                if isinstance(reply, Reply) and not reply.error:
                    if ip in self._wanted:  # not removed meanwhile (its RemovePod followed on the same socket)
                        worker.pods.add(ip)
                else:
                    log.warning("restarted tunnel worker did not take a pod", worker=dead.index, pod_ip=ip,
                                reason=str(reply.error if isinstance(reply, Reply) else reply))
            log.info("tunnel worker restarted", worker=dead.index, pid=channel.pid, pods=len(worker.pods))
            return

    # -- requests --

    def _send(self, worker: _Worker, request: Request | bytes) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        if not worker.alive:
            future.set_exception(WorkerGone(f"tunnel worker {worker.index} is gone"))
            return future
        request_id = next(self._ids)
        worker.pending[request_id] = future
        worker.channel.writer.write(frame(request_id, request if isinstance(request, bytes) else dumps(request)))
        return future

    async def _settle(self, worker: _Worker, future: asyncio.Future[Reply], timeout: float,
                      kill_when_late: bool = True) -> Reply | Exception:
        """The reply, or why there is none (gone, or late: a late worker is killed, then restarted, unless
        `kill_when_late` is false)."""
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            if kill_when_late and worker.alive:
                log.error("tunnel worker did not answer; killing it", worker=worker.index, pid=worker.channel.pid,
                          timeout=timeout)
                worker.channel.kill()
            return exc
        except WorkerGone as exc:
            return exc

    async def _ask_all(self, request: Request, timeout: float, kill_when_late: bool = True
                       ) -> list[tuple[_Worker, Reply | Exception]]:
        """Send one request to every live worker (pickled once) and gather their answers."""
        payload = dumps(request)
        sent = [(worker, self._send(worker, payload)) for worker in self.running()]
        answers = await asyncio.gather(*(self._settle(w, f, timeout, kill_when_late) for w, f in sent))
        return [(worker, answer) for (worker, _), answer in zip(sent, answers, strict=True)]

    def _push_state(self, worker: _Worker | None = None) -> None:
        """Send the current tables to `worker` (else to every live worker whose tables differ): what changed
        since the tables it holds, pickled once per distinct starting point (usually one for all)."""
        state = self.state()
        targets = [worker] if worker is not None else [w for w in self.running() if not _same_state(w.state, state)]
        payloads: dict[int, tuple[State | None, bytes]] = {}  # id(what a worker holds) -> (it, the message)
        for target in targets:
            held = target.state
            if id(held) not in payloads:
                payloads[id(held)] = (held, dumps(tables_since(held, state)))
            target.state = state
            self._send(target, payloads[id(held)][1]).add_done_callback(self._tables_done(target))

    def _tables_done(self, worker: _Worker) -> Callable[[asyncio.Future[Reply]], None]:
        """After a worker took (or failed to take) tables: one that failed gets whole tables next time."""
        log_failure = _log_failure(worker.index, "tables")

        def done(future: asyncio.Future[Reply]) -> None:
            log_failure(future)
            if not future.cancelled() and (future.exception() is not None or future.result().error):
                worker.state = None
        return done

    def retain(self) -> None:
        """The tables changed (a new snapshot): push them now, so each worker's per-Service state (outlier
        ejection, circuit breakers) drops the Services that are gone."""
        self._push_state()

    # -- the NodeTunnel surface --

    def _add_request(self, workload: Workload) -> AddPod:
        certificate = self.certificates[workload.identity]
        return AddPod(workload, Certificate(workload.identity, certificate.key_pem(), certificate.chain))

    async def add_pod(self, workload: Workload) -> None:
        """Fetch the pod's certificate here, then have every live worker open the pod's listeners; served
        once all acknowledged. A worker's refusal undoes the pod in all of them and raises."""
        if workload.ip in self.pods:
            return
        if not workload.netns:
            raise ValueError(f"pod {workload.ip}: a pod served by the tunnel needs its network namespace")
        certificate = await self.certificates.ready(workload.identity)
        if workload.ip in self.pods:
            return
        self._push_state()
        self._wanted[workload.ip] = workload
        answers = await self._ask_all(self._add_request(workload), self.request_timeout)
        refused = [f"worker {w.index}: {a.error if isinstance(a, Reply) else type(a).__name__}"
                   for w, a in answers if not isinstance(a, WorkerGone) and (not isinstance(a, Reply) or a.error)]
        acknowledged = [w for w, a in answers if isinstance(a, Reply) and not a.error]
        if refused or not acknowledged:
            self._wanted.pop(workload.ip, None)
            await self._ask_all(RemovePod(workload.ip), self.request_timeout)
            for worker in self.workers.values():
                worker.pods.discard(workload.ip)
            raise RuntimeError(f"pod {workload.ip} not served: " + ("; ".join(refused) or "no live worker"))
        for worker in acknowledged:
            worker.pods.add(workload.ip)
        self.pods[workload.ip] = ServedPod(workload, certificate)
        log.info("pod served", pod=workload.name, pod_ip=workload.ip, identity=str(workload.identity),
                 workers=len(acknowledged))

    async def remove_pod(self, ip: str) -> None:
        """Have every worker close the pod's listeners and pool."""
        served = self.pods.pop(ip, None)
        workload = self._wanted.pop(ip, None) or (served.workload if served is not None else None)
        if workload is None:
            return
        self._push_state()
        for worker, answer in await self._ask_all(RemovePod(ip), self.request_timeout):
            worker.pods.discard(ip)
            if isinstance(answer, Reply) and answer.error:
                log.warning("tunnel worker failed to release a pod", worker=worker.index, pod_ip=ip,
                            reason=answer.error)
        if not any(w.identity == workload.identity for w in self._wanted.values()):
            self.certificates.pop(workload.identity, None)
        log.info("pod released", pod_ip=ip)

    async def rotate(self) -> int:
        """Renew every certificate past half life here (the CA call in a thread) and install each renewed
        one in every worker; returns how many were renewed."""
        renewed = await self.certificates.renew()
        for certificate in renewed:
            message = Certificate(certificate.identity, certificate.key_pem(), certificate.chain)
            for worker, answer in await self._ask_all(message, self.request_timeout):
                if not isinstance(answer, Reply) or answer.error:
                    log.warning("renewed certificate not installed in a worker", worker=worker.index,
                                identity=str(certificate.identity), reason=str(answer))
        return len(renewed)

    def reevaluate(self) -> int:
        """Have every worker judge its open inbound connections again (after the current tables); each
        logs what it closed. Returns 0: the count is the workers' (it comes later, in their logs)."""
        self._push_state()
        for worker in self.running():
            self._send(worker, Reevaluate()).add_done_callback(_log_failure(worker.index, "re-evaluation"))
        return 0

    async def drain(self, deadline: float) -> DrainResult:
        """Every worker drains at once (`NodeTunnel.drain`: listeners closed, GOAWAY, the open connections
        given `deadline` seconds); what they report, summed. A worker that does not answer in time is left to
        `close`, which kills it."""
        start = asyncio.get_running_loop().time()
        answers = await self._ask_all(Drain(deadline), deadline + STOP_TIMEOUT, kill_when_late=False)
        finished = closed = 0
        for worker, answer in answers:
            if isinstance(answer, Exception) or answer.error:
                log.warning("tunnel worker did not report its drain", worker=worker.index,
                            reason=str(answer) if isinstance(answer, Exception) else answer.error)
                continue
            finished += answer.value[0]
            closed += answer.value[1]
        return DrainResult(finished, closed, asyncio.get_running_loop().time() - start)

    async def close(self) -> None:
        """Stop every worker: its socket closes, it closes its listeners and pools (GOAWAY) and exits; one
        that does not within STOP_TIMEOUT is killed."""
        self._closing = True
        for task in self._restarting.values():
            task.cancel()
        workers = list(self.workers.values())
        for worker in workers:
            worker.channel.writer.close()

        async def stopped(worker: _Worker) -> None:
            try:
                await asyncio.wait_for(worker.channel.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("tunnel worker did not stop; killing it", worker=worker.index, pid=worker.channel.pid)
                worker.channel.kill()
                await worker.channel.wait()
            if worker.reading is not None:
                await asyncio.gather(worker.reading, return_exceptions=True)

        # Side by side: N workers stop within one STOP_TIMEOUT, inside the pod's termination grace period.
        await asyncio.gather(*(stopped(worker) for worker in workers))
        self.pods.clear()
        self._wanted.clear()

    # -- admin and metrics --

    def ready(self, assigned: set[str]) -> tuple[bool, list[str]]:
        """(ready, what is missing) for the pod IPs the tunnel is assigned."""
        missing = [ip for ip in sorted(assigned) if ip not in self.pods or self.pods[ip].certificate.leaf is None]
        return not missing, missing

    def workers_status(self) -> list[dict[str, Any]]:
        """Each worker: pid, alive, pods it acknowledged, restarts, resident memory."""
        return [{"worker": index, "pid": w.channel.pid, "alive": w.alive, "pods": len(w.pods),
                 "restarts": self.restarts[index], "resident_memory_bytes": resident_memory(w.channel.pid)}
                for index, w in sorted(self.workers.items())]

    async def dump(self) -> dict[str, Any]:
        """The config dump of a single tunnel, from the workers' own (listeners, pools per worker) and the
        coordinator's certificates; plus the workers."""
        answers = await self._ask_all(Status(), self.scrape_timeout, kill_when_late=False)
        seen: dict[str, dict[str, Any]] = {}
        carried: dict[int, int] = {}
        for worker, answer in answers:
            if not isinstance(answer, Reply) or answer.error:
                continue
            carried[worker.index] = answer.value["connections_opened"]
            for pod in answer.value["pods"]:
                entry = seen.setdefault(pod["ip"], {"listeners": pod["listeners"], "pools": []})
                entry["pools"].extend({**pool, "worker": worker.index} for pool in pod["pools"])
        pods = []
        for ip, served in sorted(self.pods.items()):
            leaf = served.certificate.leaf
            pods.append({"ip": ip, "identity": str(served.workload.identity), "node": served.workload.node,
                         "listeners": seen.get(ip, {}).get("listeners", []),
                         "certificate": None if leaf is None else {
                             "serial": f"{leaf.serial_number:x}", "not_after": leaf.not_valid_after_utc.isoformat(),
                             "renewals": served.certificate.renewals},
                         "pools": seen.get(ip, {}).get("pools", [])})
        workers = [{**status, "connections_opened": carried.get(status["worker"])} for status in self.workers_status()]
        return {"pods": pods, "workers": workers}

    async def metrics_route(self) -> tuple[int, str, bytes]:
        """/metrics of the coordinator's metrics port: `scrape`, as Prometheus text."""
        return 200, CONTENT_TYPE_LATEST, await self.scrape()

    async def scrape(self) -> bytes:
        """Prometheus text: the sum over workers of their tunnel metrics, then the workers' own gauges."""
        parts: list[list[Metric]] = []
        for worker, answer in await self._ask_all(Scrape(), self.scrape_timeout, kill_when_late=False):
            if isinstance(answer, Reply) and not answer.error:
                parts.append(answer.value)
            else:
                self.skipped.labels(worker=str(worker.index)).inc()
        for index, worker in self.workers.items():
            memory = resident_memory(worker.channel.pid) if worker.alive else None
            self.rss.labels(worker=str(index)).set(memory or 0)  # 0 while a worker is being restarted
        return exposition(Families(merge_families(parts)), self.registry)


def tables_since(held: State | None, state: State) -> Tables:
    """The message taking a worker from the tables `held` to those of `state`. Every snapshot builds a new
    workload table, equal to the last unless pods changed: compared by value (milliseconds at 10,000 pods)
    rather than sent (a megabyte, and as long again for every worker to read) on every endpoint change."""
    return Tables(
        KEEP if held is not None and (held.table is state.table or held.table == state.table) else state.table,
        KEEP if held is not None and held.services is state.services else
        None if state.services is None else state.services.delta_since(held.services if held is not None else None),
        KEEP if held is not None and held.authorizer is state.authorizer else state.authorizer)


def _same_state(sent: State | None, state: State) -> bool:
    """Whether `sent` holds the very tables of `state` (by identity: each snapshot builds new ones, and
    comparing a whole cluster's tables by value would cost more than sending them)."""
    return sent is not None and sent.table is state.table and sent.services is state.services and (
        sent.authorizer is state.authorizer)


def _log_failure(index: int, what: str) -> Callable[[asyncio.Future[Reply]], None]:
    def done(future: asyncio.Future[Reply]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None and not isinstance(exc, WorkerGone):
            log.warning("tunnel worker request failed", worker=index, request=what, reason=str(exc))
        elif exc is None and future.result().error:
            log.warning("tunnel worker request failed", worker=index, request=what, reason=future.result().error)
    return done


def resident_memory(pid: int) -> int | None:
    """Resident memory of `pid` in bytes (/proc/PID/statm), or None when it is gone."""
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident * os.sysconf("SC_PAGE_SIZE")


# -- how many --

def cpu_quota(cpu_max: str) -> int | None:
    """Whole CPUs of a cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD"), rounded up; None: no quota."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    quota, period = int(fields[0]), int(fields[1])
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def cgroup_cpu_limit(proc_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The tightest CPU quota on this process's cgroup v2 path (its own cgroup and every ancestor: a
    Kubernetes limit sits on the container's cgroup, a node's may sit higher), in whole CPUs; None: none
    (also on cgroup v1, where Kubernetes' limit is cpu.cfs_quota_us, read the same way)."""
    limits: list[int] = []
    for line in proc_cgroup.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            directory, name = root / path.lstrip("/"), "cpu.max"
        elif "cpu" in controllers.split(","):
            directory, name = root / controllers / path.lstrip("/"), ""
        else:
            continue
        while True:
            limit = _read_limit(directory, name)
            if limit is not None:
                limits.append(limit)
            if directory == root or directory.parent == directory or root not in directory.parents:
                break
            directory = directory.parent
    return min(limits) if limits else None


def _read_limit(directory: Path, name: str) -> int | None:
    try:
        if name:
            return cpu_quota((directory / name).read_text())
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), capped by its cgroup's CPU quota."""
    cpus = len(os.sched_getaffinity(0))
    try:
        limit = cgroup_cpu_limit(Path("/proc/self/cgroup").read_text())
    except OSError:
        limit = None
    return max(1, min(cpus, limit) if limit is not None else cpus)


def worker_count(requested: int | None, available: int) -> int:
    """How many workers to run: `requested` (the DaemonSet passes the container's CPU limit) or every CPU
    available, never more than available (a worker beyond the cores only adds context switches)."""
    return max(1, min(requested, available) if requested is not None else available)

