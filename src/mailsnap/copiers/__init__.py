"""Copiers: how a backup's content gets from the (snapshot of the) source into the backup.

``rsync`` for point-in-time snapshots, ``maildir`` (the live copier) for a live tree. The pipeline
asks ``make_copier`` and never knows which one it got.
"""

from __future__ import annotations

from collections.abc import Callable

from mailsnap.copiers.base import Copier, CopyStats
from mailsnap.copiers.maildir import MaildirCopier
from mailsnap.copiers.rsync import RsyncCopier
from mailsnap.runner import Runner

__all__ = ["Copier", "CopyStats", "MaildirCopier", "RsyncCopier", "make_copier"]


def make_copier(
    *, point_in_time: bool, runner: Runner, max_passes: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> Copier:
    """rsync is only safe on a frozen tree; a live tree needs the Maildir-aware copier.
    ``progress`` gets (files, bytes) as the copy goes."""
    if point_in_time:
        return RsyncCopier(runner, progress=progress)
    return MaildirCopier(runner, max_passes=max_passes, progress=progress)
