"""What the kubelet decides about a pod that the agent and the lab need to know: the pod's QoS class and where the
kubelet makes the pod's cgroup (pure: names and arithmetic, no filesystem).

The kubelet names a pod's cgroup after its UID under its QoS class's (`pkg/kubelet/cm`: the pod container name
is `pod<uid>` under `kubepods[/burstable|/besteffort]`, Guaranteed pods directly under `kubepods`). With the
systemd cgroup driver each part becomes a slice whose name repeats its parents' and escapes `-` as `_`
(`cgroup_manager_linux.go`, `escapeSystemdCgroupName`):

    systemd:  <root>/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice
              <root>/kubepods.slice/kubepods-pod<uid with _>.slice                         (Guaranteed)
    cgroupfs: <root>/kubepods/burstable/pod<uid>
              <root>/kubepods/pod<uid>                                                      (Guaranteed)

The class is the API's `status.qosClass`, computed as `pkg/apis/core/helper/qos.GetPodQOS` does (`qos_class`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import PurePath
from typing import Any, TypeVar

QOS_PARENTS = {"Guaranteed": "", "Burstable": "burstable", "BestEffort": "besteffort"}
# Every place a pod cgroup can be under the root, in either driver's layout (what `cleanup` walks).
POD_CGROUP_PATTERNS = ("kubepods/pod*", "kubepods/burstable/pod*", "kubepods/besteffort/pod*",
                       "kubepods.slice/kubepods-pod*.slice",
                       "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod*.slice",
                       "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod*.slice")
QOS_RESOURCES = ("cpu", "memory")  # the resources the QoS class is computed from (qos.go supportedQoSComputeResources)


P = TypeVar("P", bound=PurePath)


class CgroupDriver(StrEnum):
    """The kubelet's --cgroup-driver."""

    SYSTEMD = "systemd"
    CGROUPFS = "cgroupfs"


@dataclass(frozen=True)
class PodCgroupKey:
    """What names a pod's cgroup: its UID and QoS class ("" when not known: every class is tried)."""

    uid: str
    qos_class: str = ""


def pod_cgroup(root: P, driver: CgroupDriver, uid: str, qos_class: str) -> P:
    """The cgroup the kubelet makes for a pod of `qos_class` under `root` (a path of either flavour)."""
    parent = QOS_PARENTS[qos_class]
    if driver is CgroupDriver.CGROUPFS:
        base = root / "kubepods"
        return (base / parent if parent else base) / f"pod{uid}"
    escaped = uid.replace("-", "_")
    base = root / "kubepods.slice"
    if not parent:
        return base / f"kubepods-pod{escaped}.slice"
    return base / f"kubepods-{parent}.slice" / f"kubepods-{parent}-pod{escaped}.slice"


def candidates(root: P, key: PodCgroupKey) -> list[P]:
    """Every place the pod's cgroup may be, its known QoS class first, both drivers."""
    classes = [key.qos_class] if key.qos_class in QOS_PARENTS else []
    classes += [c for c in QOS_PARENTS if c not in classes]
    return [pod_cgroup(root, driver, key.uid, qos) for qos in classes for driver in CgroupDriver]


class QuantityError(ValueError):
    """A resource quantity that is not one (apimachinery's resource.ParseQuantity would refuse it)."""


_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")
_SUFFIXES = {"": Fraction(1), "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
             "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
             "P": Fraction(10**15), "E": Fraction(10**18), "Ki": Fraction(2**10), "Mi": Fraction(2**20),
             "Gi": Fraction(2**30), "Ti": Fraction(2**40), "Pi": Fraction(2**50), "Ei": Fraction(2**60)}


def quantity(value: object) -> Fraction:
    """A Kubernetes resource quantity ("100m", "128Mi", "1e3", 2) as an exact number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise QuantityError(f"not a quantity: {value!r}")
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise QuantityError(f"not a quantity: {value!r}")
    number, exponent, suffix = match.groups()
    scale = Fraction(10) ** int(exponent[1:]) if exponent else _SUFFIXES[suffix or ""]
    return Fraction(number) * scale


def qos_class(spec: Mapping[str, Any]) -> str:
    """The pod's QoS class from its containers' (and init containers') cpu and memory requests and limits, as
    `GetPodQOS`: none anywhere is BestEffort; limits for both in every container and requests equal to them
    is Guaranteed; anything else Burstable. A request left out defaults to its limit, as the API server
    defaults it. Raises QuantityError for a quantity that is not one."""
    requests: dict[str, Fraction] = {}
    limits: dict[str, Fraction] = {}
    guaranteed = True
    for container in (*(spec.get("initContainers") or ()), *(spec.get("containers") or ())):
        resources = (container or {}).get("resources") or {}
        given_limits = resources.get("limits") or {}
        given_requests = {**given_limits, **(resources.get("requests") or {})}
        found_limits = set()
        for name in QOS_RESOURCES:
            if name in given_requests and (amount := quantity(given_requests[name])) != 0:
                requests[name] = requests.get(name, Fraction(0)) + amount
            if name in given_limits and (amount := quantity(given_limits[name])) != 0:
                limits[name] = limits.get(name, Fraction(0)) + amount
                found_limits.add(name)
        if found_limits != set(QOS_RESOURCES):
            guaranteed = False
    if not requests and not limits:
        return "BestEffort"
    if guaranteed and all(limits.get(name) == amount for name, amount in requests.items()) \
            and len(requests) == len(limits):
        return "Guaranteed"
    return "Burstable"
