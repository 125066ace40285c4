"""`nodeagent doctor`."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def doctor(as_json: bool) -> None:
    """Check every prerequisite (kernel features, tools, bcc) and say how to fix what is missing."""
    from nodeagent.doctor import format_checks, run_all

    checks = run_all()
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        click.echo(format_checks(checks))
    sys.exit(0 if all(c.ok for c in checks) else 1)
