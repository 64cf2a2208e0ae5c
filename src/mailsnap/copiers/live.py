"""The Maildir copier's walk over a live tree: a store that Dovecot changes while we read it.

Why not rsync: rsync lists a directory, then opens each name. Between the two, Dovecot renames
``cur/NAME:2,S`` to ``cur/NAME:2,RS`` (a flag change), moves ``new/NAME`` to ``cur/NAME:2,`` or
moves the message to another folder; rsync then reports the file as vanished and the backup
lacks a message that existed the whole time. Dovecot's own lock does not help: flag renames do
not take ``dovecot-uidlist.lock``.

What this walk does instead:
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
  ``mailsnap.maildirs.is_maildir``, the rule every copier shares.
- A message the previous backup holds (same base name, size, mtime, mode and owner, anywhere in
  the same mailbox, by the previous manifest) is hard-linked to it: renames and moves write
  nothing. Files that are not messages are linked when unchanged.
A message moved between folders during the copy can appear in both (a duplicate by Message-ID,
never a loss), just as in an atomic snapshot taken mid-MOVE; one whose old name is gone by the
time the new one is seen is kept once, in its new folder.

The manifest's records are kept until the walk ends (a later pass may drop a copy that moved),
then written in walk order; so unlike the one-pass copy of a snapshot, a live copy holds one
record per file in memory.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
from dataclasses import dataclass, field
import logging
import os
from pathlib import Path
import stat
import time

# The module, not its names: mailsnap.maildirs imports mailsnap.copiers.excludes, so importing
# it first runs this package's __init__, which imports this module before maildirs has finished.
from mailsnap import faults, maildirs
from mailsnap.copiers.base import CopyStats
from mailsnap.copiers.changes import FolderTimes, directory_fields
from mailsnap.copiers.excludes import ExcludeMatcher
from mailsnap.copiers.files import (
    IS_ROOT,
    base_name,
    copy_open_file,
    copy_symlink,
    make_directory,
    same_file,
    tail_of,
)
from mailsnap.errors import CopyFailed
from mailsnap.manifest import (
    COPIED,
    HARDLINK,
    LINKED,
    ManifestWriter,
    PreviousManifest,
    Section,
    escape,
    section_key,
    tail_size,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

MESSAGE_DIRS = ("new", "cur")  # in this order: Dovecot only ever moves new/ → cur/
RELIST_ATTEMPTS = 5
WATCH_INTERVAL = 5.0
# A terminal redraws ten times a second; reporting more often only costs time per file.
PROGRESS_INTERVAL = 0.1
# Above both, the "vanished" count is a warning, not an INFO line (see vanished_is_abnormal).
VANISHED_WARN_MIN = 20
VANISHED_WARN_SHARE = 0.10


def vanished_is_abnormal(vanished: int, files: int) -> bool:
    """Users expunge a few messages during any copy; a large share vanishing means the tree
    itself went away under us (an unmount, a rename of the mail root), not users at work."""
    return vanished > VANISHED_WARN_MIN and vanished > files * VANISHED_WARN_SHARE


@dataclass(slots=True)
class _Copied:
    """A message already in the backup, by its source inode."""

    folder: str
    base: str
    rel: str
    size: int


@dataclass
class _Folder:
    """Per-folder state: which base names are already in the backup, and its mailbox."""

    mailbox: str | None
    copied: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Record:
    section: str
    how: str
    tail: str


class LiveCopy:
    def __init__(
        self,
        source: Path,
        dest: Path,
        *,
        previous: Path | None,
        previous_manifest: PreviousManifest | None,
        manifest: ManifestWriter | None,
        excludes: ExcludeMatcher,
        dry_run: bool,
        watch: Callable[[], None] | None,
        progress: Progress | None = None,
        max_passes: int = 10,
        quiet_passes: int = 2,
        folders: FolderTimes | None = None,
    ) -> None:
        self.progress = progress
        self.folders_check = folders
        # Folders taken over from the previous backup unlisted (see ``_take_over``): their
        # cur/ and new/ as they were then. A later pass lists a folder once they move.
        self.taken: dict[str, dict[str, str]] = {}
        self.unlisted: dict[str, list[str]] = {}  # mailbox → its folders taken over
        self.last_progress = time.monotonic()
        self.source = source
        self.dest = dest
        self.previous = previous
        self.previous_manifest = previous_manifest
        self.manifest = manifest
        self.excludes = excludes
        self.dry_run = dry_run
        self.watch = watch
        self.max_passes = max_passes
        self.quiet_passes = quiet_passes
        self.last_watch = time.monotonic()
        self.stats = CopyStats(passes=0, messages=0)
        self.folders: dict[str, _Folder] = {}
        self.plain_copied: set[str] = set()
        self.directories: dict[str, tuple[str, os.stat_result]] = {}
        self.records: dict[str, _Record] = {}
        self.links: dict[str, str] = {}  # symlinks: path → its L record
        # Source inode → the message's copy. A MOVE (Dovecot hard-links into the new folder,
        # then unlinks the old name) keeps the inode, so a message seen again in another folder
        # with an inode we copied is either a COPY (both names still exist: hard-link them in
        # the backup too) or a MOVE during the copy (the old name is gone: drop the old copy,
        # so the backup holds the message once, where it is now).
        self.by_inode: dict[tuple[int, int], _Copied] = {}
        self.put_off: set[tuple[int, int]] = set()
        self.put_off_in_pass = 0
        self.last_pass = False

    def run(self) -> CopyStats:
        """Copy until ``quiet_passes`` passes in a row find no new message, or after
        ``max_passes`` (under steady delivery new mail keeps arriving; mail delivered after the
        backup started is not owed to this backup, and the log says how much was still
        arriving). Dry run: one read-only pass that counts what it would copy."""
        quiet = 0
        started = time.monotonic()
        new = 0
        for number in range(1, self.max_passes + 1):
            # The last pass puts nothing off: a put-off message must be copied by a later
            # pass, and there is none.
            self.last_pass = number == self.max_passes
            self.put_off_in_pass = 0
            new = self.one_pass()
            self.stats.passes = number
            if self.progress is not None:
                self.progress(self.stats.files, self.stats.bytes)
            log.info("live copy pass %d: %d new files", number, new)
            if self.dry_run:
                break
            # A pass that put a message off is not quiet: the next pass must take it.
            quiet = quiet + 1 if new == 0 and self.put_off_in_pass == 0 else 0
            if quiet >= self.quiet_passes:
                break
        else:
            log.warning(
                "live copy: stopped after %d passes; %d files arrived during the last one "
                "(mail delivered after the backup started; the next backup takes it)",
                self.max_passes,
                new,
            )
        self.finish_directories()
        self._write_manifest()
        abnormal = vanished_is_abnormal(self.stats.vanished, self.stats.files)
        log.info(
            "live copy: %d files, %d bytes (%d hard-linked to the previous backup) in %d "
            "passes, %.2fs; %d vanished before they could be read (%s), %d moved to "
            "another folder during the copy (kept once, in the new folder)",
            self.stats.files,
            self.stats.bytes,
            self.stats.linked,
            self.stats.passes,
            time.monotonic() - started,
            self.stats.vanished,
            "far too many, see the warning" if abnormal else "expunged",
            self.stats.moved,
        )
        if abnormal:
            log.warning(
                "live copy: %d messages vanished between listing and reading, against %d "
                "files copied; that many is not normal expunging: was the source unmounted, "
                "moved or replaced during the copy? Check the source before trusting this backup",
                self.stats.vanished,
                self.stats.files,
            )
        return self.stats

    # -- walking ---------------------------------------------------------------------------

    def one_pass(self) -> int:
        before = self.stats.files
        self._directory("", None)
        return self.stats.files - before

    def _directory(self, rel: str, mailbox: str | None) -> None:
        self._maybe_watch()
        path = self.source / rel if rel else self.source
        try:
            info = os.lstat(path)
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            if maildirs.gone(exc) and rel:
                return  # a folder deleted or renamed by the user; its new name is found later
            raise CopyFailed(f"cannot read {path}: {exc.strerror}") from None
        maildir = maildirs.is_maildir(path)
        if maildir and mailbox is None:
            mailbox = rel  # a user's Maildir root: its folders are one mailbox
        section = mailbox if mailbox is not None else rel
        self._make_dir(rel, info, section)
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
                self._tmp_dir(child, section)
            elif is_dir:
                self._directory(child, mailbox)
            else:
                self._plain_file(child, section)
        if maildir:
            self._messages(rel, section)

    def _tmp_dir(self, rel: str, section: str) -> None:
        """Create ``tmp/`` with its owner and mode, never its content (half-written files)."""
        try:
            info = os.lstat(self.source / rel)
        except OSError as exc:
            if maildirs.gone(exc):
                return
            raise
        self._make_dir(rel, info, section)

    def _previous_section(self, key: str) -> Section | None:
        if self.previous is None or self.previous_manifest is None:
            return None
        return self.previous_manifest.section(key)

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

    def _messages(self, folder_rel: str, section: str) -> None:
        first = folder_rel not in self.folders
        folder = self.folders.setdefault(folder_rel, _Folder(section))
        infos: dict[str, os.stat_result] = {}
        for sub in MESSAGE_DIRS:
            rel = f"{folder_rel}/{sub}" if folder_rel else sub
            try:
                infos[sub] = os.lstat(self.source / rel)
                self._make_dir(rel, infos[sub], section)
            except OSError as exc:
                if not maildirs.gone(exc):
                    raise
        taken = self.taken.get(folder_rel)
        if taken is not None:
            if all(sub in infos and directory_fields(infos[sub]) == taken[sub]
                   for sub in MESSAGE_DIRS):
                return  # nothing moved in it since it was taken over
            del self.taken[folder_rel]  # changed during the run: listed from now on
        elif first and self._take_over(folder, folder_rel, section, infos):
            return
        if first:
            self.stats.summary.folders_listed += len(infos)
        self._dot_files(folder_rel, section)
        listing = self._list_messages(folder_rel)
        for base in sorted(listing.keys() - folder.copied):
            self._maybe_watch()
            name = listing[base]
            for _attempt in range(RELIST_ATTEMPTS):
                rel = f"{folder_rel}/{name}" if folder_rel else name
                if self.excludes.excluded(rel, is_dir=False):
                    folder.copied.add(base)
                    break
                done = self._copy_message(folder, folder_rel, base, rel)
                if done is None:
                    break  # another name of it first: taken up by the next pass
                if done:
                    folder.copied.add(base)
                    break
                # Renamed (flag change, new/ → cur/) since we listed: find it again.
                renamed = self._list_messages(folder_rel).get(base)
                if renamed is None:
                    # Moved to another folder or expunged; a later pass finds it if it moved.
                    self.stats.vanished += 1
                    break
                name = renamed

    def _take_over(self, folder: _Folder, folder_rel: str, section: str,
                   infos: dict[str, os.stat_result]) -> bool:
        """A folder whose ``cur/`` and ``new/`` are unchanged since the previous backup
        (``mailsnap.copiers.changes``): its messages are linked from the previous backup by
        the previous manifest, unlisted. False (nothing done) when it cannot be."""
        previous = self._previous_section(section)
        check = self.folders_check
        if check is None or previous is None or set(infos) != set(MESSAGE_DIRS):
            return False
        subs = {sub: f"{folder_rel}/{sub}" if folder_rel else sub for sub in MESSAGE_DIRS}
        for sub, rel in subs.items():
            if (not check.unchanged(previous.directories.get(rel), infos[sub])
                    or rel in previous.symlinks or previous.has_subdirectories(rel)):
                return False
        for rel in subs.values():
            for path in previous.in_directory(rel):
                name = path[len(rel) + 1:]
                if self.excludes.excluded(path, is_dir=False):
                    continue
                if name.startswith("."):
                    self._plain_file(path, section)
                    continue
                tail = previous.files[path]
                if not self.dry_run:
                    assert self.previous is not None
                    try:
                        os.link(self.previous / path, self.dest / path)
                    except FileNotFoundError:
                        continue  # lost from the previous backup: the next pass copies it
                self._record_link(path, section, tail, tail_size(tail), renamed=False)
                self.stats.messages = (self.stats.messages or 0) + 1
                folder.copied.add(base_name(name))
        self.taken[folder_rel] = {sub: directory_fields(infos[sub]) for sub in MESSAGE_DIRS}
        self.unlisted.setdefault(section, []).append(folder_rel)
        self.stats.summary.folders_unchanged += len(MESSAGE_DIRS)
        return True

    def _learn_inodes(self, mailbox: str) -> None:
        """A new hard link in the source (Dovecot's COPY) whose other name may be in a folder
        taken over unlisted: ``stat`` those folders' messages once, so the backup links the
        two names as the source does."""
        previous = self._previous_section(mailbox)
        for folder_rel in self.unlisted.pop(mailbox, []):
            for sub in MESSAGE_DIRS:
                rel = f"{folder_rel}/{sub}" if folder_rel else sub
                for path in previous.in_directory(rel) if previous is not None else ():
                    try:
                        info = os.lstat(self.source / path)
                    except OSError:
                        continue
                    if info.st_nlink > 1 and path in self.records:
                        self.by_inode.setdefault((info.st_dev, info.st_ino), _Copied(
                            folder_rel, base_name(path[len(rel) + 1:]), path, info.st_size))

    def _dot_files(self, folder_rel: str, section: str) -> None:
        """Names starting with "." in ``cur/`` and ``new/`` are not messages by the Maildir
        spec, but they are in the source: copied as plain files, like a snapshot copy does."""
        for sub in MESSAGE_DIRS:
            rel = f"{folder_rel}/{sub}" if folder_rel else sub
            try:
                names = os.listdir(self.source / rel)
            except OSError as exc:
                if maildirs.gone(exc):
                    continue
                raise CopyFailed(f"cannot list {self.source / rel}: {exc.strerror}") from None
            for name in names:
                if name.startswith(".") and not self.excludes.excluded(f"{rel}/{name}",
                                                                       is_dir=False):
                    self._plain_file(f"{rel}/{name}", section)

    def _copy_message(self, folder: _Folder, folder_rel: str, base: str,
                      rel: str) -> bool | None:
        """Copy one message; False if it vanished before we could open it, None if it was
        put off to the next pass (a new name of a hard-linked inode, see below)."""
        try:
            fd = os.open(self.source / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if maildirs.gone(exc):
                return False
            raise CopyFailed(f"cannot read {self.source / rel}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            key = (info.st_dev, info.st_ino)
            if info.st_nlink > 1 and key not in self.by_inode and folder.mailbox in self.unlisted:
                self._learn_inodes(folder.mailbox)
            earlier = self.by_inode.get(key)
            if earlier is not None and earlier.folder != folder_rel:
                if self._list_messages(earlier.folder).get(earlier.base) is None:
                    self._drop_moved(earlier)
                    earlier = None
            assert folder.mailbox is not None
            # A second name of an inode already in the backup (Dovecot's COPY): link it to
            # that copy, so the source's hard links stay hard links, whichever name came first.
            if not (earlier is not None and self._hard_link(rel, earlier.rel, info,
                                                            folder.mailbox, base)) \
                    and not self._link_previous(folder.mailbox, base, rel, info):
                if info.st_nlink > 1 and key not in self.put_off and not self.last_pass:
                    # A new name of a hard-linked inode (a COPY since the last backup) seen
                    # before its older name, which the previous backup holds: once, wait a
                    # pass for that name to be linked, then link this one to it.
                    self.put_off.add(key)
                    self.put_off_in_pass += 1
                    return None
                self._write_copy(fd, rel, info, folder.mailbox)
            self.stats.messages = (self.stats.messages or 0) + 1
            self.by_inode[key] = _Copied(folder_rel, base, rel, info.st_size)
        finally:
            os.close(fd)
        return True

    def _drop_moved(self, earlier: _Copied) -> None:
        """The message moved to another folder while we copied: keep only its new place."""
        log.debug("moved during the copy: %s/%s", earlier.folder or "INBOX", earlier.base)
        self.stats.files -= 1
        self.stats.bytes -= earlier.size
        self.stats.moved += 1
        self.stats.messages = (self.stats.messages or 0) - 1
        record = self.records.pop(earlier.rel, None)
        if record is not None:
            summary = self.stats.summary
            if record.how == COPIED:
                summary.copied -= 1
                summary.bytes_written -= earlier.size
            elif record.how == LINKED:
                summary.linked -= 1
                summary.bytes_linked -= earlier.size
                self.stats.linked -= 1
            else:
                summary.hardlinked -= 1
                self.stats.linked -= 1
        if not self.dry_run:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dest / earlier.rel)

    def _link_previous(self, section_name: str, base: str, rel: str,
                       info: os.stat_result) -> bool:
        """Hard-link a message that the previous backup already holds: the same base name
        anywhere in the mailbox with the same size, mtime, mode and owner is the same message
        even if its flags (and so its name) or its folder changed since."""
        section = self._previous_section(section_name)
        if section is None:
            return False
        candidates = [rel] if rel in section.files else []
        candidates += [old for old in section.by_base(base) if old != rel]
        for old in candidates:
            tail = section.files[old]
            if not same_file(tail, info):
                continue
            if not self.dry_run:
                assert self.previous is not None
                try:
                    os.link(self.previous / old, self.dest / rel)
                except FileNotFoundError:
                    continue
            self._record_link(rel, section_name, tail, info.st_size, renamed=old != rel)
            return True
        return False

    def _record_link(self, rel: str, section: str, tail: str, size: int, *,
                     renamed: bool) -> None:
        self.records[rel] = _Record(section, LINKED, tail)
        self.stats.files += 1
        self.stats.bytes += size
        self.stats.linked += 1
        summary = self.stats.summary
        summary.linked += 1
        summary.bytes_linked += size
        summary.renames += renamed
        self._report()

    # -- plain files -----------------------------------------------------------------------

    def _plain_file(self, rel: str, section: str) -> None:
        """dovecot-uidlist, index files, subscriptions …: linked when unchanged since the
        previous backup, else copied; once, on first sight."""
        if rel in self.plain_copied:
            return
        path = self.source / rel
        try:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(path)
                if not self.dry_run:
                    copy_symlink(str(path), str(self.dest / rel), info)
                self.links[rel] = (f"L\t{escape(rel)}\t{escape(target)}\t{info.st_uid}\t"
                                   f"{info.st_gid}\t{info.st_mtime_ns}\n")
                self.records[rel] = _Record(section, "symlink", "")
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
            info = os.fstat(fd)
            previous = self._previous_section(section)
            tail = previous.files.get(rel) if previous is not None else None
            linked = False
            if tail is not None and same_file(tail, info):
                try:
                    if not self.dry_run:
                        assert self.previous is not None
                        os.link(self.previous / rel, self.dest / rel)
                    linked = True
                except FileNotFoundError:
                    pass
            if linked:
                assert tail is not None
                self._record_link(rel, section, tail, info.st_size, renamed=False)
            else:
                self._write_copy(fd, rel, info, section)
        finally:
            os.close(fd)
        self.plain_copied.add(rel)

    # -- writing ---------------------------------------------------------------------------

    def _hard_link(self, rel: str, same_as: str, info: os.stat_result, section: str,
                   base: str) -> bool:
        """Hard-link ``rel`` to ``same_as``, this backup's copy of the same source inode; False
        when that copy is gone (dropped as moved away)."""
        earlier = self.records.get(same_as)
        if earlier is None:
            return False
        try:
            if not self.dry_run:
                os.link(self.dest / same_as, self.dest / rel)
        except FileNotFoundError:
            return False
        self.records[rel] = _Record(section, HARDLINK, earlier.tail)
        previous = self._previous_section(section)
        # A renamed message of a COPY pair: one of the renames found, linked through its pair.
        self.stats.summary.renames += bool(previous is not None and rel not in previous.files
                                           and previous.by_base(base))
        self.stats.files += 1
        self.stats.bytes += info.st_size
        self.stats.summary.hardlinked += 1
        self.stats.linked += 1
        self._report()
        return True

    def _write_copy(self, fd: int, rel: str, info: os.stat_result, section: str) -> None:
        """Copy the open file ``fd`` to ``rel`` in the backup."""
        self.stats.files += 1
        self.stats.bytes += info.st_size
        self._report()
        summary = self.stats.summary
        sha = "" if self.dry_run else copy_open_file(fd, info, str(self.dest / rel))[0]
        self.records[rel] = _Record(section, COPIED, tail_of(info, sha))
        summary.copied += 1
        summary.bytes_written += info.st_size

    def _make_dir(self, rel: str, info: os.stat_result, section: str) -> None:
        if rel in self.directories:
            return
        self.directories[rel] = (section, info)
        self.stats.summary.directories += 1
        if self.dry_run:
            return
        target = self.dest / rel if rel else self.dest
        if rel:
            make_directory(str(target), info)
        else:  # mail/ itself, as rsync makes it; the backup directory around it stays 0700
            if IS_ROOT:
                os.chown(target, info.st_uid, info.st_gid)
            os.chmod(target, stat.S_IMODE(info.st_mode))

    def finish_directories(self) -> None:
        """Directory times last, deepest first: creating entries would bump them."""
        if self.dry_run:
            return
        for rel in sorted(self.directories, key=lambda r: r.count("/"), reverse=True):
            if not rel:
                continue  # the top is the backup's own mail/ directory; its time is the run's
            info = self.directories[rel][1]
            os.utime(self.dest / rel, ns=(info.st_atime_ns, info.st_mtime_ns))

    def _write_manifest(self) -> None:
        """The records, grouped into sections in walk order (see ``mailsnap.manifest``)."""
        if self.manifest is None:
            return
        sections: dict[str, list[str]] = {}
        for rel, (section, info) in self.directories.items():
            sections.setdefault(section, []).append(
                f"D\t{escape(rel)}\t{directory_fields(info)}\n")
        for rel, record in self.records.items():
            if record.how == "symlink":
                sections.setdefault(record.section, []).append(self.links[rel])
            else:
                sections.setdefault(record.section, []).append(
                    f"F\t{escape(rel)}\t{record.how}\t{record.tail}\n")
        for key in sorted(sections, key=section_key):
            self.manifest.section(key, sections[key])

    def _report(self) -> None:
        if self.progress is not None and time.monotonic() - self.last_progress >= \
                PROGRESS_INTERVAL:
            self.last_progress = time.monotonic()
            self.progress(self.stats.files, self.stats.bytes)

    def _maybe_watch(self) -> None:
        if self.watch is not None and time.monotonic() - self.last_watch > \
                faults.poll_interval(WATCH_INTERVAL):
            self.last_watch = time.monotonic()
            self.watch()
