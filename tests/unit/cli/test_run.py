"""`nodeagent run`'s proxy flags: kube-proxy's names, parsed before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from nodeagent.cli import main


@pytest.mark.parametrize(("args", "message"), [
    (["--nodeport-addresses", "primary,10.0.0.0/8"], "can't use both 'primary' and CIDRs"),
    (["--iptables-masquerade-bit", "-1"], "0<=x<=31"),
    (["--iptables-localhost-nodeports", "maybe"], "'maybe' is not a valid boolean"),
    (["--bind-address", "::g"], "'::g' is not an IP address"),
])
def test_bad_proxy_flags_stop_run_before_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                   message: str) -> None:
    def never(options: object) -> int:
        raise AssertionError(f"run started with {options}")  # it would program this machine

    monkeypatch.setattr("nodeagent.daemon.run.run", never)
    result = CliRunner().invoke(main, ["run", "--manifests", str(tmp_path), "--node", "n1", *args])
    assert result.exit_code == 2 and message in result.output, result.output
