"""`nodeagent cleanup` and mode switches: remove the nftables mode's tables, and nothing else.

As kube-proxy's CleanupLeftovers (pkg/proxy/nftables/proxier.go): delete `table ip kube-proxy` and
`table ip6 kube-proxy`; a table that does not exist is not an error.
"""

from __future__ import annotations

from typing import Protocol

from nodeagent.service.nftables import names as n


class DeletesTables(Protocol):
    """`kernel.nftables.Nft`'s part cleanup needs."""

    def delete_table(self, family: str, table: str) -> bool:
        """Delete the table; False when there was none."""
        ...


def cleanup(nft: DeletesTables) -> list[str]:
    """Delete both families' `kube-proxy` tables; the ones removed ("table ip kube-proxy")."""
    return [f"table {family} {n.TABLE}" for family in ("ip", "ip6") if nft.delete_table(family, n.TABLE)]
