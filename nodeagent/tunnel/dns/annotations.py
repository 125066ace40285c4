"""A pod's opt-out of the tunnel's DNS capture. Pure.

Named as the project's other pod and Service annotations are (`nodeagent.io/<setting>`; Istio's ambient mode
has a per-pod switch of the same kind). Capture is on unless the annotation says "false" (any case, spaces
around ignored); any other value leaves it on, as an unreadable opt-out must not silently break a pod's DNS
differently from what its owner wrote.
"""

from __future__ import annotations

from collections.abc import Mapping

DNS_CAPTURE = "nodeagent.io/dns-capture"


def dns_capture_enabled(annotations: Mapping[str, str]) -> bool:
    """Whether the pod's port 53 (UDP and TCP) is to be captured into the tunnel's DNS proxy."""
    return annotations.get(DNS_CAPTURE, "").strip().lower() != "false"
