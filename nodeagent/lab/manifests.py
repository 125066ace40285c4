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


def load_default() -> list[Document]:
    """The default lab: two nodes, a client, a two-replica server, a ClusterIP and a NodePort Service."""
    text = resources.files("nodeagent.lab").joinpath("default/cluster.yaml").read_text()
    return list(parse_text(text, DEFAULT_MANIFESTS))


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
