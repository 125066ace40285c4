"""Which pods are in the mesh, and why: pure, shared by the tunnel, the mesh capture and inspect.

As Istio ambient: the namespace or the pod carries `nodeagent.io/mesh=enabled` (or
`istio.io/dataplane-mode=ambient`); a pod label `nodeagent.io/mesh=disabled` (or
`istio.io/dataplane-mode=none`) opts the pod out whatever its namespace says. Host-network pods share
the node's namespace and can never be captured; a pod without an IP has nothing to capture yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nodeagent.cluster.model import Namespace, Pod

MESH_LABEL = "nodeagent.io/mesh"
ISTIO_MODE_LABEL = "istio.io/dataplane-mode"
_ENABLED = {(MESH_LABEL, "enabled"), (ISTIO_MODE_LABEL, "ambient")}
_DISABLED = {(MESH_LABEL, "disabled"), (ISTIO_MODE_LABEL, "none")}
_TERMINAL_PHASES = {"Succeeded", "Failed"}
NO_IP_YET = "pod has no IP yet"  # not a final answer: the kubelet (or the CNI plugin's announcement) gives one


@dataclass(frozen=True, slots=True)
class Enrollment:
    """Whether a pod is in the mesh, with the reason a person reads in `inspect`."""

    enrolled: bool
    reason: str


def _label(labels: Mapping[str, str], pairs: set[tuple[str, str]]) -> str | None:
    for key, value in sorted(pairs):
        if labels.get(key) == value:
            return f"{key}={value}"
    return None


def enrollment(pod: Pod, namespace: Namespace | None) -> Enrollment:
    """Decide enrollment for `pod`, given its namespace object (None when it is not known yet)."""
    if pod.host_network:
        return Enrollment(False, "host-network pod (shares the node's network namespace)")
    if opt_out := _label(pod.labels, _DISABLED):
        return Enrollment(False, f"pod label {opt_out} opts out")
    if pod.phase in _TERMINAL_PHASES:
        return Enrollment(False, f"pod phase {pod.phase}")
    if not pod.ips:
        return Enrollment(False, NO_IP_YET)
    if by_pod := _label(pod.labels, _ENABLED):
        return Enrollment(True, f"pod label {by_pod}")
    if namespace is not None and (by_namespace := _label(namespace.labels, _ENABLED)):
        return Enrollment(True, f"namespace {namespace.ref.name} label {by_namespace}")
    return Enrollment(False, f"neither pod nor namespace {pod.ref.namespace} carries {MESH_LABEL}=enabled")
