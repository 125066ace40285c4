"""`nodeagent ztunnel --workers N`, the coordinator's side without processes or root: the frames on a
worker's socket, and the WorkerSet's bookkeeping against fake workers (in this event loop, on real
socketpairs): tables before pods, certificates pushed (never fetched by a worker), a refused add undone
everywhere, a dead worker restarted and given the pods back, scrapes summed (a silent worker skipped and
counted), and every worker told to stop on close."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
import uvloop
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.ca.identity import CertificateAuthority, SpiffeId, make_csr
from nodeagent.cluster.decode import decode, object_ref
from nodeagent.cluster.events import Upserted
from nodeagent.cluster.model import Kind
from nodeagent.control.assignments import Assignment
from nodeagent.daemon.tunnel import TunnelOptions, TunnelProcess
from nodeagent.daemon.tunnel_wire import (
    KEEP,
    AddPod,
    Certificate,
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
    load_request,
    read_frame,
)
from nodeagent.daemon.workers import (
    Channel,
    WorkerSet,
    cgroup_cpu_limit,
    cpu_quota,
    exit_waiter,
    process_spawner,
    tables_since,
    worker_count,
)
from nodeagent.state.tracker import ChangeTracker
from nodeagent.tunnel.identity.certs import WorkloadCertificate
from nodeagent.tunnel.state.authz import Authorizer
from nodeagent.tunnel.state.services import ServicesDelta, ServiceTable, service_table
from nodeagent.tunnel.state.workloads import Workload, workload_table
from nodeagent.tunnel.telemetry import Families, TunnelMetrics, exposition, merge_families
from tests.support import objects as k8s
from tests.unit.daemon.test_tunnel import FailingSource, listed, snap, tracker_with_pods

WEB = Workload("10.244.1.2", SpiffeId("cluster.local", "shop", "web"), "node1", "/run/netns/web", name="shop/web")
API = Workload("10.244.1.3", SpiffeId("cluster.local", "shop", "api"), "node1", "/run/netns/api", name="shop/api")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@dataclass
class Fetches:
    ca: CertificateAuthority
    calls: list[SpiffeId] = field(default_factory=list)

    def __call__(self, identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> list[str]:
        self.calls.append(identity)
        return self.ca.issue(make_csr(identity, key))[1]


# -- frames --

async def frames_of(data: bytes) -> list[tuple[int, bytes] | None]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out: list[tuple[int, bytes] | None] = []
    while (received := await read_frame(reader)) is not None:
        out.append(received)
    return out


async def test_frames_carry_the_request_id_and_whole_tables() -> None:
    tracker = tracker_with_pods()
    tracker.apply(listed(Kind.PEER_AUTHENTICATION, []))
    tracker.apply(listed(Kind.AUTHORIZATION_POLICY, []))
    tracker.apply(listed(Kind.SERVICE, [k8s.service("web")]))
    snapshot = snap(tracker)
    state = State(workload_table(snapshot, "node1"), service_table(snapshot), Authorizer.from_snapshot(snapshot))
    data = (frame(7, dumps(tables_since(None, state))) + frame(8, dumps(RemovePod("10.244.1.2")))
            + frame(9, dumps(Reply(3))))
    [(first, tables), (second, remove), (third, reply)] = await frames_of(data)  # type: ignore[misc]
    assert (first, second, third) == (7, 8, 9)
    received = load_request(tables)
    assert isinstance(received, Tables) and isinstance(received.services, ServicesDelta) and received.services.full
    assert received.table == state.table
    view = ServiceTable.from_delta(None, received.services)
    assert state.services is not None
    assert view.generation == snapshot.generation and dict(view.frontends()) == dict(state.services.frontends())
    assert load_request(remove) == RemovePod("10.244.1.2")
    assert load_reply(reply) == Reply(3)
    with pytest.raises(ValueError, match="not a tunnel worker request"):
        load_request(dumps(Reply(1)))


def test_a_worker_gets_the_services_that_changed_and_answers_as_the_coordinators_table() -> None:
    tracker = ChangeTracker("node1")
    services, slices = k8s.scale_cluster(200, 3)
    tracker.apply(listed(Kind.SERVICE, services))
    tracker.apply(listed(Kind.ENDPOINT_SLICE, slices))
    first = service_table(snap(tracker))
    held = ServiceTable.from_delta(None, first.delta_since(None))
    changed = k8s.scale_slice(7, 5)  # one Service's endpoints change
    tracker.apply(Upserted(Kind.ENDPOINT_SLICE, object_ref(changed), decode(changed), "9"))
    second = first.updated(snap(tracker))
    delta = second.delta_since(first)
    assert not delta.full and len(delta.frontends) == 1 and not delta.removed_frontends
    assert len(dumps(Tables(KEEP, delta, KEEP))) * 20 < len(dumps(Tables(KEEP, second.delta_since(None), KEEP))), \
        "a change costs its own size, not the table's"
    worker = ServiceTable.from_delta(held, delta)
    assert dict(worker.frontends()) == dict(second.frontends()) and worker.generation == second.generation
    [(frontend, target)] = delta.frontends.items()
    assert worker.lookup(*frontend) == second.lookup(*frontend) == target and len(target.endpoints) == 5
    assert worker.config(target.service) == second.config(target.service)
    assert (worker.node, worker.zone) == (second.node, second.zone)
    tracker.apply(listed(Kind.SERVICE, services[1:]))  # a Service goes
    third = second.updated(snap(tracker))
    gone = third.delta_since(second)
    assert gone.removed_frontends and gone.removed_configs == (object_ref(services[0]),)
    assert dict(ServiceTable.from_delta(worker, gone).frontends()) == dict(third.frontends())


async def test_a_frame_cut_short_is_an_error_and_an_end_between_frames_is_not() -> None:
    whole = frame(1, dumps(Scrape()))
    assert await frames_of(whole) == [(1, dumps(Scrape()))]
    assert await frames_of(b"") == []
    with pytest.raises(asyncio.IncompleteReadError):
        await frames_of(whole[:-1])
    with pytest.raises(ValueError, match="broken"):
        await frames_of(b"\xff\xff\xff\xff" + bytes(8))


# -- how many workers --

def test_worker_count_follows_cpus_and_quota(tmp_path: Any) -> None:
    assert cpu_quota("max 100000") is None
    assert cpu_quota("150000 100000") == 2  # 1.5 CPUs: a second worker still has half a core
    assert cpu_quota("50000 100000") == 1
    container = tmp_path / "kubepods" / "pod1" / "ctr"
    container.mkdir(parents=True)
    (container / "cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "kubepods" / "cpu.max").write_text("800000 100000\n")
    assert cgroup_cpu_limit("0::/kubepods/pod1/ctr\n", tmp_path) == 3
    assert cgroup_cpu_limit("0::/elsewhere\n", tmp_path) is None
    assert worker_count(None, 4) == 4 and worker_count(2, 4) == 2 and worker_count(8, 3) == 3


# -- certificates a worker holds --

def test_an_installed_certificate_never_fetches_and_a_new_install_reaches_new_handshakes(
        ca: CertificateAuthority) -> None:
    fetch = Fetches(ca)
    source = WorkloadCertificate(WEB.identity, fetch)
    source.refresh()
    installed = WorkloadCertificate.installed(WEB.identity, source.key_pem(), source.chain)
    server, _ = installed.contexts()
    assert installed.leaf is not None and installed.leaf.serial_number == source.leaf.serial_number  # type: ignore[union-attr]
    assert installed.refresh(force=True) is False and fetch.calls == [WEB.identity]
    source.refresh(force=True)
    installed.install(source.key_pem(), source.chain)
    assert installed.leaf.serial_number == source.leaf.serial_number  # type: ignore[union-attr]
    assert installed.contexts()[0] is not server
    with pytest.raises(LookupError):
        WorkloadCertificate(WEB.identity, None).refresh()


# -- the WorkerSet against fake workers --

@dataclass
class FakeWorker:
    """The far end of a worker's socket: records requests, answers as a worker would."""

    index: int
    sock: socket.socket
    requests: list[Request] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)  # pod IPs whose AddPod fails
    silent: bool = False  # never answers a Scrape
    pods: set[str] = field(default_factory=set)
    metrics: TunnelMetrics = field(default_factory=TunnelMetrics)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=self.sock)
        try:
            while (received := await read_frame(reader)) is not None:
                request_id, payload = received
                request = load_request(payload)
                self.requests.append(request)
                if isinstance(request, Scrape) and self.silent:
                    continue
                writer.write(frame(request_id, dumps(self.answer(request))))
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.exited.set()

    def answer(self, request: Request) -> Reply:
        if isinstance(request, AddPod):
            if request.workload.ip in self.refuse:
                return Reply(error="FileNotFoundError: no such namespace")
            self.pods.add(request.workload.ip)
        elif isinstance(request, RemovePod):
            self.pods.discard(request.ip)
        elif isinstance(request, Scrape):
            return Reply(list(self.metrics.registry.collect()))
        elif isinstance(request, Status):
            return Reply({"pods": [{"ip": ip, "listeners": [15001, 15006, 15008], "pools": []}
                                   for ip in sorted(self.pods)]})
        return Reply(len(self.pods))

    def kinds(self) -> list[str]:
        return [type(r).__name__ for r in self.requests]


@dataclass
class Fleet:
    """Every fake worker ever spawned, by index (the latest last)."""

    spawned: dict[int, list[FakeWorker]] = field(default_factory=dict)
    pids: Iterator[int] = field(default_factory=lambda: iter(range(1000, 2000)))

    def latest(self, index: int) -> FakeWorker:
        return self.spawned[index][-1]

    async def spawn(self, index: int) -> Channel:
        ours, theirs = socket.socketpair()
        worker = FakeWorker(index, theirs)
        worker.task = asyncio.ensure_future(worker.run())
        self.spawned.setdefault(index, []).append(worker)
        reader, writer = await asyncio.open_unix_connection(sock=ours)

        async def wait() -> int:
            await worker.exited.wait()
            return 0

        def kill() -> None:
            if worker.task is not None:
                worker.task.cancel()

        return Channel(next(self.pids), reader, writer, wait, kill)


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def workers(ca: CertificateAuthority) -> Any:
    fleet = Fleet()
    state = {"now": State(None, None, None)}
    fetch = Fetches(ca)
    worker_set = WorkerSet("node1", "cluster.local", 2, fleet.spawn, lambda: state["now"], fetch,
                           request_timeout=2.0, scrape_timeout=0.2, backoff=(0.01, 0.05))
    await worker_set.start()
    yield worker_set, fleet, state, fetch
    await worker_set.close()


async def test_every_worker_gets_the_tables_then_the_pod_with_its_certificate(workers: Any) -> None:
    worker_set, fleet, state, fetch = workers
    tracker = tracker_with_pods()
    state["now"] = State(workload_table(snap(tracker), "node1"), None, None)
    await worker_set.add_pod(WEB)
    assert WEB.ip in worker_set.pods and fetch.calls == [WEB.identity]
    for index in (0, 1):
        worker = fleet.latest(index)
        assert worker.kinds() == ["Tables", "Tables", "AddPod"], "the new tables reach a worker before the pod"
        tables = worker.requests[1]
        assert isinstance(tables, Tables) and tables.table == state["now"].table
        assert tables.services == KEEP and tables.authorizer == KEEP, "only what changed"
        add = worker.requests[2]
        assert isinstance(add, AddPod) and add.workload == WEB
        assert add.certificate.chain == worker_set.certificates[WEB.identity].chain
        assert b"PRIVATE KEY" in add.certificate.key_pem
        assert worker.pods == {WEB.ip}
    assert [w["pods"] for w in worker_set.workers_status()] == [1, 1]
    ok, missing = worker_set.ready({WEB.ip, API.ip})
    assert not ok and missing == [API.ip]
    await worker_set.add_pod(WEB)  # served already: nothing sent
    assert fleet.latest(0).kinds() == ["Tables", "Tables", "AddPod"]


async def test_a_pod_one_worker_refuses_is_undone_in_all_and_not_served(workers: Any) -> None:
    worker_set, fleet, _, _ = workers
    fleet.latest(1).refuse.add(WEB.ip)
    with pytest.raises(RuntimeError, match="worker 1: FileNotFoundError"):
        await worker_set.add_pod(WEB)
    assert WEB.ip not in worker_set.pods
    assert fleet.latest(0).kinds()[-2:] == ["AddPod", "RemovePod"] and fleet.latest(0).pods == set()
    fleet.latest(1).refuse.clear()
    await worker_set.add_pod(WEB)  # the next reconcile's retry
    assert WEB.ip in worker_set.pods


async def test_a_dead_worker_is_restarted_counted_and_given_the_tables_and_pods(workers: Any) -> None:
    worker_set, fleet, _, _ = workers
    await worker_set.add_pod(WEB)
    await worker_set.add_pod(API)
    await worker_set.remove_pod(API.ip)
    first = fleet.latest(1)
    assert first.task is not None
    first.task.cancel()  # the worker's process ends: its socket reaches its end
    await until(lambda: len(fleet.spawned[1]) == 2 and fleet.latest(1).pods == {WEB.ip}, "the worker is replaced")
    replacement = fleet.latest(1)
    assert replacement.kinds() == ["Tables", "AddPod"], "tables first, then only the pods still served"
    assert worker_set.restarts == {0: 0, 1: 1}
    await until(lambda: worker_set.workers[1].pods == {WEB.ip}, "the replacement's ack is recorded")
    assert WEB.ip in worker_set.pods, "the pod stayed served (the other worker kept it)"
    text = await worker_set.scrape()
    assert 'nodeagent_tunnel_worker_restarts_total{worker="1"} 1.0' in text.decode()


async def test_a_renewed_certificate_is_installed_in_every_worker(workers: Any) -> None:
    worker_set, fleet, _, fetch = workers
    await worker_set.add_pod(WEB)
    certificate = worker_set.certificates[WEB.identity]
    assert await worker_set.rotate() == 0
    certificate.refresh(force=True)  # stands for half life passing: the next rotate renews (forced here)
    certificate.leaf = None  # due now
    assert await worker_set.rotate() == 1
    for index in (0, 1):
        pushed = fleet.latest(index).requests[-1]
        assert isinstance(pushed, Certificate) and pushed.chain == certificate.chain
    assert fetch.calls == [WEB.identity] * 3  # the coordinator's fetches only


async def test_reevaluate_reaches_every_worker_after_the_current_tables(workers: Any) -> None:
    worker_set, fleet, state, _ = workers
    state["now"] = State(None, None, Authorizer([], []))
    assert worker_set.reevaluate() == 0
    await until(lambda: all(fleet.latest(i).kinds()[-2:] == ["Tables", "Reevaluate"] for i in (0, 1)),
                "both workers judge again under the new tables")
    assert isinstance(fleet.latest(0).requests[-1], Reevaluate)


async def test_a_scrape_sums_the_workers_and_skips_a_silent_one(workers: Any) -> None:
    worker_set, fleet, _, _ = workers
    fleet.latest(0).metrics.retries.labels(destination_service="shop/web").inc(2)
    fleet.latest(1).metrics.retries.labels(destination_service="shop/web").inc(3)
    fleet.latest(1).metrics.active.labels(reporter="source").inc()
    values = parsed(await worker_set.scrape())
    assert values[("nodeagent_tunnel_connect_retries_total", (("destination_service", "shop/web"),))] == 5
    assert values[("nodeagent_tunnel_active_connections", (("reporter", "source"),))] == 1
    assert ("nodeagent_tunnel_worker_resident_memory_bytes", (("worker", "0"),)) in values
    fleet.latest(1).silent = True
    values = parsed(await worker_set.scrape())
    assert values[("nodeagent_tunnel_connect_retries_total", (("destination_service", "shop/web"),))] == 2
    assert values[("nodeagent_tunnel_worker_scrapes_skipped_total", (("worker", "1"),))] == 1
    assert worker_set.workers[1].alive, "a slow scrape does not kill a worker"


async def test_close_ends_every_workers_socket_and_restarts_none(ca: CertificateAuthority) -> None:
    fleet = Fleet()
    worker_set = WorkerSet("node1", "cluster.local", 3, fleet.spawn, lambda: State(None, None, None), Fetches(ca))
    await worker_set.start()
    await worker_set.close()
    assert all(fleet.latest(i).exited.is_set() for i in range(3))
    assert {i: len(fleet.spawned[i]) for i in range(3)} == {0: 1, 1: 1, 2: 1}


def parsed(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


async def test_the_tunnel_process_drives_its_workers_and_acks_a_pod_only_once_they_serve_it(
        ca: CertificateAuthority, tmp_path: Any) -> None:
    """TunnelProcess with --workers 2: the reconcile adds the agent's pods through the WorkerSet, a new
    snapshot's tables reach every worker, and the agent hears "served" only after the workers' acks."""
    fleet = Fleet()
    tunnel = TunnelProcess(TunnelOptions("node1", workers=2), Fetches(ca), lambda sink: FailingSource())
    assert isinstance(tunnel.tunnel, WorkerSet)
    worker_set = WorkerSet("node1", "cluster.local", 2, fleet.spawn,
                           lambda: State(tunnel.table, tunnel.services, tunnel.authorizer), tunnel.fetch)
    tunnel.tunnel = worker_set
    await worker_set.start()
    try:
        netns = tmp_path / "web"
        netns.touch()
        fleet.latest(1).refuse.add("10.244.1.2")
        await tunnel.apply(1, "run", True, [Assignment("shop/web", "10.244.1.2", "shop", "default", str(netns))], [])
        assert tunnel.pod_statuses()[0][:2] == ("shop/web", False), "one worker refused: not served"
        fleet.latest(1).refuse.clear()
        await tunnel.reconcile(None)
        assert tunnel.pod_statuses() == [("shop/web", True, "")]
        assert all(fleet.latest(i).pods == {"10.244.1.2"} for i in (0, 1))
        tracker = tracker_with_pods()
        tracker.apply(listed(Kind.PEER_AUTHENTICATION, []))
        tracker.apply(listed(Kind.AUTHORIZATION_POLICY, []))
        await tunnel.reconcile(snap(tracker))
        assert tunnel.table is not None and tunnel.authorizer is not None
        def pushed(index: int) -> Tables:
            return [r for r in fleet.latest(index).requests if isinstance(r, Tables)][-1]

        await until(lambda: all(pushed(i).table == tunnel.table for i in (0, 1)), "the new tables reach both")
        assert all(isinstance(pushed(i).authorizer, Authorizer) for i in (0, 1))
    finally:
        await worker_set.close()


async def test_a_real_worker_process_answers_and_exits_at_the_end_of_its_socket(ca: CertificateAuthority) -> None:
    """`python -m nodeagent.daemon.tunnel_worker` as the coordinator starts it (no pods: no root needed)."""
    worker_set = WorkerSet("node1", "cluster.local", 2, process_spawner("node1", "cluster.local"),
                           lambda: State(None, None, Authorizer([], [])), Fetches(ca))
    await worker_set.start()
    try:
        deadline = time.monotonic() + 60
        # A worker answers once it has imported the tunnel (a second or more on a loaded machine); until then
        # a dump (1 s per worker) goes without it.
        dump = await worker_set.dump()
        while None in [w["connections_opened"] for w in dump["workers"]]:
            assert time.monotonic() < deadline, dump
            dump = await worker_set.dump()
        assert [w["pid"] for w in dump["workers"]] == [w.channel.pid for w in worker_set.workers.values()]
        assert [w["connections_opened"] for w in dump["workers"]] == [0, 0], "both answered their status"
        values = parsed(await worker_set.scrape())
        assert ("nodeagent_tunnel_active_connections", (("reporter", "source"),)) not in values
        assert values[("nodeagent_tunnel_worker_resident_memory_bytes", (("worker", "1"),))] > 10 << 20
        assert worker_set.reevaluate() == 0
    finally:
        pids = [w.channel.pid for w in worker_set.workers.values()]
        await worker_set.close()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert worker_set.restarts == {0: 0, 1: 0}


def test_histograms_sum_bucket_by_bucket_and_created_is_the_earliest() -> None:
    registries = [CollectorRegistry(), CollectorRegistry()]
    histograms = [Histogram("nodeagent_tunnel_connect_seconds", "connect time", ["reporter"], buckets=(0.1, 1.0),
                            registry=r) for r in registries]
    for value in (0.05, 0.5):
        histograms[0].labels(reporter="source").observe(value)
    histograms[1].labels(reporter="source").observe(5.0)
    merged = merge_families([list(r.collect()) for r in registries])
    samples = {(s.name, s.labels.get("le")): s.value for family in merged for s in family.samples}
    assert samples[("nodeagent_tunnel_connect_seconds_bucket", "0.1")] == 1
    assert samples[("nodeagent_tunnel_connect_seconds_bucket", "1.0")] == 2
    assert samples[("nodeagent_tunnel_connect_seconds_bucket", "+Inf")] == 3
    assert samples[("nodeagent_tunnel_connect_seconds_count", None)] == 3
    assert samples[("nodeagent_tunnel_connect_seconds_sum", None)] == pytest.approx(5.55)
    created = [s.value for r in registries for f in r.collect() for s in f.samples if s.name.endswith("_created")]
    assert samples[("nodeagent_tunnel_connect_seconds_created", None)] == min(created)
    assert b"nodeagent_tunnel_connect_seconds_bucket" in exposition(Families(merged))


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_exit_waiter_reports_the_status_of_a_process_it_did_not_start_under_the_loop(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """The worker's exit status comes from a pidfd the loop watches (the process is started by Popen, outside
    the loop): a clean exit, an exit code, and a signal are each reported, and waiting twice is allowed."""

    async def statuses() -> list[int | None]:
        found = []
        for argv in (["true"], ["sh", "-c", "exit 3"], ["sh", "-c", "kill -9 $$"]):
            process = subprocess.Popen(argv)
            wait = exit_waiter(process)
            found.append(await asyncio.wait_for(wait(), 10))
            assert await wait() == found[-1]
        return found

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(statuses()) == [0, 3, -9]
