"""The ``mailsnap`` command line: one module per command group, all on one typer ``app``.
``cli/app.py`` holds the shared options and the one place errors become exit codes.
"""

from __future__ import annotations

# Importing a command module registers its commands on ``app``.
from mailsnap.cli import (  # noqa: F401
    backup,
    cleanup,
    inspect,
    prune,
    restore,
    snapshot,
    status,
    verify,
)
from mailsnap.cli.app import app, main

__all__ = ["app", "main"]
