"""CLI commands: `retrieval-sdk export` and `verify` (issue P2). Registered on sdk.cli.app; heavy imports stay inside the commands."""

from __future__ import annotations

from sdk.cli import app  # noqa: F401
