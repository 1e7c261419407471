"""How the CLI reports errors: a user error (the packages' error bases, a missing file or extra) is one
line naming the fix; anything else is a bug and keeps its traceback. Imports nothing heavy."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from sdk.errors import SdkError

# The other packages' error bases, looked up only once their package is loaded (sdk never imports them).
PACKAGE_ERRORS = (("export.errors", "ExportError"), ("training.errors", "TrainingError"))
TRAIN_PACKAGES = ("torch", "timm", "torchvision", "scipy")
REPORT_PACKAGES = ("matplotlib",)  # `retrieval-sdk evaluate`'s plots


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on stderr and exit with `code`."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def require_folders(flag: str, *folders: Path | None, expected: str = "") -> None:
    """fail() naming `flag` unless every given folder (None: not given) is a directory."""
    for folder in folders:
        if folder is not None and not folder.is_dir():
            fail(f"{flag} {folder} is not a folder{expected}")


def user_error_types() -> tuple[type[BaseException], ...]:
    """SdkError, plus ExportError / TrainingError when their package is loaded, plus a missing file."""
    loaded = [getattr(sys.modules[m], name) for m, name in PACKAGE_ERRORS if m in sys.modules]
    return (SdkError, FileNotFoundError, *loaded)


@contextmanager
def user_errors(interrupted: str | None = None) -> Iterator[None]:
    """Turn the errors a user can fix into one line (exit 2); `interrupted`: the line for Ctrl-C."""
    try:
        yield
    except ModuleNotFoundError as e:
        extra = "train" if e.name in TRAIN_PACKAGES else "report" if e.name in REPORT_PACKAGES else "all"
        fail(f"missing package '{e.name}': install the extra with  pip install 'retrieval-sdk[{extra}]'")
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        fail(interrupted, code=130)
    except Exception as e:  # noqa: BLE001  (re-raised unless it is a user error)
        if not isinstance(e, user_error_types()):
            raise
        fail(str(e))
