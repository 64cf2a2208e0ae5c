"""A dated hard-link store on this host: the job's own ``target`` (``--destination local``),
or a second one (``type = "local"``: another disk, a USB drive).

A second store gets its copy with the Maildir copier, from the snapshot or from the backup
just published in the job's own target, linked against its own previous backup and manifest,
and published by the same rename; so it is as browsable, verifiable and prunable as the first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import ClassVar

from mailsnap.config import Job, LocalDestination
from mailsnap.copiers import MaildirCopier, Previous
from mailsnap.destinations.base import Sent, Source, Stored
from mailsnap.errors import DestinationFailed
from mailsnap.manifest import MANIFEST_FILE
from mailsnap.prune import backup_time
from mailsnap.runner import Runner
from mailsnap.store import CONTENT, MANIFEST, Backup, BackupStore
from mailsnap.verify import verify_backup

log = logging.getLogger(__name__)


class LocalStore:
    kind: ClassVar[str] = "local"

    def __init__(self, job: Job, settings: LocalDestination | None, runner: Runner) -> None:
        self.job = job
        self.settings = settings
        self.name = settings.name if settings else "local"
        self.runner = runner
        target = settings.target if settings else job.target
        self.store = BackupStore(target / job.name, dry_run=runner.dry_run)

    def close(self) -> None:
        pass  # nothing held between calls

    def where(self) -> str:
        return str(self.store.root)

    def _backup(self, stored: Stored) -> Backup:
        for backup in self.store.backups():
            if backup.run_id == stored.id:
                return backup
        raise DestinationFailed(f"destination {self.name}: no backup {stored.id} in "
                                f"{self.store.root}")

    def backups(self) -> list[Stored]:
        return [Stored(b.run_id, backup_time(b.run_id), b.run_id, dict(b.manifest))
                for b in self.store.backups()]

    def send(self, source: Source) -> Sent:
        if self.settings is None:
            raise DestinationFailed("the job's own store is written by the backup itself")
        with self.store.locked():
            self.store.sweep_partials()
            self.store.finish_deletions()
            previous = self.store.latest()
            partial = self.store.begin(source.run_id)
            try:
                copier = MaildirCopier(self.runner, frozen=True)
                stats = copier.copy(
                    source.tree, partial / CONTENT,
                    previous=Previous.of(previous) if previous else None,
                    excludes=source.excludes, manifest=partial / MANIFEST_FILE)
                meta = {}
                if source.local is not None and (source.local / MANIFEST).exists():
                    meta = json.loads((source.local / MANIFEST).read_text())
                # The source backup's record, but this copy's own manifest.
                meta.update({"copied_by_destination": self.name,
                             "copy": stats.summary.as_dict() if stats.manifest else None,
                             "manifest_sha256": stats.manifest_sha256,
                             "previous": previous.run_id if previous else None})
                self.store.publish(partial, meta)
            except BaseException:
                self.store.discard(partial)
                raise
        summary = stats.summary.as_dict() if stats.manifest else {}
        return Sent(source.run_id, files=stats.files,
                    bytes_sent=summary.get("bytes_written"), details=summary)

    def remove(self, stored: list[Stored]) -> None:
        with self.store.locked():
            for item in stored:
                self.store.remove(item.id)

    def verify(self, stored: Stored, *, deep: bool) -> list[str]:
        return verify_backup(self._backup(stored), deep=deep).problems

    def fetch(self, stored: Stored, subdir: str, into: Path) -> Path:
        return self._backup(stored).content  # already here: read in place
