"""The rules that hook kube-proxy's chains into the built-in ones (kube-proxy's `iptablesJumpChains`). Pure.

They live in chains other programs own (PREROUTING, INPUT, ...), so they are ensured one by one with
`iptables -C`/`-I`, never written by a restore, and removed one by one by `cleanup`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.service.iptables import names as n

_NEW = ("-m", "conntrack", "--ctstate", "NEW")


@dataclass(frozen=True)
class Jump:
    """`-I source -m ... -m comment --comment COMMENT -j target` in `table`."""

    table: str
    target: str
    source: str
    comment: str
    extra: tuple[str, ...] = ()

    @property
    def rule(self) -> tuple[str, ...]:
        """The rule's arguments as given to `iptables -I source`."""
        comment = ("-m", "comment", "--comment", self.comment) if self.comment else ()
        return (*self.extra, *comment, "-j", self.target)


JUMPS = (
    Jump("filter", n.KUBE_EXTERNAL_SERVICES, "INPUT", "kubernetes externally-visible service portals", _NEW),
    Jump("filter", n.KUBE_EXTERNAL_SERVICES, "FORWARD", "kubernetes externally-visible service portals", _NEW),
    Jump("filter", n.KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports"),
    Jump("filter", n.KUBE_SERVICES, "FORWARD", "kubernetes service portals", _NEW),
    Jump("filter", n.KUBE_SERVICES, "OUTPUT", "kubernetes service portals", _NEW),
    Jump("filter", n.KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules"),
    Jump("filter", n.KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall", _NEW),
    Jump("filter", n.KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall", _NEW),
    Jump("filter", n.KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall", _NEW),
    Jump("nat", n.KUBE_SERVICES, "OUTPUT", "kubernetes service portals"),
    Jump("nat", n.KUBE_SERVICES, "PREROUTING", "kubernetes service portals"),
    Jump("nat", n.KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules"),
)
# kubelet's firewall chain, duplicated by kube-proxy; created but (like kube-proxy) never removed by cleanup.
KUBELET_JUMPS = (
    Jump("filter", n.KUBELET_FIREWALL, "INPUT", ""),
    Jump("filter", n.KUBELET_FIREWALL, "OUTPUT", ""),
)
CANARY_TABLES = ("mangle", "nat", "filter")
