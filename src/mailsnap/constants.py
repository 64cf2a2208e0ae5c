"""Names the CLI needs to declare its options and help text, in a module that imports nothing
heavy: ``mailsnap --help`` and ``--version`` show them without loading pydantic and the
config models (``mailsnap.config`` validates against the same values)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = Path("/etc/mailsnap.toml")
# The ``backend`` values a job may name; each is the tag of one job model in mailsnap.config.
BACKEND_NAMES = ("auto", "btrfs", "lvm", "zfs", "live")
