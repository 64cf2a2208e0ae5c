"""Giving mail back: a user's messages from a backup, into the live Maildir while Dovecot runs,
or into a fresh Maildir++ tree anywhere.

Into the live store, every message goes in by the Maildir delivery protocol, as an MDA would
deliver it: written to the folder's ``tmp/`` under a unique name, fsync'ed, then hard-linked
into ``cur/`` under its original name and flags (``link`` fails if the name exists, so nothing
is ever overwritten) and the ``tmp/`` name removed. Dovecot sees a new file in ``cur/`` and
gives it a new UID at its next look; ``dovecot-uidlist``, ``dovecot-keywords`` and the index
files are never touched. A message whose base name or Message-ID is already in the target
folder is skipped, so a second restore adds nothing. A missing folder is created the way
Dovecot creates one (``cur/ new/ tmp/`` and ``maildirfolder``, owned like the user's Maildir)
and subscribed.

Only the system flags (``D F P R S T``) are restored: lowercase letters are keywords whose
meaning is per folder (``dovecot-keywords``), so they could name a different keyword in the
folder they go back to.

Users are found by the job's ``users`` layout: ``"{domain}/{user}/Maildir"`` (``{user}`` is
the part before ``@``), ``"{user}/Maildir"``, or ``""`` for a source that is a single Maildir.
Folders are Maildir++ folders, named as IMAP shows them (``INBOX``, ``Sent``,
``Lists/debian`` or ``Lists.debian``, ``Café``) or as on disk (``.Caf&AOk-``).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
import email.parser
import errno
import logging
import os
from pathlib import Path
import re
import shutil
import socket
import stat
import time

from mailsnap.copiers.files import base_name
from mailsnap.errors import MailsnapError
from mailsnap.maildirs import MESSAGE_DIRS, is_maildir

log = logging.getLogger(__name__)

SYSTEM_FLAGS = frozenset("DFPRST")
HEADER_BYTES = 64 * 1024


class RestoreRefused(MailsnapError):
    """A restore that would escape the user's Maildir, or names what the backup lacks."""


# -- names ---------------------------------------------------------------------------------


def mutf7_encode(name: str) -> str:
    """IMAP modified UTF-7 (RFC 3501 5.1.3): how Dovecot names a Maildir++ folder on disk."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def mutf7_decode(name: str) -> str:
    def one(match: re.Match[str]) -> str:
        chunk = match.group(1)
        if not chunk:
            return "&"
        chunk = chunk.replace(",", "/")
        chunk += "=" * (-len(chunk) % 4)
        return base64.b64decode(chunk).decode("utf-16-be")

    return re.sub(r"&([^-]*)-", one, name)


def folder_dir(folder: str) -> str:
    """An IMAP folder name → its Maildir++ directory ("" for INBOX). A name starting with "."
    is taken as the directory name itself."""
    if folder.upper() == "INBOX" or folder == "":
        return ""
    if any(part in ("", ".", "..") for part in folder.lstrip(".").split("/")) \
            or folder.startswith("/"):
        raise RestoreRefused(f"--folder {folder!r}: not a folder name (no '/', '..' or NUL)")
    if folder.startswith("."):
        on_disk = folder
    else:
        on_disk = "." + mutf7_encode(folder.replace("/", "."))
    if "/" in on_disk or on_disk in (".", "..") or "\0" in on_disk:
        raise RestoreRefused(f"--folder {folder!r}: not a folder name (no '/', '..' or NUL)")
    return on_disk


def folder_name(directory: str) -> str:
    """A Maildir++ directory → the IMAP name people know it by."""
    return mutf7_decode(directory[1:]) if directory else "INBOX"


def user_path(layout: str | None, user: str) -> str:
    """The relative path of ``user``'s Maildir under the source (and under a backup's
    ``mail/``). Refuses a user name that could leave it."""
    if layout is None:
        raise RestoreRefused("this job has no `users` layout: set users = "
                             "\"{domain}/{user}/Maildir\", \"{user}/Maildir\" or \"\" (the "
                             "source is one Maildir) in its [[job]] table")
    if not user or "/" in user or "\0" in user or user in (".", "..") or user.startswith("."):
        raise RestoreRefused(f"--user {user!r}: not a user name")
    local, _, domain = user.partition("@")
    if "{domain}" in layout and not domain:
        raise RestoreRefused(f"--user {user!r}: the job's users layout {layout!r} needs "
                             "user@domain")
    rel = layout.format(user=local, domain=domain, login=user)
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise RestoreRefused(f"--user {user!r}: the path {rel!r} leaves the store")
    return "/".join(parts)


# -- what a backup holds for a user ---------------------------------------------------------


@dataclass(frozen=True)
class Message:
    folder: str  # Maildir++ directory, "" for INBOX
    sub: str  # "cur" or "new"
    name: str
    path: Path
    size: int
    mtime: float
    mode: int = 0o600
    uid: int = -1
    gid: int = -1

    @property
    def base(self) -> str:
        return base_name(self.name)

    @property
    def flags(self) -> str:
        info = self.name.split(":2,", 1)
        return "".join(sorted(set(info[1]) & SYSTEM_FLAGS)) if len(info) == 2 else ""


def _safe_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def folders_of(maildir: Path) -> list[str]:
    """The Maildir++ folders of a user's Maildir: "" (INBOX) and every ``.Name`` Maildir."""
    found = [""] if is_maildir(maildir) else []
    with os.scandir(maildir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith(".") and entry.name not in (".", "..") \
                    and entry.is_dir(follow_symlinks=False) and is_maildir(entry.path):
                found.append(entry.name)
    return found


def messages_in(maildir: Path, folder: str) -> Iterator[Message]:
    """Regular files in the folder's ``new/`` and ``cur/`` (a symlink is never followed)."""
    base = maildir / folder if folder else maildir
    for sub in MESSAGE_DIRS:
        directory = base / sub
        if not _safe_dir(directory):
            continue
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                info = entry.stat(follow_symlinks=False)
                yield Message(folder, sub, entry.name, Path(entry.path), info.st_size,
                              info.st_mtime, stat.S_IMODE(info.st_mode), info.st_uid,
                              info.st_gid)


def message_id(path: Path) -> str | None:
    """The Message-ID header (normalised: no angle brackets, no spaces), or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_BYTES)
    except OSError:
        return None
    headers = email.parser.BytesHeaderParser().parsebytes(head.split(b"\n\n", 1)[0] + b"\n\n")
    value = headers.get("Message-ID")
    return str(value).strip().strip("<>").strip() if value else None


@dataclass
class Selection:
    folders: tuple[str, ...] = ()  # IMAP names; empty: every folder
    message_ids: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def wants(self, message: Message) -> bool:
        if self.since is not None and message.mtime < self.since.timestamp():
            return False
        if self.until is not None and message.mtime >= self.until.timestamp():
            return False
        if self.message_ids:
            found = message_id(message.path)
            return found is not None and found in {m.strip("<>") for m in self.message_ids}
        return True


@dataclass
class FolderResult:
    folder: str  # IMAP name in the backup
    into: str  # IMAP name it went to
    restored: int = 0
    skipped: int = 0  # already there (base name or Message-ID)
    bytes: int = 0
    created: bool = False

    def as_dict(self) -> dict[str, object]:
        return dict(vars(self))


@dataclass
class RestoreResult:
    job: str
    backup: str
    user: str
    into: str
    dry_run: bool
    folders: list[FolderResult] = field(default_factory=list)

    @property
    def restored(self) -> int:
        return sum(f.restored for f in self.folders)

    @property
    def skipped(self) -> int:
        return sum(f.skipped for f in self.folders)

    def as_dict(self) -> dict[str, object]:
        return {"job": self.job, "backup": self.backup, "user": self.user, "into": self.into,
                "dry_run": self.dry_run, "restored": self.restored, "skipped": self.skipped,
                "folders": [f.as_dict() for f in self.folders]}


def pick_folders(maildir: Path, wanted: tuple[str, ...]) -> list[str]:
    present = folders_of(maildir)
    if not wanted:
        return present
    chosen = []
    for name in wanted:
        directory = folder_dir(name)
        if directory not in present:
            shown = ", ".join(folder_name(f) for f in present)
            raise RestoreRefused(f"--folder {name!r} is not in this backup of the user "
                                 f"(it has: {shown})")
        chosen.append(directory)
    return chosen


# -- the two kinds of target ------------------------------------------------------------------


class _Target:
    """A Maildir++ tree messages are delivered into."""

    def __init__(self, root: Path, *, dry_run: bool, owner: os.stat_result,
                 keep_owners: bool) -> None:
        self.root = root
        self.dry_run = dry_run
        self.owner = owner  # uid/gid for what is created
        # Into a new tree each message keeps its owner; into the live store it belongs to the
        # user's Maildir owner there (the uid may differ from the host the backup came from).
        self.keep_owners = keep_owners
        self.known: dict[str, tuple[set[str], set[str] | None]] = {}
        self.counter = 0

    def folder_path(self, directory: str) -> Path:
        path = self.root / directory if directory else self.root
        if path.is_symlink():
            raise RestoreRefused(f"{path} is a symlink: refusing to restore through it")
        return path

    def ensure_folder(self, directory: str) -> bool:
        """Create the folder the way Dovecot does; True when it was created."""
        path = self.folder_path(directory)
        if all(_safe_dir(path / sub) for sub in (*MESSAGE_DIRS, "tmp")):
            return False
        if self.dry_run:
            return True
        for sub in ("", *MESSAGE_DIRS, "tmp"):
            target = path / sub if sub else path
            if not target.exists():
                target.mkdir(mode=0o700)
                self._own(target)
        if directory:
            marker = path / "maildirfolder"
            if not marker.exists():
                marker.touch(mode=0o600)
                self._own(marker)
            self.subscribe(folder_name(directory))
        return True

    def subscribe(self, name: str) -> None:
        """Append the folder to ``subscriptions`` (one name per line, Dovecot's Maildir++
        format), unless it is listed already."""
        path = self.root / "subscriptions"
        lines = path.read_text(errors="surrogateescape").splitlines() if path.exists() else []
        if name in lines:
            return
        created = not path.exists()
        with open(path, "a", errors="surrogateescape") as handle:
            handle.write(name + "\n")
        if created:
            self._own(path)

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.owner.st_uid, self.owner.st_gid, follow_symlinks=False)

    def present(self, directory: str) -> tuple[set[str], set[str] | None]:
        """Base names in the folder, and (read when first needed) its Message-IDs."""
        if directory not in self.known:
            bases: set[str] = set()
            path = self.folder_path(directory)
            for sub in MESSAGE_DIRS:
                with_sub = path / sub
                if _safe_dir(with_sub):
                    bases.update(base_name(n) for n in os.listdir(with_sub))
            self.known[directory] = (bases, None)
        return self.known[directory]

    def message_ids(self, directory: str) -> set[str]:
        bases, ids = self.present(directory)
        if ids is None:
            ids = set()
            path = self.folder_path(directory)
            for sub in MESSAGE_DIRS:
                with_sub = path / sub
                if not _safe_dir(with_sub):
                    continue
                for name in os.listdir(with_sub):
                    found = message_id(with_sub / name)
                    if found:
                        ids.add(found)
            self.known[directory] = (bases, ids)
        return ids

    def deliver(self, message: Message, directory: str) -> bool:
        """Deliver one message: tmp/, fsync, link into cur/ (or new/, for a message that was
        in new/), unlink tmp/. False when its name turned up meanwhile (never overwritten)."""
        path = self.folder_path(directory)
        flags = message.flags
        if message.sub == "new":
            final = path / "new" / message.base
        else:
            final = path / "cur" / f"{message.base}:2,{flags}"
        if self.dry_run:
            return True
        self.counter += 1
        tmp = path / "tmp" / (f"{int(time.time())}.M{self.counter}P{os.getpid()}."
                              f"{socket.gethostname()}.mailsnap-restore")
        with open(message.path, "rb") as source, open(tmp, "xb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
            if os.geteuid() == 0:
                if self.keep_owners and message.uid >= 0:
                    os.fchown(out.fileno(), message.uid, message.gid)
                else:
                    os.fchown(out.fileno(), self.owner.st_uid, self.owner.st_gid)
            os.fchmod(out.fileno(), message.mode)
        # INTERNALDATE: Dovecot takes a new message's received date from its mtime.
        os.utime(tmp, (message.mtime, message.mtime))
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True


def restore_user(
    *, job_name: str, backup_content: Path, backup_id: str, layout: str | None, user: str,
    into: str, live_root: Path, selection: Selection, as_folder: str | None = None,
    dry_run: bool = False,
) -> RestoreResult:
    """Restore ``user``'s messages from ``backup_content`` (a backup's ``mail/``), ``into``
    "live" (the user's Maildir under ``live_root``, the job's source) or a path (a new
    Maildir++ tree). Dry run: counts what it would restore, writes nothing."""
    rel = user_path(layout, user)
    maildir = backup_content / rel if rel else backup_content
    if not _safe_dir(maildir) or not is_maildir(maildir):
        raise RestoreRefused(f"--user {user!r}: no Maildir for that user in backup {backup_id} "
                             f"(looked for {rel or '.'} with the layout {layout!r})")
    if into == "live":
        target_root = live_root / rel if rel else live_root
        real_root = os.path.realpath(live_root)
        if os.path.commonpath([real_root, os.path.realpath(target_root)]) != real_root:
            raise RestoreRefused(f"{target_root} leaves the source {live_root}: refusing")
        if not _safe_dir(target_root) or not is_maildir(target_root):
            raise RestoreRefused(f"--user {user!r}: {target_root} is not a Maildir in the live "
                                 "store (restore into a path with --into DIR instead)")
        owner = os.lstat(target_root)
    else:
        target_root = Path(into)
        if target_root.exists() and not _safe_dir(target_root):
            raise RestoreRefused(f"--into {into}: exists and is not a directory")
        owner = os.lstat(maildir)
        if not dry_run:
            target_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = _Target(target_root, dry_run=dry_run, owner=owner, keep_owners=into != "live")
    result = RestoreResult(job_name, backup_id, user, into, dry_run)
    for directory in pick_folders(maildir, selection.folders):
        destination = directory
        if as_folder:
            prefix = folder_dir(as_folder)
            if not prefix:
                raise RestoreRefused("--as-folder: give a new folder name, not INBOX")
            destination = prefix + directory  # ".Restored" + ".Sent" → ".Restored.Sent"
        folder = FolderResult(folder_name(directory), folder_name(destination))
        wanted = [m for m in messages_in(maildir, directory) if selection.wants(m)]
        if wanted:
            folder.created = target.ensure_folder(destination)
        for message in wanted:
            bases, _ids = target.present(destination)
            if message.base in bases:
                folder.skipped += 1
                continue
            found = message_id(message.path)
            if found and found in target.message_ids(destination):
                folder.skipped += 1
                continue
            try:
                delivered = target.deliver(message, destination)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise MailsnapError(f"restore stopped: {target_root} is full") from exc
                raise
            if delivered:
                folder.restored += 1
                folder.bytes += message.size
                bases.add(message.base)  # a second copy in the backup goes in once
                if found:
                    target.message_ids(destination).add(found)
            else:
                folder.skipped += 1
        result.folders.append(folder)
        log.info("%s → %s: %d restored, %d already there", folder.folder, folder.into,
                 folder.restored, folder.skipped)
    return result
