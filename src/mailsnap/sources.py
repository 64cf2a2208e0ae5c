"""What mailsnap will accept as a source, and how a live source is watched while it is copied.

A backup tool is judged by its worst night. The worst nights here are quiet ones: the mail
volume was not mounted (its mount point is an empty directory), ``source`` points at the wrong
tree, or the volume is unmounted while a live copy reads it. Each of these used to produce a
"successful" backup with few or no messages, which then became ``latest``. So a source must be
a Maildir or a tree of Maildirs before anything is created, and a live source must still be the
same directory on the same file system when the copy ends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
import os
from pathlib import Path
import stat

from mailsnap.config import nesting_problem
from mailsnap.errors import ConfigError, SourceRejected
from mailsnap.maildirs import is_maildir

# Layouts seen in the wild put the first Maildir at most a few levels down:
# /srv/mail/<domain>/<user>/Maildir is three. The search stops at the first one it finds, and
# gives up after MAX_DIRS directories so that a wrong source such as / costs milliseconds.
MAX_DEPTH = 4
MAX_DIRS = 5000


def find_first_maildir(source: Path) -> Path | None:
    """The first Maildir at ``source`` or up to ``MAX_DEPTH`` levels below it (breadth first),
    or None. Read-only; does not follow symlinks."""
    queue: deque[tuple[Path, int]] = deque([(source, 0)])
    seen = 0
    while queue and seen < MAX_DIRS:
        path, depth = queue.popleft()
        seen += 1
        if is_maildir(path):
            return path
        if depth == MAX_DEPTH:
            continue
        try:
            with os.scandir(path) as entries:
                children = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue  # unreadable or vanished: not where the mail is
        queue.extend((path / name, depth + 1) for name in children)
    return None


def check_source(source: Path) -> None:
    """Refuse a source that is not a Maildir or a tree of Maildirs, with what to do.
    Read-only; runs in dry run too, and before anything is created or locked."""
    try:
        info = os.stat(source)
    except FileNotFoundError:
        raise SourceRejected(f"source {source}: does not exist; fix `source`") from None
    except OSError as exc:
        raise SourceRejected(
            f"source {source}: cannot read it ({exc.strerror}); run as root or as the mail user"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise SourceRejected(f"source {source}: not a directory; set `source` to the mail root")
    if not os.access(source, os.R_OK | os.X_OK):
        raise SourceRejected(
            f"source {source}: not readable; run as root or as the mail user"
        )
    if find_first_maildir(source) is None:
        with os.scandir(source) as entries:
            empty = not any(True for _ in entries)
        why = (
            "it is empty, which is what the mount point of an unmounted mail volume looks like"
            if empty else
            f"no Maildir (a directory with cur/ and new/) at it or up to {MAX_DEPTH} levels below"
        )
        raise SourceRejected(
            f"source {source}: not a Maildir or a tree of Maildirs ({why}); mount the mail "
            "volume or fix `source`. Nothing was backed up and earlier backups are untouched"
        )


def check_target_outside_source(source: Path, target: Path) -> None:
    """The config already compares the paths as written; this compares them with symlinks
    resolved, because a target that reaches into the source through a link makes a live copy
    copy its own output into itself until the names get too long."""
    problem = nesting_problem(source.resolve(), target.resolve())
    if problem:
        raise ConfigError(f"{problem} (with symlinks resolved: {source} → {source.resolve()}, "
                          f"{target} → {target.resolve()})")


@dataclass(frozen=True)
class SourceIdentity:
    """The device and inode of a source directory at the start of a live copy.

    A lazily unmounted volume (``umount -l``) keeps open files readable but makes every path
    resolve to the empty mount point below it: the copy then sees thousands of messages
    "vanish" and would publish a truncated backup. Comparing the identity catches that, and a
    source directory replaced by another (renamed, re-created) too.
    """

    path: Path
    device: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> SourceIdentity:
        info = os.stat(path)
        return cls(path, info.st_dev, info.st_ino)

    def verify(self) -> None:
        """Raise ``SourceRejected`` when the source is no longer the same directory on the same
        file system. Read-only."""
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise SourceRejected(
                f"source {self.path} disappeared during the live copy ({exc.strerror}); was the "
                "volume unmounted? Nothing was published"
            ) from None
        if (info.st_dev, info.st_ino) != (self.device, self.inode):
            raise SourceRejected(
                f"source {self.path} is no longer the directory the live copy started from "
                f"(device {self.device}/inode {self.inode}, now {info.st_dev}/{info.st_ino}); "
                "the volume was unmounted or replaced during the copy. Nothing was published"
            )
