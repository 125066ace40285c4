"""Read a source once, to completion, into one snapshot: for commands that show state (`snapshot`,
`chains`, `inspect`) rather than run the agent."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from nodeagent.cluster.discovery.kubernetes import CORE_KINDS, MESH_KINDS, ApiConnection, KubernetesSource
from nodeagent.cluster.discovery.manifests import ManifestSource
from nodeagent.errors import NodeAgentError
from nodeagent.state.tracker import ChangeTracker, Snapshot

# What `snapshot`, `chains` and `inspect` judge a node by: IPv4 always, and IPv6 where the node's own Node object
# has an IPv6 address or pod CIDR (as the agent's IPv6 proxier starts), so a Service of a family the node cannot
# serve is shown as the rejection the agent would report, not listed as if it were programmed.
ONE_SHOT_FAMILIES = frozenset({4})


class SourceTimeout(NodeAgentError):
    """The API server did not deliver a complete list of every kind in time."""


def snapshot_of_manifests(directory: Path, node_name: str) -> Snapshot:
    """The snapshot a node named `node_name` would build from `directory`."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    tracker = ChangeTracker(node_name, families=ONE_SHOT_FAMILIES)
    ManifestSource(directory, tracker.apply).read()
    snapshot = tracker.snapshot()
    assert snapshot is not None  # a first read always makes the first snapshot
    return snapshot


def snapshot_of_cluster(kubeconfig: str | None, node_name: str, *, context: str | None = None,
                        timeout: float = 60.0) -> Snapshot:
    """List every kind from the API server (kubeconfig, or in-cluster config) and fold it into one snapshot."""
    changed = threading.Event()
    tracker = ChangeTracker(node_name, on_change=changed.set, families=ONE_SHOT_FAMILIES)
    kinds = CORE_KINDS + MESH_KINDS
    api = ApiConnection.from_config(kubeconfig, context)
    source = KubernetesSource(api, tracker.apply, node_name, kinds=kinds).start()
    try:
        deadline = time.monotonic() + timeout
        while not tracker.synced(kinds):
            if time.monotonic() > deadline:
                missing = [str(k) for k in kinds if not tracker.synced([k])]
                raise SourceTimeout(f"no complete list of {', '.join(missing)} within {timeout:.0f} s "
                                    "(see the log for the server's answers)")
            changed.wait(0.1)
            changed.clear()
    finally:
        source.stop()
        api.close()
    snapshot = tracker.snapshot()
    assert snapshot is not None
    return snapshot
