"""Fast seeding of Maildir++ stores by writing message files directly, and the message format.

Writing files (then ``doveadm force-resync``) is ~40x faster than delivering by LMTP. Every
message carries a unique ``Message-ID`` (the identity the checker uses) and an ``X-Mailsnap-Id``
header with the same token. File names follow Dovecot's Maildir convention
``<secs>.M<usecs>P<pid>Q<n>.<host>,S=<size>[:2,<flags>]`` with a correct ``S=`` size.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
import os
from pathlib import Path
import random
import re
import time

from tests.livemail.dovecot import DovecotInstance
from tests.livemail.events import EventLog

# Folder (IMAP name, UTF-8) -> share of a user's seeded messages. "" is INBOX.
FOLDERS: dict[str, float] = {
    "": 0.40,
    "Sent": 0.15,
    "Archive": 0.20,
    "Archive.2023": 0.10,
    "Projekt & Überblick": 0.15,  # space, '&' and non-ASCII: modified UTF-7 on disk
}
SEED_HOST = "seed.livemail"
_FILLER = "".join(
    random.Random(3).choice("abcdefghijklmnopqrstuvwxyz      ") for _ in range(64 * 1024)
)


def mutf7_encode(name: str) -> str:
    """IMAP modified UTF-7 (RFC 3501 5.1.3), as Dovecot uses it for mailbox and folder names."""
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


def folder_dir(maildir: Path, folder: str) -> Path:
    """The directory of ``folder`` (UTF-8 IMAP name, "" for INBOX) in a Maildir++ store."""
    return maildir / ("." + mutf7_encode(folder)) if folder else maildir


def imap_mailbox(folder: str) -> str:
    """The quoted, modified-UTF-7 mailbox name to send in an IMAP command."""
    return '"' + (mutf7_encode(folder) if folder else "INBOX") + '"'


def message_id(token: str) -> str:
    return f"<{token}@mailsnap.test>"


def build_message(token: str, user: str, rng: random.Random, size: int) -> bytes:
    """An RFC 5322 message of roughly ``size`` bytes, LF line ends (as Maildir stores them)."""
    head = (
        f"Message-ID: {message_id(token)}\n"
        f"X-Mailsnap-Id: {token}\n"
        f"From: Livemail Load <load@example.test>\n"
        f"To: {user}\n"
        f"Subject: livemail {token}\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
    )
    body_len = max(64, size - len(head))
    start = rng.randrange(0, len(_FILLER) - body_len - 1)
    text = _FILLER[start : start + body_len]
    body = "\n".join(text[i : i + 72] for i in range(0, len(text), 72)) + "\n"
    return (head + body).encode()


@dataclass(frozen=True)
class SeedSpec:
    messages_per_user: int
    min_size: int = 1500
    max_size: int = 12000
    new_share: float = 0.05  # left in new/ (no flags), as if never seen by a client
    seed: int = 1


def _flags(rng: random.Random) -> str:
    """Maildir flag letters, in the ASCII order Maildir requires."""
    chances = (("D", 0.02), ("F", 0.3), ("R", 0.3), ("S", 0.7))
    return "".join(letter for letter, chance in chances if rng.random() < chance)


def seed_user(
    dovecot: DovecotInstance, user: str, spec: SeedSpec, log: EventLog, tag: str
) -> int:
    """Write ``spec.messages_per_user`` messages into ``user``'s folders; return the count.

    Each message is registered in ``log`` as existing from now on. Call ``dovecot.force_resync``
    afterwards (``seed_store`` does).
    """
    rng = random.Random(f"{spec.seed}-{user}")
    maildir = dovecot.maildir(user)
    pid = os.getpid()
    now = int(time.time()) - 86400
    counter = 0
    folders = list(FOLDERS)
    weights = [FOLDERS[f] for f in folders]
    for folder in folders:
        directory = folder_dir(maildir, folder)
        for sub in ("cur", "new", "tmp"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        if folder:
            (directory / "maildirfolder").touch()
    (maildir / "subscriptions").write_text(
        "".join(mutf7_encode(f) + "\n" for f in folders if f)
    )
    local = user.split("@", 1)[0]
    for folder in rng.choices(folders, weights, k=spec.messages_per_user):
        counter += 1
        token = f"{tag}-s-{local}-{counter:06d}"
        data = build_message(token, user, rng, rng.randint(spec.min_size, spec.max_size))
        base = f"{now + counter}.M{counter % 1000000}P{pid}Q{counter}.{SEED_HOST},S={len(data)}"
        directory = folder_dir(maildir, folder)
        if rng.random() < spec.new_share:
            path = directory / "new" / base
        else:
            path = directory / "cur" / f"{base}:2,{_flags(rng)}"
        path.write_bytes(data)
        log.created(message_id(token), "seed", user=user, folder=folder)
    dovecot.chown_tree(dovecot.home(user))
    return counter


def seed_store(
    dovecot: DovecotInstance, users: Sequence[str], spec: SeedSpec, log: EventLog
) -> int:
    """Seed every user and let Dovecot index the result; return the number of messages."""
    total = 0
    for user in users:
        total += seed_user(dovecot, user, spec, log, log.tag)
    for user in users:
        dovecot.force_resync(user)
    return total
