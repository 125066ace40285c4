"""Logs: structlog everywhere, JSON lines when stderr is not a terminal, readable key=value on one,
`--log-level` honoured, and no print() in the package (output goes through click or explicit writes)."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import structlog
from click.testing import CliRunner

from nodeagent.cli import main
from nodeagent.observability.logs import configure_logging

PACKAGE = Path(__file__).resolve().parents[3] / "nodeagent"


def test_a_broken_manifest_is_logged_as_json_naming_the_file_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: Service\nmetadata: [not, a, mapping\n")
    result = CliRunner().invoke(main, ["snapshot", "--manifests", str(tmp_path), "--node", "node1"])
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines, result.stderr
    assert any("bad.yaml" in json.dumps(line) for line in lines), lines
    assert all({"event", "level", "timestamp"} <= line.keys() for line in lines)


def test_log_level_filters_and_the_terminal_renderer_writes_key_value() -> None:
    stream = io.StringIO()
    configure_logging(json=False, level="warning")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=stream))
    log = structlog.get_logger("test")
    log.info("hidden", pod="demo/a")
    log.warning("shown", pod="demo/b")
    text = stream.getvalue()
    assert "hidden" not in text
    assert "shown" in text and "pod=demo/b" in text


def test_the_package_never_calls_print() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == []
