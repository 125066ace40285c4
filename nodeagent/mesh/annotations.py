"""A pod's capture options from its annotations (Istio's sidecar exclusion annotations). Pure.

Ambient Istio ignores these; sidecar Istio honoured them, and a pod moving into the mesh may still
carry them. Each bad annotation is rejected alone, with a message naming the pod, the annotation and
the value, and the other annotations still apply.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nodeagent.mesh.iptables.render import DEFAULT_OPTIONS, CaptureOptions, CaptureOptionsError
from nodeagent.tunnel.dns.annotations import dns_capture_enabled

EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
EXCLUDE_OUTBOUND_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"


@dataclass(frozen=True, slots=True)
class AnnotationRejection:
    """An annotation that was not applied, and why."""

    pod: str
    annotation: str
    value: str
    reason: str

    def __str__(self) -> str:
        return f"pod {self.pod}: annotation {self.annotation}={self.value!r}: {self.reason}"


def _ports(text: str) -> tuple[int, ...]:
    ports = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise ValueError(f"{item!r} is not a port (1-65535)")
        ports.append(int(item))
    return tuple(sorted(set(ports)))


def _ranges(text: str) -> tuple[str, ...]:
    ranges = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if item == "*":
            raise ValueError("'*' (exclude everything) would disable the capture; remove the pod from the mesh")
        try:  # IPv4 or IPv6, as Istio's excludeOutboundIPRanges: each family's capture takes its own
            network = ipaddress.ip_network(item)
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an IP network ({exc})") from exc
        if network.prefixlen == 0:
            raise ValueError(f"{item!r} (a whole IP family) would disable that family's capture; remove the pod "
                             "from the mesh")
        ranges.append(str(network))
    return tuple(sorted(set(ranges)))


_SETTERS: tuple[tuple[str, Callable[[CaptureOptions, str], CaptureOptions]], ...] = (
    (EXCLUDE_OUTBOUND_PORTS, lambda o, v: dataclasses.replace(o, exclude_outbound_ports=_ports(v))),
    (EXCLUDE_INBOUND_PORTS, lambda o, v: dataclasses.replace(o, exclude_inbound_ports=_ports(v))),
    (EXCLUDE_OUTBOUND_RANGES, lambda o, v: dataclasses.replace(o, exclude_outbound_cidrs=_ranges(v))),
)


def capture_options(pod: str, annotations: Mapping[str, str], base: CaptureOptions = DEFAULT_OPTIONS
                    ) -> tuple[CaptureOptions, list[AnnotationRejection]]:
    """`base` with the pod's exclusion annotations and its DNS opt-out applied; the ones that cannot be used
    are returned."""
    options = base if dns_capture_enabled(annotations) else dataclasses.replace(base, dns_port=None)
    rejected: list[AnnotationRejection] = []
    for annotation, setter in _SETTERS:
        value = annotations.get(annotation)
        if value is None:
            continue
        try:
            options = setter(options, value)
        except (ValueError, CaptureOptionsError) as exc:
            rejected.append(AnnotationRejection(pod, annotation, value, str(exc)))
    return options, rejected
