"""btrfs: a read-only snapshot of the subvolume that holds the source.

Where the snapshot goes matters. Dovecot takes any ``.name`` directory inside a Maildir for a mail
folder, so a snapshot inside the live tree would show up in users' mail clients. The snapshot
therefore lives in ``.mailsnap/`` at the file system's top level (subvolid=5), which is mounted
privately under the job's run directory only while a snapshot is created or deleted.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import logging
import os
from pathlib import Path, PurePosixPath
from typing import ClassVar

from mailsnap.backends.base import OWNER_PREFIX, Snapshot, Volume, owned_by
from mailsnap.config import JobBase
from mailsnap.errors import BackendUnsuitable, CommandFailed, MailsnapError
from mailsnap.mounts import SAFE_OPTIONS, find_mount, unmount
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

SNAPSHOT_DIR = ".mailsnap"  # at the top level of the file system, never inside the source


class BtrfsBackend:
    name: ClassVar[str] = "btrfs"
    point_in_time: ClassVar[bool] = True
    needs_root: ClassVar[bool] = True
    tools: ClassVar[tuple[str, ...]] = ("btrfs", "findmnt", "mount", "umount")

    def __init__(self, runner: Runner, job: JobBase) -> None:
        self.runner = runner
        self.job = job
        # The subvolume list discover() read, for the sweep that follows it (under the job's
        # lock nothing of the job can appear in between); used once, so the final sweep
        # lists again.
        self._listed: dict[str, PurePosixPath] | None = None

    # -- discovery (read-only) -------------------------------------------------------------

    def discover(self, source: Path) -> Volume:
        """Find the btrfs subvolume that holds ``source`` and the source's place inside it.

        Read-only. Refuses a source on another file system, a source that *is* the top level
        (the snapshot could only go inside it), and a source with nested subvolumes (a
        snapshot does not descend into them, so their mail would be silently missing).
        """
        mount = find_mount(self.runner, source)
        if mount.fstype != "btrfs":
            raise BackendUnsuitable(
                f"{source} is on {mount.fstype or 'an unknown file system'}, not btrfs: "
                "use backend = \"auto\" or another backend"
            )
        rootid = self._run_ro(["btrfs", "inspect-internal", "rootid", str(source)]).strip()
        subvolumes = self._subvolumes(mount.target)
        if rootid == "5":
            subvol = PurePosixPath("/")
        elif rootid in subvolumes:
            subvol = subvolumes[rootid]  # the list has every path: no subvolid-resolve
        else:
            path = self._run_ro(
                ["btrfs", "inspect-internal", "subvolid-resolve", rootid, str(mount.target)]
            ).strip()
            subvol = PurePosixPath("/") / path
        # The source's path from the top level, then relative to its subvolume.
        in_mount = PurePosixPath(os.path.normpath(source)).relative_to(mount.target)
        from_top = PurePosixPath(mount.fsroot) / in_mount
        relative = from_top.relative_to(subvol)
        if subvol == PurePosixPath("/"):
            raise BackendUnsuitable(
                f"{source} lives in the top-level subvolume of {mount.source}; a snapshot of it "
                "would have to be stored inside it. Move the mail into its own subvolume "
                "(btrfs subvolume create) or use backend = \"live\""
            )
        nested = [str(p) for p in subvolumes.values() if from_top in p.parents]
        if nested:
            raise BackendUnsuitable(
                f"{source} contains other btrfs subvolumes ({', '.join(nested[:3])}); a snapshot "
                "does not include them. Back them up as separate jobs, or convert them to "
                "plain directories"
            )
        self._listed = subvolumes
        return Volume(
            backend=self.name,
            source=source,
            device=mount.source,
            relative=Path(relative),
            fstype=mount.fstype,
            details={"subvolume": str(subvol), "subvolume_id": rootid},
        )

    def _subvolumes(self, path: Path) -> dict[str, PurePosixPath]:
        """Every subvolume of the file system but the top level, by id, as paths from the
        top level. ``-a`` because without it btrfs-progs prints paths below the mounted
        subvolume relative to the mount, and the rest relative to the top level."""
        out = self._run_ro(["btrfs", "subvolume", "list", "-a", str(path)])
        found = {}
        for line in out.splitlines():
            if line.startswith("ID ") and " path " in line:
                rel = line.split(" path ", 1)[1].removeprefix("<FS_TREE>/")
                found[line.split(maxsplit=2)[1]] = PurePosixPath("/") / rel
        return found

    def _run_ro(self, argv: list[str]) -> str:
        return self.runner.run(argv, mutates=False).stdout

    # -- the snapshot ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _top_level(self, device: str) -> Iterator[Path]:
        """Mount the top level (subvolid=5) privately for the duration of one operation. Kept
        from create() to destroy() it would save two commands a run, but a run killed in
        between would leave the whole file system mounted read-write under run_dir."""
        top = self.job.work_dir / "top"
        if not self.runner.dry_run:
            top.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.runner.run(
            ["mount", "-t", "btrfs", "-o", "subvolid=5," + ",".join(SAFE_OPTIONS), device, top],
            mutates=True,
        )
        try:
            yield top
        finally:
            unmount(self.runner, top)
            if not self.runner.dry_run:
                # An empty directory left in our own run_dir is harmless; unmount() above has
                # already raised if the top level were still mounted.
                with contextlib.suppress(OSError):
                    top.rmdir()

    def create(self, volume: Volume, name: str) -> Snapshot:
        """``btrfs subvolume snapshot -r`` of the source's subvolume into ``.mailsnap/<name>``
        at the top level. Dry run: prints the commands, creates nothing.
        """
        subvol = volume.details["subvolume"].lstrip("/")
        self._listed = None  # out of date from here on
        with self._top_level(volume.device) as top:
            snapdir = top / SNAPSHOT_DIR
            if not self.runner.dry_run and not snapdir.exists():
                snapdir.mkdir(mode=0o700)
            self.runner.run(
                ["btrfs", "subvolume", "snapshot", "-r", top / subvol, snapdir / name],
                mutates=True,
            )
        return Snapshot(
            backend=self.name,
            name=name,
            volume=volume,
            details={"path": f"/{SNAPSHOT_DIR}/{name}"},
        )

    def mount(self, snapshot: Snapshot, mountpoint: Path) -> Path:
        """Mount the snapshot subvolume read-only at ``mountpoint``; return the source inside it.
        The snapshot itself is read-only already; ``ro`` on the mount keeps even atime updates
        and orphan cleanup off it. Dry run: prints the mount, returns the path.
        """
        options = ["ro", *SAFE_OPTIONS, f"subvol={snapshot.details['path']}"]
        self.runner.run(
            ["mount", "-t", "btrfs", "-o", ",".join(options), snapshot.volume.device, mountpoint],
            mutates=True,
        )
        return mountpoint / snapshot.volume.relative

    def unmount(self, snapshot: Snapshot, mountpoint: Path) -> None:
        """Unmount; nothing mounted is success."""
        unmount(self.runner, mountpoint)

    def destroy(self, snapshot: Snapshot) -> None:
        """``btrfs subvolume delete`` the snapshot; already gone is success. Refuses any name
        without the mailsnap marker. Deleting returns at once (btrfs cleans up in the
        background), so this is cheap even for a large store.
        """
        if not snapshot.name.startswith(OWNER_PREFIX):
            raise MailsnapError(f"refusing to delete {snapshot.name!r}: not created by mailsnap")
        self._listed = None
        with self._top_level(snapshot.volume.device) as top:
            path = top / SNAPSHOT_DIR / snapshot.name
            if self.runner.dry_run or path.exists():
                self.runner.run(["btrfs", "subvolume", "delete", path], mutates=True)

    def list_owned(self, volume: Volume, job: str) -> list[Snapshot]:
        """Snapshots in ``.mailsnap/`` whose names carry this job's marker (read-only).
        Listed through the source; when the source is gone (unmounted during the run, so the
        final sweep would fail), through the file system's top level, mounted for a moment.
        Dry run: through the source only (the top-level mount is not made)."""
        listed, self._listed = self._listed, None
        try:
            paths = listed if listed is not None else self._subvolumes(volume.source)
        except CommandFailed:
            if self.runner.dry_run:
                raise
            log.warning("%s is gone; listing snapshots through the top level of %s",
                        volume.source, volume.device)
            with self._top_level(volume.device) as top:
                paths = self._subvolumes(top)
        found = []
        for path in paths.values():
            if path.parent == PurePosixPath("/", SNAPSHOT_DIR) and owned_by(path.name, job):
                found.append(
                    Snapshot(backend=self.name, name=path.name, volume=volume,
                             details={"path": str(path)})
                )
        return found

    def check_healthy(self, snapshot: Snapshot) -> None:
        """A btrfs snapshot cannot overflow or go invalid: nothing to check."""
