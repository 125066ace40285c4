"""The manifest directory source: edits to the directory become exactly the expected snapshot changes.

No root needed: a temporary directory, the real source and the real change tracker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from nodeagent.cluster.discovery.manifests import ManifestSource
from nodeagent.cluster.events import Event, Unreadable
from nodeagent.cluster.model import Kind, ObjectRef, Protocol
from nodeagent.state.tracker import ChangeTracker, Snapshot
from nodeagent.state.translation import ServicePortName
from tests.support import objects as k8s

WEB = ServicePortName("shop", "web", "http", Protocol.TCP)
DB = ServicePortName("shop", "db", "pg", Protocol.TCP)


def write(path: Path, *documents: Any) -> None:
    """Write as tooling does: a new file renamed into place."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(yaml.safe_dump_all(documents))
    os.replace(scratch, path)


def web(*ips: str) -> list[dict[str, Any]]:
    return [k8s.service("web"), k8s.endpoint_slice("web-a", "web", [k8s.endpoint(ip) for ip in ips])]


def db() -> list[dict[str, Any]]:
    return [k8s.service("db", cluster_ip="10.96.0.20", ports=[{"name": "pg", "port": 5432}]),
            k8s.endpoint_slice("db-a", "db", [k8s.endpoint("10.244.1.9")], ports=[{"name": "pg", "port": 5432}])]


class Harness:
    """A source over `directory` feeding a tracker, with every event kept for assertions."""

    def __init__(self, directory: Path, poll_interval: float = 1.0) -> None:
        self.tracker = ChangeTracker("node1")
        self.events: list[Event] = []
        self.source = ManifestSource(directory, self._sink, poll_interval=poll_interval)

    def _sink(self, event: Event) -> None:
        self.events.append(event)
        self.tracker.apply(event)

    def read(self) -> Snapshot | None:
        """Read the directory once; the new snapshot, or None when nothing changed."""
        self.events.clear()
        self.source.read()
        return self.tracker.snapshot()

    def problems(self) -> list[str]:
        return [f"{e.source}: {e.reason}" for e in self.events if isinstance(e, Unreadable)]


def endpoints(snapshot: Snapshot, port: ServicePortName) -> list[str]:
    return [str(e) for e in snapshot.endpoints_of(port)]


def test_first_read_delivers_every_file_and_syncs_every_kind(tmp_path: Path) -> None:
    write(tmp_path / "web.yaml", *web("10.244.1.2", "10.244.1.3"))
    write(tmp_path / "db.yml", *db())
    (tmp_path / "notes.txt").write_text("not a manifest")
    harness = Harness(tmp_path)
    snapshot = harness.read()
    assert snapshot is not None and snapshot.synced(Kind)
    assert set(snapshot.service_ports) == {WEB, DB}
    assert endpoints(snapshot, WEB) == ["10.244.1.2:8080", "10.244.1.3:8080"]
    assert harness.problems() == []
    assert snapshot.resource_versions[Kind.SERVICE] == "manifests-1"


def test_an_edit_changes_exactly_the_edited_port_and_no_change_makes_no_snapshot(tmp_path: Path) -> None:
    write(tmp_path / "web.yaml", *web("10.244.1.2"))
    write(tmp_path / "db.yaml", *db())
    harness = Harness(tmp_path)
    first = harness.read()
    assert first is not None

    assert harness.read() is None, "an unchanged directory must not produce a snapshot"

    write(tmp_path / "web.yaml", *web("10.244.1.2", "10.244.1.7"))
    second = harness.read()
    assert second is not None and second.generation == first.generation + 1
    assert second.changed_ports == {WEB}
    assert endpoints(second, WEB) == ["10.244.1.2:8080", "10.244.1.7:8080"]
    assert second.endpoints_of(DB) is first.endpoints_of(DB) or endpoints(second, DB) == endpoints(first, DB)


def test_a_removed_file_withdraws_its_objects(tmp_path: Path) -> None:
    write(tmp_path / "web.yaml", *web("10.244.1.2"))
    write(tmp_path / "db.yaml", *db())
    harness = Harness(tmp_path)
    harness.read()
    (tmp_path / "db.yaml").unlink()
    snapshot = harness.read()
    assert snapshot is not None
    assert set(snapshot.service_ports) == {WEB}
    assert snapshot.changed_ports == {DB}
    assert ObjectRef(Kind.SERVICE, "shop", "db") not in snapshot.services


def test_invalid_yaml_keeps_the_files_last_good_content_until_it_is_fixed(tmp_path: Path) -> None:
    write(tmp_path / "web.yaml", *web("10.244.1.2"))
    harness = Harness(tmp_path)
    harness.read()
    (tmp_path / "web.yaml").write_text("kind: Service\nmetadata: {name: [unclosed\n")
    broken = harness.read()
    assert broken is not None, "the problem itself is news for inspect"
    assert broken.changed_ports == frozenset(), "a broken file must not withdraw what it defined"
    assert endpoints(broken, WEB) == ["10.244.1.2:8080"]
    assert any(p.startswith(f"{tmp_path / 'web.yaml'}: not valid YAML") for p in harness.problems()), \
        harness.problems()
    assert any("not valid YAML" in u.reason for u in broken.unreadable)

    write(tmp_path / "web.yaml", *web("10.244.1.4"))
    fixed = harness.read()
    assert fixed is not None and endpoints(fixed, WEB) == ["10.244.1.4:8080"]


def test_a_bad_object_is_reported_by_file_and_document_and_the_rest_is_kept(tmp_path: Path) -> None:
    bad_port = k8s.service("bad", cluster_ip="10.96.0.30", ports=[{"name": "x", "port": 70000}])
    nameless = {"apiVersion": "v1", "kind": "Service", "metadata": {}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}
    write(tmp_path / "all.yaml", *web("10.244.1.2"), bad_port, nameless, deployment)
    harness = Harness(tmp_path)
    snapshot = harness.read()
    assert snapshot is not None
    assert set(snapshot.service_ports) == {WEB}
    assert harness.problems() == [f"{tmp_path / 'all.yaml'}#3: metadata.name: missing"]
    bad = snapshot.rejections_of(ObjectRef(Kind.SERVICE, "shop", "bad"))
    assert [(r.field, "65535" in r.reason) for r in bad] == [("spec.ports[0].port", True)]


def test_a_second_definition_of_an_object_is_ignored_and_named(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", *web("10.244.1.2"))
    write(tmp_path / "b.yaml", k8s.endpoint_slice("web-a", "web", [k8s.endpoint("10.244.9.9")]))
    harness = Harness(tmp_path)
    snapshot = harness.read()
    assert snapshot is not None and endpoints(snapshot, WEB) == ["10.244.1.2:8080"]
    assert harness.problems() == [
        f"{tmp_path / 'b.yaml'}#0: EndpointSlice shop/web-a is already defined at {tmp_path / 'a.yaml'}#1; "
        "this definition is ignored"]


def test_a_same_size_rewrite_within_one_timestamp_tick_is_still_seen(tmp_path: Path) -> None:
    """In-place writes of equal length can share an mtime; the racy check compares content."""
    path = tmp_path / "web.yaml"
    write(path, *web("10.244.1.2"))
    stat = path.stat()
    harness = Harness(tmp_path)
    harness.read()
    path.write_text(path.read_text().replace("10.244.1.2", "10.244.1.3"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the worst case: the same timestamp
    assert path.stat().st_ino == stat.st_ino and path.stat().st_size == stat.st_size
    snapshot = harness.read()
    assert snapshot is not None and endpoints(snapshot, WEB) == ["10.244.1.3:8080"]


def test_the_polling_thread_picks_up_a_change(tmp_path: Path) -> None:
    write(tmp_path / "web.yaml", *web("10.244.1.2"))
    harness = Harness(tmp_path, poll_interval=0.02)
    harness.source.start()
    try:
        first = harness.tracker.snapshot()
        assert first is not None
        write(tmp_path / "web.yaml", *web("10.244.1.5"))
        deadline = time.monotonic() + 10
        snapshot = None
        while snapshot is None and time.monotonic() < deadline:
            snapshot = harness.tracker.snapshot()
            time.sleep(0.01)  # polling a condition with a deadline, not waiting for readiness
        assert snapshot is not None and endpoints(snapshot, WEB) == ["10.244.1.5:8080"]
    finally:
        harness.source.stop()
