"""The Kubernetes source against a fake API server speaking the real protocol over real HTTP (loopback only).

Each test drives the server (changes, bookmarks, 410s, drops, restarts, garbage) and waits, with a
deadline, until the tracker's state equals what the server holds: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cluster.discovery.kubernetes import CORE_KINDS, ApiConnection, KubernetesSource
from nodeagent.cluster.discovery.wire import Backoff
from nodeagent.cluster.events import Event
from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.state.tracker import ChangeTracker, Snapshot
from tests.support import objects as k8s
from tests.support.fakeapi import FakeApiServer


class Harness:
    """A tracker fed by a KubernetesSource, with a way to wait for a condition on its next snapshot."""

    def __init__(self, server: FakeApiServer, kubeconfig: Path, **source_args: Any) -> None:
        self.server = server
        self.tracker = ChangeTracker("node1")
        self._cond = threading.Condition()
        self.api = ApiConnection.from_config(str(kubeconfig))
        source_args.setdefault("backoff", lambda: Backoff(initial=0.05, cap=0.2))
        source_args.setdefault("kinds", CORE_KINDS)
        self.source = KubernetesSource(self.api, self._sink, "node1", **source_args)
        self.latest: Snapshot | None = None

    def _sink(self, event: Event) -> None:
        self.tracker.apply(event)
        with self._cond:
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[Snapshot], bool], timeout: float = 10.0, what: str = "") -> Snapshot:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = self.tracker.snapshot() or self.latest
                if snapshot is not None:
                    self.latest = snapshot
                    if predicate(snapshot):
                        return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {what or predicate}; last snapshot: "
                                         f"{sorted(str(r) for r in snapshot.services) if snapshot else None}")
                self._cond.wait(min(remaining, 0.1))

    def wait_watching(self, count: int | None = None) -> None:
        expected = count if count is not None else len(self.source.reflectors)
        deadline = time.monotonic() + 10
        while self.server.open_watches() < expected:
            assert time.monotonic() < deadline, f"only {self.server.open_watches()} of {expected} watches open"
            with self._cond:
                self._cond.wait(0.02)

    def matches_server(self, snapshot: Snapshot) -> bool:
        """The tracker holds exactly the Services and slices the server holds, at the server's versions."""
        for kind, held in ((Kind.SERVICE, snapshot.services), (Kind.ENDPOINT_SLICE, snapshot.endpoint_slices)):
            plural = "services" if kind is Kind.SERVICE else "endpointslices"
            with self.server._lock:
                stored = {ObjectRef(kind, ns, name): obj["metadata"]["resourceVersion"]
                          for (ns, name), obj in self.server._objects[plural].items()}
            if {ref: getattr(obj, "resource_version", "") for ref, obj in held.items()} != stored:
                return False
        return True


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    api = FakeApiServer().start()
    api.create_many([k8s.namespace("shop"), k8s.node("node1", "172.18.0.2", "10.244.1.0/24"),
                     k8s.service("web"), k8s.endpoint_slice("web-a", "web", [k8s.endpoint("10.244.1.2")]),
                     k8s.pod("web-0", "10.244.1.2"), k8s.pod("far-0", "10.244.2.2", node="node2")])
    yield api
    api.stop()


@pytest.fixture
def harness(server: FakeApiServer, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(server, server.write_kubeconfig(tmp_path / "kubeconfig"), page_size=2, min_watch_timeout=300)
    yield h
    h.source.stop()
    h.api.close()


def web(snapshot: Snapshot) -> list[str]:
    return [str(e) for e in snapshot.endpoints.get(next(iter(n for n in snapshot.service_ports
                                                                if n.name == "web")), ())]


def test_initial_list_pages_through_everything_with_the_token_and_kube_proxy_selectors(
        server: FakeApiServer, harness: Harness) -> None:
    server.create_many([k8s.service(f"s{i}", cluster_ip=f"10.96.1.{i}") for i in range(7)])
    harness.source.start()
    snapshot = harness.wait_until(lambda s: s.synced(CORE_KINDS), what="initial sync")
    assert len(snapshot.services) == 8 and web(snapshot) == ["10.244.1.2:8080"]
    assert set(snapshot.pods) == {ObjectRef(Kind.POD, "shop", "web-0")}, "only this node's pods"
    lists = [q for p, q in server.requests if p == "services" and "watch" not in q]
    assert len(lists) == 4 and lists[1]["continue"] and lists[0]["limit"] == "2"
    assert lists[0]["labelSelector"] == "!service.kubernetes.io/service-proxy-name"
    pod_queries = [q for p, q in server.requests if p == "pods"]
    assert all(q["fieldSelector"] == "spec.nodeName=node1" for q in pod_queries)
    assert snapshot.resource_versions[Kind.SERVICE] == str(server.resource_version)


def test_incremental_updates_arrive_in_order(server: FakeApiServer, harness: Harness) -> None:
    harness.source.start()
    harness.wait_watching()
    server.create(k8s.endpoint_slice("web-a", "web", [k8s.endpoint("10.244.1.2"), k8s.endpoint("10.244.1.3")]))
    snapshot = harness.wait_until(lambda s: web(s) == ["10.244.1.2:8080", "10.244.1.3:8080"], what="new endpoint")
    assert {str(n) for n in snapshot.changed_ports} == {"shop/web:http"}
    server.create(k8s.service("db", cluster_ip="10.96.0.20"))
    server.delete("Service", "shop", "web")
    snapshot = harness.wait_until(lambda s: set(s.services) == {ObjectRef(Kind.SERVICE, "shop", "db")},
                                  what="web deleted, db added")
    assert harness.matches_server(snapshot)
    server.create(k8s.pod("web-1", "10.244.1.7"))
    server.create(k8s.pod("far-1", "10.244.2.7", node="node2"))
    harness.wait_until(lambda s: ObjectRef(Kind.POD, "shop", "web-1") in s.pods, what="pod on this node")
    assert ObjectRef(Kind.POD, "shop", "far-1") not in harness.tracker.last().pods  # type: ignore[union-attr]


def test_bookmarks_advance_the_version_and_a_reconnect_resumes_from_it_without_relisting(
        server: FakeApiServer, harness: Harness) -> None:
    harness.source.start()
    harness.wait_watching()
    server.create(k8s.pod("other", "10.244.2.9", node="node2"))  # moves the version, not seen by this node
    server.bookmark()
    reflector = harness.source.reflectors[Kind.POD]
    deadline = time.monotonic() + 10
    while reflector.resource_version != str(server.resource_version):
        assert time.monotonic() < deadline, "bookmark not seen"
        with harness._cond:
            harness._cond.wait(0.05)
    assert harness.tracker._resource_versions[Kind.POD] == str(server.resource_version)
    bookmark_version = str(server.resource_version)
    server.drop_connections()
    server.create(k8s.pod("web-2", "10.244.1.8"))  # while disconnected: must come from history
    harness.wait_until(lambda s: ObjectRef(Kind.POD, "shop", "web-2") in s.pods, what="event from the gap")
    rewatch = [q for p, q in server.requests if p == "pods" and q.get("watch")][-1]
    assert rewatch["resourceVersion"] == bookmark_version and rewatch["allowWatchBookmarks"] == "true"
    assert reflector.lists == 1 and reflector.watches >= 2


@pytest.mark.parametrize("in_stream", [True, False], ids=["410-as-error-event", "410-as-http-status"])
def test_expired_version_relists_with_no_lost_or_duplicated_state(
        server: FakeApiServer, tmp_path: Path, in_stream: bool) -> None:
    server.expire_in_stream = in_stream
    harness = Harness(server, server.write_kubeconfig(tmp_path / "kubeconfig"), page_size=2)
    try:
        harness.source.start()
        harness.wait_watching()
        if in_stream:
            server.expire_watches()  # 410 ERROR inside the open streams, history gone
        else:
            server.compact()
            server.drop_connections()  # the rewatch from the old version gets HTTP 410
            server.compact()
        # changes the client cannot see as events: only a relist can find them
        with server._lock:
            del server._objects["services"][("shop", "web")]
        server.create_many([k8s.service("late", cluster_ip="10.96.0.30")])
        server.create(k8s.endpoint_slice("late-a", "late", [k8s.endpoint("10.244.1.30")]))
        snapshot = harness.wait_until(harness.matches_server, what="converged after relist")
        assert set(snapshot.services) == {ObjectRef(Kind.SERVICE, "shop", "late")}
        assert [str(n) for n in snapshot.service_ports] == ["shop/late:http"]
        assert harness.source.reflectors[Kind.SERVICE].lists >= 2
    finally:
        harness.source.stop()
        harness.api.close()


def test_server_restart_converges(server: FakeApiServer, harness: Harness) -> None:
    harness.source.start()
    harness.wait_watching()
    server.stop()
    server.create(k8s.service("db", cluster_ip="10.96.0.20"))  # changed while down
    server.delete("EndpointSlice", "shop", "web-a")
    server.start()
    snapshot = harness.wait_until(lambda s: harness.matches_server(s) and ObjectRef(Kind.SERVICE, "shop", "db")
                                  in s.services, timeout=15, what="converged after restart")
    assert web(snapshot) == []


def test_malformed_events_are_reported_and_the_stream_goes_on(server: FakeApiServer, harness: Harness) -> None:
    harness.source.start()
    harness.wait_watching()
    server.inject("services", b"{this is not json")
    server.inject("services", b'{"type": "ADDED", "object": {"metadata": {}}}')
    server.inject("services", b'["not", "an", "event"]')
    bad = k8s.service("bad", cluster_ip="10.96.0.300")
    server.create(bad)
    server.create(k8s.service("good", cluster_ip="10.96.0.40"))
    snapshot = harness.wait_until(lambda s: ObjectRef(Kind.SERVICE, "shop", "good") in s.services,
                                  what="the good Service after the bad ones")
    assert ObjectRef(Kind.SERVICE, "shop", "bad") not in snapshot.services
    [rejection] = snapshot.rejections_of(ObjectRef(Kind.SERVICE, "shop", "bad"))
    assert rejection.field == "spec.clusterIPs[0]" and "10.96.0.300" in rejection.reason
    reasons = [u.reason for u in snapshot.unreadable]
    assert any(r.startswith("not JSON") for r in reasons)
    assert any("JSON object" in r for r in reasons)
    assert snapshot.rejection_counts[("Service", "unreadable")] == 2
    assert snapshot.rejection_counts[("Service", "object")] == 2  # the nameless one and the bad IP
    assert harness.source.reflectors[Kind.SERVICE].lists == 1, "no relist for bad content"


def test_a_missing_crd_does_not_hold_back_the_core_kinds(tmp_path: Path) -> None:
    server = FakeApiServer(serve_mesh_kinds=False).start()
    harness = Harness(server, server.write_kubeconfig(tmp_path / "kubeconfig"), kinds=(
        *CORE_KINDS, Kind.AUTHORIZATION_POLICY))
    try:
        server.create(k8s.service("web"))
        harness.source.start()
        snapshot = harness.wait_until(lambda s: s.synced(CORE_KINDS), what="core kinds")
        assert not snapshot.synced([Kind.AUTHORIZATION_POLICY])
        deadline = time.monotonic() + 10
        while len([p for p, _ in server.requests if p == "authorizationpolicies"]) < 2:
            assert time.monotonic() < deadline, "the missing kind is not retried"
            with harness._cond:
                harness._cond.wait(0.05)
    finally:
        harness.source.stop()
        harness.api.close()
        server.stop()


def test_a_wrong_token_is_retried_with_backoff_not_fatal(server: FakeApiServer, tmp_path: Path) -> None:
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    kubeconfig.write_text(kubeconfig.read_text().replace(server.token, "wrong"))
    harness = Harness(server, kubeconfig, kinds=(Kind.SERVICE,))
    try:
        harness.source.start()
        deadline = time.monotonic() + 10
        while len(server.requests) < 3:
            assert time.monotonic() < deadline
            with harness._cond:
                harness._cond.wait(0.05)
        assert harness.source.reflectors[Kind.SERVICE].lists == 0
        assert harness.tracker.last() is None
    finally:
        harness.source.stop()
        harness.api.close()


def test_server_side_watch_timeout_rewatches_at_once(server: FakeApiServer, tmp_path: Path) -> None:
    harness = Harness(server, server.write_kubeconfig(tmp_path / "kubeconfig"), kinds=(Kind.SERVICE,),
                      min_watch_timeout=1)
    try:
        harness.source.start()
        deadline = time.monotonic() + 15
        while harness.source.reflectors[Kind.SERVICE].watches < 2:
            assert time.monotonic() < deadline, "no rewatch after the server ended the stream"
            with harness._cond:
                harness._cond.wait(0.1)
        server.create(k8s.service("after", cluster_ip="10.96.0.50"))
        harness.wait_until(lambda s: ObjectRef(Kind.SERVICE, "shop", "after") in s.services)
        assert harness.source.reflectors[Kind.SERVICE].lists == 1
    finally:
        harness.source.stop()
        harness.api.close()


def test_stop_interrupts_open_watches_promptly(server: FakeApiServer, harness: Harness) -> None:
    harness.source.start()
    harness.wait_watching()
    started = time.monotonic()
    harness.source.stop()
    assert time.monotonic() - started < 3
    assert all(not r._thread.is_alive() for r in harness.source.reflectors.values())


def test_snapshot_command_reads_the_cluster_once(server: FakeApiServer, tmp_path: Path) -> None:
    """`nodeagent snapshot --kubeconfig` lists every kind, folds it, prints it, and stops its watches."""
    from click.testing import CliRunner

    from nodeagent.cli import main

    server.create(k8s.service("broken", cluster_ip="10.96.0.99", ports=[{"name": "x", "port": 0}]))
    result = CliRunner().invoke(main, ["snapshot", "--kubeconfig", str(server.write_kubeconfig(tmp_path / "kc")),
                                       "--node", "node1", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    (web_port,) = [p for p in document["service_ports"] if p["service_port"] == "shop/web:http"]
    assert [(e["address"], e["port"], e["local"]) for e in web_port["endpoints"]] == [("10.244.1.2", 8080, True)]
    assert {"object": "Service shop/broken", "field": "spec.ports[0].port"}.items() <= document["rejections"][0].items()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("watch-")], \
        "the one-shot read must stop its watches"


def test_snapshot_command_names_an_unreachable_server(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nodeagent.cli import main

    config = tmp_path / "kc"
    config.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    result = CliRunner().invoke(main, ["snapshot", "--kubeconfig", str(config), "--node", "n1"])
    assert result.exit_code == 1 and "Kubernetes configuration" in result.output, result.output
