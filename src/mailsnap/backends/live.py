"""live: no snapshot at all — the fallback for a plain directory, a file system without snapshot
support, or a run without root.

``point_in_time = False`` tells the pipeline there is nothing to create or mount: it reads the
live tree in place with the Maildir-aware copier (which re-finds renamed and moved messages),
watches that the source stays the same mounted directory, and records the backup as a live copy
(no snapshot name) in ``mailsnap.json``. ``create``/``mount``/``destroy`` exist only to keep the
``SnapshotBackend`` contract; the pipeline does not call them for this backend.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import ClassVar

from mailsnap.backends.base import Snapshot, Volume
from mailsnap.config import JobBase
from mailsnap.errors import BackendUnsuitable
from mailsnap.runner import Runner

log = logging.getLogger(__name__)


class LiveBackend:
    name: ClassVar[str] = "live"
    point_in_time: ClassVar[bool] = False
    needs_root: ClassVar[bool] = False
    # No snapshot tools, but every run's sweep lists mounts under the job's work directory.
    tools: ClassVar[tuple[str, ...]] = ("findmnt",)

    def __init__(self, runner: Runner, job: JobBase) -> None:
        self.runner = runner
        self.job = job

    def discover(self, source: Path) -> Volume:
        """The source must be a readable directory. Read-only."""
        if not source.is_dir():
            raise BackendUnsuitable(f"{source}: not a directory; set source to the Maildir root")
        if not os.access(source, os.R_OK | os.X_OK):
            raise BackendUnsuitable(f"{source}: not readable; run as root or as the mail user")
        return Volume(backend=self.name, source=source, device="", relative=Path("."), fstype="")

    def create(self, volume: Volume, name: str) -> Snapshot:
        """Nothing to create; the log line says this is a live copy."""
        log.warning(
            "live copy of %s: no snapshot, so the backup is not a single point in time "
            "(messages are re-found by base name when Dovecot renames or moves them)",
            volume.source,
        )
        return Snapshot(backend=self.name, name=name, volume=volume, point_in_time=False)

    def mount(self, snapshot: Snapshot, mountpoint: Path) -> Path:
        """Nothing to mount: copy straight from the live source."""
        return snapshot.volume.source

    def unmount(self, snapshot: Snapshot, mountpoint: Path) -> None:
        """Nothing was mounted."""

    def destroy(self, snapshot: Snapshot) -> None:
        """Nothing was created."""

    def list_owned(self, volume: Volume, job: str) -> list[Snapshot]:
        """A live copy leaves no snapshots behind."""
        return []

    def check_healthy(self, snapshot: Snapshot) -> None:
        """The live tree cannot go invalid."""
