"""Where a daemon's cluster objects come from: the Kubernetes API (kubeconfig, or in-cluster) or a directory of
manifests. One factory for the agent, the tunnel and the CA, so each picks the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nodeagent.cluster.events import Sink
from nodeagent.cluster.model import Kind


class Source(Protocol):
    """A source of cluster objects (KubernetesSource, ManifestSource) feeding the sink it was made with."""

    def start(self) -> object:
        """Begin delivering events."""
        ...

    def stop(self) -> None:
        """Stop delivering events."""
        ...


@dataclass(frozen=True)
class SourceOptions:
    """The source flags: `manifests` wins; else the API server of `kubeconfig` (in-cluster config without)."""

    manifests: Path | None = None
    kubeconfig: str | None = None
    context: str | None = None


def source_factory(options: SourceOptions, node: str, *, all_pods: bool = False,
                   kinds: tuple[Kind, ...] | None = None) -> Callable[[Sink], Source]:
    """A maker of the chosen source for `node` (the Kubernetes API is connected to only when it is called).
    `all_pods`: every node's pods, not only this node's; `kinds`: what to watch (the source's default without)."""

    def make(sink: Sink) -> Source:
        if options.manifests is not None:
            from nodeagent.cluster.discovery.manifests import ManifestSource

            return ManifestSource(options.manifests, sink)
        from nodeagent.cluster.discovery.kubernetes import ApiConnection, KubernetesSource

        api = ApiConnection.from_config(options.kubeconfig, options.context)
        if kinds is None:
            return KubernetesSource(api, sink, node, all_pods=all_pods)
        return KubernetesSource(api, sink, node, all_pods=all_pods, kinds=kinds)

    return make
