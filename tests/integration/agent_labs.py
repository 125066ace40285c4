"""A lab built from the default manifests plus extra documents, with agents on every node (shared by the
datapath lab tests)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml

from nodeagent.lab import lab as labs
from nodeagent.lab.agents import start_agents
from nodeagent.lab.manifests import load_default
from tests.integration.conftest import unique_lab_name


@contextmanager
def lab_with_agents(directory: Path, extra_yaml: str, mode: str, agent_args: Sequence[str] = (), *,
                    mesh: bool = False, capture: bool = True) -> Iterator[labs.Lab]:
    """Bring the lab up with agents in `mode` (and tunnels with `mesh`, the agents capturing enrolled
    pods unless not `capture`); always take it down."""
    documents = [dict(d.body) for d in load_default()] + list(yaml.safe_load_all(extra_yaml))
    (directory / "cluster.yaml").write_text(yaml.safe_dump_all(documents))
    name = unique_lab_name()
    labs.up(name, directory)
    try:
        yield start_agents(name, mode, extra=agent_args, mesh=mesh, capture=capture)
    finally:
        labs.down(name)
