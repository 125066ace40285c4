"""Whether this kernel and nft can run the nftables mode, and if not, why (the reason `run` falls back with).

kube-proxy (pkg/proxy/nftables/proxier.go getNFTablesInterface, pkg/util/kernel) requires kernel 5.13 or later
(so the host's nft is new enough not to be broken by our rules) unless KUBE_PROXY_NFTABLES_SKIP_KERNEL_VERSION_CHECK
is set, and knftables requires nft 1.0.1. Beyond kube-proxy, the expressions the rules use are tried: a probe
transaction with each of them is checked by the kernel (`nft --check`: validated, never committed), so a kernel
built without, say, numgen or fib fails here with nft's words instead of at the first sync.
"""

from __future__ import annotations

import re
from typing import Protocol

MIN_KERNEL = (5, 13)
SKIP_KERNEL_CHECK = "KUBE_PROXY_NFTABLES_SKIP_KERNEL_VERSION_CHECK"
PROBE_TABLE = "kube-proxy-probe"


class ChecksTransactions(Protocol):
    """`kernel.nftables.Nft`'s part the probe needs."""

    def probe(self, transaction: str) -> str | None:
        """None when the kernel accepts the transaction (without loading it), else why not."""
        ...


def probe_transaction(family: str = "ip") -> str:
    """A table using every expression and object type the mode writes: base chains of both types, a
    concatenated verdict map, a dynamic timeout set updated from a rule, numgen, fib, reject, masquerade
    fully-random, dnat, ct state, marks and comments."""
    ip, addr = ("ip", "ipv4_addr") if family == "ip" else ("ip6", "ipv6_addr")
    dest = "10.0.0.1:80" if family == "ip" else "[fd00::1]:80"
    saddr = "10.0.0.0/8" if family == "ip" else "fd00::/64"
    t = f"{family} {PROBE_TABLE}"
    return "\n".join([
        f'add table {t} {{ comment "probe" ; }}',
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}",
        f"add chain {t} filter-input {{ type filter hook input priority 0 ; }}",
        f"add chain {t} endpoint",
        f"add chain {t} service",
        f"add set {t} affinity {{ type {addr} ; flags dynamic,timeout ; timeout 10800s ; }}",
        f'add map {t} service-ips {{ type {addr} . inet_proto . inet_service : verdict ; comment "probe" ; }}',
        f"add rule {t} endpoint {ip} saddr {saddr} mark set mark or 0x4000",
        f"add rule {t} endpoint update @affinity {{ {ip} saddr }}",
        f"add rule {t} endpoint meta l4proto tcp dnat to {dest}",
        f"add rule {t} service {ip} saddr @affinity goto endpoint",
        f"add rule {t} service numgen random mod 2 vmap {{ 0 : goto endpoint , 1 : goto endpoint }}",
        f"add rule {t} nat-prerouting {ip} daddr . meta l4proto . th dport vmap @service-ips",
        f"add rule {t} nat-prerouting fib daddr type local meta l4proto . th dport vmap {{ tcp . 30000 : goto "
        "service }",
        f"add rule {t} nat-postrouting mark and 0x4000 == 0 return",
        f"add rule {t} nat-postrouting masquerade fully-random",
        f'add rule {t} filter-input ct state new {ip} daddr {saddr} reject comment "probe"',
        f"add element {t} service-ips {{ {dest.rsplit(':', 1)[0].strip('[]')} . tcp . 80 : goto service }}",
        "",
    ])


def kernel_release_too_old(release: str) -> str | None:
    """kube-proxy's kernel check on `uname -r`: why the release is too old, or None."""
    match = re.match(r"(\d+)\.(\d+)", release)
    if match is None:
        return None  # unparseable: leave it to the probe
    if (int(match[1]), int(match[2])) < MIN_KERNEL:
        return (f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}, which kube-proxy's nftables mode "
                f"requires (set {SKIP_KERNEL_CHECK} to try anyway)")
    return None


def unsupported(nft: ChecksTransactions, release: str, skip_kernel_check: bool, families: tuple[str, ...] = ("ip",)
                ) -> str | None:
    """Why the nftables mode cannot run here, or None when it can."""
    if not skip_kernel_check and (reason := kernel_release_too_old(release)) is not None:
        return reason
    for family in families:
        if (refused := nft.probe(probe_transaction(family))) is not None:
            return f"the kernel refused the nftables mode's expressions ({family}): {refused}"
    return None
