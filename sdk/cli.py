"""`retrieval-sdk` command line: the app and the explicit list of command modules that register on it.

Each command module imports only typer and sdk.cli_errors at import time (training, export, torch and
the server load inside the commands), so `import sdk.cli` stays torch-free and the module graph has
no cycle: sdk.cli -> sdk.cli_<group> -> sdk.cli_errors.
"""

from __future__ import annotations

import importlib

import typer

# One more command group = one more module with a `register(app)` function, listed here.
COMMAND_MODULES = ("sdk.cli_train", "sdk.cli_export", "sdk.cli_serve", "sdk.cli_evaluate", "sdk.cli_doctor")

app = typer.Typer(
    help="Asymmetric image retrieval for mobile: gallery models in the cloud, a light query model on the phone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


@app.command()
def version() -> None:
    """Print the installed version."""
    from sdk import __version__

    typer.echo(__version__)


if __name__ == "__main__":  # pragma: no cover
    app()
