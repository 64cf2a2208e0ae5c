"""The copier contract and what a copy reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from mailsnap.manifest import MANIFEST_FILE, Summary

if TYPE_CHECKING:
    from mailsnap.store import Backup


@dataclass(frozen=True)
class Previous:
    """The last published backup, as a copy links against it: its ``mail/`` tree and its
    manifest (which an rsync-made or older backup does not have)."""

    content: Path
    manifest: Path
    # The copy's destination already holds a writable snapshot of this backup
    # (``target_snapshots``): the copy changes it into the new backup instead of linking.
    in_place: bool = False
    # Its sha256 as recorded in the backup's mailsnap.json (none from older backups): the
    # manifest is trusted by it instead of being decompressed whole.
    manifest_sha256: str | None = None

    @classmethod
    def of(cls, backup: Backup, *, in_place: bool = False) -> Previous:
        """What a copy needs of a published backup to link against it."""
        return cls(backup.content, backup.path / MANIFEST_FILE, in_place=in_place,
                   manifest_sha256=backup.manifest_sha256)


@dataclass
class CopyStats:
    """What one copy did. ``linked`` files are hard links to the previous backup (unchanged);
    ``passes`` > 1 only for a live copy, which re-scans until nothing new turns up.
    ``messages`` is counted by a copier that knows (the Maildir copier), else None and the
    pipeline counts the finished backup. ``summary`` is what the manifest says was copied,
    linked and renamed (``None`` for rsync, which writes no manifest)."""

    files: int = 0
    bytes: int = 0
    linked: int = 0
    passes: int = 1
    vanished: int = 0  # live copy: expunged between listing and reading
    moved: int = 0  # live copy: moved to another folder during the copy (kept once)
    messages: int | None = None
    summary: Summary = field(default_factory=Summary)
    manifest_sha256: str | None = None  # of the manifest file, once written complete

    @property
    def manifest(self) -> bool:
        """A complete manifest was written."""
        return self.manifest_sha256 is not None


class Copier(Protocol):
    name: ClassVar[str]

    def copy(
        self,
        source: Path,
        dest: Path,
        *,
        previous: Previous | None,
        excludes: Sequence[str],
        watch: Callable[[], None] | None = None,
        manifest: Path | None = None,
    ) -> CopyStats:
        """Copy the tree at ``source`` into ``dest`` (an existing empty directory).

        ``previous`` is the last published backup: what it holds unchanged becomes hard links
        to it. ``excludes`` are rsync-style patterns. ``watch`` is called periodically during
        the copy and may raise to abort it (snapshot went invalid). ``manifest`` is where a
        copier that writes a manifest puts it.
        Dry run: reads, writes nothing, and reports what it would copy where it can.
        Raises ``CopyFailed``; a partial ``dest`` is the caller's to discard.
        """
        ...
