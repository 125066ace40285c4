"""Reading Kubernetes YAML manifests for the lab: files of a directory, or the built-in default.

Only reading lives here; what the documents mean is decided in `topology`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nodeagent.lab.errors import LabManifestError, ManifestProblem

DEFAULT_MANIFESTS = "built-in default"


@dataclass(frozen=True)
class Document:
    """One Kubernetes object as written, with where it came from (for error messages)."""

    source: str
    body: Mapping[str, Any]


def load_directory(directory: Path) -> list[Document]:
    """Every document of every *.yaml / *.yml / *.json file of `directory` (not recursive), in name order."""
    if not directory.is_dir():
        raise LabManifestError([ManifestProblem(str(directory), "-", "-", "not a directory")])
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
    if not files:
        raise LabManifestError([ManifestProblem(str(directory), "-", "-", "no *.yaml, *.yml or *.json files")])
    documents: list[Document] = []
    problems: list[ManifestProblem] = []
    for path in files:
        try:
            documents.extend(parse_text(path.read_text(), str(path)))
        except LabManifestError as exc:
            problems.extend(exc.problems)
    if problems:
        raise LabManifestError(problems)
    return documents


# Makes a lab dual-stack (IPv4 stays the primary family): an IPv6 service CIDR, hence IPv6 node addresses, pod
# CIDRs and pod addresses from the lab's IPv6 defaults (`nodeagent.lab.topology`), mirroring the IPv4 ones.
DUAL_STACK_CONFIG = """apiVersion: lab.nodeagent.io/v1alpha1
kind: LabConfig
metadata: {name: dual-stack}
spec:
  nodeCIDR: 172.18.0.0/24,fd00:18::/64
  serviceCIDR: 10.96.0.0/12,fd00:10:96::/112
"""
# The dual-stack default lab's demo Service (`lab demo --dual-stack` reaches it over each family): an echo pod
# on node2 in a namespace outside the mesh, so the answers show the agents' datapath of each family alone.
DUAL_STACK_DEMO_SERVICE = """apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: plain, labels: {app: echo-dual}}
spec:
  nodeName: node2
  containers:
  - name: echo
    command: [nodeagent, workload, serve, --port, "8080"]
    ports: [{name: http, containerPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-dual, namespace: plain}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {app: echo-dual}
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
"""


def load_default(dual_stack: bool = False) -> list[Document]:
    """The default lab: two nodes, a client, a two-replica server, a ClusterIP and a NodePort Service; with
    `dual_stack`, the same with IPv6 beside IPv4 (`DUAL_STACK_CONFIG`) and `DUAL_STACK_DEMO_SERVICE`."""
    text = resources.files("nodeagent.lab").joinpath("default/cluster.yaml").read_text()
    documents = list(parse_text(text, DEFAULT_MANIFESTS))
    if dual_stack:
        documents.extend(parse_text(DUAL_STACK_CONFIG + "---\n" + DUAL_STACK_DEMO_SERVICE,
                                    f"{DEFAULT_MANIFESTS} (dual-stack)"))
    return documents


def parse_text(text: str, source: str) -> Iterator[Document]:
    """Split a multi-document YAML text into documents, flattening `kind: List`."""
    try:
        bodies = [b for b in yaml.safe_load_all(text) if b is not None]
    except yaml.YAMLError as exc:
        raise LabManifestError([ManifestProblem(source, "-", "-", f"not valid YAML: {exc}")]) from exc
    for index, body in enumerate(bodies):
        where = f"{source}#{index}"
        if not isinstance(body, Mapping):
            raise LabManifestError([ManifestProblem(where, "-", "-", "a document must be a mapping")])
        if body.get("kind") == "List":
            items = body.get("items") or []
            if not isinstance(items, list):
                raise LabManifestError([ManifestProblem(where, "List", "items", "must be a list")])
            for item_index, item in enumerate(items):
                if not isinstance(item, Mapping):
                    raise LabManifestError(
                        [ManifestProblem(f"{where}.items[{item_index}]", "-", "-", "must be a mapping")]
                    )
                yield Document(f"{where}.items[{item_index}]", item)
        else:
            yield Document(where, body)
