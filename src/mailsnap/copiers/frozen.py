"""The Maildir copier's one pass over a frozen tree (a read-only snapshot).

Nothing moves under a snapshot, so each directory is listed once and no name is looked up
twice. What the previous backup holds comes from its manifest (``PreviousManifest``), read in
step with the walk, one mailbox at a time. For each message in ``cur/`` and ``new/``:

1. Same path, and the size in its name (Dovecot's ``,S=``) matches the previous record: hard
   link to the previous backup. No ``stat``: the name and the manifest already answer, and a
   Maildir message never changes content, only its name. (A folder whose ``cur/`` or ``new/``
   changed owner or mode since the previous backup — a ``chown -R`` after a uid change — is
   checked file by file instead.)
2. Else the same base name (before ``:2,``) with the same size anywhere in the same mailbox
   (the user's Maildir root and all its folders, ``new/`` or ``cur/``): hard link under the new
   name and place. Flag changes, ``new/``→``cur/`` and folder moves write no message bytes.
3. Else a new message: copied and hashed. One with more than one link in the source is a
   Dovecot COPY (or an LMTP delivery to several users): it becomes a hard link to the copy of
   the same source inode if there is one, so the backup keeps the source's hard links.
Files that are not messages (``dovecot-uidlist``, ``dovecot.index*``, ``subscriptions`` …) are
``stat``'ed and linked only when size, mtime, mode and owner are unchanged.

The link and copy system calls run in a thread pool, a few thousand messages per task; the walk,
the manifest and the bookkeeping stay in the calling thread, which walks the next mailbox while
the pool works on the last one (``_close``).

What changed since the previous backup: a ``cur/`` or ``new/`` whose mtime, ctime, inode, mode
and owner are what the previous manifest recorded is taken over from it unlisted
(``copiers.changes``: the rules and their holes); every other directory is listed. The seam for
another change list (``btrfs send --no-data``) is ``Listing``.

In place (``target_snapshots``): the backup directory already holds a writable snapshot of the
previous backup. Then an unchanged folder costs nothing at all, a kept message no system call,
a renamed or moved one a ``rename`` inside the snapshot (a ``link`` when its old name stays),
and what else the source no longer has is removed when its mailbox is done. In a folder that
is listed (a flag change renamed one of its messages), the names it still holds are not looked
at one by one: set operations on the two listings find the few that differ, and the others'
records are carried over as text (``_carry``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
import errno
import functools
import itertools
import logging
import os
from pathlib import Path
import shutil
import stat
import threading
import time
from typing import Protocol

from mailsnap import faults
from mailsnap.copiers.base import CopyStats
from mailsnap.copiers.changes import FolderTimes, directory_fields
from mailsnap.copiers.excludes import ExcludeMatcher
from mailsnap.copiers.files import (
    IS_ROOT,
    Reflinks,
    append_open_file,
    base_name,
    copy_open_file,
    copy_symlink,
    make_directory,
    same_file,
    size_digits,
    tail_of,
)
from mailsnap.errors import CopyFailed
from mailsnap.manifest import (
    APPENDED,
    COPIED,
    HARDLINK,
    LINKED,
    REFLINKED,
    ManifestWriter,
    MessageFrame,
    PreviousManifest,
    Section,
    escape,
    tail_sha256,
    tail_size,
)
from mailsnap.subvolumes import clone_file

log = logging.getLogger(__name__)

MESSAGE_DIRS = ("new", "cur")
# Messages per task for the thread pool: large enough that a task's overhead is noise, small
# enough that one 20,000-message cur/ is shared between the threads.
CHUNK_MESSAGES = 2000
# Mailboxes whose tasks may still run while the walk goes on (``_close``): enough that a
# mailbox with many renames does not stop the walk of the small ones after it.
PENDING_SECTIONS = 8
PROGRESS_INTERVAL = 0.1
WATCH_INTERVAL = 5.0
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def default_threads() -> int:
    """Links and copies are system calls that release the GIL; on the 2-core test machine two
    threads halve the time of 200,000 links and more do not help (measured). Up to 8."""
    override = os.environ.get("MAILSNAP_COPY_THREADS")
    if override and override.isdigit() and int(override) > 0:
        return int(override)
    return max(1, min(8, os.cpu_count() or 1))


def _open_source(path: str) -> int:
    try:
        return os.open(path, OPEN_FLAGS)
    except OSError as exc:
        raise CopyFailed(f"cannot read {path}: {exc.strerror}") from None


class Listing(Protocol):
    """Where the copy learns what a directory holds. A full listing today; a change list
    (unchanged folders taken over whole) can replace it without touching the copy."""

    def scan(self, path: str) -> list[os.DirEntry[str]]: ...


class FullListing:
    def scan(self, path: str) -> list[os.DirEntry[str]]:
        with os.scandir(path) as entries:
            return list(entries)


@dataclass
class _Result:
    """What one task did; merged into the section and the stats by the calling thread."""

    # Messages linked by name on the fast path: their paths and record tails (the tail is the
    # previous record's own string), made into ``F`` lines only as the section is written.
    # Ahead of ``lines`` in the manifest, as if they had been appended there first.
    directory: str | None = None  # the message directory it holds records of (None: head)
    # In place, the previous records of the names a listed directory still holds (``_carry``):
    # written first, as they were, in one block of text.
    carried: str = ""
    carried_records: int = 0
    fast_paths: list[str] = field(default_factory=list)
    fast_tails: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    deferred: list[tuple[str, str, os.stat_result]] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    messages: int = 0
    copied: int = 0
    bytes_written: int = 0
    linked: int = 0
    bytes_linked: int = 0
    renames: int = 0
    reflinked: int = 0
    appended: int = 0

    def records(self) -> Iterator[str]:
        """The manifest lines of this task, in the order it made them."""
        if self.carried:
            yield self.carried
        for rel, tail in zip(self.fast_paths, self.fast_tails, strict=True):
            yield f"F\t{escape(rel)}\t{LINKED}\t{tail}\n"
        yield from self.lines

    def link(self, rel: str, tail: str, size: int, *, renamed: bool) -> None:
        self.lines.append(f"F\t{escape(rel)}\t{LINKED}\t{tail}\n")
        self.files += 1
        self.bytes += size
        self.linked += 1
        self.bytes_linked += size
        self.renames += renamed

    def append(self, rel: str, tail: str, size: int, written: int) -> None:
        self.lines.append(f"F\t{escape(rel)}\t{APPENDED}\t{tail}\n")
        self.files += 1
        self.bytes += size
        self.appended += 1
        self.bytes_written += written

    def copy(self, rel: str, tail: str, size: int, *, reflinked: bool = False) -> None:
        self.lines.append(f"F\t{escape(rel)}\t{REFLINKED if reflinked else COPIED}\t{tail}\n")
        self.files += 1
        self.bytes += size
        if reflinked:  # shares the snapshot's extents: nothing written
            self.reflinked += 1
        else:
            self.copied += 1
            self.bytes_written += size


@dataclass
class _Section:
    """A mailbox (or a directory outside any Maildir) being copied: its previous records,
    the tasks still running, and the records to write when it is done."""

    key: str
    previous: Section | None
    results: list[_Result] = field(default_factory=list)
    # (directory, work for the pool): taken in turns between directories by ``_submit``.
    tasks: list[tuple[str, Callable[[], _Result]]] = field(default_factory=list)
    futures: list[Future[_Result]] = field(default_factory=list)
    head: _Result = field(default_factory=_Result)  # directories and plain files
    inodes: dict[int, tuple[str, str]] = field(default_factory=dict)
    # In place: paths the source no longer has (removed when the mailbox is done, so a moved
    # message can still be linked from its old place), and paths replaced by another file
    # (never a source for such a link).
    removals: list[str] = field(default_factory=list)
    replaced: set[str] = field(default_factory=set)
    # In place, once the mailbox is walked: the removals as a set, and the previous files
    # renamed to their new name and place (old path → new path; ``begin_move``).
    going: frozenset[str] = frozenset()
    moved: dict[str, str] = field(default_factory=dict)
    moving: set[str] = field(default_factory=set)
    # Names a link is being made from right now (``begin_link``). A link made first gets
    # the previous file; one begun after the name is ``replaced`` is not made. Only the
    # bookkeeping is locked, not the link() or the append: two workers linking renamed
    # messages, and the main thread appending to an index file, used to wait for each other
    # (0.3-0.4 s of a 20,000-message renames night).
    linking: dict[str, int] = field(default_factory=dict)
    lock: threading.Condition = field(default_factory=threading.Condition)
    # Message directories taken over unlisted: their inodes are unknown until a new hard
    # link in the source asks for them (``_find_inode``).
    taken_over: list[str] = field(default_factory=list)
    # In place, listed message directories whose kept messages were carried over by name,
    # unstat'ed (``_carry``): their inodes are unknown too.
    carried: list[str] = field(default_factory=list)
    # Their previous records of the names not carried (gone, or looked at one by one), and
    # the gone ones by base name: where a renamed or moved message is found again. When every
    # listed directory of the mailbox was carried (``all_carried``), a message that is not
    # found there is new: the mailbox's records are never read whole.
    known: dict[str, str] = field(default_factory=dict)
    gone_by_base: dict[str, list[str]] = field(default_factory=dict)
    all_carried: bool = True
    message_dirs: set[str] = field(default_factory=set)  # the cur/ and new/ walked
    # In place: whether anything of this section differs from the previous backup's (else
    # its manifest frame is reused whole), its directories seen, and the unlisted message
    # directories whose records are made only if it does.
    changed: bool = False
    dirs: int = 0
    unlisted: list[str] = field(default_factory=list)
    # Its directories with their source lstat, whose times are set when the copy is done;
    # in place, not those of a section reused whole (nothing was done in them).
    made: list[tuple[str, os.stat_result]] = field(default_factory=list)

    def begin_move(self, name: str) -> bool:
        """In place: whether the previous file at ``name`` may be renamed to its new name
        (the source no longer has it there, and no link is being made from it). A rename
        is one change to the snapshot's b-tree where a link and the unlink after it are two.
        After True, ``end_move`` must follow."""
        with self.lock:
            if (name in self.replaced or name in self.moving or name in self.moved
                    or name in self.linking or not self._going(name)):
                return False
            self.moving.add(name)
            return True

    def end_move(self, name: str, to: str | None) -> None:
        """``to``: where it is now (None: the rename failed; it is where it was)."""
        with self.lock:
            self.moving.discard(name)
            if to is not None:
                self.moved[name] = to
            self.lock.notify_all()

    def _going(self, name: str) -> bool:
        while name:
            if name in self.going:
                return True
            name = name.rpartition("/")[0]
        return False

    def begin_link(self, name: str) -> str | None:
        """Where a link to the previous file at ``name`` may be made from: ``name``, or the
        new name it was renamed to (``begin_move``); None: it was replaced. After a path,
        ``end_link(name)`` must follow."""
        with self.lock:
            self.lock.wait_for(lambda: name not in self.moving)
            if name in self.replaced:
                return None
            self.linking[name] = self.linking.get(name, 0) + 1
            return self.moved.get(name, name)

    def end_link(self, name: str) -> None:
        with self.lock:
            left = self.linking.pop(name) - 1
            if left:
                self.linking[name] = left
            else:
                self.lock.notify_all()

    def claim(self, name: str) -> None:
        """No link is made from the previous file at ``name`` from now on: returns once the
        links begun from it are made, so it may be removed or changed."""
        with self.lock:
            self.replaced.add(name)
            self.lock.wait_for(lambda: name not in self.linking and name not in self.moving)


class FrozenCopy:
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
        progress: Callable[[int, int], None] | None,
        threads: int | None = None,
        listing: Listing | None = None,
        folders: FolderTimes | None = None,
        in_place: bool = False,
        check_every_file: bool = False,
    ) -> None:
        self.source = os.fspath(source)
        self.dest = os.fspath(dest)
        self.in_place = in_place and not dry_run
        # In place, the previous backup's files are in ``dest`` already: links are made there.
        self.previous = (self.dest if self.in_place else
                         os.fspath(previous) if previous is not None else None)
        self.folders = folders
        self.cloning = False  # hard links to the previous backup cannot be made: see below
        self.clone_lock = threading.Lock()
        self.clones: dict[int, str] = {}  # previous backup's inode → its clone here
        # A full check: every message is stat'ed and compared with its previous record,
        # not linked by its name alone.
        self.check_every_file = check_every_file
        self.previous_manifest = previous_manifest
        self.manifest = manifest
        self.excludes = excludes
        self.dry_run = dry_run
        self.watch = watch
        self.progress = progress
        self.listing = listing or FullListing()
        self.threads = threads or default_threads()
        self.stats = CopyStats(messages=0)
        # Source inode → (backup path, record tail) of its first copy, for files the source
        # links more than once (a COPY, an LMTP delivery to several users): their other names
        # become hard links to it, across mailboxes too. Each section keeps such a map of every
        # message it holds (messages linked by name are never stat'ed, so their link count is
        # unknown); this one, for the whole run, only holds files seen to have several links,
        # so memory follows the largest mailbox, not the store.
        self.inodes: dict[int, tuple[str, str]] = {}
        self.directories: list[tuple[str, os.stat_result]] = []
        self.last_watch = self.last_progress = time.monotonic()
        self.pool: ThreadPoolExecutor | None = None
        # Sections whose tasks run while the walk goes on (``_close``), in walk order.
        self.pending: collections.deque[_Section] = collections.deque()
        # A snapshot on the target's own btrfs (or XFS): new messages share its extents.
        self.reflinks = Reflinks(enabled=not dry_run)

    # -- the walk --------------------------------------------------------------------------

    def run(self) -> CopyStats:
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mailsnap-copy")
        try:
            self._directory("", None)
            while self.pending:
                self._finish(self.pending.popleft())
        except BaseException:
            # An error or a signal: do not wait for the queued tasks, only the running ones.
            self.pool.shutdown(wait=True, cancel_futures=True)
            raise
        self.pool.shutdown(wait=True)
        self._directory_times()
        return self.stats

    def _src(self, rel: str) -> str:
        return f"{self.source}/{rel}" if rel else self.source

    def _dst(self, rel: str) -> str:
        return f"{self.dest}/{rel}" if rel else self.dest

    def _prev(self, rel: str) -> str:
        return f"{self.previous}/{rel}"

    def _directory(self, rel: str, mailbox: _Section | None) -> None:
        self._tick()
        path = self._src(rel)
        try:
            info = os.lstat(path)
            entries = sorted(self.listing.scan(path), key=lambda e: e.name)
        except OSError as exc:
            raise CopyFailed(f"cannot read {path}: {exc.strerror}") from None
        by_name = {e.name: e for e in entries}
        # A mailbox root, or a directory outside any Maildir, starts a section of its own.
        section = mailbox if mailbox is not None else self._open(rel)
        messages = self._message_dirs(rel, by_name, section)
        self._make_dir(rel, info, section)
        kept: set[str] = set()
        subdirs: list[str] = []
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if messages is not None and is_dir and entry.name in (*MESSAGE_DIRS, "tmp"):
                kept.add(entry.name)
                continue  # the Maildir's own directories: below
            if self.excludes.excluded(child, is_dir=is_dir):
                continue
            kept.add(entry.name)
            if is_dir:
                subdirs.append(child)
            else:
                self._plain(child, section)
        if self.in_place:
            self._remove_others(rel, kept, section)
        if messages is not None:
            for sub, (sub_info, listed) in messages.items():
                self._messages(f"{rel}/{sub}" if rel else sub, sub_info, listed, section)
            if "tmp" in by_name and by_name["tmp"].is_dir(follow_symlinks=False):
                tmp = f"{rel}/tmp" if rel else "tmp"  # kept, empty: half-written deliveries
                self._make_dir(tmp, os.lstat(self._src(tmp)), section)
        elif mailbox is None:
            self._close(section)  # its subdirectories are sections of their own
        for child in subdirs:
            self._directory(child, section if messages is not None or mailbox else None)
        if messages is not None and mailbox is None:
            self._close(section)

    def _message_dirs(
        self, rel: str, by_name: dict[str, os.DirEntry[str]], section: _Section
    ) -> dict[str, tuple[os.stat_result, list[os.DirEntry[str]] | None]] | None:
        """``new/`` and ``cur/`` with their ``lstat`` and listing (None: unchanged since the
        previous backup, taken over unlisted), when ``rel`` is a Maildir by the rule in
        ``mailsnap.maildirs`` (both are directories holding no directory); else None."""
        listed: dict[str, tuple[os.stat_result, list[os.DirEntry[str]] | None]] = {}
        for sub in MESSAGE_DIRS:
            entry = by_name.get(sub)
            if entry is None or not entry.is_dir(follow_symlinks=False):
                return None
            sub_rel = f"{rel}/{sub}" if rel else sub
            path = self._src(sub_rel)
            try:
                info = os.lstat(path)
                if self._unchanged(section, sub_rel, info):
                    listed[sub] = (info, None)
                    continue
                entries = self.listing.scan(path)
            except OSError as exc:
                raise CopyFailed(f"cannot read {path}: {exc.strerror}") from None
            if any(e.is_dir(follow_symlinks=False) for e in entries):
                return None
            listed[sub] = (info, entries)
        return listed

    def _unchanged(self, section: _Section, rel: str, info: os.stat_result) -> bool:
        previous = section.previous
        return (self.folders is not None and previous is not None
                and self.folders.unchanged(previous.directories.get(rel), info)
                and rel not in previous.symlinks and not previous.has_subdirectories(rel))

    def _remove_others(self, rel: str, kept: set[str], section: _Section) -> None:
        """In place: what the previous backup has in ``rel`` and the source no longer does
        (or now excludes) goes when the section is done."""
        try:
            there = os.listdir(self._dst(rel))
        except FileNotFoundError:
            return
        prefix = f"{rel}/" if rel else ""
        section.removals.extend(prefix + name for name in there if name not in kept)

    # -- sections --------------------------------------------------------------------------

    def _open(self, rel: str) -> _Section:
        previous = None
        if self.previous_manifest is not None and self.previous is not None:
            previous = self.previous_manifest.section(rel)
        return _Section(rel, previous)

    def _close(self, section: _Section) -> None:
        """Hand the section's tasks to the pool and go on walking: the walk of the next
        sections (listing folders, Dovecot's files) overlaps with them. Sections are finished
        (their hard links settled, their records written) in walk order, each once its tasks
        are done; the walk waits only when ``PENDING_SECTIONS`` are still running. Tasks only
        add to ``self.inodes``: a hard link in the source to another mailbox is settled in
        ``_finish``, in walk order, to whichever copy of the inode is in the backup by then."""
        while self.pending and (len(self.pending) >= PENDING_SECTIONS
                                or all(f.done() for f in self.pending[0].futures)):
            self._finish(self.pending.popleft())
        previous = section.previous
        if previous is not None:  # before any task runs: a moved message is not in these
            previous.settled = frozenset(section.taken_over)
            if section.all_carried and any(frame.directory not in section.message_dirs
                                           for frame in previous.frames):
                section.all_carried = False  # a folder gone: its messages may be elsewhere
        if self.in_place:
            section.going = frozenset(section.removals)
        self._submit(section)
        self.pending.append(section)

    def _finish(self, section: _Section) -> None:
        """Wait for the section's tasks, settle its deferred hard links, write its records."""
        previous = section.previous
        self._drain(section)
        if section.removals:
            section.changed = True
        if (self.in_place and self.manifest is not None and previous is not None
                and not section.changed and previous.counts is not None and previous.frame
                and section.dirs == len(previous.directories)):
            self._reuse(section, previous)
            return
        self.directories.extend(section.made)
        # In place, an unchanged message directory of a changed mailbox: its frame of the
        # previous manifest as it is (neither decompressed nor compressed again).
        reused: list[MessageFrame] = []
        for rel in section.unlisted:
            assert previous is not None
            frame = previous.frame_of(rel) if self.manifest is not None else None
            if frame is not None and frame.size is not None and frame.messages is not None:
                reused.append(frame)
                self._count_reused(frame.records, frame.size, frame.messages)
            else:
                section.results.append(self._takeover(rel, previous.in_directory(rel), section))
        results = [section.head, *section.results]
        late: dict[str, _Result] = {}
        for result in results:
            for rel, sub_rel, info in result.deferred:
                self._hard_link_or_copy(rel, sub_rel, info,
                                        late.setdefault(sub_rel, _Result(directory=sub_rel)),
                                        section)
        results += late.values()
        for rel in section.removals:
            self._clear(self._dst(rel))
        self.stats.summary.removed += len(section.removals)
        summary = self.stats.summary
        for result in results:
            self.stats.files += result.files
            self.stats.bytes += result.bytes
            self.stats.messages = (self.stats.messages or 0) + result.messages
            summary.copied += result.copied
            summary.bytes_written += result.bytes_written
            summary.linked += result.linked
            summary.bytes_linked += result.bytes_linked
            summary.renames += result.renames
            summary.reflinked += result.reflinked
            summary.appended += result.appended
        self.stats.linked = summary.linked + summary.hardlinked
        if self.manifest is not None and (reused or any(r.lines or r.fast_paths or r.carried
                                                        for r in results)):
            counts = (sum(r.files for r in results) + sum(f.records for f in reused),
                      sum(r.bytes for r in results) + sum(f.size or 0 for f in reused),
                      sum(r.messages for r in results) + sum(f.messages or 0 for f in reused))
            # Directories and files that are not messages first; then the records of each
            # message directory in a frame of their own, which the next run reads only if
            # it lists that directory.
            self.manifest.section(section.key, section.head.records(), counts,
                                  sorted(reused + self._frames(results[1:]),
                                         key=lambda f: f.directory or ""))
        self._report(force=True)

    @staticmethod
    def _frames(results: list[_Result]) -> list[MessageFrame]:
        by_directory: dict[str, list[_Result]] = {}
        for result in results:
            assert result.directory is not None
            by_directory.setdefault(result.directory, []).append(result)
        return [MessageFrame(rel, sum(r.carried_records + len(r.fast_paths) + len(r.lines)
                                      for r in group),
                             sum(r.bytes for r in group), sum(r.messages for r in group),
                             itertools.chain.from_iterable(r.records() for r in group))
                for rel, group in by_directory.items()]

    def _count_reused(self, files: int, size: int, messages: int) -> None:
        """Files that are in the backup as they were in the previous one (in place)."""
        self.stats.files += files
        self.stats.bytes += size
        self.stats.messages = (self.stats.messages or 0) + messages
        summary = self.stats.summary
        summary.linked += files
        summary.bytes_linked += size
        self.stats.linked = summary.linked + summary.hardlinked

    def _reuse(self, section: _Section, previous: Section) -> None:
        """In place, a section that is as it was in the previous backup, directory for
        directory and file for file: nothing was done on disk, and its manifest frame is
        the previous one. (Its records are never parsed: a quiet night costs per mailbox.)"""
        assert self.manifest is not None and previous.counts is not None
        self._count_reused(*previous.counts)
        self.manifest.reuse(previous)
        self._report(force=True)

    def _drain(self, section: _Section) -> None:
        pending = set(section.futures)
        while pending:
            _done, pending = wait(pending, timeout=PROGRESS_INTERVAL, return_when=FIRST_COMPLETED)
            self._tick()
        section.results.extend(future.result() for future in section.futures)
        section.futures = []

    # -- messages --------------------------------------------------------------------------

    def _messages(self, rel: str, info: os.stat_result, listed: list[os.DirEntry[str]] | None,
                  section: _Section) -> None:
        self._make_dir(rel, info, section)
        section.message_dirs.add(rel)
        previous = section.previous
        if listed is None:  # unchanged since the previous backup: its records, unlisted
            assert previous is not None
            self.stats.summary.folders_unchanged += 1
            section.taken_over.append(rel)
            if self.in_place:  # already there: its records only if the section changed
                section.unlisted.append(rel)
                return
            paths = previous.in_directory(rel)
            for start in range(0, len(paths), CHUNK_MESSAGES):
                chunk = paths[start : start + CHUNK_MESSAGES]
                section.tasks.append((rel, functools.partial(self._takeover, rel, chunk,
                                                             section)))
            return
        section.changed = True
        self.stats.summary.folders_listed += 1
        # Linking by name alone trusts that owner and mode are what they were; a directory
        # whose owner or mode changed says they may not be.
        strict = (self.check_every_file or previous is None
                  or not _same_owner(previous.directories.get(rel), info))
        there: frozenset[str] | None = None
        if self.in_place:
            there = frozenset(os.listdir(self._dst(rel)))
            kept = self._kept_names(rel, listed)
            gone = there - kept
            section.removals.extend(f"{rel}/{name}" for name in sorted(gone))
            if not strict and previous is not None and self._carry(rel, listed, kept, there,
                                                                   gone, section):
                return
        section.all_carried = False
        for start in range(0, len(listed), CHUNK_MESSAGES):
            section.tasks.append((rel, functools.partial(
                self._message_task, rel, listed[start : start + CHUNK_MESSAGES], section,
                strict, there)))

    def _carry(self, rel: str, listed: list[os.DirEntry[str]], kept: set[str],
               there: frozenset[str], gone: frozenset[str], section: _Section) -> bool:
        """In place, a listed message directory: a message still there under its name is the
        previous backup's file already, and its record is the previous one, carried over as
        text (``Section.directory_records``) when the size in its name is the record's. Set
        operations, not a loop per message: a flag change makes Dovecot rename one file, and
        the folder is listed, but only the names that differ are looked at one by one (the
        tasks).
        False: the previous records cannot be split by name; each message is looked at."""
        assert section.previous is not None
        records = section.previous.directory_records(rel)
        if records is None:
            return False
        odd = {e.name for e in listed
               if e.name[0] == "." or not e.is_file(follow_symlinks=False)}
        keep = (kept & there) - odd
        # Dovecot's ",S=<size>" in the name must be the size of the previous copy, as on the
        # fast path of ``_message_task``.
        carried = records.split([name in keep and size_digits(name) == size
                                 for name, size in zip(records.names, records.sizes, strict=True)])
        section.known.update(carried.others)
        for name in gone:
            path = f"{rel}/{name}"
            if path in carried.others:
                section.gone_by_base.setdefault(base_name(name), []).append(path)
        count = carried.records
        section.results.append(_Result(
            directory=rel, carried=carried.text, carried_records=count, files=count,
            messages=count, linked=count, bytes=carried.size, bytes_linked=carried.size))
        section.carried.append(rel)
        # Looked at one by one: new names, and those kept whose record is missing or was not
        # carried (the size in the name is not the previous copy's).
        cut = len(rel) + 1
        rest = (kept - keep) | keep.difference(records.names) | {
            path[cut:] for path in carried.others if path[cut:] in keep}
        if rest:
            slow = [e for e in listed if e.name in rest]
            for start in range(0, len(slow), CHUNK_MESSAGES):
                section.tasks.append((rel, functools.partial(
                    self._message_task, rel, slow[start : start + CHUNK_MESSAGES], section,
                    True, there)))
        return True

    def _kept_names(self, rel: str, listed: list[os.DirEntry[str]]) -> set[str]:
        if not self.excludes.rules:
            return {e.name for e in listed if e.name not in self.excludes.names}
        return {e.name for e in listed
                if not self.excludes.excluded(f"{rel}/{e.name}",
                                              is_dir=e.is_dir(follow_symlinks=False))}

    def _submit(self, section: _Section) -> None:
        """Hand the section's chunks to the pool, taking turns between directories: link()
        and create() lock the target directory, so two threads in one cur/ wait for each
        other, and two in different folders do not."""
        assert self.pool is not None
        by_directory: dict[str, list[Callable[[], _Result]]] = {}
        for rel, work in section.tasks:
            by_directory.setdefault(rel, []).append(work)
        queues = list(by_directory.values())
        while queues:
            for queue in queues:
                section.futures.append(self.pool.submit(queue.pop(0)))
            queues = [q for q in queues if q]
        section.tasks = []

    def _takeover(self, rel: str, paths: list[str], section: _Section) -> _Result:
        """An unchanged message directory: the previous records, and (unless in place, where
        the files are there already) a link to each previous file. Runs in the pool."""
        assert section.previous is not None
        result = _Result(directory=rel)
        files = section.previous.records_in(rel)
        prev_dir, dst_dir = self._prev(rel), self._dst(rel)
        cut = len(rel) + 1
        only_names = not self.excludes.rules
        names = self.excludes.names
        excluded = self.excludes.excluded
        link = None if self.dry_run or self.in_place else self._link_previous
        fast_paths, fast_tails = result.fast_paths, result.fast_tails
        messages = total = 0
        for child in paths:
            name = child[cut:]
            if (name in names) if only_names else excluded(child, is_dir=False):
                continue
            tail = files[child]
            if link is not None:
                try:
                    link(f"{prev_dir}/{name}", f"{dst_dir}/{name}")
                except FileNotFoundError:
                    self._copy_missing(child, result, section)
                    continue
            fast_paths.append(child)
            fast_tails.append(tail)
            messages += name[0] != "."
            total += int(tail[: tail.index("\t")])
        result.files += len(fast_paths)
        result.messages += messages
        result.linked += len(fast_paths)
        result.bytes += total
        result.bytes_linked += total
        return result

    def _copy_missing(self, child: str, result: _Result, section: _Section) -> None:
        """A file of an unchanged folder that the previous backup lost: copied from the
        source (which has it: its folder did not change)."""
        src = self._src(child)
        try:
            info = os.lstat(src)
        except FileNotFoundError:
            log.warning("%s: in the previous manifest and its folder's mtime is unchanged, but "
                        "it is gone; not in this backup", src)
            return
        except OSError as exc:
            raise CopyFailed(f"cannot read {src}: {exc.strerror}") from None
        result.messages += not child.rsplit("/", 1)[1].startswith(".")
        self._copy_message(child, src, self._dst(child), result, section, info)

    def _message_task(
        self, rel: str, chunk: list[os.DirEntry[str]], section: _Section, strict: bool,
        there: frozenset[str] | None,
    ) -> _Result:
        """Runs in the pool: link or copy one chunk of a message directory. ``there``: in
        place, the names the directory holds already (the previous backup's)."""
        result = _Result(directory=rel)
        previous = section.previous
        files = previous.records_in(rel) if previous is not None and not strict else {}
        src_dir, dst_dir = self._src(rel), self._dst(rel)
        prev_dir = self._prev(rel) if self.previous is not None else ""
        slow: list[os.DirEntry[str]] = []
        # The per-message loop of a no-change night: a dict lookup, a string compare, one
        # link(). Everything else (stat, hashing, renames) is the slow path.
        excluded = self.excludes.excluded
        only_names = not self.excludes.rules
        names = self.excludes.names
        link = self._link_previous if self.cloning else os.link
        inodes = section.inodes
        fast_paths, fast_tails = result.fast_paths, result.fast_tails
        linked = linked_bytes = 0
        for entry in chunk:
            name = entry.name
            child = f"{rel}/{name}"
            if (name in names) if only_names else excluded(child, is_dir=False):
                continue
            if name[0] == "." or not entry.is_file(follow_symlinks=False):
                slow.append(entry)  # not a message by the Maildir spec: a plain file
                continue
            tail = None if strict else files.get(child)
            if tail is None:
                slow.append(entry)
                continue
            # Dovecot's ",S=<size>" in the name must be the size the previous copy has
            # (a 0-byte file under a name that says 8125 bytes is copied again, not linked).
            size_text = tail[: tail.index("\t")]
            if size_digits(name) != size_text:
                slow.append(entry)
                continue
            if there is not None:
                if name not in there:
                    slow.append(entry)
                    continue
            elif not self.dry_run:
                try:
                    link(f"{prev_dir}/{name}", f"{dst_dir}/{name}")
                except FileNotFoundError:
                    slow.append(entry)  # gone from the previous backup: copy it
                    continue
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    link = self._link_previous
                    link(f"{prev_dir}/{name}", f"{dst_dir}/{name}")
            fast_paths.append(child)
            fast_tails.append(tail)
            inodes[entry.inode()] = (child, tail)
            linked += 1
            linked_bytes += int(size_text)
        result.files += linked
        result.messages += linked
        result.linked += linked
        result.bytes += linked_bytes
        result.bytes_linked += linked_bytes
        for entry in slow:
            self._slow_entry(rel, entry, src_dir, dst_dir, section, result, there)
        return result

    def _slow_entry(self, rel: str, entry: os.DirEntry[str], src_dir: str, dst_dir: str,
                    section: _Section, result: _Result,
                    there: frozenset[str] | None = None) -> None:
        name = entry.name
        child = f"{rel}/{name}"
        if name.startswith(".") or not entry.is_file(follow_symlinks=False):
            self._plain_into(child, section, result)
            return
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError as exc:
            raise CopyFailed(f"cannot read {src_dir}/{name}: {exc.strerror}") from None
        result.messages += 1
        previous = section.previous
        if there is not None and name in there:
            # In place, under this name already: kept if it is this message, else replaced.
            tail = self._previous_tail(section, child)
            if tail is not None and same_file(tail, info):
                result.link(child, tail, info.st_size, renamed=False)
                self._remember(section, info, child, tail)
                return
            self._replace(section, child)
        if previous is not None and self.previous is not None:
            for old in self._candidates(section, previous, child, name):
                tail = self._previous_tail(section, old)
                if tail is None or not same_file(tail, info):
                    continue  # same base name, other content or owner: not this message
                if not self.dry_run and not self._bring(section, old, child,
                                                        f"{dst_dir}/{name}"):
                    continue
                result.link(child, tail, info.st_size, renamed=old != child)
                self._remember(section, info, child, tail)
                return
        if info.st_nlink > 1:
            # A hard link in the source: settled when the section closes, in one thread, so
            # the first copy of the inode exists before the other names link to it.
            result.messages -= 1  # counted when settled
            result.deferred.append((child, rel, info))
            return
        self._copy_message(child, f"{src_dir}/{name}", f"{dst_dir}/{name}", result, section,
                           info)

    def _bring(self, section: _Section, old: str, child: str, target: str) -> bool:
        """Put the previous file at ``old`` at ``target`` (``child``'s place): renamed, in
        place, when ``old`` goes anyway; else hard-linked, from where it is now. False: it
        is not there (replaced, or gone from the previous backup)."""
        if section.begin_move(old):
            moved_to = None
            try:
                os.rename(self._prev(old), target)
                moved_to = child
            except FileNotFoundError:
                return False
            finally:
                section.end_move(old, moved_to)
            return True
        where = section.begin_link(old)
        if where is None:
            return False
        try:
            self._link_previous(self._prev(where), target)
        except FileNotFoundError:
            return False
        finally:
            section.end_link(old)
        return True

    def _remember(self, section: _Section, info: os.stat_result, child: str,
                  tail: str) -> None:
        section.inodes[info.st_ino] = (child, tail)
        if info.st_nlink > 1:
            self.inodes[info.st_ino] = (child, tail)

    @staticmethod
    def _previous_tail(section: _Section, path: str) -> str | None:
        known = section.known.get(path)
        if known is not None or section.previous is None:
            return known
        return section.previous.tail(path)

    @staticmethod
    def _candidates(section: _Section, previous: Section, child: str,
                    name: str) -> Iterator[str]:
        """Where the previous backup may hold message ``child`` (same base name), nearest
        first."""
        base = base_name(name)
        gone = section.gone_by_base.get(base, [])
        yield from (old for old in gone if old != child)
        if section.all_carried:
            return  # every place a message can have left is in ``gone_by_base``
        if previous.tail(child) is not None:
            yield child
        for old in previous.by_base(base):
            if old != child and old not in gone:
                yield old

    def _copy_message(self, child: str, src: str, dst: str, result: _Result,
                      section: _Section, info: os.stat_result) -> int:
        """Copy a new file, ``info`` its ``lstat`` (a frozen tree: the file it opens is that
        one, so no ``fstat``); returns its inode in the source."""
        fd = _open_source(src)
        try:
            sha, cloned = ("", False) if self.dry_run else copy_open_file(fd, info, dst,
                                                                          self.reflinks)
        finally:
            os.close(fd)
        tail = tail_of(info, sha)
        result.copy(child, tail, info.st_size, reflinked=cloned)
        self._remember(section, info, child, tail)
        return info.st_ino

    def _hard_link_or_copy(self, child: str, rel: str, info: os.stat_result,
                           result: _Result, section: _Section) -> None:
        """A message with several links in the source: link it to the copy of its inode
        already in this backup (in any mailbox: an LMTP delivery to several users links them
        too), or copy it (the first of its names)."""
        result.messages += 1
        name = child.rsplit("/", 1)[1]
        first = (section.inodes.get(info.st_ino) or self.inodes.get(info.st_ino)
                 or self._find_inode(section, info.st_ino))
        if first is None:
            self._copy_message(child, f"{self._src(rel)}/{name}", f"{self._dst(rel)}/{name}",
                               result, section, info)
            return
        path, tail = first
        if not self.dry_run:
            os.link(self._dst(path), f"{self._dst(rel)}/{name}")
        result.lines.append(f"F\t{escape(child)}\t{HARDLINK}\t{tail}\n")
        result.files += 1
        result.bytes += info.st_size
        self.stats.summary.hardlinked += 1

    def _find_inode(self, section: _Section, inode: int) -> tuple[str, str] | None:
        """A Dovecot COPY hard-links a message under a new name into another folder, and
        the folder it came from may be one taken over unlisted: ``stat`` that mailbox's
        unlisted messages once to learn their inodes (only on a night with such a COPY)."""
        if not (section.taken_over or section.carried) or section.previous is None:
            return None
        for rel in section.taken_over + section.carried:
            files = section.previous.records_in(rel)
            for child in files:
                try:
                    info = os.lstat(self._src(child))
                except FileNotFoundError:
                    continue
                if info.st_nlink > 1:
                    section.inodes.setdefault(info.st_ino, (child, files[child]))
        section.taken_over = []
        section.carried = []
        return section.inodes.get(inode)

    # -- plain files, directories ------------------------------------------------------------

    def _plain(self, rel: str, section: _Section) -> None:
        self._plain_into(rel, section, section.head)

    def _plain_into(self, rel: str, section: _Section, result: _Result) -> None:
        """dovecot-uidlist, index files, subscriptions …: linked when unchanged, else copied."""
        src = self._src(rel)
        try:
            info = os.lstat(src)
        except OSError as exc:
            raise CopyFailed(f"cannot read {src}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            section.changed = True  # its L record is not kept: the section is written anew
            if self.in_place:
                self._clear(self._dst(rel))
            target = os.readlink(src) if self.dry_run else copy_symlink(src, self._dst(rel), info)
            # With the directories, wherever it is: a reader learns which directories hold a
            # symlink without reading the messages' records (list.append is atomic).
            section.head.lines.append(f"L\t{escape(rel)}\t{escape(target)}\t{info.st_uid}\t"
                                      f"{info.st_gid}\t{info.st_mtime_ns}\n")
            return
        if not stat.S_ISREG(info.st_mode):
            log.warning("skipping %s: not a regular file", src)
            return
        previous = section.previous
        tail = previous.tail(rel) if previous is not None else None
        if tail is not None and same_file(tail, info):
            # In place the file is there already: this backup starts as a snapshot of the
            # previous one, whose record says it holds this file (the trust that takes an
            # unchanged message folder over unlisted; verify checks both).
            try:
                if not self.in_place and not self.dry_run:
                    self._link_previous(self._prev(rel), self._dst(rel))
            except FileNotFoundError:
                pass  # gone from the previous backup: copy it
            else:
                result.link(rel, tail, info.st_size, renamed=False)
                return
        section.changed = True
        if self.in_place and tail is not None and not self.dry_run and self._append(
                rel, src, info, tail, result, section):
            return
        if self.in_place:
            self._replace(section, rel)
        self._copy_message(rel, src, self._dst(rel), result, section, info)

    def _append(self, rel: str, src: str, info: os.stat_result, tail: str, result: _Result,
                section: _Section) -> bool:
        """In place: Dovecot's logs and caches grow by appending; write only what is new
        (``append_open_file``). False when the file was rewritten: copy it whole."""
        old_size = tail_size(tail)
        if info.st_size <= old_size:
            return False  # not grown: neither opened nor marked replaced
        fd = _open_source(src)
        try:
            section.claim(rel)  # no other name may be linked to the old content from here on
            sha = append_open_file(fd, info, self._dst(rel), old_size, tail_sha256(tail))
        finally:
            os.close(fd)
        if sha is None:
            return False
        result.append(rel, tail_of(info, sha), info.st_size, info.st_size - old_size)
        self._remember(section, info, rel, tail_of(info, sha))
        return True

    def _make_dir(self, rel: str, info: os.stat_result, section: _Section) -> None:
        section.made.append((rel, info))
        fields = directory_fields(info)
        section.head.lines.append(f"D\t{escape(rel)}\t{fields}\n")
        self.stats.summary.directories += 1
        section.dirs += 1
        as_before = (section.previous is not None
                     and section.previous.directories.get(rel) == fields)
        if not as_before:
            section.changed = True
        elif self.in_place:
            # The same directory (inode, ctime, mode, owner) as in the previous backup, which
            # this one starts as a snapshot of: made there with these, nothing to look at.
            return
        if self.in_place:
            # The snapshot of the previous backup has the directory already, as a rule with
            # its owner and mode: changing nothing there keeps the metadata shared with the
            # previous backup (a chmod would copy the b-tree leaf that holds it).
            try:
                there = os.lstat(self._dst(rel))
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISDIR(there.st_mode):
                    self._clear(self._dst(rel))
                elif (there.st_uid, there.st_gid, stat.S_IMODE(there.st_mode)) == (
                        info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) or not IS_ROOT:
                    if stat.S_IMODE(there.st_mode) != stat.S_IMODE(info.st_mode):
                        os.chmod(self._dst(rel), stat.S_IMODE(info.st_mode))
                    return
        if not self.dry_run and rel:
            try:
                make_directory(self._dst(rel), info)
            except OSError as exc:
                raise CopyFailed(f"cannot create {self._dst(rel)}: {exc.strerror}") from None
        elif not self.dry_run:
            # mail/ itself gets the source top's owner and mode, as rsync gives it; the backup
            # directory around it stays 0700.
            if IS_ROOT:
                os.chown(self.dest, info.st_uid, info.st_gid)
            os.chmod(self.dest, stat.S_IMODE(info.st_mode))

    def _link_previous(self, source: str, target: str) -> None:
        """A hard link to the previous backup's file; where the previous backup is in another
        btrfs subvolume (the first backup into subvolumes, ``target_snapshots``), a clone
        sharing its extents instead."""
        if not self.cloning:
            try:
                os.link(source, target)
                return
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                if not self.cloning:
                    log.info("the previous backup is on another subvolume: its files are "
                             "cloned (FICLONE: no data written), not hard-linked")
                self.cloning = True
        info = os.lstat(source)
        if info.st_nlink == 1:
            clone_file(source, target)
            return
        # Names that are one file in the previous backup (a COPY) stay one file here.
        with self.clone_lock:
            first = self.clones.get(info.st_ino)
            if first is not None:
                os.link(first, target)
            else:
                clone_file(source, target)
                self.clones[info.st_ino] = target

    def _replace(self, section: _Section, rel: str) -> None:
        """In place: the previous backup's file at ``rel`` is not this one's; remove it, and
        never link another name to it (``_Section.claim``)."""
        section.claim(rel)
        self._clear(self._dst(rel))

    @staticmethod
    def _clear(path: str) -> None:
        """In place: remove what the previous backup has at ``path`` (a file, a symlink or a
        whole directory), if anything."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(path)

    def _directory_times(self) -> None:
        """Directory times last, deepest first: creating entries would bump them."""
        if self.dry_run:
            return
        for rel, info in sorted(self.directories, key=lambda d: d[0].count("/"), reverse=True):
            if not rel:
                continue  # the top is the backup's own mail/ directory; its time is the run's
            # In place, a directory nothing was done to has its time already (see _make_dir).
            if self.in_place and os.lstat(self._dst(rel)).st_mtime_ns == info.st_mtime_ns:
                continue
            os.utime(self._dst(rel), ns=(info.st_atime_ns, info.st_mtime_ns))

    # -- watching and progress -------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        if self.watch is not None and now - self.last_watch > faults.poll_interval(
                WATCH_INTERVAL):
            self.last_watch = now
            self.watch()
        self._report()

    def _report(self, *, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if force or now - self.last_progress >= PROGRESS_INTERVAL:
            self.last_progress = now
            self.progress(self.stats.files, self.stats.bytes)


def _same_owner(record: str | None, info: os.stat_result) -> bool:
    """The previous ``D`` record (mode, uid, gid, …) has this directory's mode and owner."""
    if record is None:
        return False
    mode, uid, gid = record.split("\t", 3)[:3]
    return (int(mode, 8), int(uid), int(gid)) == (stat.S_IMODE(info.st_mode), info.st_uid,
                                                   info.st_gid)


def summary_line(stats: CopyStats) -> str:
    s = stats.summary
    return (f"{stats.files} files: {s.copied} copied ({s.bytes_written} bytes written), "
            f"{s.linked} linked to the previous backup ({s.renames} renamed or moved), "
            f"{s.hardlinked} hard links kept")


