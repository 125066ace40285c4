"""Drift between desired and live state, and the tunnel's part of a report from its config dump. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nodeagent.cluster.model import ObjectRef
from nodeagent.inspect.model import Capture, Drift, PolicyLine, ServicePath, Tunnel
from nodeagent.state.tracker import Snapshot
from nodeagent.tunnel.state.authz import Authorizer


def compute_drift(*, enrolled: bool, capture: Capture, missing: Sequence[str], unexpected: Sequence[str],
                  agent_state: str | None, tunnel: Tunnel, services: Iterable[ServicePath]) -> tuple[Drift, ...]:
    """Every difference between what should be (enrollment, the rendered capture, the agent's named state)
    and what is (the kernel, the tunnel), each one line."""
    out = [Drift("capture", "missing", line) for line in missing]
    out += [Drift("capture", "unexpected", line) for line in unexpected]
    if capture.status != "netns-missing":
        if enrolled and capture.status == "absent":
            out.append(Drift("capture", "state", "the pod is enrolled but nothing captures its traffic"))
        if not enrolled and capture.status != "absent":
            out.append(Drift("capture", "state", f"the pod is not enrolled but a capture is {capture.status}"))
    if agent_state == "captured" and capture.status != "installed":
        out.append(Drift("agent", "state", f"the agent says captured, the kernel says {capture.status}"))
    if tunnel.reachable:
        if enrolled and not tunnel.served:
            out.append(Drift("tunnel", "missing", f"the tunnel does not serve the pod ({tunnel.state or 'unknown'})"))
        if not enrolled and tunnel.served:
            out.append(Drift("tunnel", "unexpected", "the tunnel serves a pod that is not enrolled"))
    out += [Drift("service", "missing", f"{p.frontend} ({p.service}): {p.via} not in the kernel")
            for p in services if p.live == "missing"]
    return tuple(out)


def tunnel_part(dump: Mapping[str, Any] | None, ip: str, error: str = "") -> Tunnel:
    """The pod's entry of the tunnel's config dump (`nodeagent.tunnel.admin.config_dump` plus the process's
    status); unreachable with `error` when there is no dump."""
    if dump is None:
        return Tunnel(False, error or "the tunnel's admin endpoint did not answer")
    state = str(dump.get("states", {}).get(ip, ""))
    pod = next((p for p in dump.get("pods", ()) if p.get("ip") == ip), None)
    if pod is None:
        return Tunnel(True, state=state or "not served")
    cert = pod.get("certificate") or {}
    return Tunnel(True, served=state in ("", "served"), state=state or "served",
                  listeners=tuple(int(port) for port in pod.get("listeners", ())),
                  certificate_subject=str(pod.get("identity", "")), certificate_serial=str(cert.get("serial", "")),
                  certificate_expiry=str(cert.get("not_after", "")), pools=tuple(pod.get("pools", ())))


def policy_lines(snapshot: Snapshot, namespace: str, labels: Mapping[str, str]) -> tuple[PolicyLine, ...]:
    """The policies the tunnel applies to a workload as a destination, with what it cannot enforce as written:
    its mTLS mode (the PeerAuthentication that sets it, or the mesh default), then every AuthorizationPolicy
    that selects it. The unenforceable parts come from the snapshot's rejections of each policy, which name
    the field and what the tunnel does instead (an ALLOW rule matches nothing, a DENY denies on the rest)."""
    authorizer = Authorizer.from_snapshot(snapshot)

    def notes(ref: ObjectRef) -> tuple[str, ...]:
        return tuple(f"{r.field}: {r.reason}" for r in snapshot.rejections_of(ref))

    mode, peer = authorizer.mode(namespace, labels)
    lines = [PolicyLine("PeerAuthentication", peer.key if peer else "", str(mode), notes(peer) if peer else ())]
    lines += [PolicyLine("AuthorizationPolicy", policy.ref.key, str(policy.action), notes(policy.ref))
              for policy in authorizer.applicable(namespace, labels)]
    return tuple(lines)
