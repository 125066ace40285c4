"""Chaining nodeagent-cni into the node's CNI configuration, and taking it out again (pure: text in, text out).

The runtime uses the first configuration file of its directory in lexical order (`.conf`, `.conflist` or
`.json`), as libcni's `ConfFiles`/`LoadConfList` pick it. The plugin goes last in that file's `plugins`
list, after the network plugin, as istio-cni's install does (`cni/pkg/install`); a single-plugin `.conf`
becomes a `.conflist` holding it and ours. Inserting is idempotent (an existing entry of ours is replaced
by the wanted one), and removing leaves the file as the network plugin wrote it, less our entry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nodeagent.errors import NodeAgentError

CONFIG_SUFFIXES = (".conf", ".conflist", ".json")
# The plugin's (nodeagent.cni.plugin runs on the node's Python and imports nothing of ours; deciding stays
# apart from its HTTP client, so the two are kept equal by a test).
PLUGIN_TYPE = "nodeagent-cni"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


class ConflistError(NodeAgentError):
    """The node's CNI configuration cannot take the plugin (unreadable, or of an unsupported version)."""


@dataclass(frozen=True)
class PluginSettings:
    """Our entry in the chain."""

    agent_socket: str
    timeout: float
    on_agent_unreachable: str

    def entry(self) -> dict[str, Any]:
        """The plugin's configuration object, as it appears in `plugins`."""
        return {"type": PLUGIN_TYPE, "agentSocket": self.agent_socket, "timeoutSeconds": self.timeout,
                "onAgentUnreachable": self.on_agent_unreachable}


def primary(names: Iterable[str]) -> str | None:
    """The configuration file the runtime uses: the first CNI configuration file name in lexical order."""
    candidates = sorted(n for n in names if n.endswith(CONFIG_SUFFIXES) and not n.startswith("."))
    return candidates[0] if candidates else None


def _load(name: str, text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConflistError(f"{name}: not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ConflistError(f"{name}: not a JSON object")
    return document


def chained(name: str, text: str, settings: PluginSettings) -> tuple[str, str]:
    """(file name, text) of the configuration with our plugin last in its chain. A `.conf` (one plugin)
    comes back as a `.conflist` of the same stem; the caller removes the old file."""
    document = _load(name, text)
    if "plugins" in document:
        plugins = document["plugins"]
        if not isinstance(plugins, list) or not all(isinstance(p, dict) for p in plugins):
            raise ConflistError(f"{name}: plugins is not a list of objects")
        out_name = name
    else:
        if "type" not in document:
            raise ConflistError(f"{name}: neither a plugin (type) nor a list of them (plugins)")
        # A single plugin's configuration: its name and version move to the list, the rest is the plugin.
        plugin = {k: v for k, v in document.items() if k not in ("cniVersion", "name")}
        document = {"cniVersion": document.get("cniVersion", "0.3.1"), "name": document.get("name", "k8s-pod-network"),
                    "plugins": [plugin]}
        plugins = document["plugins"]
        out_name = name.rsplit(".", 1)[0] + ".conflist"
    version = document.get("cniVersion", "")
    if version not in SUPPORTED_VERSIONS:
        raise ConflistError(f"{name}: cniVersion {version!r} is not one nodeagent-cni speaks "
                            f"({', '.join(SUPPORTED_VERSIONS)})")
    kept = [p for p in plugins if p.get("type") != PLUGIN_TYPE]
    document["plugins"] = [*kept, settings.entry()]
    return out_name, json.dumps(document, indent=2) + "\n"


def unchained(name: str, text: str) -> str | None:
    """The configuration without our plugin; None when it holds no entry of ours (nothing to write)."""
    document = _load(name, text)
    plugins = document.get("plugins")
    if not isinstance(plugins, list) or not any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE
                                                for p in plugins):
        return None
    document["plugins"] = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    return json.dumps(document, indent=2) + "\n"


def is_chained(name: str, text: str) -> bool:
    """Whether the configuration's chain ends with our plugin (what a watch checks)."""
    try:
        plugins = _load(name, text).get("plugins")
    except ConflistError:
        return False
    return isinstance(plugins, list) and bool(plugins) and isinstance(plugins[-1], dict) \
        and plugins[-1].get("type") == PLUGIN_TYPE
