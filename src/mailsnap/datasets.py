"""Backups as snapshots of one ZFS dataset per job (``target_snapshots = "auto"`` on ZFS).

On a ZFS target a job's backups live in a dataset of their own, ``<parent>/mailsnap-<job>``,
mounted at ``TARGET/<job>/.mirror``. Between runs it holds the newest backup. A run whose
mirror is not as the last run left it (a run killed before its snapshot, a change made by
hand: ``store.BackupStore`` tells) first rolls it back to that backup's snapshot; it then
applies the night's changes in place and publishes with ``zfs snapshot <dataset>@<run id>``:
that is the commit point. The dated backup ``TARGET/<job>/<run id>`` is a symlink to the snapshot's
read-only view, ``.mirror/.zfs/snapshot/<run id>``, which ZFS mounts on first access.
Retention destroys the snapshot (O(1) in the foreground), then the symlink.

Why not a dataset per backup (``zfs clone``), as btrfs has a subvolume per backup: a clone
depends on its origin snapshot, so the oldest backup could not be destroyed without
``zfs promote`` reshuffling the chain on every prune.

The dataset carries the user property ``mailsnap:store`` = the store's path; a dataset of
that name without it (someone else's) is never rolled back, snapshotted or destroyed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import re
from typing import TYPE_CHECKING

from mailsnap.backends.base import RUN_ID_RE
from mailsnap.errors import CommandFailed, MailsnapError

if TYPE_CHECKING:
    from mailsnap.runner import Runner

log = logging.getLogger(__name__)

MIRROR = ".mirror"
PREFIX = "mailsnap-"
STORE_PROPERTY = "mailsnap:store"
SNAPSHOT_DIR = ".zfs/snapshot"


def view_target(run_id: str) -> str:
    """What the symlink ``TARGET/<job>/<run id>`` holds: relative, so the store can be
    mounted elsewhere (a rescue system) and still read."""
    return f"{MIRROR}/{SNAPSHOT_DIR}/{run_id}"


def is_view(path: Path) -> bool:
    """``path`` is a published backup's symlink into its job dataset's snapshots, and not any
    other symlink (which the store never follows)."""
    try:
        return os.readlink(path) == view_target(path.name)
    except OSError:
        return False


class JobDataset:
    """The dataset behind one job's store (``root`` = ``TARGET/<job>``)."""

    def __init__(self, runner: Runner, name: str, root: Path) -> None:
        self.runner = runner
        self.name = name
        self.root = root

    @property
    def mountpoint(self) -> Path:
        return self.root / MIRROR

    @classmethod
    def at(cls, runner: Runner, root: Path) -> JobDataset | None:
        """The job dataset mounted at ``root/.mirror``, or None when there is none (a store
        of hard-link trees or subvolumes). Refuses a dataset there that is not this store's."""
        from mailsnap.mounts import find_mount

        mirror = root / MIRROR
        if not mirror.is_dir() or mirror.is_symlink():
            return None
        mount = find_mount(runner, mirror)
        if mount.fstype != "zfs" or mount.target != mirror:
            return None
        dataset = cls(runner, mount.source, root)
        dataset._check_ours()
        return dataset

    @classmethod
    def ensure(cls, runner: Runner, root: Path) -> JobDataset:
        """The job's dataset, created (mounted at ``root/.mirror``, mode 0700) when it does
        not exist yet."""
        from mailsnap.mounts import find_mount

        found = cls.at(runner, root)
        if found is not None:
            return found
        parent = find_mount(runner, root)
        if parent.fstype != "zfs":
            raise MailsnapError(f"target {root}: not on ZFS ({parent.fstype}), so its backups "
                                "cannot be ZFS snapshots")
        dataset = cls(runner, f"{parent.source}/{PREFIX}{root.name}", root)
        if dataset._exists():
            dataset._check_ours()
            raise MailsnapError(
                f"dataset {dataset.name} belongs to this store but is not mounted at "
                f"{dataset.mountpoint}: mount it there (`zfs set mountpoint="
                f"{dataset.mountpoint} {dataset.name}`) and run again")
        dataset._create()
        log.info("created dataset %s for the backups of %s", dataset.name, root.name)
        return dataset

    # -- reading ---------------------------------------------------------------------------

    def snapshots(self) -> list[str]:
        """Snapshot names (after the ``@``), oldest first."""
        result = self.runner.run(["zfs", "list", "-H", "-p", "-t", "snapshot", "-o", "name",
                                  "-s", "createtxg", "-d", "1", self.name], mutates=False)
        return [line.split("@", 1)[1] for line in result.stdout.splitlines() if "@" in line]

    def backups(self) -> list[str]:
        return [s for s in self.snapshots() if re.fullmatch(RUN_ID_RE, s)]

    def unchanged_since(self, snapshot: str) -> bool:
        """Nothing was written to the dataset since ``snapshot`` (``written@``). ZFS counts as
        of its last committed transaction group: a change made by hand hours ago shows, one
        a run made a second before it was killed may not yet (the store's own check covers
        that)."""
        result = self.runner.run(["zfs", "get", "-H", "-p", "-o", "value",
                                  f"written@{snapshot}", self.name],
                                 mutates=False, ok_codes=(0, 1))
        return result.exit_code == 0 and result.stdout.strip() == "0"

    def _exists(self) -> bool:
        result = self.runner.run(["zfs", "list", "-H", "-o", "name", self.name],
                                 mutates=False, ok_codes=(0, 1))
        return result.exit_code == 0

    def _check_ours(self) -> None:
        result = self.runner.run(["zfs", "get", "-H", "-p", "-o", "value", STORE_PROPERTY,
                                  self.name], mutates=False)
        owner = result.stdout.strip()
        if owner != str(self.root):
            raise MailsnapError(
                f"dataset {self.name}: its {STORE_PROPERTY} is {owner!r}, not {self.root}, so "
                "it is not this store's and mailsnap will not touch it; give the job another "
                "name or target")

    # -- writing ---------------------------------------------------------------------------

    def reset(self, base: str | None) -> None:
        """Make the mirror what the next backup starts from: the backup ``base`` (rolled back
        to its snapshot, whatever a failed run wrote since), or empty for the first backup."""
        if base is not None:
            self.runner.run(
                ["zfs", "rollback", f"{self.name}@{base}"], mutates=True,
                hint=f"{base} must be the newest snapshot of {self.name}: destroy (or move "
                     "away) the snapshots taken after it that are not mailsnap's (mailsnap "
                     "sets com.sun:auto-snapshot=false on it; exclude it from sanoid too)")
            return
        if not os.listdir(self.mountpoint):  # new (``.zfs`` is not listed): nothing to undo
            return
        taken = self.snapshots()
        if taken:
            raise MailsnapError(
                f"dataset {self.name} holds snapshots ({', '.join(taken)}) but "
                f"{self.root} has no published backup to start from; destroy them or give the "
                "job another name")
        # A first run that failed left a partial copy: start from an empty dataset again.
        self.runner.run(["zfs", "destroy", self.name], mutates=True,
                        hint="something may still use the mirror: see `fuser -vm "
                             f"{self.mountpoint}`")
        self._create()

    def _create(self) -> None:
        # No atime: reading a backup must not write to the mirror. No zfs-auto-snapshot: a
        # snapshot taken after the newest backup would stop the rollback of a failed night.
        self.runner.run(["zfs", "create", "-o", f"mountpoint={self.mountpoint}",
                         "-o", "atime=off", "-o", "com.sun:auto-snapshot=false",
                         "-o", f"{STORE_PROPERTY}={self.root}", self.name],
                        mutates=True, hint="the pool may be full, or the target read-only")
        os.chmod(self.mountpoint, 0o700)

    def discard(self) -> None:
        """Undo an unpublished run: back to the newest backup, or (none yet) an empty
        mirror."""
        taken = self.backups()
        if taken:
            self.runner.run(["zfs", "rollback", f"{self.name}@{taken[-1]}"], mutates=True)
        else:
            self.reset(None)

    def snapshot(self, run_id: str) -> None:
        """The commit point of a backup: one atomic snapshot of what the run wrote."""
        self.runner.run(["zfs", "snapshot", f"{self.name}@{run_id}"], mutates=True,
                        hint="the pool may be full")

    def destroy(self, run_id: str) -> None:
        """Destroy one backup's snapshot; already gone is success. Its read-only view is
        unmounted first (ZFS refuses to destroy a snapshot someone is browsing)."""
        from mailsnap.mounts import unmount

        if not re.fullmatch(RUN_ID_RE, run_id):
            raise MailsnapError(f"refusing to destroy {self.name}@{run_id}: not a backup name")
        unmount(self.runner, self.mountpoint / SNAPSHOT_DIR / run_id)
        try:
            self.runner.run(["zfs", "destroy", f"{self.name}@{run_id}"], mutates=True,
                            hint=f"something may still use {run_id}: see `fuser -vm "
                                 f"{self.mountpoint / SNAPSHOT_DIR / run_id}`")
        except CommandFailed:
            if run_id in self.snapshots():
                raise
            log.info("snapshot %s@%s is already gone", self.name, run_id)
