"""Backups as btrfs subvolumes on a btrfs target (``target_snapshots = "auto"``).

A hard-link tree costs a ``link()`` per message every night and an ``unlink()`` per message
when retention removes a backup, however little changed. On a btrfs target each backup is a
subvolume instead: the next one starts as a writable snapshot of it (O(1)), the copy applies
only the night's changes, the subvolume is made read-only and published by the same rename,
and retention deletes it with ``btrfs subvolume delete`` (O(1) in the foreground; the space is
freed in the background). Every command goes through the runner, so it is logged with its
time and a dry run only prints it.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mailsnap.errors import MailsnapError

if TYPE_CHECKING:
    from mailsnap.runner import Runner

log = logging.getLogger(__name__)

# The inode number of every subvolume's top directory (BTRFS_FIRST_FREE_OBJECTID).
SUBVOLUME_INODE = 256


def is_subvolume(path: Path) -> bool:
    """``path`` is the top of a btrfs subvolume: inode 256 on a device number of its own (each
    subvolume has one). No process, no ioctl; False for anything that is not there."""
    try:
        info = os.lstat(path)
        parent = os.lstat(path.parent)
    except OSError:
        return False
    return info.st_ino == SUBVOLUME_INODE and info.st_dev != parent.st_dev


def is_btrfs(runner: Runner, path: Path) -> bool:
    from mailsnap.mounts import find_mount

    return find_mount(runner, path).fstype == "btrfs"


def snapshot(runner: Runner, source: Path, target: Path) -> None:
    """A writable snapshot of the subvolume ``source`` at ``target``."""
    runner.run(["btrfs", "subvolume", "snapshot", str(source), str(target)], mutates=True,
               hint="the target's file system may be full or read-only")


def create(runner: Runner, target: Path) -> None:
    runner.run(["btrfs", "subvolume", "create", str(target)], mutates=True,
               hint="the target's file system may be full or read-only")


def make_read_only(runner: Runner, path: Path) -> None:
    """A published backup cannot be changed by accident (``btrfs property set -ts``)."""
    runner.run(["btrfs", "property", "set", "-ts", str(path), "ro", "true"], mutates=True)


def delete(runner: Runner, path: Path) -> None:
    """Delete a subvolume (read-only or not): returns at once, the space is freed by the
    file system in the background."""
    if not is_subvolume(path):
        raise MailsnapError(f"refusing to delete {path} as a subvolume: it is not one")
    runner.run(["btrfs", "subvolume", "delete", str(path)], mutates=True,
               hint="run `btrfs subvolume delete` on it by hand")


def clone_file(source: str, target: str) -> None:
    """What ``os.link(source, target)`` would make, where a hard link cannot be made (the
    previous backup is in another subvolume): a new file sharing ``source``'s extents
    (``FICLONE``: no data read or written) with its owner, mode and times. Raises like
    ``os.link``: ``FileNotFoundError`` when ``source`` is gone."""
    import fcntl

    from mailsnap.copiers.files import FICLONE, IS_ROOT

    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.ioctl(out, FICLONE, fd)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL):
                    raise
                done = 0  # not one btrfs: a plain copy
                while done < info.st_size and (step := os.copy_file_range(
                        fd, out, info.st_size - done)):
                    done += step
            if IS_ROOT:
                os.fchown(out, info.st_uid, info.st_gid)
            os.fchmod(out, info.st_mode & 0o7777)
            os.utime(out, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(out)
    finally:
        os.close(fd)
