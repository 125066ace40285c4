"""Snapshots in words: what a node would program, as text for people or JSON for tools. Pure."""

from __future__ import annotations

from typing import Any

from nodeagent.state.tracker import Snapshot
from nodeagent.state.translation import EndpointInfo, ServicePortInfo


def _endpoint(e: EndpointInfo) -> dict[str, Any]:
    return {"address": str(e.ip), "port": e.port, "ready": e.ready, "serving": e.serving,
            "terminating": e.terminating, "node": e.node_name, "local": e.is_local,
            "pod": e.pod.key if e.pod is not None else None}


def _port(info: ServicePortInfo) -> dict[str, Any]:
    return {"service_port": str(info.name), "protocol": str(info.protocol), "type": str(info.type),
            "cluster_ips": [str(ip) for ip in info.cluster_ips], "port": info.port,
            "target_port": info.target_port, "node_port": info.node_port,
            "external_ips": [str(ip) for ip in info.external_ips],
            "load_balancer_ips": [str(ip) for ip in info.load_balancer_ips],
            "load_balancer_source_ranges": [str(n) for n in info.load_balancer_source_ranges],
            "session_affinity_timeout": info.affinity_timeout_seconds,
            "external_traffic_local": info.external_policy_local,
            "internal_traffic_local": info.internal_policy_local}


def snapshot_document(snapshot: Snapshot) -> dict[str, Any]:
    """Everything a reconciler reads from `snapshot`, as plain JSON-able data, in a stable order."""
    return {
        "node": snapshot.node_name,
        "generation": snapshot.generation,
        "resource_versions": {str(k): v for k, v in sorted(snapshot.resource_versions.items())},
        "service_ports": [_port(info) | {"endpoints": [_endpoint(e) for e in snapshot.endpoints_of(name)]}
                          for name, info in sorted(snapshot.service_ports.items(), key=lambda kv: str(kv[0]))],
        "skipped_services": {str(ref): reason for ref, reason in sorted(snapshot.skipped_services.items(),
                                                                        key=lambda kv: str(kv[0]))},
        "rejections": [{"object": str(r.ref), "field": r.field, "reason": r.reason, "whole_object": r.whole_object}
                       for ref in sorted(snapshot.rejections, key=str) for r in snapshot.rejections[ref]],
        "unreadable": [{"source": u.source, "kind": str(u.kind) if u.kind else None, "reason": u.reason}
                       for u in snapshot.unreadable],
    }


def format_snapshot(snapshot: Snapshot) -> str:
    """A human-readable listing: one block per Service port, then what was skipped or rejected."""
    lines = [f"node {snapshot.node_name}, generation {snapshot.generation}, "
             f"{len(snapshot.service_ports)} service ports"]
    for name, info in sorted(snapshot.service_ports.items(), key=lambda kv: str(kv[0])):
        fronts = [f"{ip}:{info.port}" for ip in info.cluster_ips]
        fronts += [f"nodePort {info.node_port}"] if info.node_port else []
        fronts += [f"external {ip}:{info.port}" for ip in (*info.external_ips, *info.load_balancer_ips)]
        extras = []
        if info.affinity_timeout_seconds is not None:
            extras.append(f"affinity ClientIP {info.affinity_timeout_seconds}s")
        if info.external_policy_local:
            extras.append("externalTrafficPolicy Local")
        if info.internal_policy_local:
            extras.append("internalTrafficPolicy Local")
        lines.append(f"{name}/{info.protocol} {info.type}  {', '.join(fronts)}"
                     + (f"  ({'; '.join(extras)})" if extras else ""))
        endpoints = snapshot.endpoints_of(name)
        if not endpoints:
            lines.append("    (no endpoints)")
        for e in endpoints:
            state = "ready" if e.ready else ("terminating" if e.terminating else "not ready")
            where = "local" if e.is_local else (e.node_name or "?")
            lines.append(f"    -> {e}  {state}, {where}" + (f", {e.pod.key}" if e.pod else ""))
    for ref, reason in sorted(snapshot.skipped_services.items(), key=lambda kv: str(kv[0])):
        lines.append(f"skipped {ref}: {reason}")
    for ref in sorted(snapshot.rejections, key=str):
        lines.extend(f"problem {r}" for r in snapshot.rejections[ref])
    lines.extend(f"unreadable {u.source}: {u.reason}" for u in snapshot.unreadable)
    return "\n".join(lines)
