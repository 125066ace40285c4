"""Rendering a report: tables a person reads at a glance, or JSON/YAML for tools (shape: `schema.json`). Pure."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import yaml

from nodeagent.inspect.model import PodReport, ServicePath, as_document

MARK = "!!"  # the marker of every line that differs from what it should be


def to_json(report: PodReport) -> str:
    """The report as JSON."""
    return json.dumps(as_document(report), indent=2, sort_keys=True)


def to_yaml(report: PodReport) -> str:
    """The report as YAML."""
    return yaml.safe_dump(as_document(report), sort_keys=True)


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


def to_human(report: PodReport) -> str:
    """The report as a person reads it: one section per part, differences marked with `!!`."""
    lines = [f"Pod:        {report.pod}   (node {report.node}, {', '.join(report.ips) or 'no IP'})",
             f"Identity:   {report.identity}",
             f"Enrollment: {'enrolled' if report.enrolled else 'not enrolled'} ({report.enrollment_reason})",
             f"Datapath:   {report.datapath_mode or 'unknown'} ({report.datapath_reason or 'no reason known'})",
             f"Mesh state: {report.mesh_state or '-'}",
             f"Read from:  {report.source} ({report.source_note})" if report.source_note
             else f"Read from:  {report.source}", ""]
    cap = report.capture
    lines.append(f"Capture: {cap.mechanism} ({cap.backend or '-'}), {cap.status}, in {cap.netns}")
    missing = {d.detail for d in report.drift if d.where == "capture" and d.change == "missing"}
    unexpected = {d.detail for d in report.drift if d.where == "capture" and d.change == "unexpected"}
    if cap.rules:
        rows = [[MARK if f"{r.table}: {r.rule}" in unexpected else "", "" if r.packets is None else str(r.packets),
                 r.table, r.rule] for r in cap.rules]
        lines += _table(rows, ["", "pkts", "table", "rule"])
    if cap.programs:
        lines += _table([["", p.name, str(p.prog_id), p.where] for p in cap.programs], ["", "program", "id", "where"])
    lines += [f"  map: {entry}" for entry in cap.map_entries]
    if cap.counters:
        lines.append("  counters: " + ", ".join(f"{k}={v}" for k, v in sorted(cap.counters.items())))
    lines += [f"  {MARK} missing: {line}" for line in sorted(missing)]
    lines.append("")
    tun = report.tunnel
    if not tun.reachable:
        lines.append(f"Tunnel: not reachable ({tun.error})")
    else:
        lines.append(f"Tunnel: {tun.state or ('served' if tun.served else 'not served')}"
                     + (f", listeners {', '.join(map(str, tun.listeners))}" if tun.listeners else ""))
        if tun.certificate_subject:
            lines.append(f"  certificate: {tun.certificate_subject} serial {tun.certificate_serial} "
                         f"expires {tun.certificate_expiry}")
        for pool in tun.pools:
            lines.append(f"  pool: {pool.get('peer')} {pool.get('identity')} connections={pool.get('connections')} "
                         f"streams={pool.get('streams')}")
    lines.append("")
    if report.services:
        lines.append("Services (a new connection from this pod):")
        rows = []
        for path in report.services:
            eps = ", ".join(f"{e.address} p={e.probability:.3g}" for e in path.endpoints) or "-"
            rows.append([MARK if path.live == "missing" else "", path.frontend, path.service, path.verdict,
                         path.via, eps])
        lines += _table(rows, ["", "frontend", "service", "verdict", "via", "endpoints"])
        lines.append("")
    if report.policies:
        lines.append("Policies (this pod as a destination):")
        for line in report.policies:
            lines.append(f"  {line.kind} {line.policy or '(mesh default)'}: {line.effect}")
            lines += [f"    {MARK} not enforceable as written: {note}" for note in line.unenforceable]
        lines.append("")
    if report.drift:
        lines.append(f"Drift ({len(report.drift)}):")
        lines += [f"  {MARK} {d.where} {d.change}: {d.detail}" for d in report.drift]
    else:
        lines.append("Drift: none (the kernel and the tunnel hold what the agent wants)")
    return "\n".join(lines) + "\n"


def node_text(node: str, reports: list[PodReport], output: str) -> str:
    """Every pod of a node, one line each (human), or their reports (JSON/YAML: {"node", "pods": [...]})."""
    if output != "human":
        document = {"node": node, "pods": [as_document(r) for r in reports]}
        return json.dumps(document, indent=2, sort_keys=True) + "\n" if output == "json" else \
            yaml.safe_dump(document, sort_keys=True)
    first = reports[0] if reports else None
    lines = [f"Node {node}: datapath {first.datapath_mode if first else '?'} "
             f"({first.datapath_reason if first else 'no pod'}); read from {first.source if first else '?'}"]
    rows = [[MARK if r.drifted else "", r.pod, ", ".join(r.ips), "enrolled" if r.enrolled else "-",
             r.mesh_state or "-", f"{r.capture.mechanism}/{r.capture.status}",
             r.tunnel.state or ("served" if r.tunnel.served else "-"), str(len(r.drift))] for r in reports]
    lines += _table(rows, ["", "pod", "ips", "mesh", "agent state", "capture", "tunnel", "drift"])
    return "\n".join(lines) + "\n"


def service_text(paths: list[ServicePath], output: str) -> str:
    """A Service's frontends and their paths."""
    if output != "human":
        document = [dataclasses.asdict(p) for p in paths]
        return json.dumps(document, indent=2) + "\n" if output == "json" else yaml.safe_dump(document)
    rows = [[MARK if p.live == "missing" else "", p.frontend, p.kind, p.verdict, p.via,
             ", ".join(f"{e.address} p={e.probability:.3g}" for e in p.endpoints) or "-", p.live] for p in paths]
    return "\n".join(_table(rows, ["", "frontend", "kind", "verdict", "via", "endpoints", "in kernel"])) + "\n"


def render(report: PodReport, output: str) -> str:
    """`output` is human, json or yaml."""
    renderers: dict[str, Any] = {"human": to_human, "json": to_json, "yaml": to_yaml}
    return str(renderers[output](report))
