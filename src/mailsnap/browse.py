"""What a backup holds per user and per folder: messages, bytes, date range. For an admin who
has to pick what to restore (``mailsnap list --user``, ``mailsnap show``).

Read from the backup's manifest when it has one (no walk of the backup), else from the tree.
Users are found by the job's ``users`` layout (see ``mailsnap.restore``); a message is a file
in a folder's ``cur/`` or ``new/`` (a name starting with "." is not); its date is its mtime,
which is what Dovecot shows as the date it was received.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
import os
from pathlib import Path
import re

from mailsnap.manifest import MANIFEST_FILE, ManifestDamaged, read_records, unescape
from mailsnap.restore import folder_name, user_path
from mailsnap.store import Backup


@dataclass
class Totals:
    messages: int = 0
    bytes: int = 0
    oldest: float | None = None
    newest: float | None = None

    def add(self, size: int, mtime: float) -> None:
        self.messages += 1
        self.bytes += size
        self.oldest = mtime if self.oldest is None else min(self.oldest, mtime)
        self.newest = mtime if self.newest is None else max(self.newest, mtime)

    def as_dict(self) -> dict[str, object]:
        def day(value: float | None) -> str | None:
            return None if value is None else datetime.fromtimestamp(value, UTC).isoformat()

        return {"messages": self.messages, "bytes": self.bytes, "oldest": day(self.oldest),
                "newest": day(self.newest)}


def _layout_regex(layout: str) -> re.Pattern[str]:
    """``{domain}/{user}/Maildir`` → a regex whose groups name the user's parts."""
    pattern = ""
    for piece in re.split(r"(\{user\}|\{domain\}|\{login\})", layout):
        if piece in ("{user}", "{domain}", "{login}"):
            name = piece[1:-1]
            pattern += f"(?P<{name}>[^/]+)" if f"(?P<{name}>" not in pattern else f"(?P={name})"
        else:
            pattern += re.escape(piece)
    return re.compile(pattern + ("/" if layout else ""))


def _user_of(match: re.Match[str]) -> str:
    parts = match.groupdict()
    if "login" in parts:
        return parts["login"]
    return f"{parts['user']}@{parts['domain']}" if parts.get("domain") else parts["user"]


def _files(backup: Backup) -> Iterator[tuple[str, int, float]]:
    """(path, size, mtime) of every file of the backup, from its manifest or its tree."""
    manifest = backup.path / MANIFEST_FILE
    if manifest.exists():
        try:
            for fields in read_records(manifest):
                if fields[0] == "F":
                    yield unescape(fields[1]), int(fields[3]), int(fields[4]) / 1e9
            return
        except ManifestDamaged:
            pass  # fall back to the tree
    root = os.fspath(backup.content)
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            yield os.path.relpath(path, root), info.st_size, info.st_mtime


def _message_folder(rest: str) -> str | None:
    """``.Sent/cur/NAME`` → ``.Sent``; ``cur/NAME`` → "" (INBOX); anything else → None."""
    parts = rest.split("/")
    if len(parts) < 2 or parts[-2] not in ("cur", "new") or parts[-1].startswith("."):
        return None
    return "/".join(parts[:-2])


def per_user(backup: Backup, layout: str) -> dict[str, Totals]:
    """Messages per user in ``backup``."""
    regex = _layout_regex(layout)
    found: dict[str, Totals] = {}
    for path, size, mtime in _files(backup):
        match = regex.match(path)
        if match is None:
            continue
        if _message_folder(path[match.end():]) is None:
            continue
        found.setdefault(_user_of(match) if layout else "", Totals()).add(size, mtime)
    return dict(sorted(found.items()))


def per_folder(backup: Backup, layout: str | None, user: str,
               folder: str | None = None) -> dict[str, Totals]:
    """Messages per folder (IMAP names) of ``user`` in ``backup``."""
    rel = user_path(layout, user)
    prefix = f"{rel}/" if rel else ""
    found: dict[str, Totals] = {}
    for path, size, mtime in _files(backup):
        if not path.startswith(prefix):
            continue
        directory = _message_folder(path[len(prefix):])
        if directory is None or "/" in directory:
            continue
        name = folder_name(directory)
        if folder is not None and name != folder.replace("/", "."):
            continue
        found.setdefault(name, Totals()).add(size, mtime)
    return dict(sorted(found.items(), key=lambda item: (item[0] != "INBOX", item[0])))


def exists(content: Path, layout: str | None, user: str) -> bool:
    rel = user_path(layout, user)
    return (content / rel).is_dir() if rel else content.is_dir()
