"""The per-backup manifest: one record per file and directory of a backup, written while the
copy runs, read back by the next run instead of listing the previous backup.

Format (``manifest.zst`` beside ``mailsnap.json``): UTF-8 text lines, ``\\t``-separated fields,
compressed with zstandard. Paths are relative to the backup's ``mail/`` with ``/`` separators;
a ``\\``, tab or newline in a name is escaped (``\\\\``, ``\\t``, ``\\n``) and bytes that are not
UTF-8 are kept as they are (surrogate escapes), so any Maildir folder name round-trips::

    mailsnap-manifest  1
    S  <section key>                       a mailbox (a user's Maildir root) or a plain directory
    D  <path>  <mode>  <uid>  <gid>  <mtime_ns>  <ctime_ns>  <inode>
    F  <path>  <how>  <size>  <mtime_ns>  <mode>  <uid>  <gid>  <sha256>
    L  <path>  <link target>  <uid>  <gid>  <mtime_ns>
    M  <records> <bytes> <messages> <dir>  the records of message directory <dir> follow in
                                           a frame of their own (version 1: ``M <records>``,
                                           one frame for all the section's messages)
    C  <files>  <bytes>  <messages>        the section's totals (newer manifests)
    E  <records>  [listed_before=<ns>  full_check=<ns>  excludes=<crc32>]

``how`` is ``copied`` (written, hashed now), ``reflinked`` (a new file sharing the snapshot's
extents when both are on one btrfs or XFS: hashed, nothing written), ``appended`` (the
previous backup's file, in a backup that started as a snapshot of it, grown by what the source
appended; its old part proven by the previous record's sha256, the whole hashed), ``linked``
(a hard link to the previous backup; its hash carried over, so a message is hashed once in its
life) or
``hardlink`` (a hard link to an earlier file of this backup: Dovecot's COPY hard-links a
message into the new folder).
A message's base name is its name up to ``:2,`` and is not stored. ``D`` records keep the
source directory's times and inode, which a later run compares to take over an unchanged
``cur/`` or ``new/`` without listing it. The ``E`` line says from when on the copy saw the
source (``listed_before``: no later than the snapshot, or the live copy's start; a directory
whose mtime is within the clock's resolution of it may have changed again unseen, see
``mailsnap.copiers.changes``) and when the last copy that listed every folder and compared
every message ran (``full_check``), both in ns since the epoch.

Newer manifests write a section as several frames: directories, symlinks and the files that
are not messages, then (each announced by an ``M`` record) the records of the files in one
``cur/`` or ``new/`` per frame; a reader decompresses a directory's frame only when it needs
one of its records, so a night that changed a few folders of a mailbox reads and writes the
records of those folders only. (Version 1 had one frame for all of a section's messages; it
is still read.) A section whose mailbox did not change at all since the previous backup (a
backup that started as a snapshot of it, ``target_snapshots``), or one of its message
directories that did not, is the previous manifest's frames, copied as they are: its
records, ``how`` included, say how each file came into the backup that first wrote them. So
are, as text, the records of the files a changed message directory still holds under the
same name (``DirectoryRecords``).

Records come in sections: one per mailbox (everything below a user's Maildir root, all its
folders), or one per directory outside any Maildir. Sections are written in the copy's walk
order, which is sorted by path components, so the next run reads the previous manifest in step
with its own walk and holds one mailbox's records at a time, never the whole store. Each
section is its own zstd frame with a content checksum: a damaged frame is detected before any
of its records is used, and a truncated manifest lacks its ``E`` line. The file's sha256 goes
into ``mailsnap.json`` when the backup is published; the next run trusts the manifest whole by
it (a backup from before that: by decompressing it all), since a mailbox's frames it reuses
unchanged are copied without being decompressed.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
import contextlib
from dataclasses import dataclass, field
import hashlib
import io
import itertools
import operator
import os
from pathlib import Path
import re
import threading
from typing import IO, TYPE_CHECKING, cast

from mailsnap.errors import MailsnapError

if TYPE_CHECKING:
    import zstandard

MANIFEST_FILE = "manifest.zst"
MAGIC = "mailsnap-manifest"
VERSION = "2"
VERSIONS = ("1", "2")  # what a reader takes: 1 wrote one messages frame per section

COPIED = "copied"
LINKED = "linked"
HARDLINK = "hardlink"
REFLINKED = "reflinked"
APPENDED = "appended"

# Records handed to the compressor per write, and characters per read of a previous manifest:
# large enough that the per-call cost is noise, small enough that no buffer of a whole mailbox
# adds to the peak memory of a run.
WRITE_LINES = 1024
READ_CHARS = 1 << 16
READ_BYTES = 1 << 16

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n"}
_NEEDS_ESCAPE = re.compile(r"[\\\t\n]")
_UNESCAPE = re.compile(r"\\(.)")
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n"}


class ManifestDamaged(MailsnapError):
    """The previous backup's manifest cannot be trusted (missing, truncated, corrupt)."""


def escape(path: str) -> str:
    if "\\" not in path and "\t" not in path and "\n" not in path:
        return path  # nearly always: three scans in C are cheaper than a regex call
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group(0)], path)


def unescape(field: str) -> str:
    if "\\" not in field:
        return field
    return _UNESCAPE.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(1)), field)


def section_key(rel: str) -> tuple[str, ...]:
    """The order sections are written in: the copy walks directories sorted by name, so its
    order is the order of path component tuples (``a/b`` before ``a.b``)."""
    return tuple(rel.split("/")) if rel else ()


def file_tail(size: int, mtime_ns: int, mode: int, uid: int, gid: int, sha256: str) -> str:
    """The part of an ``F`` record after ``how``: what a link to it carries forward."""
    return f"{size}\t{mtime_ns}\t{mode:o}\t{uid}\t{gid}\t{sha256}"


def parent_of(path: str) -> str:
    """``a/b/c`` → ``a/b``; a name at the top → ``""``."""
    cut = path.rfind("/")
    return path[:cut] if cut >= 0 else ""


def tail_size(tail: str) -> int:
    return int(tail.split("\t", 1)[0])


def tail_mtime(tail: str) -> int:
    return int(tail.split("\t", 2)[1])


def tail_sha256(tail: str) -> str:
    return tail.rsplit("\t", 1)[1]


@dataclass
class Summary:
    """What the copy did, as ``mailsnap.json`` and the run report show it."""

    files: int = 0
    copied: int = 0
    bytes_written: int = 0
    linked: int = 0
    bytes_linked: int = 0
    hardlinked: int = 0
    renames: int = 0
    reflinked: int = 0
    # Files of the previous backup grown in place by what the source appended (Dovecot's
    # index logs and caches); their new bytes are in bytes_written.
    appended: int = 0
    directories: int = 0
    # Message directories (cur/, new/) listed, and those taken over unlisted because their
    # mtime, ctime and inode say nothing in them changed since the previous backup.
    folders_listed: int = 0
    folders_unchanged: int = 0
    # Files and directories of the previous backup removed from a backup that started as a
    # snapshot of it (target_snapshots): what the source no longer has.
    removed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _compressor() -> zstandard.ZstdCompressor:
    import zstandard  # only the copy and verify need it

    # Level 1, not zstd's default 3: a manifest is mostly sha256 hex, which no level
    # compresses. The 41 MB of records of 200,000 messages: 13.1 MB in 0.31 s at level 3,
    # 12.9 MB in 0.13 s at level 1 (and every mailbox a busy night touches is written anew).
    return zstandard.ZstdCompressor(level=1, write_checksum=True)


class _Hashed:
    """A file, and the sha256 of every byte written to it or read from it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.raw.write(data)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()


class ManifestWriter:
    """Streams sections to ``path`` (created 0600). ``close()`` writes the ``E`` line; a
    manifest without it is treated as damaged, so an interrupted copy never leaves one that
    looks whole."""

    def __init__(self, path: Path) -> None:
        # Written on the end line: see the module's docstring.
        self.end_fields: dict[str, int] = {}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._raw = _Hashed(os.fdopen(fd, "wb"))
        # zstd needs only write() and flush() of it.
        self._zstd = _compressor().stream_writer(cast(IO[bytes], self._raw), closefd=False)
        self.records = 0
        self._frame([f"{MAGIC}\t{VERSION}\n"])

    def _frame(self, lines: Iterable[str]) -> int:
        """Write ``lines`` as one zstd frame; returns how many records (lines) it holds."""
        import zstandard

        # Handed to zstd a slice at a time: a mailbox's records are never one string (and its
        # encoded copy) in memory at once. The frame and its bytes are the same either way.
        count = 0
        it = iter(lines)
        while batch := list(itertools.islice(it, WRITE_LINES)):
            data = "".join(batch).encode("utf-8", "surrogateescape")
            count += data.count(b"\n")  # an item may be many records (``CarriedRecords``)
            self._zstd.write(data)
        self._zstd.flush(zstandard.FLUSH_FRAME)
        return count

    def section(self, key: str, lines: Iterable[str],
                counts: tuple[int, int, int] | None = None,
                folders: Iterable[MessageFrame] = ()) -> None:
        """One section: ``lines`` are complete ``D``/``F``/``L`` records (newline included),
        a list or made as they are written; ``counts`` (files, bytes, messages) its totals;
        ``folders`` the F records of its message directories, a frame each: made from their
        ``lines``, or a previous manifest's ``frame`` copied as it is."""
        frames = [f for f in folders if f.records]
        tail = [f"C\t{counts[0]}\t{counts[1]}\t{counts[2]}\n"] if counts is not None else []
        tail += [f"M\t{f.records}\t{f.size}\t{f.messages}\t{escape(f.directory or '')}\n"
                 for f in frames]
        self.records += self._frame(itertools.chain((f"S\t{escape(key)}\n",), lines, tail)) - 1
        for frame in frames:
            if frame.frame:
                self._raw.write(frame.frame)
                written = frame.records
            else:
                written = self._frame(frame.lines or ())
            self.records += written
            if written != frame.records:
                raise ValueError(f"{frame.directory}: {written} records, not the "
                                 f"{frame.records} announced")

    def reuse(self, section: Section) -> None:
        """A section of the previous manifest, whole: its zstd frames as they were."""
        self._raw.write(section.frame)
        for frame in section.frames:
            self._raw.write(frame.frame)
        self.records += section.records

    def close(self) -> None:
        extra = "".join(f"\t{key}={value}" for key, value in self.end_fields.items())
        self._frame([f"E\t{self.records}{extra}\n"])
        self._zstd.close()  # type: ignore[no-untyped-call]
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()

    @property
    def sha256(self) -> str:
        """Of the whole file as written (recorded in ``mailsnap.json``: the next run trusts
        the manifest by it, without decompressing it all)."""
        return self._raw.digest.hexdigest()

    def abort(self) -> None:
        """Close without the end line (the copy failed; the .partial goes anyway)."""
        # Already failing: the file is discarded with the .partial backup.
        with contextlib.suppress(Exception):
            self._zstd.close()  # type: ignore[no-untyped-call]
        self._raw.close()


@dataclass
class MessageFrame:
    """The records of one message directory (``cur/`` or ``new/``) in a zstd frame of their
    own: to write (``lines``), or as read or reused (``frame``, its bytes in the file). In a
    version 1 manifest one frame holds all of a section's messages: ``directory`` is None and
    the sizes are unknown."""

    directory: str | None
    records: int
    size: int | None = None  # bytes of its files
    messages: int | None = None
    lines: Iterable[str] | None = None
    frame: bytes = b""


@dataclass
class DirectoryRecords:
    """The previous records of one message directory, split in C but not parsed
    (``Section.directory_records``): a night that lists a folder for a flag change keeps
    almost all of them as they are, and parsing each cost more than the rest of its work."""

    lines: list[str]  # F records, without their newline
    names: list[str]  # the file name of each (not escaped: see ``directory_records``)
    sizes: list[str]  # the size field of each, as written
    size: int  # bytes of all their files

    def split(self, keep: Iterable[bool]) -> CarriedRecords:
        """The records where ``keep`` is true, as one block of text; the others' tails."""
        mask = list(keep)
        kept = list(itertools.compress(self.lines, mask))
        others: dict[str, str] = {}
        size = self.size
        if len(kept) != len(self.lines):
            for line in itertools.compress(self.lines, map(operator.not_, mask)):
                _kind, path, _how, tail = line.split("\t", 3)
                others[path] = tail
                size -= int(tail[: tail.index("\t")])
        return CarriedRecords("\n".join(kept) + "\n" if kept else "", len(kept), size, others)


@dataclass
class CarriedRecords:
    """Records of a message directory kept as they were, and the tails of the others."""

    text: str  # complete F records, newlines included
    records: int
    size: int  # the bytes of their files
    others: dict[str, str]  # path → record tail


@dataclass
class Section:
    """One section of a previous manifest: path → record tail, and base name → paths (built
    on first use: a night with no renames never needs it)."""

    key: str
    directories: dict[str, str] = field(default_factory=dict)  # path → rest of the D record
    # The section's zstd frame as it is in the file, its record count and its C record
    # (files, bytes, messages): what a copy needs to reuse it whole.
    frame: bytes = b""
    records: int = 0
    counts: tuple[int, int, int] | None = None
    # The frames of its message directories, compressed until a record of one is needed.
    frames: list[MessageFrame] = field(default_factory=list)
    # F records of the section's first frame, parsed on first use; those not directly in a
    # cur/ or new/ (dovecot-uidlist, index files …) are parsed at once.
    _lines: list[str] = field(default_factory=list)
    _files: dict[str, str] | None = None
    _plain: dict[str, str] = field(default_factory=dict)
    frames_read: int = 0  # how many message frames were decompressed
    # Directories holding a symlink (``L`` records are not kept): never taken over unlisted.
    symlinks: set[str] = field(default_factory=set)
    # Message directories the copy took over unlisted (unchanged since this backup): no
    # message left them, so ``by_base`` need not read their records to find a moved one.
    settled: frozenset[str] = frozenset()
    # base name → its path, or its paths when there are several (rare: a list for every
    # message would double the index's memory).
    _by_base: dict[str, str | list[str]] | None = None
    _by_directory: dict[str, list[str]] | None = None
    _in_frame: dict[str, dict[str, str]] = field(default_factory=dict)  # directory → records
    _frame_index: dict[str, MessageFrame] | None = None
    _head: dict[str, dict[str, str]] | None = None  # the first frame's F records by directory
    _parents: set[str] | None = None
    # The copier's worker threads take chunks of one mailbox at once: the first to need an
    # index builds it, the others wait for it (unlocked, each parsed the whole mailbox again,
    # twice the time and, at 20,000 messages, 10 MiB more at the peak). Reentrant: an index
    # is built from the records of each directory, which take it too.
    _building: threading.RLock = field(default_factory=threading.RLock, repr=False,
                                       compare=False)

    @property
    def messages_frame_read(self) -> bool:
        return self.frames_read > 0

    @property
    def by_directory(self) -> bool:
        """Whether its messages are in a frame per directory (version 2)."""
        return bool(self.frames) and self.frames[0].directory is not None

    def frame_of(self, rel: str) -> MessageFrame | None:
        """The frame of message directory ``rel``, with its sizes (version 2), if it has one."""
        if self._frame_index is None:  # asked once per listed or unlisted folder: not a scan
            self._frame_index = {f.directory: f for f in self.frames if f.directory is not None}
        return self._frame_index.get(rel)

    @property
    def files(self) -> dict[str, str]:
        """path → file_tail, for every F record."""
        if self._files is None:
            with self._building:
                if self._files is None:
                    self._files = self._parse_files()
        return self._files

    def _parse_files(self) -> dict[str, str]:
        files: dict[str, str] = {}
        lines = self._lines
        for frame in self.frames:
            lines = lines + _decompress(frame.frame).split("\n")[:-1]
            self.frames_read += 1
        for line in lines:
            _kind, path, _how, tail = line.split("\t", 3)
            files[unescape(path) if "\\" in path else path] = tail
        if self.by_directory:
            self._head_files()  # what ``records_in`` needs of them, before they go
        self._lines = []
        return files

    def records_in(self, rel: str) -> dict[str, str]:
        """path → file_tail of the files directly in directory ``rel``: in a version 2
        manifest only ``rel``'s own frame is decompressed."""
        found = self._in_frame.get(rel)
        if found is not None:
            return found
        with self._building:
            found = self._in_frame.get(rel)
            if found is None:
                if not self.by_directory:
                    files = self.files
                    found = {path: files[path] for path in self.in_directory(rel)}
                else:
                    found = dict(self._head_files().get(rel, {}))
                    frame = self.frame_of(rel)
                    if frame is not None:
                        self.frames_read += 1
                        for line in _decompress(frame.frame).split("\n")[:-1]:
                            _kind, path, _how, tail = line.split("\t", 3)
                            found[unescape(path) if "\\" in path else path] = tail
                self._in_frame[rel] = found
        return found

    def directory_records(self, rel: str) -> DirectoryRecords | None:
        """The records of message directory ``rel`` split into lines, names and sizes without
        parsing them one by one. None when that cannot be done safely (no frame of its own,
        records of it in the section's first frame, an escaped name, which is not the name on
        disk): ``records_in`` then."""
        frame = self.frame_of(rel)
        if frame is None or frame.size is None or rel in self._head_files():
            return None
        text = _decompress(frame.frame)
        self.frames_read += 1
        prefix = f"F\t{rel}/"
        lines = text.split("\n")
        if ("\\" in text or lines.pop() != "" or not text.startswith(prefix)
                or text.count("\n" + prefix) != len(lines) - 1):
            return None
        # F, path, how and the six fields of a tail: without the path's directory, a name is
        # every eighth field.
        fields = text[len(prefix):].replace("\n" + prefix, "\t").replace("\n", "").split("\t")
        if len(fields) != 8 * len(lines):
            return None
        return DirectoryRecords(lines, fields[0::8], fields[2::8], frame.size)

    def _head_files(self) -> dict[str, dict[str, str]]:
        if self._head is None:
            head: dict[str, dict[str, str]] = {}
            for line in self._lines:
                _kind, path, _how, tail = line.split("\t", 3)
                path = unescape(path)
                head.setdefault(parent_of(path), {})[path] = tail
            self._head = head
        return self._head

    def tail(self, path: str) -> str | None:
        """The record tail of ``path`` (a file that is not a message: without parsing the
        messages' records)."""
        found = self._plain.get(path)
        if found is not None:
            return found
        if self._files is not None:
            return self._files.get(path)
        return self.records_in(parent_of(path)).get(path)

    def has_subdirectories(self, rel: str) -> bool:
        """Whether the previous backup held a directory inside ``rel`` (then ``rel`` was no
        message directory, whatever its name)."""
        if self._parents is None:
            self._parents = {parent_of(path) for path in self.directories}
        return rel in self._parents

    def in_directory(self, rel: str) -> list[str]:
        """The paths of the files directly in directory ``rel`` (built on first use, for the
        whole section in a version 1 manifest: only a night that takes folders over unlisted
        needs it)."""
        if self.by_directory and self._files is None:
            return list(self.records_in(rel))
        if self._by_directory is None:
            files = self.files
            with self._building:
                if self._by_directory is None:
                    index: dict[str, list[str]] = {}
                    for path in files:
                        index.setdefault(parent_of(path), []).append(path)
                    self._by_directory = index
        return self._by_directory.get(rel, [])

    def by_base(self, base: str) -> list[str]:
        """The paths of the previous files with base name ``base``, in every directory but
        the ``settled`` ones."""
        if self._by_base is None:
            with self._building:
                if self._by_base is None:
                    if not self.by_directory:
                        self._by_base = _base_index(self.files)
                    else:
                        self._by_base = _base_index(itertools.chain(
                            *(paths for paths in self._head_files().values()),
                            *(self.records_in(frame.directory) for frame in self.frames
                              if frame.directory is not None
                              and frame.directory not in self.settled)))
        found = self._by_base.get(base)
        if found is None:
            return []
        return [found] if isinstance(found, str) else found


def _base_index(files: Iterable[str]) -> dict[str, str | list[str]]:
    """base name → its path, or its paths when there are several."""
    index: dict[str, str | list[str]] = {}
    for path in files:
        key = path[path.rfind("/") + 1:].split(":", 1)[0]
        seen = index.setdefault(key, path)
        if seen is not path:
            if isinstance(seen, str):
                index[key] = [seen, path]
            else:
                seen.append(path)
    return index


_END_LINE = re.compile(rb"(?:^|\n)E\t\d+((?:\t[a-z_]+=\d+)*)\n$")


def _check_whole(path: Path) -> dict[str, int]:
    """Decompress the whole manifest (checking every frame's checksum) and look for its end
    line; returns the end line's ``key=value`` fields. Raises ValueError or zstd's error.
    Cheap: no line is parsed."""
    import zstandard  # only the copy and verify need it

    tail = b""
    with path.open("rb") as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        while chunk := reader.read(READ_CHARS):
            tail = (tail + chunk[-256:])[-256:]
    return _end_fields(tail)


def _check_digest(path: Path, sha256: str) -> dict[str, int]:
    """``_check_whole`` for a manifest whose sha256 was recorded when it was published: the
    file is read once and hashed, its frames found from their headers, and only the last
    (the end line) decompressed. About half the time at 200,000 messages (13 MB: 37-45 ms
    against 70-97 ms). Raises ValueError or zstd's error."""
    last: collections.deque[bytes] = collections.deque(maxlen=2)
    with path.open("rb") as raw:
        hashed = _Hashed(raw)
        last.extend(_frames(hashed))
    if hashed.digest.hexdigest() != sha256:
        raise ValueError("it is not the manifest published with its backup (its sha256 "
                         "differs from the one in mailsnap.json)")
    # The end line's frame, which may be followed by the empty one zstd's writer ends with.
    tail = ""
    for frame in reversed(last):
        tail = _decompress(frame) + tail
        if tail:
            break
    return _end_fields(tail.encode("utf-8", "surrogateescape"))


def _end_fields(tail: bytes) -> dict[str, int]:
    """The ``key=value`` fields of the end line that ``tail`` (a manifest's last bytes,
    decompressed) ends with."""
    found = _END_LINE.search(tail)
    if found is None:
        raise ValueError("truncated: no end line")
    fields = found.group(1).decode().split("\t")[1:]
    return {key: int(value) for key, value in (f.split("=", 1) for f in fields)}


def _read_text(path: Path) -> tuple[IO[bytes], io.TextIOWrapper]:
    import zstandard

    raw = path.open("rb")
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    text = io.TextIOWrapper(
        io.BufferedReader(reader, 1 << 16),
        encoding="utf-8", errors="surrogateescape", newline="\n",
    )
    return raw, text


def _frame_length(data: bytes | bytearray) -> int | None:
    """The length of the zstd frame at the start of ``data``, found from its block headers
    without decompressing it; None if ``data`` ends before the frame does."""
    import zstandard

    if len(data) < 18:  # magic and the longest frame header
        try:
            start = zstandard.frame_header_size(bytes(data))
        except zstandard.ZstdError:
            return None
    else:
        start = zstandard.frame_header_size(bytes(data[:18]))
    if len(data) < start:
        return None
    checksum = 4 if zstandard.get_frame_parameters(bytes(data[:start])).has_checksum else 0
    at = start
    while True:
        if len(data) < at + 3:
            return None
        header = data[at] | data[at + 1] << 8 | data[at + 2] << 16
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise ValueError("a zstd block of a reserved type")
        at += 3 + (1 if kind == 1 else size)  # an RLE block holds one byte
        if last:
            end = at + checksum
            return end if len(data) >= end else None


def _frames(raw: IO[bytes] | _Hashed) -> Iterator[bytes]:
    """Each zstd frame of a manifest, as its bytes in the file."""
    data = bytearray()
    while True:
        length = _frame_length(data) if data else None
        while length is None:
            chunk = raw.read(READ_BYTES)
            if not chunk:
                if data:
                    raise ValueError("truncated: a frame without its end")
                return
            data += chunk
            length = _frame_length(data)
        with memoryview(data) as view:  # one copy of the frame, not two
            frame = bytes(view[:length])
        del data[:length]
        yield frame


def _decompress(frame: bytes) -> str:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(frame).decode(
        "utf-8", "surrogateescape")


def _is_message_record(line: str) -> bool:
    """An F record of a file directly in a ``cur/`` or ``new/`` (a guess that may say yes for
    a few others: those are then parsed with the messages, on first use)."""
    return "/cur/" in line or "/new/" in line or line.startswith(("F\tcur/", "F\tnew/"))


class PreviousManifest:
    """Reads a manifest section by section, in step with a walk in the same order.

    ``section(key)`` returns the section for ``key`` (a ``/``-joined path) or None. Keys must be
    asked in walk order, except with ``keep=True`` (the live copier walks its tree several
    times): then every section read stays in memory. ``damaged`` is set (with the reason) when
    the rest of the manifest cannot be trusted; from then on every section is None, so the copy
    falls back to copying rather than risking a wrong link.
    """

    def __init__(self, path: Path, *, keep: bool = False, sha256: str | None = None) -> None:
        self.path = path
        self.keep = keep
        self.damaged: str | None = None
        self.end_fields: dict[str, int] = {}
        self._cache: dict[str, Section] = {}
        self._pending: Section | None = None
        self._done = False
        try:
            # Trusted whole by the digest recorded at publish where there is one (older
            # backups have none): every frame's checksum is still checked as it is read.
            self.end_fields = (_check_whole(path) if sha256 is None
                               else _check_digest(path, sha256))
            self._raw = path.open("rb")
            self._frames = _frames(self._raw)
            head = _decompress(next(self._frames))
        except (OSError, ValueError, StopIteration) as exc:
            self._fail(f"cannot read {path}: {exc!r}")
            return
        except Exception as exc:  # zstd errors have no common base we can import lazily
            self._fail(f"{path} is damaged: {exc}")
            return
        magic, _, version = head.rstrip("\n").partition("\t")
        if magic != MAGIC or version not in VERSIONS:
            self._fail(f"{path} is not a mailsnap manifest of version {' or '.join(VERSIONS)}")
            return

    def _fail(self, reason: str) -> None:
        self.damaged = reason
        self._done = True
        self._pending = None
        self._cache.clear()

    def close(self) -> None:
        if hasattr(self, "_raw"):
            self._raw.close()

    def _next_section(self) -> Section | None:
        """Read the next section (one zstd frame, checksummed as it is decompressed), or None
        at a verified end. Lines are split in C and only D, L and C records, and F records of
        files that are not messages, are parsed now."""
        if self._done:
            return None
        try:
            for frame in self._frames:
                lines = _decompress(frame).split("\n")
                if lines.pop() != "":
                    raise ValueError("a frame that does not end with a whole record")
                first = lines[0] if lines else ""
                if first.startswith("E\t"):
                    self._done = True
                    return None
                if not first.startswith("S\t"):
                    raise ValueError(f"a frame that is not a section: {first[:20]!r}")
                section = Section(unescape(first[2:]), frame=frame, records=len(lines) - 1)
                messages = section._lines
                plain = section._plain
                for line in itertools.islice(lines, 1, None):
                    kind = line[:2]
                    if kind == "F\t":
                        if _is_message_record(line):
                            messages.append(line)
                        else:
                            _kind, path, _how, tail = line.split("\t", 3)
                            plain[unescape(path)] = tail
                            messages.append(line)  # in the full parse too
                    elif kind == "D\t":
                        _kind, path, rest = line.split("\t", 2)
                        section.directories[unescape(path)] = rest
                    elif kind == "L\t":
                        # Symlinks are re-read from the source every time, so their directory is.
                        path = unescape(line.split("\t", 2)[1])
                        section.symlinks.add(parent_of(path))
                    elif kind == "C\t":
                        files, size, count = line[2:].split("\t")
                        section.counts = (int(files), int(size), int(count))
                    elif kind == "M\t":
                        # A frame of messages: kept compressed until a record is needed.
                        fields = line[2:].split("\t")
                        if len(fields) == 1:  # version 1: all the section's messages
                            folder = MessageFrame(None, int(fields[0]))
                        else:
                            records, size, count, directory = fields
                            folder = MessageFrame(unescape(directory), int(records), int(size),
                                                  int(count))
                        folder.frame = next(self._frames)
                        section.frames.append(folder)
                        section.records += folder.records
                    else:
                        raise ValueError(f"unknown record {line[:20]!r}")
                return section
            raise ValueError("truncated: no end line")
        except (ValueError, IndexError, UnicodeError, OSError) as exc:
            self._fail(f"{self.path} is damaged ({exc})")
        except Exception as exc:  # zstandard.ZstdError: a corrupt frame
            self._fail(f"{self.path} is damaged ({exc})")
        return None

    def section(self, key: str) -> Section | None:
        if key in self._cache:
            return self._cache[key]
        want = section_key(key)
        while True:
            head = self._pending
            if head is None:
                head = self._pending = self._next_section()
                if head is None:
                    return None
            if section_key(head.key) > want:
                return None  # a new mailbox, not in the previous backup
            self._pending = None
            if self.keep:
                self._cache[head.key] = head
            if head.key == key:
                return head

    def all_sections(self) -> Iterator[Section]:
        """Every section, in order (verify, list). Stops early, with ``damaged`` set, on damage."""
        if self._pending is not None:
            yield self._pending
            self._pending = None
        while (found := self._next_section()) is not None:
            yield found


def read_records(path: Path) -> list[list[str]]:
    """Every record of a manifest as its fields, header and end line included (tests, tools;
    small manifests only). Raises ``ManifestDamaged``."""
    try:
        raw, text = _read_text(path)
        try:
            lines = text.read().split("\n")
        finally:
            text.close()
            raw.close()
    except Exception as exc:  # OSError, UnicodeError, zstandard.ZstdError
        raise ManifestDamaged(f"{path} is damaged ({exc})") from None
    if len(lines) < 2 or lines[-1] != "" or not lines[-2].startswith("E\t"):
        raise ManifestDamaged(f"{path} is damaged (no end line)")
    return [line.split("\t") for line in lines[:-1]]
