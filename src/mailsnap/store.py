"""The backup store on the local disk: ``TARGET/<job>/<run id>/`` with ``mail/`` and
``mailsnap.json``, a ``latest`` link, and the job's run lock.

A backup is built in ``<run id>.partial/`` and published by one ``rename`` only after the copy
succeeded, so a reader (or a restore) never sees a half-made backup under a dated name, and a
failed run never touches the backups before it. Everything is mode 0700: backups are users' mail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import ctypes
from dataclasses import dataclass
from datetime import UTC, datetime
import errno
import fcntl
import functools
import json
import logging
import os
from pathlib import Path
import re
import shutil
import stat
from typing import TYPE_CHECKING, Any, Literal

from mailsnap import datasets, subvolumes
from mailsnap.backends.base import RUN_ID_RE
from mailsnap.errors import LockedError, MailsnapError
from mailsnap.faults import fault_point
from mailsnap.manifest import MANIFEST_FILE

if TYPE_CHECKING:
    from mailsnap.runner import Runner

log = logging.getLogger(__name__)

MANIFEST = "mailsnap.json"
CONTENT = "mail"
PARTIAL_SUFFIX = ".partial"
DELETING_SUFFIX = ".deleting"
LOCK_FILE = ".lock"
LATEST = "latest"

# What a backup is: a directory of hard links to the previous one, a btrfs subvolume, or a
# snapshot of the job's ZFS dataset (see ``subvolumes`` and ``datasets``).
TargetKind = Literal["tree", "subvolume", "dataset"]


def run_id_for(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True)
class Backup:
    """One published backup. ``loaded``: its ``mailsnap.json`` as listed, or None for a backup
    on a ZFS target, whose ``manifest`` is read on first use: reading it mounts the snapshot's
    view, and a night needs only the newest one's."""

    path: Path
    loaded: dict[str, Any] | None = None

    @functools.cached_property
    def manifest(self) -> dict[str, Any]:
        if self.loaded is not None:
            return self.loaded
        try:
            found = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot read its %s (%s)", self.path, MANIFEST, exc)
            return {}
        return found if isinstance(found, dict) else {}

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def content(self) -> Path:
        return self.path / CONTENT

    @property
    def manifest_sha256(self) -> str | None:
        """The sha256 of its ``manifest.zst`` as written, recorded when it was published
        (None in backups made before that was recorded)."""
        value = self.manifest.get("manifest_sha256")
        return value if isinstance(value, str) else None


class BackupStore:
    """All backups of one job, under ``root`` = ``TARGET/<job>``."""

    def __init__(self, root: Path, *, dry_run: bool = False,
                 runner: Runner | None = None) -> None:
        self.root = root
        self.dry_run = dry_run
        self._runner = runner
        # The run being made in the job's ZFS dataset (begin → publish or discard).
        self._open: tuple[str, datasets.JobDataset] | None = None
        # The job dataset the sweep found mounted (``_repair_views``): a night then begins in
        # it without looking it up (findmnt, ``zfs get``) again.
        self._dataset: datasets.JobDataset | None = None

    @property
    def runner(self) -> Runner:
        """For ``btrfs subvolume`` commands (a store of subvolumes, see ``subvolumes``)."""
        if self._runner is None:
            from mailsnap.runner import Runner

            self._runner = Runner(dry_run=self.dry_run)
        return self._runner

    # -- the run lock ----------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``TARGET/<job>/.lock`` (flock) for the whole run, so two runs of one job never
        sweep each other's snapshots. Creates the job directory (0700) if needed — in dry run
        too, since the lock is what keeps a dry run from racing a real one.
        """
        self._make_private_dirs()
        path = self.root / LOCK_FILE
        handle = path.open("a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)  # "a+" reads from the end
                holder = handle.read().strip() or "another process"
                raise LockedError(
                    f"job already running ({holder} holds {path}); wait for it to finish"
                ) from None
            try:
                os.ftruncate(handle.fileno(), 0)
                os.pwrite(handle.fileno(), f"pid {os.getpid()}\n".encode(), 0)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # A full target: the lock is held all the same, only its holder goes unsaid.
                # (``prune``, run to make room, must get past this.)
                log.debug("%s: holder not written: %s", path, exc.strerror)
            yield
        finally:
            handle.close()

    def _make_private_dirs(self) -> None:
        make_private_dirs(self.root)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise MailsnapError(f"target {self.root}: not writable; run as root or fix its owner")

    # -- reading ---------------------------------------------------------------------------

    def backups(self) -> list[Backup]:
        """Published backups, oldest first. Partial and foreign directories are ignored."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(self.root.iterdir()):
            if not re.fullmatch(RUN_ID_RE, entry.name):
                continue
            if entry.is_symlink():
                # A ZFS snapshot's view: published once its snapshot exists (``stat`` does
                # not mount it). The store follows no other symlink.
                if datasets.is_view(entry) and entry.is_dir():
                    found.append(Backup(entry))
                continue
            if not entry.is_dir():
                continue
            try:
                manifest = json.loads((entry / MANIFEST).read_text())
            except (OSError, ValueError):
                continue  # not a published mailsnap backup
            found.append(Backup(entry, manifest))
        return found

    def latest(self) -> Backup | None:
        backups = self.backups()
        return backups[-1] if backups else None

    def new_run_id(self, now: datetime) -> str:
        """A run id not used yet: the UTC time, with ``.1``, ``.2`` … for runs in one second."""
        base = run_id_for(now)
        candidate, n = base, 0
        while (os.path.lexists(self.root / candidate)
               or self.partial_path(candidate).exists()):
            n += 1
            candidate = f"{base}.{n}"
        return candidate

    def partial_path(self, run_id: str) -> Path:
        return self.root / f"{run_id}{PARTIAL_SUFFIX}"

    # -- writing ---------------------------------------------------------------------------

    def begin(self, run_id: str, *, kind: TargetKind = "tree",
              base: Backup | None = None) -> Path:
        """Create ``<run id>.partial/mail/`` and return the ``.partial`` directory.
        ``kind`` ``subvolume``: the ``.partial`` is a btrfs subvolume, a writable snapshot of
        ``base`` (a subvolume: the copy then changes it into the new backup) or a new empty one.
        ``dataset``: the job's ZFS dataset, rolled back to ``base`` (or emptied), is where the
        copy goes; it returns the dataset's mount point ``.mirror`` instead.
        Dry run: returns the path, creates nothing."""
        partial = self.partial_path(run_id)
        if self.dry_run:
            return partial
        if kind == "dataset":
            return self._begin_in_dataset(run_id, base)
        if kind == "tree":
            partial.mkdir(mode=0o700)
            (partial / CONTENT).mkdir(mode=0o700)
        elif base is not None:
            subvolumes.snapshot(self.runner, base.path, partial)
            for own in (MANIFEST, MANIFEST_FILE):  # the previous backup's, not this one's
                with contextlib.suppress(FileNotFoundError):
                    (partial / own).unlink()
        else:
            subvolumes.create(self.runner, partial)
            os.chmod(partial, 0o700)
            (partial / CONTENT).mkdir(mode=0o700)
        return partial

    def _begin_in_dataset(self, run_id: str, base: Backup | None) -> Path:
        dataset = self._dataset or datasets.JobDataset.ensure(self.runner, self.root)
        # Rolled back unless it is the backup it was (so that someone else's snapshot taken
        # since, sanoid's or an admin's, does not stop the night): its mailsnap.json still
        # names it (a run killed a moment ago removed it), and ZFS says nothing was written
        # since (a change made by hand in the mirror).
        if (base is None or not _still_holds(dataset.mountpoint, base.run_id)
                or not dataset.unchanged_since(base.run_id)):
            dataset.reset(base.run_id if base is not None else None)
        self._open = (run_id, dataset)
        mirror = dataset.mountpoint
        for own in (MANIFEST, MANIFEST_FILE):  # the previous backup's, not this one's
            with contextlib.suppress(FileNotFoundError):
                (mirror / own).unlink()
        if base is None:
            (mirror / CONTENT).mkdir(mode=0o700)
        return mirror

    def discard(self, partial: Path) -> None:
        """Remove an unpublished ``.partial`` directory (after a failed or interrupted run).
        Only ever removes names ending in ``.partial`` directly under this job's directory."""
        if self.dry_run or not partial.exists():
            return
        if partial == self.root / datasets.MIRROR:
            if self._open is None:
                return  # published: the mirror is the new backup now
            run_id, dataset = self._open
            self._open = None
            dataset.discard()
            log.info("rolled %s back: %s was not published", dataset.name, run_id)
            return
        if partial.parent != self.root or not partial.name.endswith(PARTIAL_SUFFIX):
            raise MailsnapError(f"refusing to remove {partial}: not a partial backup")
        self._remove_tree(partial)
        log.info("removed unpublished %s", partial)

    def sweep_partials(self) -> list[Path]:
        """Remove ``.partial`` directories a crashed run left (we hold the lock, so no live run
        owns them). In a ZFS store, finish what a crash interrupted instead: a backup whose
        snapshot was taken (it is published) gets its dated view; a view whose snapshot was
        destroyed (a prune) goes. The next run rolls the mirror back itself."""
        if not self.root.is_dir():
            return []
        if not self.dry_run and (self.root / datasets.MIRROR).is_dir():
            self._repair_views()
        stale = [
            p
            for p in self.root.iterdir()
            if p.name.endswith(PARTIAL_SUFFIX)
            and re.fullmatch(RUN_ID_RE, p.name.removesuffix(PARTIAL_SUFFIX))
        ]
        for partial in stale:
            log.warning("removing %s left by an interrupted run", partial)
            self.discard(partial)
        return stale

    def _repair_views(self) -> None:
        dataset = self._dataset = datasets.JobDataset.at(self.runner, self.root)
        if dataset is None:
            return
        taken = dataset.backups()
        for run_id in taken:
            if not os.path.lexists(self.root / run_id):
                log.warning("%s: its snapshot was taken but the run stopped before it got its "
                            "dated name; it is published now", run_id)
                self._make_view(run_id)
                self._point_latest(taken[-1])
        for entry in self.root.iterdir():
            if datasets.is_view(entry) and entry.name not in taken:
                log.warning("%s: its snapshot is gone (an interrupted prune); removing the name",
                            entry.name)
                entry.unlink()
        _fsync_dir(self.root)

    def _make_view(self, run_id: str) -> None:
        tmp = self.root / f".{run_id}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(datasets.view_target(run_id), tmp)
        os.rename(tmp, self.root / run_id)

    def publish(
        self, partial: Path, manifest: dict[str, Any], *,
        on_commit: Callable[[], None] | None = None,
    ) -> Backup:
        """Write the manifest, then rename ``<id>.partial`` → ``<id>`` and point ``latest`` at it.
        The rename is the commit point: before it nothing is published, after it the backup is
        complete and durable (files and directories are fsync'ed first). ``on_commit`` runs
        just before the rename (the pipeline stops signals from interrupting from there on).
        Dry run: writes nothing, returns the backup it would publish.
        """
        opened = (self._open if self._open is not None
                  and partial == self._open[1].mountpoint else None)  # a run in the dataset
        final = self.root / (opened[0] if opened is not None
                             else partial.name.removesuffix(PARTIAL_SUFFIX))
        if self.dry_run:
            return Backup(final, manifest)
        manifest_path = partial / MANIFEST
        with manifest_path.open("w") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(manifest_path, 0o600)
        _sync_tree(partial)
        if subvolumes.is_subvolume(partial):
            subvolumes.make_read_only(self.runner, partial)
        if os.path.lexists(final):
            raise MailsnapError(f"{final} already exists; refusing to overwrite a backup")
        fault_point("mid-publish")
        if on_commit is not None:
            on_commit()
        if opened is not None:
            opened[1].snapshot(final.name)  # the commit point: the view only names it
            self._open = None
            fault_point("after-rename")
            self._make_view(final.name)
        else:
            os.rename(partial, final)
            fault_point("after-rename")
        self._point_latest(final.name)
        _fsync_dir(self.root)
        return Backup(final, manifest)

    # -- removing (retention) ---------------------------------------------------------------

    def latest_target(self) -> str | None:
        """The run id ``latest`` points to, or None."""
        link = self.root / LATEST
        return os.readlink(link) if link.is_symlink() else None

    def remove(self, run_id: str) -> None:
        """Remove one published backup. A subvolume is deleted at once: that is one atomic
        step already (the file system frees its space in the background), and it takes no new
        metadata, so it works on a target too full to rename anything, the night an admin
        prunes to make room. A hard-link tree is renamed to ``<id>.deleting`` (one atomic
        step, after which it is no longer published), then deleted; a crash in between leaves
        only the ``.deleting`` directory, which ``finish_deletions`` removes on the next run.
        Refuses anything that is not a real directory named like a backup directly in this
        store (a symlink is never followed out of the target). Dry run: does nothing."""
        if not re.fullmatch(RUN_ID_RE, run_id):
            raise MailsnapError(f"refusing to remove {run_id!r}: not a backup name")
        path = self.root / run_id
        if datasets.is_view(path):
            if self.dry_run:
                return
            dataset = datasets.JobDataset.at(self.runner, self.root)
            if dataset is None:
                raise MailsnapError(f"{path} names a snapshot of the job's dataset, but no "
                                    f"dataset of this store is mounted at {path.parent}/"
                                    f"{datasets.MIRROR}: mount it and run again")
            fault_point("mid-prune")
            # Snapshot first: a crash in between leaves a name pointing at nothing, which
            # no listing shows and the next run removes.
            dataset.destroy(run_id)
            path.unlink()
            _fsync_dir(self.root)
            return
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise MailsnapError(f"refusing to remove {path}: not a directory (a symlink?)")
        if self.dry_run:
            return
        if subvolumes.is_subvolume(path):
            # Not synced: a crash before the file system commits it brings the backup back,
            # whole, for the next prune.
            fault_point("mid-prune")
            subvolumes.delete(self.runner, path)
            return
        doomed = self.root / f"{run_id}{DELETING_SUFFIX}"
        os.rename(path, doomed)
        _fsync_dir(self.root)
        fault_point("mid-prune")
        self._remove_tree(doomed)

    def finish_deletions(self) -> list[str]:
        """Delete ``<id>.deleting`` directories that an interrupted prune left. Returns their
        names. Dry run: returns them, deletes nothing."""
        if not self.root.is_dir():
            return []
        left = sorted(
            p for p in self.root.iterdir()
            if p.name.endswith(DELETING_SUFFIX)
            and re.fullmatch(RUN_ID_RE, p.name.removesuffix(DELETING_SUFFIX))
            and not p.is_symlink()
        )
        for path in left:
            log.warning("finishing the removal of %s (an interrupted prune)", path.name)
            if not self.dry_run:
                self._remove_tree(path)
        return [p.name for p in left]

    def repair_latest(self) -> str | None:
        """Point ``latest`` at the newest published backup if it points elsewhere (a run
        killed between its rename and the switch of ``latest``). Returns what it changed, or
        None. Dry run: returns what it would change, changes nothing."""
        newest = self.latest()
        link = self.root / LATEST
        current = os.readlink(link) if link.is_symlink() else None
        if newest is None or current == newest.run_id:
            return None
        if not self.dry_run:
            self._point_latest(newest.run_id)
            _fsync_dir(self.root)
        return f"{LATEST} -> {newest.run_id} (was {current or 'missing'})"

    def _point_latest(self, name: str) -> None:
        link = self.root / LATEST
        tmp = self.root / f".{LATEST}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, link)

    def _remove_tree(self, path: Path) -> None:
        """A subvolume is deleted whole (O(1)); a hard-link tree by ``shutil.rmtree``, which
        works on directory file descriptors and never follows a symlink it finds inside (a
        symlink at the top it refuses): one unlink per file, the messages live on in the
        other backups."""
        if subvolumes.is_subvolume(path):
            subvolumes.delete(self.runner, path)
        else:
            shutil.rmtree(path)


def _still_holds(mirror: Path, run_id: str) -> bool:
    """The job dataset's mirror is still the backup ``run_id``, as the night that made it left
    it: its ``mailsnap.json`` names it. A run removes that file before it changes anything
    else, so one killed at any point after has left it gone (ZFS keeps the order of changes
    through a crash)."""
    try:
        return bool(json.loads((mirror / MANIFEST).read_text()).get("run_id") == run_id)
    except (OSError, ValueError, AttributeError):
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(path: Path) -> None:
    """Make the copied files durable before the rename publishes them: ``syncfs`` flushes the
    target file system in one call instead of an fsync per message. Python 3.11's ``os`` has
    no ``syncfs`` (and ``os.sync`` would flush every file system on the host, a busy mail
    volume included), so it is called from libc."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc_syncfs(fd) != 0:
            code = ctypes.get_errno()
            if code != errno.ENOSYS:
                raise OSError(code, os.strerror(code), str(path))
            os.sync()
    finally:
        os.close(fd)


def _libc_syncfs(fd: int) -> int:
    syncfs = getattr(os, "syncfs", None)
    if syncfs is not None:  # Python 3.12+
        syncfs(fd)
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    result: int = libc.syncfs(fd)
    return result


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700, and make ``path`` itself 0700
    even if it existed (it is ours: users' mail, or the mount point of a snapshot of it).
    ``mkdir -p`` would leave the new parents at 0755."""
    missing = [d for d in (*reversed(path.parents), path) if not d.exists()]
    for directory in missing:
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile by someone else: fine
        except OSError as exc:
            raise MailsnapError(
                f"{directory}: cannot create it ({exc.strerror}); create it or fix the "
                "permissions of its parent"
            ) from None
    os.chmod(path, 0o700)
