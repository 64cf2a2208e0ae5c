"""Copiers: how a backup's content gets from the (snapshot of the) source into the backup.

``maildir`` (the default, for snapshots and live trees) and ``rsync`` (snapshots only) behind
one ``Copier`` Protocol. The pipeline asks ``make_copier`` and never knows which one it got.
"""

from __future__ import annotations

from collections.abc import Callable

from mailsnap.copiers.base import Copier, CopyStats, Previous
from mailsnap.copiers.maildir import MaildirCopier
from mailsnap.copiers.rsync import RsyncCopier
from mailsnap.errors import ConfigError
from mailsnap.runner import Runner

__all__ = ["Copier", "CopyStats", "MaildirCopier", "Previous", "RsyncCopier", "make_copier"]


def make_copier(
    kind: str, *, point_in_time: bool, runner: Runner, max_passes: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> Copier:
    """The job's copier. rsync is only safe on a frozen tree: a live view gets the Maildir
    copier's re-scanning walk. ``progress`` gets (files, bytes) as the copy goes."""
    if kind == "rsync":
        if not point_in_time:
            raise ConfigError("copier = 'rsync' needs a snapshot, and this job copies the live "
                              "tree (backend live, or auto on a plain directory): use copier "
                              "'maildir'")
        return RsyncCopier(runner, progress=progress)
    return MaildirCopier(runner, frozen=point_in_time, max_passes=max_passes,
                         progress=progress)
