"""The command line: version, and errors that say what to do instead of a traceback."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from nodeagent import __version__
from nodeagent.cli import main


def test_version() -> None:
    result = CliRunner().invoke(main, ["version"])
    assert result.exit_code == 0 and result.output.strip() == f"nodeagent {__version__}"


def test_lab_up_with_a_bad_manifest_names_file_object_and_field(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/33}\n"
        "---\napiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n"
    )
    result = CliRunner().invoke(main, ["lab", "up", str(tmp_path), "--lab", "unitbad"])
    assert result.exit_code == 1
    assert f"{tmp_path / 'bad.yaml'}#0: Node n1: spec.podCIDR: not an IPv4 CIDR" in result.output
    assert f"{tmp_path / 'bad.yaml'}#1: Gadget g: kind: unknown kind 'Gadget'" in result.output
    assert "Traceback" not in result.output


def test_lab_name_is_validated_before_anything_else() -> None:
    result = CliRunner().invoke(main, ["lab", "down", "--lab", "Bad-Name"])
    assert result.exit_code == 1 and "invalid lab name 'Bad-Name'" in result.output


def test_lab_up_without_root_says_so(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    result = CliRunner().invoke(main, ["lab", "up", "--lab", "unitnoroot"])
    assert result.exit_code == 1
    assert "needs root: run it with sudo" in result.output


def test_a_daemon_that_cannot_start_says_why_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "root-cert.pem").write_text("root")
    result = CliRunner().invoke(main, ["ztunnel", "--node", "n1", "--manifests", str(tmp_path),
                                       "--ca-token-file", str(tmp_path / "token"),
                                       "--ca-root-file", str(tmp_path / "root-cert.pem")])
    assert result.exit_code == 1
    assert "Error: tunnel credentials: " in result.output and "Traceback" not in result.output


def test_every_command_group_is_registered_on_the_root() -> None:
    assert set(main.commands) == {"version", "doctor", "lab", "workload", "snapshot", "run", "ztunnel", "ca", "chains",
                                  "inspect", "trace", "cleanup", "compare-modes", "cni"}
