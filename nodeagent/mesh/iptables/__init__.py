"""Mesh capture in iptables mode: the rules inside each enrolled pod's network namespace that send its TCP
to the node tunnel (15001 out, 15006 plaintext in, 15008 HBONE untouched), and the node's probe SNAT.

`render`, `rules`, `state` and `annotations` are pure; `kernel` reads and writes the namespaces.
"""

from nodeagent.mesh.annotations import Rejection, capture_options
from nodeagent.mesh.capture import ACTION, Action, CaptureState, CaptureStatus, assess
from nodeagent.mesh.iptables.apply import (
    CaptureError,
    RedirectError,
    apply_capture,
    apply_probe_snat,
    live_state,
    netns_present,
    probe_snat_state,
    remove_capture,
    remove_probe_snat,
    rule_counters,
)
from nodeagent.mesh.iptables.render import (
    CaptureOptions,
    CaptureOptionsError,
    node_probe_snat,
    pod_capture,
    render_node_probe_snat,
    render_pod_capture,
    render_pod_cleanup,
)
from nodeagent.mesh.iptables.rules import LiveRules, RuleSet, parse_save

__all__ = [
    "ACTION",
    "Action",
    "CaptureError",
    "CaptureOptions",
    "CaptureOptionsError",
    "CaptureState",
    "CaptureStatus",
    "LiveRules",
    "RedirectError",
    "Rejection",
    "RuleSet",
    "apply_capture",
    "apply_probe_snat",
    "assess",
    "capture_options",
    "live_state",
    "netns_present",
    "node_probe_snat",
    "parse_save",
    "pod_capture",
    "probe_snat_state",
    "remove_capture",
    "remove_probe_snat",
    "render_node_probe_snat",
    "render_pod_capture",
    "render_pod_cleanup",
    "rule_counters",
]
