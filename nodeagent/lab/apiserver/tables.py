"""Server-side printing: `kubectl get` asks for `as=Table;g=meta.k8s.io;v=v1` and prints the columns the
server sends. These are the columns kube-apiserver's printers send for the same kinds (pkg/printers/
internalversion), computed from the object, so `kubectl get svc -A` reads as it does on a cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

Column = tuple[str, str, int, str]  # (name, type, priority, format)
Row = Callable[[dict[str, Any]], list[Any]]
NAME_COLUMN: Column = ("Name", "string", 0, "name")
AGE_COLUMN: Column = ("Age", "string", 0, "")


def human_duration(seconds: float) -> str:
    """apimachinery's duration.HumanDuration: 45s, 5m30s, 42m, 3h10m, 5h, 3d4h, 120d, 3y."""
    s = int(max(seconds, 0))
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y"


def age(obj: dict[str, Any]) -> str:
    """Time since creationTimestamp, as kubectl shows it (<unknown> without one)."""
    created = (obj.get("metadata") or {}).get("creationTimestamp")
    if not created:
        return "<unknown>"
    try:
        then = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    return human_duration((datetime.now(UTC) - then).total_seconds())


def _name(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _service_ports(spec: dict[str, Any]) -> str:
    ports = []
    for port in spec.get("ports") or []:
        node_port = f":{port['nodePort']}" if port.get("nodePort") else ""
        ports.append(f"{port.get('port')}{node_port}/{port.get('protocol', 'TCP')}")
    return ",".join(ports) or "<none>"


def _service(obj: dict[str, Any]) -> list[Any]:
    spec = obj.get("spec") or {}
    kind = spec.get("type", "ClusterIP")
    ingress = [i.get("ip") or i.get("hostname") for i in (obj.get("status") or {}).get("loadBalancer", {})
               .get("ingress") or []]
    external = ",".join([*ingress, *(spec.get("externalIPs") or [])]) or (
        "<pending>" if kind == "LoadBalancer" else spec.get("externalName", "<none>"))
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items())) or "<none>"
    return [_name(obj), kind, spec.get("clusterIP") or "<none>", external, _service_ports(spec), age(obj), selector]


def _pod(obj: dict[str, Any]) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    containers = spec.get("containers") or []
    statuses = status.get("containerStatuses") or []
    phase = status.get("phase") or "Pending"
    ready = sum(1 for c in statuses if c.get("ready")) if statuses else (len(containers) if phase == "Running" else 0)
    restarts = sum(int(c.get("restartCount") or 0) for c in statuses)
    reason = "Terminating" if (obj.get("metadata") or {}).get("deletionTimestamp") else status.get("reason", phase)
    return [_name(obj), f"{ready}/{len(containers)}", reason, restarts, age(obj), status.get("podIP") or "<none>",
            spec.get("nodeName") or "<none>", "<none>", "<none>"]


def _node(obj: dict[str, Any]) -> list[Any]:
    status = obj.get("status") or {}
    ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    state = {"True": "Ready", "False": "NotReady"}.get(str(ready), "Unknown")
    roles = ",".join(sorted(k.split("/", 1)[1] for k in (obj.get("metadata") or {}).get("labels") or {}
                            if k.startswith("node-role.kubernetes.io/"))) or "<none>"
    addresses: dict[Any, Any] = {}
    for entry in status.get("addresses") or []:  # the first of each type, as the Node printer (getNodeInternalIP)
        addresses.setdefault(entry.get("type"), entry.get("address"))
    info = status.get("nodeInfo") or {}
    return [_name(obj), state, roles, age(obj), info.get("kubeletVersion") or "<unknown>",
            addresses.get("InternalIP", "<none>"), addresses.get("ExternalIP", "<none>"),
            info.get("osImage") or "<unknown>", info.get("kernelVersion") or "<unknown>",
            info.get("containerRuntimeVersion") or "<unknown>"]


def _namespace(obj: dict[str, Any]) -> list[Any]:
    return [_name(obj), (obj.get("status") or {}).get("phase") or "Active", age(obj)]


def _endpoint_slice(obj: dict[str, Any]) -> list[Any]:
    ports = ",".join(str(p.get("port")) for p in obj.get("ports") or [] if p.get("port") is not None) or "<unset>"
    addresses = [a for e in obj.get("endpoints") or [] for a in e.get("addresses") or []]
    shown = ",".join(addresses[:3]) + (f" + {len(addresses) - 3} more..." if len(addresses) > 3 else "")
    return [_name(obj), obj.get("addressType", ""), ports, shown or "<unset>", age(obj)]


def _config_map(obj: dict[str, Any]) -> list[Any]:
    return [_name(obj), len(obj.get("data") or {}) + len(obj.get("binaryData") or {}), age(obj)]


def _generic(obj: dict[str, Any]) -> list[Any]:
    return [_name(obj), age(obj)]


PRINTERS: dict[str, tuple[tuple[Column, ...], Row]] = {
    "Service": ((NAME_COLUMN, ("Type", "string", 0, ""), ("Cluster-IP", "string", 0, ""),
                 ("External-IP", "string", 0, ""), ("Port(s)", "string", 0, ""), AGE_COLUMN,
                 ("Selector", "string", 1, "")), _service),
    "Pod": ((NAME_COLUMN, ("Ready", "string", 0, ""), ("Status", "string", 0, ""), ("Restarts", "string", 0, ""),
             AGE_COLUMN, ("IP", "string", 1, ""), ("Node", "string", 1, ""), ("Nominated Node", "string", 1, ""),
             ("Readiness Gates", "string", 1, "")), _pod),
    "Node": ((NAME_COLUMN, ("Status", "string", 0, ""), ("Roles", "string", 0, ""), AGE_COLUMN,
              ("Version", "string", 0, ""), ("Internal-IP", "string", 1, ""), ("External-IP", "string", 1, ""),
              ("OS-Image", "string", 1, ""), ("Kernel-Version", "string", 1, ""),
              ("Container-Runtime", "string", 1, "")), _node),
    "Namespace": ((NAME_COLUMN, ("Status", "string", 0, ""), AGE_COLUMN), _namespace),
    "EndpointSlice": ((NAME_COLUMN, ("AddressType", "string", 0, ""), ("Ports", "string", 0, ""),
                       ("Endpoints", "string", 0, ""), AGE_COLUMN), _endpoint_slice),
    "ConfigMap": ((NAME_COLUMN, ("Data", "integer", 0, ""), AGE_COLUMN), _config_map),
}


def _row_object(obj: dict[str, Any], include: str) -> dict[str, Any] | None:
    if include == "None":
        return None
    if include == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


def table(kind: str, objects: Iterable[dict[str, Any]], metadata: dict[str, Any], include: str = "Metadata",
          *, headers: bool = True) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table of `objects` (all of `kind`); `include` is the includeObject parameter."""
    columns, row = PRINTERS.get(kind, ((NAME_COLUMN, AGE_COLUMN), _generic))
    rows = []
    for obj in objects:
        entry: dict[str, Any] = {"cells": row(obj)}
        embedded = _row_object(obj, include)
        if embedded is not None:
            entry["object"] = embedded
        rows.append(entry)
    definitions = [{"name": name, "type": typ, "format": fmt, "description": name, "priority": priority}
                   for name, typ, priority, fmt in columns] if headers else []
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata,
            "columnDefinitions": definitions, "rows": rows}
