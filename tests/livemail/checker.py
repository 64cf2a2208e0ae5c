"""The checker: what a backup of a live Maildir tree lost or got wrong, judged by the event log.

* **missing** – Message-IDs that existed for the whole backup window (see ``EventLog.required``)
  but appear nowhere in the backup. A MOVE during the window does not excuse a loss: the message
  existed in some folder all along, so it must be in *some* folder of the backup.
* **duplicated** – one Maildir base name (the part before ``:2,``) twice in one folder's
  ``cur/`` + ``new/``: Dovecot would index one message twice.
* **cross-folder duplicates** – one Message-ID in several folders although it was never COPYed
  (copies are left out: they are meant to be there). Reported separately and not an error: an
  atomic snapshot can catch a MOVE between its hard-link and its unlink.
* **wrong sizes** – a file whose ``,S=<size>`` in its name differs from its length (a message
  whose data did not make it into the copy, e.g. caught between rename and write-back).
* **unidentified** – a message file without a Message-ID (likewise: damaged or empty).
* **tmp files** – anything inside a ``tmp/`` (half-written deliveries).
* **lock files** – ``dovecot-uidlist.lock``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
import os
from pathlib import Path
import re

from tests.livemail.events import EventLog

_SIZE = re.compile(r",S=(\d+)")
_MESSAGE_ID = re.compile(rb"^message-id:\s*(<[^>\s]+>)", re.IGNORECASE | re.MULTILINE)
LOCK_NAMES = ("dovecot-uidlist.lock",)
FLAG_NAMES = {"S": "\\Seen", "R": "\\Answered", "F": "\\Flagged", "T": "\\Deleted",
              "D": "\\Draft"}


@dataclass(frozen=True)
class BackupMessage:
    folder: str  # the folder directory relative to the backup root ("user1/Maildir/.Sent")
    subdir: str  # "cur" or "new"
    name: str  # the file name
    message_id: str | None
    size: int  # the file's length in bytes

    @property
    def size_ok(self) -> bool:
        """False when the name carries ``,S=<n>`` and the file is not ``n`` bytes long."""
        match = _SIZE.search(self.base)
        return match is None or int(match.group(1)) == self.size

    @property
    def base(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def flags(self) -> frozenset[str]:
        """IMAP system flags from the ``:2,`` suffix (lower-case letters are keywords)."""
        if self.subdir != "cur" or ":2," not in self.name:
            return frozenset()
        letters = self.name.rsplit(":2,", 1)[1]
        return frozenset(FLAG_NAMES[c] for c in letters if c in FLAG_NAMES)


@dataclass(frozen=True)
class BackupScan:
    messages: list[BackupMessage]
    tmp_files: list[str]
    lock_files: list[str]


@dataclass
class CheckResult:
    """What ``check_backup`` found; ``ok`` means nothing was lost or broken."""

    window: tuple[float, float]
    files: int  # message files in cur/ and new/
    required: int  # Message-IDs that existed for the whole window
    missing: list[str] = field(default_factory=list)
    duplicated: list[tuple[str, str]] = field(default_factory=list)  # (folder, base name)
    cross_folder_duplicates: list[str] = field(default_factory=list)
    tmp_files: list[str] = field(default_factory=list)
    lock_files: list[str] = field(default_factory=list)
    unidentified: list[str] = field(default_factory=list)  # message files without Message-ID
    wrong_size: list[str] = field(default_factory=list)  # length differs from the name's S=
    changes_in_window: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.tmp_files or self.lock_files
                    or self.unidentified or self.wrong_size)

    @property
    def seconds(self) -> float:
        return self.window[1] - self.window[0]

    def summary(self) -> str:
        rate = self.changes_in_window / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{'OK' if self.ok else 'FAIL'}: {self.files} files, {self.required} required, "
            f"missing {len(self.missing)}, duplicated {len(self.duplicated)}, "
            f"cross-folder {len(self.cross_folder_duplicates)}, tmp {len(self.tmp_files)}, "
            f"locks {len(self.lock_files)}, unidentified {len(self.unidentified)}, "
            f"wrong size {len(self.wrong_size)}; "
            f"window {self.seconds:.2f}s with {self.changes_in_window} changes ({rate:.0f}/s)"
        )


def read_message_id(path: Path) -> str | None:
    """The Message-ID from the header block of a message file (None if it has none)."""
    with open(path, "rb") as handle:
        head = handle.read(16384)
    end = head.find(b"\n\n")
    crlf = head.find(b"\r\n\r\n")
    if crlf != -1 and (end == -1 or crlf < end):
        end = crlf
    match = _MESSAGE_ID.search(head if end == -1 else head[:end])
    return match.group(1).decode() if match else None


def _maildir_folders(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, _ in os.walk(root):
        if "cur" in dirnames or "new" in dirnames:
            yield Path(dirpath)


def scan_backup(root: Path) -> BackupScan:
    """Every message file, tmp file and lock file below ``root`` (a copy of a Maildir tree)."""
    messages: list[BackupMessage] = []
    tmp_files: list[str] = []
    lock_files: list[str] = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name in LOCK_NAMES:
                lock_files.append(os.path.relpath(os.path.join(dirpath, name), root))
    for folder in _maildir_folders(root):
        rel = os.path.relpath(folder, root)
        for sub in ("cur", "new"):
            directory = folder / sub
            if not directory.is_dir():
                continue
            for entry in os.scandir(directory):
                if entry.is_file(follow_symlinks=False):
                    mid = read_message_id(Path(entry.path))
                    size = entry.stat(follow_symlinks=False).st_size
                    messages.append(BackupMessage(rel, sub, entry.name, mid, size))
        tmp = folder / "tmp"
        if tmp.is_dir():
            for dirpath, _, filenames in os.walk(tmp):
                tmp_files.extend(
                    os.path.relpath(os.path.join(dirpath, n), root) for n in filenames
                )
    return BackupScan(messages, sorted(tmp_files), sorted(lock_files))


def check_backup(backup: Path, log: EventLog, start: float, end: float) -> CheckResult:
    """Judge the Maildir tree copy at ``backup`` against ``log`` for the window [start, end]
    (``time.monotonic()`` values taken just before the copy began and just after it ended)."""
    scan = scan_backup(backup)
    present = {m.message_id for m in scan.messages if m.message_id}
    required = log.required(start, end)
    bases = Counter((m.folder, m.base) for m in scan.messages)
    copied = log.copied()
    folders_of: dict[str, set[str]] = defaultdict(set)
    for m in scan.messages:
        if m.message_id:
            folders_of[m.message_id].add(m.folder)
    return CheckResult(
        window=(start, end),
        files=len(scan.messages),
        required=len(required),
        missing=sorted(required - present),
        duplicated=sorted(key for key, count in bases.items() if count > 1),
        cross_folder_duplicates=sorted(
            mid for mid, f in folders_of.items() if len(f) > 1 and mid not in copied
        ),
        tmp_files=scan.tmp_files,
        lock_files=scan.lock_files,
        unidentified=sorted(f"{m.folder}/{m.subdir}/{m.name}" for m in scan.messages
                            if not m.message_id),
        wrong_size=sorted(f"{m.folder}/{m.subdir}/{m.name}" for m in scan.messages
                          if not m.size_ok),
        changes_in_window=sum(log.changes(start, end).values()),
    )
