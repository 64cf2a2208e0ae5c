"""Restore a user's Maildir from a backup into another user and compare what Dovecot shows.

The restore is what an administrator would do by hand: a plain copy of the backed-up home into the
new user's empty home, ownership fixed to vmail, leaving out Dovecot's index files (Dovecot
rebuilds them from the Maildir). Dovecot then has to show every message file of the backup, in the
same mailbox, with the flags its ``:2,`` suffix names.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
import shutil

from tests.livemail.checker import BackupMessage, scan_backup
from tests.livemail.dovecot import DovecotInstance
from tests.livemail.seed import mutf7_decode

# (mailbox, Message-ID, flags) -> number of messages. Not the Maildir base name: Dovecot's GUID
# for a message MOVEd by hard link is the original file's name, kept in dovecot-uidlist.
View = Counter[tuple[str, str, frozenset[str]]]


def mailbox_of(folder: str) -> str:
    """IMAP mailbox name (UTF-8) for a folder directory path ending in ``Maildir[/.Name]``."""
    last = Path(folder).name
    return mutf7_decode(last[1:]) if last.startswith(".") else "INBOX"


# Each folder's ``dovecot.index``, ``.index.log`` (and the rotated ``.index.log.2``) and
# ``.index.cache``, left out of the restore. In Maildir the file name is the durable record of a
# message's flags; the index is a cache that Dovecot rebuilds from the Maildir. A flag change is
# appended to ``dovecot.index.log`` first and renames the message file only when Dovecot syncs the
# index to the Maildir, so a backup of a live store -- even an atomic snapshot -- can catch a
# folder between the two, and Dovecot opening that copy trusts its index over the file name (a
# Sent message named ``:2,FS`` in the backup was shown ``\Flagged`` only). Without the index,
# Dovecot takes every message's flags from its file name, which is what the backup holds and what
# ``backup_view`` expects. ``dovecot-uidlist`` (UIDs, GUIDs) and ``dovecot-keywords`` are kept.
INDEX_FILES = ("dovecot.index", "dovecot.index.*")


def restore_home(dovecot: DovecotInstance, backup_home: Path, user: str) -> None:
    """Copy a backed-up home (``<backup>/mail/<local part>``) into ``user``'s empty home,
    without Dovecot's index files (see ``INDEX_FILES``)."""
    home = dovecot.home(user)
    if home.exists() and any(home.iterdir()):
        raise RuntimeError(f"{home} is not empty; restore needs a fresh user")
    shutil.copytree(backup_home, home, symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(*INDEX_FILES))
    dovecot.chown_tree(home)


def backup_view(backup_home: Path) -> View:
    """What the backup's files say: one entry per message file, flags from its name. (Works on
    any Maildir home, e.g. the live one once the load has stopped.)"""
    messages: list[BackupMessage] = scan_backup(backup_home).messages
    return Counter(
        (mailbox_of(m.folder), m.message_id or "", m.flags) for m in messages
    )


def settled(view: View, unsettled: set[str]) -> View:
    """``view`` without the messages whose Message-ID is in ``unsettled``."""
    return Counter({key: n for key, n in view.items() if key[1] not in unsettled})


def dovecot_view(dovecot: DovecotInstance, user: str) -> View:
    """What Dovecot shows for ``user``: ``doveadm fetch 'mailbox flags hdr.message-id' ALL``."""
    out = dovecot.doveadm("-f", "tab", "fetch", "-u", user, "mailbox flags hdr.message-id", "ALL")
    view: View = Counter()
    lines = out.splitlines()
    if lines and lines[0].split("\t") != ["mailbox", "flags", "hdr.message-id"]:
        raise ValueError(f"unexpected doveadm fetch output: {out[:200]!r}")
    for line in lines[1:]:
        if not line:
            continue
        mailbox, flags, mid = line.split("\t")
        shown = frozenset(f for f in flags.split() if f != "\\Recent")
        view[(mailbox, mid.strip(), shown)] += 1
    return view
