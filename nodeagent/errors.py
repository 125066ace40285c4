"""The root of nodeagent's own errors.

Every error a nodeagent module raises on purpose (bad input, a kernel that refuses, a peer that breaks the
protocol) derives from `NodeAgentError`, so a caller that reports and goes on (the CLI, a reconciler's
pass) catches one class instead of a tuple that falls behind as modules are added. `OSError` and the like
still reach callers as they are: they are the machine's, not ours.
"""

from __future__ import annotations


class NodeAgentError(Exception):
    """An error nodeagent raises on purpose, with a message that names the object and what is wrong."""
