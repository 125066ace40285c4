"""The one-shot snapshots `snapshot`, `chains` and `inspect` read: a Service of a family the node cannot serve is
the rejection the agent would report, and becomes served once the node's Node has that family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.state.once import snapshot_of_manifests
from tests.support import objects as k8s

WEB = ObjectRef(Kind.SERVICE, "shop", "web")


def node(*addresses: str, cidrs: tuple[str, ...]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}, "spec": {"podCIDRs": list(cidrs)},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]}}


def write(directory: Path, *documents: dict[str, Any]) -> Path:
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all(documents))
    return directory


def test_an_ipv6_service_on_an_ipv4_only_node_is_reported_on_its_field(tmp_path: Path) -> None:
    web = k8s.service("web", clusterIPs=["fd00::10"], ipFamilies=["IPv6"], clusterIP="fd00::10")
    snapshot = snapshot_of_manifests(write(tmp_path, web, node("192.168.0.2", cidrs=("10.244.1.0/24",))), "node1")
    assert any("spec.ipFamilies[0]" in str(r) for r in snapshot.rejections_of(WEB)), snapshot.rejections_of(WEB)


def test_the_same_service_is_served_where_the_node_has_ipv6(tmp_path: Path) -> None:
    web = k8s.service("web", clusterIPs=["fd00::10"], ipFamilies=["IPv6"], clusterIP="fd00::10")
    dual = node("192.168.0.2", "fd00:192::2", cidrs=("10.244.1.0/24", "fd00:10:1::/64"))
    snapshot = snapshot_of_manifests(write(tmp_path, web, dual), "node1")
    assert not any("ipFamilies" in str(r) for r in snapshot.rejections_of(WEB))
    assert any(info.name.name == "web" for info in snapshot.service_ports.values())
