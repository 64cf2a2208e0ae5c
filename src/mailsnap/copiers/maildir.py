"""The Maildir copier: rename-aware incremental copies of a snapshot or of a live tree.

rsync matches files by path, so every flag change (``cur/NAME:2,S`` → ``cur/NAME:2,RS``),
every ``new/``→``cur/`` move and every folder move is copied again in full. This copier keys a
message by its base name (before ``:2,``) and size within its mailbox (the user's Maildir root
and all its folders), so those become hard links to the previous backup, and it writes a
manifest per backup (``mailsnap.manifest``) that the next run reads instead of listing the
previous backup. A snapshot is copied in one pass (``copiers.frozen``); a live tree with
re-scans that find renamed and moved messages again (``copiers.live``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
from datetime import timedelta
import logging
from pathlib import Path
import shutil
import time
from typing import TYPE_CHECKING, Any, ClassVar

from mailsnap.copiers.base import CopyStats, Previous
from mailsnap.copiers.changes import excludes_fingerprint, plan_folders
from mailsnap.copiers.excludes import ExcludeMatcher
from mailsnap.copiers.files import base_name
from mailsnap.manifest import ManifestWriter, PreviousManifest
from mailsnap.runner import Runner

if TYPE_CHECKING:
    from mailsnap.copiers.live import vanished_is_abnormal

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class MaildirCopier:
    name: ClassVar[str] = "maildir"

    def __init__(self, runner: Runner, *, frozen: bool = False, max_passes: int = 10,
                 quiet_passes: int = 2, progress: Progress | None = None,
                 full_check_every: timedelta = timedelta(days=7), since_ns: int = 0) -> None:
        self.runner = runner
        self.full_check_every = full_check_every
        # No later than the instant the source is copied as of (0: the copy's own start):
        # see mailsnap.copiers.changes.
        self.since_ns = since_ns
        self.frozen = frozen
        self.max_passes = max_passes
        self.quiet_passes = quiet_passes
        # Called with (files, bytes) so far, a few times a second.
        self.progress = progress

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
        """Copy ``source`` into ``dest`` and write ``manifest``, linking what ``previous``
        already holds according to its manifest. A previous backup without a usable manifest
        (made by rsync or an older mailsnap, or damaged) is not linked against at all: the copy
        is a full one, with a warning, rather than a link made on a guess.

        Dry run: reads the source where it is there (a snapshot is not mounted in a dry run),
        writes nothing, and counts what it would copy and link.
        """
        dry_run = self.runner.dry_run
        if dry_run and not source.is_dir():
            log.info("[dry-run] %s is not mounted: nothing to read", source)
            return CopyStats(messages=None)
        started_ns = time.time_ns()
        with contextlib.ExitStack() as stack:
            earlier = self._previous_manifest(previous, keep=not self.frozen)
            if earlier is not None:
                stack.callback(earlier.close)
            in_place = previous is not None and previous.in_place and not dry_run
            if in_place and earlier is None:
                # The snapshot of the previous backup cannot be checked against a manifest:
                # start from an empty tree rather than keep a file on a guess.
                log.warning("emptying %s: the previous backup it is a snapshot of has no "
                            "usable manifest, so this backup is a full copy", dest)
                shutil.rmtree(dest)
                dest.mkdir(mode=0o700)
                in_place = False
            fingerprint = excludes_fingerprint(excludes)
            plan = plan_folders(earlier.end_fields if earlier is not None else None,
                                self.full_check_every, started_ns, fingerprint)
            log.info("folders: %s", plan.reason)
            writer = None
            if manifest is not None and not dry_run:
                writer = ManifestWriter(manifest)
                stack.callback(writer.abort)
            linked_to = previous.content if earlier is not None and previous else None
            matcher = ExcludeMatcher(excludes)
            # Each walk is imported by the run that uses it: a snapshot's backup never loads
            # the live copier, nor a live one the snapshot copier (start-up time, issue #9).
            if self.frozen:
                from mailsnap.copiers.frozen import FrozenCopy
            else:
                from mailsnap.copiers.live import LiveCopy
            stats = (
                FrozenCopy(source, dest, previous=linked_to, previous_manifest=earlier,
                           manifest=writer, excludes=matcher, dry_run=dry_run, watch=watch,
                           progress=self.progress, folders=plan.times,
                           in_place=in_place, check_every_file=plan.times is None).run()
                if self.frozen else
                LiveCopy(source, dest, previous=linked_to, previous_manifest=earlier,
                         manifest=writer, excludes=matcher, dry_run=dry_run, watch=watch,
                         progress=self.progress, max_passes=self.max_passes,
                         quiet_passes=self.quiet_passes, folders=plan.times).run()
            )
            if earlier is not None and earlier.damaged:
                log.warning("%s; the rest of this backup was copied, not linked",
                            earlier.damaged)
            if writer is not None:
                # A lower bound of when this copy saw the source: a snapshot is older than
                # the copy, a live tree is read from the copy's start on.
                writer.end_fields = {
                    "listed_before": min(self.since_ns or started_ns, started_ns),
                    "full_check": plan.full_check,
                    "excludes": fingerprint,
                }
                stack.pop_all()
                if earlier is not None:
                    earlier.close()
                writer.close()
                stats.manifest_sha256 = writer.sha256
        summary = stats.summary
        summary.files = stats.files
        log.info(
            "%d files: %d copied, %d appended to (%d bytes written), %d linked to the "
            "previous backup (%d bytes; %d renamed or moved), %d hard links kept",
            stats.files, summary.copied, summary.appended, summary.bytes_written,
            summary.linked, summary.bytes_linked, summary.renames, summary.hardlinked,
        )
        return stats

    @staticmethod
    def _previous_manifest(previous: Previous | None, *, keep: bool) -> PreviousManifest | None:
        """The previous backup's manifest, checked whole (every zstd frame's checksum and the
        end line: a few tens of milliseconds) before any of it is trusted."""
        if previous is None:
            return None
        if not previous.manifest.exists():
            log.warning(
                "the previous backup %s has no manifest (made by rsync or an older mailsnap): "
                "this backup is a full copy, not linked to it; the next one is incremental "
                "again", previous.content.parent.name)
            return None
        earlier = PreviousManifest(previous.manifest, keep=keep,
                                   sha256=previous.manifest_sha256)
        if earlier.damaged:
            log.warning("%s: this backup is a full copy, not linked to the previous one; the "
                        "next one is incremental again", earlier.damaged)
            earlier.close()
            return None
        return earlier


def __getattr__(name: str) -> Any:
    # ``vanished_is_abnormal`` lives with the live copier, which is imported only when used.
    if name == "vanished_is_abnormal":
        from mailsnap.copiers.live import vanished_is_abnormal

        return vanished_is_abnormal
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MaildirCopier", "base_name", "vanished_is_abnormal"]
