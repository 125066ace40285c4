"""`nodeagent ztunnel --workers`: a positive count or `auto`, from the flag or NODEAGENT_ZTUNNEL_WORKERS."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from nodeagent.cli import main
from nodeagent.cli.ztunnel import WORKERS


def test_workers_take_a_positive_count_or_auto() -> None:
    assert WORKERS.convert("auto", None, None) is None
    assert WORKERS.convert("AUTO", None, None) is None
    assert WORKERS.convert("3", None, None) == 3
    assert WORKERS.convert(2, None, None) == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(click.BadParameter):
            WORKERS.convert(bad, None, None)


def test_a_bad_worker_count_is_refused_before_anything_starts() -> None:
    result = CliRunner().invoke(main, ["ztunnel", "--node", "n1", "--ca-token-file", "t", "--ca-root-file", "r"],
                                env={"NODEAGENT_ZTUNNEL_WORKERS": "0"})
    assert result.exit_code == 2 and "'0' is not a positive number of workers" in result.output
