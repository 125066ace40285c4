"""Errors of the lab, grouped by what the caller can do about them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nodeagent.errors import NodeAgentError


class LabError(NodeAgentError):
    """Root of every error the lab raises."""


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with one object of a lab manifest: where it is, which field, and why."""

    source: str
    obj: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.obj}: {self.field}: {self.message}"


class LabManifestError(LabError):
    """The manifests describe a lab that cannot be built; nothing was created."""

    def __init__(self, problems: Iterable[ManifestProblem]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the lab manifests, nothing was created:\n{lines}")


class LabExistsError(LabError):
    """A lab of that name is already up (or left over from a crash)."""


class LabNotFoundError(LabError):
    """No lab of that name is recorded."""


class LabEnvironmentError(LabError):
    """The machine cannot host a lab: not root, or a kernel feature is missing."""


class LabBuildError(LabError):
    """Creating the lab failed halfway; what had been created was removed again."""
