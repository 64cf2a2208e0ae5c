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
import json
import logging
import os
from pathlib import Path
import re
import shutil
import stat
from typing import TYPE_CHECKING, Any

from mailsnap import subvolumes
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


def run_id_for(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True)
class Backup:
    """One published backup."""

    path: Path
    manifest: dict[str, Any]

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
            if (not re.fullmatch(RUN_ID_RE, entry.name) or entry.is_symlink()
                    or not entry.is_dir()):
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
        while (self.root / candidate).exists() or self.partial_path(candidate).exists():
            n += 1
            candidate = f"{base}.{n}"
        return candidate

    def partial_path(self, run_id: str) -> Path:
        return self.root / f"{run_id}{PARTIAL_SUFFIX}"

    # -- writing ---------------------------------------------------------------------------

    def begin(self, run_id: str, *, subvolume: bool = False,
              base: Backup | None = None) -> Path:
        """Create ``<run id>.partial/mail/`` and return the ``.partial`` directory.
        ``subvolume``: the ``.partial`` is a btrfs subvolume, a writable snapshot of ``base``
        (a subvolume: the copy then changes it into the new backup) or a new empty one.
        Dry run: returns the path, creates nothing."""
        partial = self.partial_path(run_id)
        if self.dry_run:
            return partial
        if not subvolume:
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

    def discard(self, partial: Path) -> None:
        """Remove an unpublished ``.partial`` directory (after a failed or interrupted run).
        Only ever removes names ending in ``.partial`` directly under this job's directory."""
        if self.dry_run or not partial.exists():
            return
        if partial.parent != self.root or not partial.name.endswith(PARTIAL_SUFFIX):
            raise MailsnapError(f"refusing to remove {partial}: not a partial backup")
        self._remove_tree(partial)
        log.info("removed unpublished %s", partial)

    def sweep_partials(self) -> list[Path]:
        """Remove ``.partial`` directories a crashed run left (we hold the lock, so no live run
        owns them)."""
        if not self.root.is_dir():
            return []
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
        final = self.root / partial.name.removesuffix(PARTIAL_SUFFIX)
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
        if final.exists():
            raise MailsnapError(f"{final} already exists; refusing to overwrite a backup")
        fault_point("mid-publish")
        if on_commit is not None:
            on_commit()
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
