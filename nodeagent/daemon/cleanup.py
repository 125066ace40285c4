"""`nodeagent cleanup` assembled: remove what any datapath and the mesh created on a node (eBPF
attachments and pins, the nftables mode's tables, iptables chains and jumps as kube-proxy --cleanup, the mesh
capture of each pod namespace and the node's probe SNAT), nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nodeagent.errors import NodeAgentError
from nodeagent.kernel.bpf import loader, tc
from nodeagent.kernel.netfilter import Iptables, detect_backend, legacy_tables_exist
from nodeagent.kernel.nftables import Nft
from nodeagent.kernel.podnetns import candidates
from nodeagent.mesh.capture import CaptureStatus
from nodeagent.mesh.ebpf.kubelet import detach_from_pods
from nodeagent.mesh.iptables.apply import live_state, remove_capture, remove_probe_snat
from nodeagent.service.iptables import cleanup as iptables_cleanup
from nodeagent.service.nftables import cleanup as nftables_cleanup


class CleanupError(NodeAgentError):
    """A part could not be removed; the message names the part ("cleanup (ebpf): …")."""


@dataclass(frozen=True)
class CleanupOptions:
    """The flags of `nodeagent cleanup`."""

    iptables_backend: str = "both"  # auto, nft, legacy, or both (nft, and legacy where it has tables)
    netns: str | None = None  # a node network namespace (None: this one)
    bpf_scope: str = "host"
    cgroup: Path | None = None  # the cgroup the eBPF programs were attached to (None: detach none)
    pod_netns_dir: Path = Path("/run/netns")
    pod_netns_prefix: str = ""


def cleanup(options: CleanupOptions) -> Iterator[str]:
    """Remove everything, saying each removal ("removed (ebpf) …", "removed (nftables) table ip kube-proxy",
    "removed (nft) …") as it is done.
    Raises CleanupError at the first part that cannot be removed."""
    netns = options.netns
    try:
        detached = loader.detach(options.cgroup) if options.cgroup is not None else []
        # The mesh's eBPF capture on the kubelet's pod cgroups below the same root (a real node's layout).
        detached += detach_from_pods(options.cgroup) if options.cgroup is not None else []
        for line in detached + tc.detach_tc(netns=netns) + loader.remove_pins(options.bpf_scope):
            yield f"removed (ebpf) {line}"
    except (NodeAgentError, OSError) as exc:
        raise CleanupError(f"cleanup (ebpf): {exc}") from exc
    try:
        removed_tables = nftables_cleanup.cleanup(Nft(netns))
    except (NodeAgentError, OSError) as exc:
        raise CleanupError(f"cleanup (nftables): {exc}") from exc
    for line in removed_tables:
        yield f"removed (nftables) {line}"

    if options.iptables_backend == "both":
        backends = ["nft"] + (["legacy"] if legacy_tables_exist(netns) else [])
    else:
        backends = [detect_backend(netns) if options.iptables_backend == "auto" else options.iptables_backend]
    for backend in backends:
        try:
            removed = iptables_cleanup.cleanup(Iptables(backend, netns))
        except (NodeAgentError, OSError) as exc:
            raise CleanupError(f"cleanup ({backend}): {exc}") from exc
        for line in removed:
            yield f"removed ({backend}) {line}"
        yield from _cleanup_ipv6(backend, netns)
    yield from _cleanup_mesh(backends, options)


def _cleanup_ipv6(backend: str, netns: str | None) -> Iterator[str]:
    """The IPv6 proxier's ip6tables state, where there is any (kube-proxy --cleanup cleans both families); a node
    whose IPv6 proxier never ran is not touched (legacy ip6tables: not even read, which would load its tables)."""
    ipt = Iptables(backend, netns, ipv6=True)
    try:
        if backend == "legacy" and not legacy_tables_exist(netns, ipv6=True):
            return
        if not iptables_cleanup.has_our_chains(ipt):
            return
        removed = iptables_cleanup.cleanup(ipt)
    except (NodeAgentError, OSError) as exc:
        raise CleanupError(f"cleanup ({backend}, IPv6): {exc}") from exc
    for line in removed:
        yield f"removed ({backend}, IPv6) {line}"


def _cleanup_mesh(backends: list[str], options: CleanupOptions) -> Iterator[str]:
    """The mesh capture of every pod namespace that holds one, then the node's probe SNAT."""
    node = f"/run/netns/{options.netns}" if options.netns else None
    for backend in backends:
        try:
            for path in candidates(options.pod_netns_dir, options.pod_netns_prefix):
                if str(path) == node:
                    continue
                if live_state(str(path), backend=backend).status is not CaptureStatus.ABSENT:
                    remove_capture(str(path), backend=backend, pod=path.name)
                    yield f"removed ({backend}) mesh capture in {path}"
            remove_probe_snat(node, backend=backend)
        except (NodeAgentError, OSError) as exc:
            raise CleanupError(f"cleanup (mesh, {backend}): {exc}") from exc
