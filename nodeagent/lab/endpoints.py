"""EndpointSlices for lab Services, derived from Pods the way the endpoint-slice controller does.

Pure: selector matching, named targetPort resolution, grouping of pods by their resolved ports
(pods that resolve a named port differently land in different slices, as upstream), 100 endpoints
per slice. A Service for which the manifests already carry EndpointSlices is left to those.
A Service gets slices of each of its address types, as the controller's getAddressTypesForService
(pkg/controller/endpointslice): one per family of spec.ipFamilies (IPv4 first in a dual-stack lab), and
each slice lists the pods' addresses of its family; without spec.ipFamilies, the families of its cluster IPs,
and IPv4 (and IPv6) for a headless Service.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodeagent.lab.topology import LabPod

MAX_ENDPOINTS_PER_SLICE = 100
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when every key of a (non-empty) equality selector matches `labels`."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _resolve_port(pod: LabPod, target: int | str, protocol: str) -> int | None:
    if isinstance(target, int):
        return target
    for container in pod.containers:
        for port in container.ports:
            if port.name == target and port.protocol == protocol:
                return port.port
    return None


def _slice_name(service: str, ports_key: tuple[tuple[str, str, int], ...], chunk: int, address_type: str) -> str:
    # IPv4 slices keep the names they had before the lab was dual-stack
    key = (ports_key, chunk) if address_type == "IPv4" else (ports_key, chunk, address_type)
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:5]
    return f"{service[:57]}-{digest}"


def address_types(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The address types of a Service's slices (the controller's getAddressTypesForService)."""
    families = spec.get("ipFamilies")
    if isinstance(families, list) and families:
        return tuple(f for f in families if f in ("IPv4", "IPv6"))
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if not ips or ips[0] == "None":
        # headless without families: upstream guesses from the endpoints; IPv4 here (a lab's primary family)
        return ("IPv4",)
    return tuple("IPv6" if ":" in str(ip) else "IPv4" for ip in ips)


def _pod_address(pod: LabPod, address_type: str) -> str | None:
    for ip in pod.ips:
        if (ip.version == 6) == (address_type == "IPv6"):
            return str(ip)
    return None


def derive_endpoint_slices(
    services: Sequence[Mapping[str, Any]], pods: Sequence[LabPod], existing: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The EndpointSlices the controller would write for `services` selecting `pods`."""
    covered = {
        ((s.get("metadata") or {}).get("namespace", "default"),
         ((s.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL))
        for s in existing
    }
    slices: list[dict[str, Any]] = []
    for svc in services:
        meta, spec = svc["metadata"], svc["spec"]
        namespace, name = meta["namespace"], meta["name"]
        selector = spec.get("selector")
        if not selector or spec.get("type") == "ExternalName" or (namespace, name) in covered:
            continue
        groups: dict[tuple[tuple[str, str, int], ...], list[LabPod]] = {}
        for pod in pods:
            if pod.namespace != namespace or not selects(selector, pod.labels):
                continue
            resolved = []
            for port in spec.get("ports") or []:
                number = _resolve_port(pod, port["targetPort"], port["protocol"])
                if number is not None:
                    resolved.append((str(port.get("name", "")), port["protocol"], number))
            groups.setdefault(tuple(resolved), []).append(pod)
        for address_type in address_types(spec):
            for ports_key, group in sorted(groups.items()):
                members = [p for p in group if _pod_address(p, address_type) is not None]
                for chunk, start in enumerate(range(0, len(members), MAX_ENDPOINTS_PER_SLICE)):
                    slices.append(_slice(namespace, name, ports_key, chunk,
                                         members[start:start + MAX_ENDPOINTS_PER_SLICE], address_type))
    return slices


def _slice(namespace: str, service: str, ports_key: tuple[tuple[str, str, int], ...], chunk: int,
           pods: Sequence[LabPod], address_type: str) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": _slice_name(service, ports_key, chunk, address_type),
            "namespace": namespace,
            "labels": {SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: MANAGED_BY},
        },
        "addressType": address_type,
        "endpoints": [
            {
                "addresses": [str(_pod_address(pod, address_type))],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": pod.node,
                "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name},
            }
            for pod in pods
        ],
        "ports": [{"name": n, "protocol": proto, "port": number} for n, proto, number in ports_key],
    }
