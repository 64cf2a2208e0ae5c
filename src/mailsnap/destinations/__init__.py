"""The explicit registry of destinations (see ``base.py`` for the protocol).

Adding a kind: write a class that satisfies ``Destination``, add it to ``KINDS`` and give it a
config model in ``config.py``. The pipeline never changes.
"""

from __future__ import annotations

from typing import Any

from mailsnap.config import Job
from mailsnap.destinations.base import Destination, Sent, Source, Stored
from mailsnap.errors import ConfigError
from mailsnap.runner import Runner

__all__ = ["Destination", "Sent", "Source", "Stored", "make_destination"]


def make_destination(job: Job, settings: Any, runner: Runner) -> Destination:
    """The destination ``settings`` (one [[job.destination]] table) of ``job``. Each kind's
    module is imported when a job has one, not by every run."""
    if settings.type == "ssh":
        from mailsnap.destinations.ssh import SshStore

        return SshStore(job, settings, runner)
    if settings.type == "restic":
        from mailsnap.destinations.restic import ResticRepository

        return ResticRepository(job, settings, runner)
    if settings.type == "local":
        from mailsnap.destinations.local import LocalStore

        return LocalStore(job, settings, runner)
    raise ConfigError(f"destination {settings.name!r}: unknown type {settings.type!r}")
