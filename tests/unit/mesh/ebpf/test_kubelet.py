"""Where the kubelet makes a pod's cgroup (no root: the layouts are paths; the lookup is over a directory tree
standing for /sys/fs/cgroup). The names are kubelet's (pkg/kubelet/cm: pod<uid> under the QoS class's
parent, the systemd driver escaping '-' as '_' in slice names)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.cluster.kubelet import CgroupDriver, PodCgroupKey, candidates, pod_cgroup
from nodeagent.mesh.ebpf.kubelet import KubeletCgroups, pod_cgroups

UID = "5f1c2a3b-7d8e-4f90-a1b2-c3d4e5f60718"
ROOT = Path("/sys/fs/cgroup")


@pytest.mark.parametrize(("driver", "qos", "path"), [
    (CgroupDriver.SYSTEMD, "Burstable",
     "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f1c2a3b_7d8e_4f90_a1b2_c3d4e5f60718.slice"),
    (CgroupDriver.SYSTEMD, "BestEffort",
     "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5f1c2a3b_7d8e_4f90_a1b2_c3d4e5f60718.slice"),
    (CgroupDriver.SYSTEMD, "Guaranteed", "kubepods.slice/kubepods-pod5f1c2a3b_7d8e_4f90_a1b2_c3d4e5f60718.slice"),
    (CgroupDriver.CGROUPFS, "Burstable", f"kubepods/burstable/pod{UID}"),
    (CgroupDriver.CGROUPFS, "BestEffort", f"kubepods/besteffort/pod{UID}"),
    (CgroupDriver.CGROUPFS, "Guaranteed", f"kubepods/pod{UID}"),
])
def test_the_kubelets_names(driver: CgroupDriver, qos: str, path: str) -> None:
    assert pod_cgroup(ROOT, driver, UID, qos) == ROOT / path


def test_a_known_class_is_tried_first_and_an_unknown_one_tries_every_class() -> None:
    known = candidates(ROOT, PodCgroupKey(UID, "BestEffort"))
    assert known[:2] == [pod_cgroup(ROOT, d, UID, "BestEffort") for d in CgroupDriver] and len(known) == 6
    assert len(set(candidates(ROOT, PodCgroupKey(UID)))) == 6


def test_the_lookup_finds_the_pod_in_either_layout_and_by_namespace_too(tmp_path: Path) -> None:
    systemd = pod_cgroup(tmp_path, CgroupDriver.SYSTEMD, UID, "Burstable")
    systemd.mkdir(parents=True)
    keys = {"shop/web-0": (UID, ""), "/run/netns/cni-1": (UID, "")}
    locate = KubeletCgroups(tmp_path, lambda netns, pod: keys.get(pod) if pod else keys.get(netns))
    assert locate.cgroup_of("", "shop/web-0") == systemd
    assert locate.cgroup_of("/run/netns/cni-1", "") == systemd
    assert locate.cgroup_of("", "shop/other") is None
    other = "0a0a0a0a-0000-0000-0000-000000000000"
    cgroupfs = pod_cgroup(tmp_path, CgroupDriver.CGROUPFS, other, "Guaranteed")
    cgroupfs.mkdir(parents=True)
    keys["shop/db-0"] = (other, "Guaranteed")
    assert locate.cgroup_of("", "shop/db-0") == cgroupfs
    assert pod_cgroups(tmp_path) == sorted([systemd, cgroupfs])


def test_a_pod_whose_cgroup_is_not_there_is_not_located(tmp_path: Path) -> None:
    locate = KubeletCgroups(tmp_path, lambda netns, pod: (UID, "Burstable"))
    assert locate.cgroup_of("", "shop/web-0") is None
    assert locate("/nonexistent/netns", "shop/web-0") is None
