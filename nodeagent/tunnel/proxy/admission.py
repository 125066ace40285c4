"""Which inbound connections a pod's listeners may carry at all, before any policy (pure).

A tunnel listener serves one workload. Whatever a peer asks for, the tunnel only ever connects to that
workload's own address, and never to the tunnel's own ports inside it; ztunnel's inbound does the same
(`src/proxy/inbound.rs`: `validate_destination` refuses an HBONE address that is not the connection's
destination with 400, `find_inbound_upstream` refuses `illegal_ports` with 503 as a self call). Without
this check a peer holding any valid certificate could use a pod's 15008 as an open relay to any host
reachable from the pod's network namespace, with the pod's address and the tunnel's mark (which every
capture skips).

The same check covers captured plaintext on 15006, whose target is the original destination the
capture recorded. Shared here so the two listeners cannot drift apart, and `inspect`/`trace` can say
why a connection would be refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

# Every port the tunnel itself listens on in a pod's namespace or on the node (docs/ports-and-names.md): admin, captured
# outbound, captured inbound, HBONE, metrics, readiness. A CONNECT to one of them would loop back into
# the tunnel, or reach its admin surface from outside the node.
TUNNEL_PORTS = frozenset({15000, 15001, 15006, 15008, 15020, 15021})


class Refusal(StrEnum):
    """Why an inbound connection is refused before policy; the value is the metric's `reason` label."""

    NOT_THIS_POD = "target-not-served-pod"  # the authority names another host than the listener's pod
    TUNNEL_PORT = "target-tunnel-port"  # the authority names one of the tunnel's own ports
    POLICIES_NOT_SYNCED = "policies-not-synced"  # fail closed until the policy kinds are listed
    POD_UNKNOWN = "pod-unknown"  # the served pod is no longer in the workload table (leaving)
    IDENTITY_UNKNOWN = "source-identity-unknown"  # a valid certificate of an identity no pod holds any more

    @property
    def status(self) -> int:
        """The HTTP status an HBONE CONNECT is refused with (ztunnel's choices, see the module doc)."""
        if self is Refusal.NOT_THIS_POD:
            return 400
        return 401 if self is Refusal.IDENTITY_UNKNOWN else 503


@dataclass(frozen=True, slots=True)
class NotAdmitted:
    """A refusal and its one-line reason for logs and `inspect`."""

    refusal: Refusal
    reason: str


def check_target(served_ip: str | Sequence[str], host: str, port: int) -> NotAdmitted | None:
    """None when `host`:`port` is a target a listener serving `served_ip` (one address, or every address of a
    dual-stack pod) may connect to.

    Addresses are compared as addresses (so `::ffff:10.0.0.1` or a differently written IPv6 address is
    not mistaken either way); a host that is not an address at all is never the pod."""
    served = (served_ip,) if isinstance(served_ip, str) else tuple(served_ip)
    try:
        same = any(ipaddress.ip_address(host) == ipaddress.ip_address(ip) for ip in served)
    except ValueError:
        same = False
    if not same:
        return NotAdmitted(Refusal.NOT_THIS_POD, f"{host}:{port} is not an address of the pod this listener serves "
                                             f"({', '.join(served)})")
    if port in TUNNEL_PORTS:
        return NotAdmitted(Refusal.TUNNEL_PORT, f"{host}:{port} is one of the tunnel's own ports")
    return None
