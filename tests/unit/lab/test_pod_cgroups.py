"""The lab's pods in the kubelet's cgroup layout: each pod has a UID (given, or derived from its name, stable)
and a QoS class the API shows, and its cgroup is where the kubelet with the systemd driver would make it under
its node's cgroup, so the agents' `KubeletCgroups` finds it as on a real node."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from nodeagent.cluster.kubelet import CgroupDriver, PodCgroupKey, candidates, pod_cgroup
from nodeagent.lab.errors import LabManifestError
from nodeagent.lab.manifests import load_default, parse_text
from nodeagent.lab.plan import plan_lab
from nodeagent.lab.topology import build_topology

NODE = """
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.1.0/24}
"""


def pod(name: str, meta: str = "", resources: str = "") -> str:
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}{meta}}}
spec:
  nodeName: n1
  containers: [{{name: c, command: [nodeagent, workload, idle]{resources}}}]
"""


def test_every_default_pod_has_a_stable_uid_and_a_cgroup_where_the_kubelet_puts_it() -> None:
    first, again = build_topology(load_default()), build_topology(load_default())
    assert [p.uid for p in first.pods] == [p.uid for p in again.pods]
    assert len({p.uid for p in first.pods}) == len(first.pods)
    plan = plan_lab("t1", first)
    for planned in plan.pods:
        node = plan.node(planned.pod.node).cgroup
        uid = planned.pod.uid.replace("-", "_")
        assert planned.cgroup == (f"{node}/kubepods.slice/kubepods-besteffort.slice/"
                                  f"kubepods-besteffort-pod{uid}.slice"), planned.pod.key
        # what the agent's locator tries first for this pod
        assert PurePosixPath(planned.cgroup) == candidates(PurePosixPath(node), PodCgroupKey(
            planned.pod.uid, planned.pod.qos_class))[0]


def test_the_api_sees_the_uid_and_the_qos_class() -> None:
    text = NODE + pod("given", ", uid: 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0") + pod(
        "sized", resources=", resources: {limits: {cpu: 100m, memory: 64Mi}}")
    topology = build_topology(list(parse_text(text, "lab.yaml")))
    given, sized = (next(p for p in topology.pods if p.name == n) for n in ("given", "sized"))
    assert given.uid == "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0" and given.qos_class == "BestEffort"
    assert sized.qos_class == "Guaranteed"
    bodies = {d["metadata"]["name"]: d for d in topology.documents if d["kind"] == "Pod"}
    assert bodies["given"]["metadata"]["uid"] == given.uid and bodies["given"]["status"]["qosClass"] == "BestEffort"
    assert bodies["sized"]["status"]["qosClass"] == "Guaranteed"
    assert bodies["sized"]["metadata"]["uid"] == sized.uid
    node = plan_lab("t1", topology).node("n1").cgroup
    assert plan_lab("t1", topology).pod("default/sized").cgroup == str(
        pod_cgroup(Path(node), CgroupDriver.SYSTEMD, sized.uid, "Guaranteed"))


@pytest.mark.parametrize(("meta", "resources", "expected"), [
    (", uid: ../../escape", "", "Pod default/a: metadata.uid: not a UID: '../../escape'"),
    (", uid: ABC", "", "Pod default/a: metadata.uid: not a UID"),
    ("", ", resources: {limits: {cpu: lots}}", "Pod default/a: spec.containers[].resources: not a quantity: 'lots'"),
])
def test_a_bad_uid_or_quantity_is_refused_by_field(meta: str, resources: str, expected: str) -> None:
    with pytest.raises(LabManifestError) as caught:
        build_topology(list(parse_text(NODE + pod("a", meta, resources), "lab.yaml")))
    assert any(expected in str(p) for p in caught.value.problems), [str(p) for p in caught.value.problems]
