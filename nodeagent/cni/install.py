"""Installing nodeagent-cni on a node: the plugin into the CNI bin directory, its entry into the chain of the
configuration the runtime uses (`conflist`), and both out again on uninstall. Every file is written beside
its final path and renamed into place, so the runtime never reads half a file.

`watch` re-checks the chain on a period and puts the entry back when the network plugin rewrote its file
without it (Calico and Cilium rewrite theirs on upgrade), as istio-cni's install container keeps doing.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from nodeagent.cni import plugin
from nodeagent.cni.conflist import ConflistError, PluginSettings, chained, is_chained, primary, unchained

log = structlog.get_logger("nodeagent.cni.install")
PLUGIN_NAME = plugin.PLUGIN_TYPE
PYTHONS = ("usr/bin/python3", "usr/local/bin/python3", "bin/python3")


@dataclass(frozen=True)
class Paths:
    """Where the node keeps its CNI files (as mounted in the installing container) and its root."""

    conf_dir: Path
    bin_dir: Path
    host_root: Path = Path("/")  # the node's / as mounted here: its python3 runs the plugin


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    staged = path.with_name(f".{path.name}.nodeagent-tmp")
    staged.write_bytes(data)
    os.chmod(staged, mode)
    os.replace(staged, path)


def host_python(root: Path) -> Path | None:
    """The node's python3 (the plugin's interpreter: `#!/usr/bin/env python3`), if it has one."""
    return next((root / p for p in PYTHONS if (root / p).exists()), None)


def install(paths: Paths, settings: PluginSettings) -> Path:
    """Install the plugin and chain it into the runtime's configuration; the configuration file written.
    ConflistError when the node has no CNI configuration yet, or one the plugin cannot join."""
    if host_python(paths.host_root) is None:
        raise ConflistError(f"the node has no python3 under {paths.host_root} ({', '.join(PYTHONS)}): nodeagent-cni "
                            "runs on the node's own Python")
    paths.bin_dir.mkdir(parents=True, exist_ok=True)
    _write(paths.bin_dir / PLUGIN_NAME, Path(plugin.__file__).read_bytes(), 0o755)
    name = primary(p.name for p in paths.conf_dir.iterdir()) if paths.conf_dir.is_dir() else None
    if name is None:
        raise ConflistError(f"no CNI configuration in {paths.conf_dir} yet (the network plugin writes it)")
    source = paths.conf_dir / name
    out_name, text = chained(name, source.read_text(), settings)
    target = paths.conf_dir / out_name
    _write(target, text.encode())
    if target != source:
        source.unlink()  # a .conf became a .conflist: the runtime must not keep the unchained one first
    log.info("nodeagent-cni chained", config=str(target), plugin=str(paths.bin_dir / PLUGIN_NAME))
    return target


def uninstall(paths: Paths) -> list[Path]:
    """Take the plugin out of every configuration file that has it, and remove the binary; the files changed."""
    changed: list[Path] = []
    if paths.conf_dir.is_dir():
        for path in sorted(paths.conf_dir.iterdir()):
            if not path.name.endswith((".conf", ".conflist", ".json")) or path.name.startswith("."):
                continue
            try:
                text = unchained(path.name, path.read_text())
            except (ConflistError, OSError) as exc:
                log.warning("CNI configuration left as is", config=str(path), reason=str(exc))
                continue
            if text is not None:
                _write(path, text.encode())
                changed.append(path)
    binary = paths.bin_dir / PLUGIN_NAME
    if binary.exists():
        binary.unlink()
    log.info("nodeagent-cni removed", configs=[str(p) for p in changed])
    return changed


def chained_now(paths: Paths) -> bool:
    """Whether the runtime's configuration currently ends its chain with our plugin, and the binary is there."""
    name = primary(p.name for p in paths.conf_dir.iterdir()) if paths.conf_dir.is_dir() else None
    if name is None or not (paths.bin_dir / PLUGIN_NAME).exists():
        return False
    return is_chained(name, (paths.conf_dir / name).read_text())


def watch(paths: Paths, settings: PluginSettings, stop: threading.Event, period: float = 5.0) -> None:
    """Keep the plugin chained until `stop` is set: install at once (retrying until the network plugin has
    written its configuration), then repair whenever the chain lost our entry."""
    while not stop.is_set():
        try:
            if not chained_now(paths):
                install(paths, settings)
        except (ConflistError, OSError) as exc:
            log.warning("nodeagent-cni not chained yet", conf_dir=str(paths.conf_dir), reason=str(exc))
        stop.wait(period)


def copy_plugin_to(path: Path) -> Path:
    """Copy the plugin's file to `path` (executable): for a test or a lab that runs it like a runtime."""
    shutil.copyfile(plugin.__file__, path)
    os.chmod(path, 0o755)
    return path
