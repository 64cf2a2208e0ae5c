"""The live copier: a Maildir-aware copy of a store that Dovecot is changing while we read it.

Why not rsync: rsync lists a directory, then opens each name. Between the two, Dovecot renames
``cur/NAME:2,S`` to ``cur/NAME:2,RS`` (a flag change), moves ``new/NAME`` to ``cur/NAME:2,`` or
moves the message to another folder; rsync then reports the file as vanished and the backup
lacks a message that existed the whole time. Dovecot's own lock does not help: flag renames do
not take ``dovecot-uidlist.lock``.

What this copier does instead:
- A message is keyed by its base name (the part before ``:2,``), which Dovecot never changes for
  renames within a folder. Each folder's messages are copied once per base name.
- ``new/`` is listed before ``cur/``, so a message moving ``new/``→``cur/`` between the two
  listings is seen in ``cur/``.
- When opening a listed name fails with ENOENT, the folder is listed again and the message is
  found under its new name; once open, renames no longer matter (we read the open file).
- The whole tree is re-scanned until ``quiet_passes`` passes in a row find nothing new, so a
  message moved into a folder that was already copied is still caught.
- The content of a Maildir's ``tmp/`` (half-delivered files) is never copied; ``tmp/`` itself is
  created empty so each folder stays a valid Maildir. What is a Maildir is decided by
  ``mailsnap.maildirs.is_maildir``, the rule every copier shares: a ``tmp``, ``new`` or ``cur``
  directory that is not part of a Maildir (a user called ``tmp``, a LAYOUT=fs folder
  ``Projects/tmp``) is ordinary content, walked and copied in full. Lock files are left out by
  the default excludes.
A message moved between folders during the copy can appear in both (a duplicate by Message-ID,
never a loss), just as in an atomic snapshot taken mid-MOVE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
from dataclasses import dataclass, field
import logging
import os
from pathlib import Path
import stat
import time
from typing import ClassVar

# The module, not its names: mailsnap.maildirs imports mailsnap.copiers.excludes, so importing
# it first runs this package's __init__, which imports this module before maildirs has finished.
from mailsnap import maildirs
from mailsnap.copiers.base import CopyStats
from mailsnap.copiers.excludes import ExcludeMatcher
from mailsnap.errors import CopyFailed
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

MESSAGE_DIRS = ("new", "cur")  # in this order: Dovecot only ever moves new/ → cur/
INFO_SEPARATOR = ":"  # Maildir's "NAME:2,FLAGS"; Dovecot's maildir_info_separator default
RELIST_ATTEMPTS = 5
WATCH_INTERVAL = 5.0
# A terminal redraws ten times a second; reporting more often only costs time per file.
PROGRESS_INTERVAL = 0.1
CHUNK = 1 << 20
# Above both, the "vanished" count is a warning, not an INFO line (see vanished_is_abnormal).
VANISHED_WARN_MIN = 20
VANISHED_WARN_SHARE = 0.10


def base_name(filename: str) -> str:
    """``1700000000.M1P2.host,S=123:2,RS`` → ``1700000000.M1P2.host,S=123``."""
    return filename.split(INFO_SEPARATOR, 1)[0]


@dataclass(slots=True)
class _Copied:
    """A message already in the backup, by its source inode."""

    folder: str
    base: str
    dest: Path
    size: int


@dataclass
class _Folder:
    """Per-folder state: which base names are already in the backup."""

    copied: set[str] = field(default_factory=set)
    previous: dict[str, Path] | None = None  # base name → file in the previous backup


class MaildirCopier:
    name: ClassVar[str] = "maildir"

    def __init__(self, runner: Runner, *, max_passes: int = 10, quiet_passes: int = 2,
                 progress: Progress | None = None) -> None:
        self.runner = runner
        self.max_passes = max_passes
        self.quiet_passes = quiet_passes
        # Called with (files, bytes) so far: often during a pass, and once after each pass.
        self.progress = progress

    def copy(
        self,
        source: Path,
        dest: Path,
        *,
        previous: Path | None,
        excludes: Sequence[str],
        watch: Callable[[], None] | None = None,
    ) -> CopyStats:
        """Copy a live Maildir tree. Dry run: one read-only pass that counts what it would copy.

        Stops when ``quiet_passes`` passes in a row find no new message, or after
        ``max_passes`` (under steady delivery new mail keeps arriving; mail delivered after the
        backup started is not owed to this backup, and the log says how much was still arriving).
        """
        run = _Run(source, dest, previous, ExcludeMatcher(excludes), self.runner.dry_run, watch,
                   self.progress)
        quiet = 0
        started = time.monotonic()
        new = 0
        for number in range(1, self.max_passes + 1):
            new = run.one_pass()
            run.stats.passes = number
            if self.progress is not None:
                self.progress(run.stats.files, run.stats.bytes)
            log.info("live copy pass %d: %d new files", number, new)
            if self.runner.dry_run:
                break
            quiet = quiet + 1 if new == 0 else 0
            if quiet >= self.quiet_passes:
                break
        else:
            log.warning(
                "live copy: stopped after %d passes; %d files arrived during the last one "
                "(mail delivered after the backup started; the next backup takes it)",
                self.max_passes,
                new,
            )
        run.finish_directories()
        abnormal = vanished_is_abnormal(run.stats.vanished, run.stats.files)
        log.info(
            "live copy: %d files, %d bytes (%d hard-linked to the previous backup) in %d "
            "passes, %.2fs; %d vanished before they could be read (%s), %d moved to "
            "another folder during the copy (kept once, in the new folder)",
            run.stats.files,
            run.stats.bytes,
            run.stats.linked,
            run.stats.passes,
            time.monotonic() - started,
            run.stats.vanished,
            "far too many, see the warning" if abnormal else "expunged",
            run.stats.moved,
        )
        if abnormal:
            log.warning(
                "live copy: %d messages vanished between listing and reading, against %d "
                "files copied; that many is not normal expunging: was the source unmounted, "
                "moved or replaced during the copy? Check the source before trusting this backup",
                run.stats.vanished,
                run.stats.files,
            )
        return run.stats


def vanished_is_abnormal(vanished: int, files: int) -> bool:
    """Users expunge a few messages during any copy; a large share vanishing means the tree
    itself went away under us (an unmount, a rename of the mail root), not users at work."""
    return vanished > VANISHED_WARN_MIN and vanished > files * VANISHED_WARN_SHARE


class _Run:
    def __init__(
        self,
        source: Path,
        dest: Path,
        previous: Path | None,
        excludes: ExcludeMatcher,
        dry_run: bool,
        watch: Callable[[], None] | None,
        progress: Progress | None = None,
    ) -> None:
        self.progress = progress
        self.last_progress = time.monotonic()
        self.source = source
        self.dest = dest
        self.previous = previous
        self.excludes = excludes
        self.dry_run = dry_run
        self.watch = watch
        self.last_watch = time.monotonic()
        self.stats = CopyStats(passes=0)
        self.folders: dict[str, _Folder] = {}
        self.plain_copied: set[str] = set()
        self.directories: dict[str, os.stat_result] = {}
        # Source inode → the message's copy. A MOVE (Dovecot hard-links into the new folder,
        # then unlinks the old name) keeps the inode, so a message seen again in another folder
        # with an inode we copied is either a COPY (both names still exist: hard-link them in
        # the backup too) or a MOVE during the copy (the old name is gone: drop the old copy,
        # so the backup holds the message once, where it is now).
        self.by_inode: dict[tuple[int, int], _Copied] = {}
        self.is_root = os.geteuid() == 0

    # -- walking ---------------------------------------------------------------------------

    def one_pass(self) -> int:
        before = self.stats.files
        self._directory("")
        return self.stats.files - before

    def _directory(self, rel: str) -> None:
        self._maybe_watch()
        path = self.source / rel if rel else self.source
        try:
            info = os.lstat(path)
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            if maildirs.gone(exc) and rel:
                return  # a folder deleted or renamed by the user; its new name is found later
            raise CopyFailed(f"cannot read {path}: {exc.strerror}") from None
        self._make_dir(rel, info)
        maildir = maildirs.is_maildir(path)
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            structural = maildir and is_dir and entry.name in (*MESSAGE_DIRS, "tmp")
            if not structural and self.excludes.excluded(child, is_dir=is_dir):
                continue
            if maildir and is_dir and entry.name in MESSAGE_DIRS:
                continue  # handled below, in a fixed order
            if maildir and is_dir and entry.name == "tmp":
                self._tmp_dir(child)
            elif is_dir:
                self._directory(child)
            else:
                self._plain_file(child)
        if maildir:
            self._messages(rel)

    def _tmp_dir(self, rel: str) -> None:
        """Create ``tmp/`` with its owner and mode, never its content (half-written files)."""
        try:
            info = os.lstat(self.source / rel)
        except OSError as exc:
            if maildirs.gone(exc):
                return
            raise
        self._make_dir(rel, info)

    # -- messages --------------------------------------------------------------------------

    def _list_messages(self, folder_rel: str) -> dict[str, str]:
        """base name → ``sub/filename`` for the folder's ``new/`` then ``cur/``."""
        found: dict[str, str] = {}
        for sub in MESSAGE_DIRS:
            path = self.source / folder_rel / sub if folder_rel else self.source / sub
            try:
                names = os.listdir(path)
            except OSError as exc:
                if maildirs.gone(exc):
                    continue
                raise CopyFailed(f"cannot list {path}: {exc.strerror}") from None
            for name in names:
                if not name.startswith("."):
                    found[base_name(name)] = f"{sub}/{name}"
        return found

    def _messages(self, folder_rel: str) -> None:
        folder = self.folders.setdefault(folder_rel, _Folder())
        for sub in MESSAGE_DIRS:
            rel = f"{folder_rel}/{sub}" if folder_rel else sub
            try:
                self._make_dir(rel, os.lstat(self.source / rel))
            except OSError as exc:
                if not maildirs.gone(exc):
                    raise
        listing = self._list_messages(folder_rel)
        for base in sorted(listing.keys() - folder.copied):
            self._maybe_watch()
            name = listing[base]
            for _attempt in range(RELIST_ATTEMPTS):
                rel = f"{folder_rel}/{name}" if folder_rel else name
                if self.excludes.excluded(rel, is_dir=False):
                    folder.copied.add(base)
                    break
                if self._copy_message(folder, folder_rel, base, rel):
                    folder.copied.add(base)
                    break
                # Renamed (flag change, new/ → cur/) since we listed: find it again.
                renamed = self._list_messages(folder_rel).get(base)
                if renamed is None:
                    # Moved to another folder or expunged; a later pass finds it if it moved.
                    self.stats.vanished += 1
                    break
                name = renamed

    def _copy_message(self, folder: _Folder, folder_rel: str, base: str, rel: str) -> bool:
        """Copy one message; False if it vanished before we could open it."""
        try:
            fd = os.open(self.source / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if maildirs.gone(exc):
                return False
            raise CopyFailed(f"cannot read {self.source / rel}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            key = (info.st_dev, info.st_ino)
            earlier = self.by_inode.get(key)
            if earlier is not None and earlier.folder != folder_rel:
                if self._list_messages(earlier.folder).get(earlier.base) is None:
                    self._drop_moved(earlier)
                    earlier = None
            if not self._link_previous(folder, folder_rel, base, rel, info):
                self._write_copy(fd, rel, info, same_as=earlier.dest if earlier else None)
            self.by_inode[key] = _Copied(folder_rel, base, self.dest / rel, info.st_size)
        finally:
            os.close(fd)
        return True

    def _drop_moved(self, earlier: _Copied) -> None:
        """The message moved to another folder while we copied: keep only its new place."""
        log.debug("moved during the copy: %s/%s", earlier.folder or "INBOX", earlier.base)
        self.stats.files -= 1
        self.stats.bytes -= earlier.size
        self.stats.moved += 1
        if not self.dry_run:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(earlier.dest)

    def _link_previous(
        self, folder: _Folder, folder_rel: str, base: str, rel: str, info: os.stat_result
    ) -> bool:
        """Hard-link a message that the previous backup already holds. A Maildir message never
        changes content, only its name, so the same base name with the same size and mtime is
        the same message even if its flags (and so its name) changed since.
        """
        if self.previous is None:
            return False
        if folder.previous is None:
            folder.previous = self._previous_index(folder_rel)
        old = folder.previous.get(base)
        if old is None:
            return False
        try:
            old_info = os.lstat(old)
        except OSError:
            return False
        if old_info.st_size != info.st_size or old_info.st_mtime_ns != info.st_mtime_ns:
            return False
        self.stats.files += 1
        self.stats.bytes += info.st_size
        self.stats.linked += 1
        self._report()
        if not self.dry_run:
            os.link(old, self.dest / rel)
        return True

    def _previous_index(self, folder_rel: str) -> dict[str, Path]:
        assert self.previous is not None
        index: dict[str, Path] = {}
        for sub in MESSAGE_DIRS:
            path = self.previous / folder_rel / sub
            try:
                names = os.listdir(path)
            except OSError:
                continue
            for name in names:
                index[base_name(name)] = path / name
        return index

    # -- plain files -----------------------------------------------------------------------

    def _plain_file(self, rel: str) -> None:
        """dovecot-uidlist, index files, subscriptions …: copied once, on first sight."""
        if rel in self.plain_copied:
            return
        path = self.source / rel
        try:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                if not self.dry_run:
                    os.symlink(os.readlink(path), self.dest / rel)
                    self._own(self.dest / rel, info, follow=False)
                self.plain_copied.add(rel)
                return
            if not stat.S_ISREG(info.st_mode):
                log.warning("skipping %s: not a regular file", path)
                self.plain_copied.add(rel)
                return
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if maildirs.gone(exc):
                return  # rewritten by Dovecot (index files are replaced by rename); next pass
            raise CopyFailed(f"cannot read {path}: {exc.strerror}") from None
        try:
            self._write_copy(fd, rel, os.fstat(fd))
        finally:
            os.close(fd)
        self.plain_copied.add(rel)

    # -- writing ---------------------------------------------------------------------------

    def _write_copy(
        self, fd: int, rel: str, info: os.stat_result, *, same_as: Path | None = None
    ) -> None:
        """Copy the open file ``fd`` to ``rel`` in the backup, or hard-link it to ``same_as``
        (the copy of the same source inode: Dovecot's COPY hard-links messages)."""
        self.stats.files += 1
        self.stats.bytes += info.st_size
        self._report()
        if self.dry_run:
            return
        target = self.dest / rel
        if same_as is not None:
            try:
                os.link(same_as, target)
                return
            except FileNotFoundError:
                pass  # that copy was dropped (moved away); write this one out
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            out = os.open(target, flags, 0o600)
        except OSError as exc:
            raise CopyFailed(f"cannot write {target}: {exc.strerror}") from None
        try:
            while chunk := os.read(fd, CHUNK):
                os.write(out, chunk)
            self._own_fd(out, info)
            os.utime(out, ns=(info.st_atime_ns, info.st_mtime_ns))
        except OSError as exc:
            raise CopyFailed(f"cannot write {target}: {exc.strerror}") from None
        finally:
            os.close(out)

    def _own_fd(self, fd: int, info: os.stat_result) -> None:
        if self.is_root:
            os.fchown(fd, info.st_uid, info.st_gid)
        os.fchmod(fd, stat.S_IMODE(info.st_mode))

    def _own(self, path: Path, info: os.stat_result, *, follow: bool = True) -> None:
        if self.is_root:
            os.chown(path, info.st_uid, info.st_gid, follow_symlinks=follow)
        if follow:
            os.chmod(path, stat.S_IMODE(info.st_mode))

    def _make_dir(self, rel: str, info: os.stat_result) -> None:
        if rel in self.directories:
            return
        self.directories[rel] = info
        if self.dry_run:
            return
        target = self.dest / rel if rel else self.dest
        target.mkdir(mode=0o700, exist_ok=True)
        self._own(target, info)

    def finish_directories(self) -> None:
        """Directory times last, deepest first: creating entries would bump them."""
        if self.dry_run:
            return
        for rel in sorted(self.directories, key=lambda r: r.count("/"), reverse=True):
            if not rel:
                continue  # the top is the backup's own mail/ directory; its time is the run's
            info = self.directories[rel]
            os.utime(self.dest / rel, ns=(info.st_atime_ns, info.st_mtime_ns))

    def _report(self) -> None:
        if self.progress is not None and time.monotonic() - self.last_progress >= \
                PROGRESS_INTERVAL:
            self.last_progress = time.monotonic()
            self.progress(self.stats.files, self.stats.bytes)

    def _maybe_watch(self) -> None:
        if self.watch is not None and time.monotonic() - self.last_watch > WATCH_INTERVAL:
            self.last_watch = time.monotonic()
            self.watch()

