"""Copiers: how a backup's content gets from the (snapshot of the) source into the backup.

``maildir`` (the default, for snapshots and live trees) and ``rsync`` (snapshots only) behind
one ``Copier`` Protocol. The pipeline asks ``make_copier`` and never knows which one it got.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from mailsnap.copiers.base import Copier, CopyStats, Previous
from mailsnap.errors import ConfigError
from mailsnap.runner import Runner

if TYPE_CHECKING:
    from mailsnap.copiers.maildir import MaildirCopier
    from mailsnap.copiers.rsync import RsyncCopier

__all__ = ["Copier", "CopyStats", "MaildirCopier", "Previous", "RsyncCopier", "make_copier"]


def make_copier(
    kind: str, *, point_in_time: bool, runner: Runner, max_passes: int = 10,
    progress: Callable[[int, int], None] | None = None,
    full_check_every: timedelta = timedelta(days=7), since_ns: int = 0,
) -> Copier:
    """The job's copier. rsync is only safe on a frozen tree: a live view gets the Maildir
    copier's re-scanning walk. ``progress`` gets (files, bytes) as the copy goes."""
    if kind == "rsync":
        if not point_in_time:
            raise ConfigError("copier = 'rsync' needs a snapshot, and this job copies the live "
                              "tree (backend live, or auto on a plain directory): use copier "
                              "'maildir'")
        from mailsnap.copiers.rsync import RsyncCopier  # only the job that uses it loads it

        return RsyncCopier(runner, progress=progress)
    from mailsnap.copiers.maildir import MaildirCopier

    return MaildirCopier(runner, frozen=point_in_time, max_passes=max_passes,
                         progress=progress, full_check_every=full_check_every,
                         since_ns=since_ns)


def __getattr__(name: str) -> Any:
    # The copier classes are imported when first asked for (start-up time, issue #9).
    if name == "MaildirCopier":
        from mailsnap.copiers.maildir import MaildirCopier

        return MaildirCopier
    if name == "RsyncCopier":
        from mailsnap.copiers.rsync import RsyncCopier

        return RsyncCopier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
