"""What every destination is: the job's own dated store, an SSH store, a restic repository.

A destination is a small class behind ``Destination``; the pipeline calls ``send`` after the
job's own backup is published, and the ``list``, ``verify``, ``prune`` and ``restore`` commands
call the rest. Adding a kind of destination never touches the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

from mailsnap.config import Retention
from mailsnap.retention import RetentionPolicy


@dataclass(frozen=True)
class Source:
    """What a destination reads for one run.

    ``tree`` is the snapshot mount (or the published local backup's ``mail/``). ``clean``: the
    tree is a published backup, so it holds no ``tmp/`` content and no lock file; otherwise
    the destination leaves them out itself. ``stable``: the path is the same every night (the
    snapshot's mount point), which restic needs to find its parent snapshot. ``local`` is the
    directory of the job's own backup of this run: its ``mailsnap.json`` and manifest describe
    the same content and go along where the destination can keep them.
    """

    tree: Path
    clean: bool
    stable: bool
    local: Path | None
    run_id: str
    excludes: tuple[str, ...]
    host: str


@dataclass(frozen=True)
class Stored:
    """One backup held by a destination."""

    id: str            # what names it there: a run id, or a restic snapshot id
    time: datetime     # when its run started (UTC)
    run_id: str | None  # the mailsnap run it came from
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sent:
    """How one send went: what was stored and what it cost."""

    id: str
    files: int | None = None
    bytes_sent: int | None = None   # bytes that crossed to the destination (new data)
    details: dict[str, Any] = field(default_factory=dict)


class Destination(Protocol):
    kind: ClassVar[str]
    name: str

    def where(self) -> str:
        """Where backups go, for logs (never a password)."""

    def send(self, source: Source) -> Sent:
        """Store ``source`` as one new backup. Raises ``DestinationFailed`` (or another
        ``MailsnapError``); leaves no half-made backup looking complete."""

    def backups(self) -> list[Stored]:
        """Complete backups held there, oldest first."""

    def remove(self, stored: list[Stored]) -> None:
        """Delete these backups (retention decided which). Idempotent after a crash."""

    def verify(self, stored: Stored, *, deep: bool) -> list[str]:
        """One line per problem found in ``stored``; none means intact."""

    def close(self) -> None:
        """Let go of what the calls above kept open (an SSH master connection)."""

    def fetch(self, stored: Stored, subdir: str, into: Path) -> Path:
        """Copy ``subdir`` (relative to the backup's mail tree, "" for all) of ``stored`` into
        ``into`` (an empty private directory) and return the local path of the backup's mail
        tree there, for the Maildir-aware restore."""


def policy(settings: Retention) -> RetentionPolicy:
    return RetentionPolicy(
        keep_last=settings.keep_last, keep_hourly=settings.keep_hourly,
        keep_daily=settings.keep_daily, keep_weekly=settings.keep_weekly,
        keep_monthly=settings.keep_monthly, keep_yearly=settings.keep_yearly,
        keep_within=settings.keep_within,
    )


@contextlib.contextmanager
def staging(base: Path) -> Iterator[Path]:
    """A private empty directory below ``base`` for fetched backup content, removed after."""
    import shutil
    import tempfile

    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="restore-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
