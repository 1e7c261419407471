"""`retrieval-sdk doctor`: the environment check (sdk/doctor.py) as a command."""

from __future__ import annotations

import typer


def doctor() -> None:
    """Check every part this install needs (packages, runtimes, system libraries, browser, data) and
    print the exact fix for each one that is missing; exit 1 if a part of an installed extra is missing."""
    from sdk.doctor import report, run_checks

    text, code = report(run_checks())
    typer.echo(text)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(doctor)
