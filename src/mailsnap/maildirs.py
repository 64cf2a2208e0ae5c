"""What a Maildir is, in one place, for every copier and every count.

The rule: a directory ``D`` is a Maildir when ``D/cur`` and ``D/new`` are both directories (not
symlinks) and neither of them holds a directory. A Maildir's ``cur/`` and ``new/`` hold only
message files; a mail domain that happens to have users called ``cur`` and ``new`` holds their
home directories there, so the second half of the rule is what tells the two apart.
(``D/tmp`` is not required: Dovecot recreates a missing ``tmp/`` on the next delivery.)

What follows from it:
- The content of ``D/tmp`` of a Maildir ``D`` is left out of every backup: half-written
  deliveries that Dovecot renames into ``new/`` when complete, or deletes after 36 hours. The
  ``tmp/`` directory itself is kept, empty, so each folder stays a valid Maildir.
- Every other directory called ``tmp``, ``new`` or ``cur`` is ordinary content and copied in
  full: a user called ``tmp`` (``example.com/tmp/Maildir``), a LAYOUT=fs folder ``Projects/tmp``
  (itself a Maildir, whose own ``tmp/`` follows the rule), a Maildir++ folder ``.tmp``.

No rsync pattern can say "tmp/ beside cur/ and new/" (a pattern like ``tmp/*`` dropped a whole
user called ``tmp``), so the rsync copier surveys the frozen tree first and hands rsync one
anchored rule per Maildir, and the live copier asks ``is_maildir`` as it walks.

Names are ``str`` as ``os.scandir`` gives them for a ``str`` path: bytes that are not UTF-8 come
back as surrogate escapes, and ``os.fsencode`` turns them into the original bytes again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import errno
import os
from pathlib import Path
import stat

from mailsnap.copiers.excludes import ExcludeMatcher
from mailsnap.errors import CopyFailed

MESSAGE_DIRS = ("cur", "new")
TMP_DIR = "tmp"


@dataclass(frozen=True)
class Survey:
    """What a tree holds, as a copy of it would hold it.

    ``maildirs``: relative paths of the Maildirs ("/" separators, "" for the root), sorted.
    ``messages``: regular files in ``cur/`` and ``new/`` of those Maildirs (names starting with
    "." are not messages by the Maildir spec, and are not counted here).
    ``files``/``bytes``: every regular file a copy holds (no Maildir ``tmp/`` content, nothing
    excluded), messages included.
    """

    maildirs: tuple[str, ...]
    messages: int
    files: int
    bytes: int


def gone(exc: OSError) -> bool:
    """The entry vanished (ENOENT, ENOTDIR): on a live tree, renamed, moved or expunged."""
    return exc.errno in (errno.ENOENT, errno.ENOTDIR)


def _holds_no_directory(path: str) -> bool:
    """True when ``path`` is a directory (not a symlink) with no directory in it."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        with os.scandir(path) as entries:
            return not any(entry.is_dir(follow_symlinks=False) for entry in entries)
    except OSError:
        return False  # unreadable or gone: cannot be shown to be a Maildir's message directory


def is_maildir(path: str | os.PathLike[str]) -> bool:
    """The Maildir rule (see the module docstring) for one directory. Read-only; a directory
    that cannot be read is not a Maildir (the copy then reports the read error itself)."""
    top = os.fspath(path)
    return all(_holds_no_directory(os.path.join(top, sub)) for sub in MESSAGE_DIRS)


def count_messages(root: Path) -> int:
    """Messages (files in a Maildir's ``cur/`` and ``new/``) below ``root``. Read-only."""
    return survey(root, ()).messages


@dataclass
class _Tally:
    files: int = 0
    bytes: int = 0
    messages: int = 0


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


class _Walker:
    def __init__(self, root: str, excludes: ExcludeMatcher) -> None:
        self.root = root
        self.excludes = excludes
        self.total = _Tally()
        self.maildirs: list[str] = []

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def walk(self) -> None:
        # An explicit stack of directories still to read: memory grows with the directories
        # waiting beside the current path, never with the messages.
        pending = [""]
        while pending:
            rel = pending.pop()
            subdirs = self.directory(rel)
            pending.extend(reversed(subdirs))

    def directory(self, rel: str) -> list[str]:
        """Count one directory's files; return its subdirectories still to walk."""
        path = self.path(rel)
        try:
            with os.scandir(path) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False), e) for e in it]
        except OSError as exc:
            if gone(exc) and rel:
                return []  # deleted or renamed while we walked (a live source)
            raise CopyFailed(f"cannot read {path}: {exc.strerror}") from None
        dirs = {name for name, is_dir, _e in entries if is_dir}
        maildir = False
        if all(sub in dirs for sub in MESSAGE_DIRS):
            maildir = self.message_dirs(rel)
        if maildir:
            self.maildirs.append(rel)
        walk: list[str] = []
        for name, is_dir, entry in sorted(entries, key=lambda e: e[0]):
            child = _join(rel, name)
            if maildir and is_dir and name in (*MESSAGE_DIRS, TMP_DIR):
                continue  # counted by message_dirs(); a Maildir's tmp/ content is left out
            if self.excludes.excluded(child, is_dir=is_dir):
                continue
            if is_dir:
                walk.append(child)
            else:
                self.file(child, entry, self.total)
        return walk

    def message_dirs(self, rel: str) -> bool:
        """Count ``cur/`` and ``new/`` of ``rel`` if it is a Maildir; False (nothing counted)
        when one of them holds a directory, so they are walked as ordinary directories."""
        tally = _Tally()
        for sub in MESSAGE_DIRS:
            sub_rel = _join(rel, sub)
            path = self.path(sub_rel)
            try:
                with os.scandir(path) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            return False
                        child = f"{sub_rel}/{entry.name}"
                        if self.excludes.excluded(child, is_dir=False):
                            continue
                        if self.file(child, entry, tally) and not entry.name.startswith("."):
                            tally.messages += 1
            except OSError as exc:
                if gone(exc):
                    return False  # gone since the parent was listed: nothing left to count
                raise CopyFailed(f"cannot read {path}: {exc.strerror}") from None
        self.total.files += tally.files
        self.total.bytes += tally.bytes
        self.total.messages += tally.messages
        return True

    def file(self, rel: str, entry: os.DirEntry[str], tally: _Tally) -> bool:
        """Count one entry if it is a regular file; True when it was."""
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError as exc:
            if gone(exc):
                return False  # expunged or renamed since the listing
            raise CopyFailed(f"cannot read {self.path(rel)}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            return False
        tally.files += 1
        tally.bytes += info.st_size
        return True


def survey(root: Path, excludes: Sequence[str]) -> Survey:
    """Walk ``root`` once (``os.scandir``, symlinks not followed) and say which directories are
    Maildirs and what a copy with ``excludes`` (rsync-style patterns) would hold.

    Read-only, so it also runs in dry run. Raises ``CopyFailed`` naming the directory when one
    cannot be read; entries that vanish while it walks (a live source) are skipped.
    """
    walker = _Walker(os.fspath(root), ExcludeMatcher(excludes))
    walker.walk()
    return Survey(
        maildirs=tuple(sorted(walker.maildirs)),
        messages=walker.total.messages,
        files=walker.total.files,
        bytes=walker.total.bytes,
    )
