"""The copier contract and what a copy reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol


@dataclass
class CopyStats:
    """What one copy did. ``linked`` files are hard links to the previous backup (unchanged);
    ``passes`` > 1 only for the live copier, which re-scans until nothing new turns up."""

    files: int = 0
    bytes: int = 0
    linked: int = 0
    passes: int = 1
    vanished: int = 0  # live copier: expunged between listing and reading
    moved: int = 0  # live copier: moved to another folder during the copy (kept once)


class Copier(Protocol):
    name: ClassVar[str]

    def copy(
        self,
        source: Path,
        dest: Path,
        *,
        previous: Path | None,
        excludes: Sequence[str],
        watch: Callable[[], None] | None = None,
    ) -> CopyStats:
        """Copy the tree at ``source`` into ``dest`` (an existing empty directory).

        ``previous`` is the same tree in the last published backup: files unchanged since then
        become hard links to it. ``excludes`` are rsync-style patterns. ``watch`` is called
        periodically during the copy and may raise to abort it (snapshot went invalid).
        Dry run: reads, writes nothing, and reports what it would copy where it can.
        Raises ``CopyFailed``; a partial ``dest`` is the caller's to discard.
        """
        ...
