#!/usr/bin/env python3
"""Benchmark for issues #9 and #12 (incremental backups that cost what changed): what a
nightly backup of a Maildir store costs after no change, after flag renames and moves, after
new mail and after a busy day, and what removing the oldest backup costs.

    sudo PYTHONPATH=src .venv/bin/python scripts/bench_incremental.py [--quick]
        [--messages 20000] [--repeat 3] [--full-repeat 1] [--cold]
        [--target-fs ext4|btrfs|source]
        [--scenarios full,nochange,flags1,renames,newmail,flags10,prune,prune-cold]
        [--methods mailsnap-maildir,mailsnap-rsync,rsync,doveadm] [--work /var/tmp]
        [--keep] [--floor] [--json FILE]

``scripts/plot_incremental.py`` draws the JSON files of several runs (sizes, target kinds).

Needs root, btrfs-progs and rsync; doveadm (Debian: dovecot-core) is optional. ``--quick`` is a
smoke run (1,000 messages, one repetition, well under a minute); 200,000 messages is the size
the issue is about, 1,000,000 is allowed (give it disk: every method keeps full copies).

What it does. A store is seeded on a btrfs loop volume (the ``mail`` subvolume is the source):
users × Maildir++ folders (INBOX = the Maildir root, ``.Sent``, ``.Archive``, ``.Lists.debian``,
``.Caf&AOk-`` …), log-normal message sizes of 2–50 KB with correct Dovecot names
(``<time>.M<usec>P<pid>.<host>,S=<size>,W=<vsize>:2,<flags>``), 2.5 % or more of it still in
``new/``, 1 % hard-linked into another folder under a new base name (Dovecot's COPY), three
users with a 20,000-entry INBOX ``cur/`` from 100,000 messages up, and per folder
``dovecot-uidlist``, ``dovecot.index``, ``dovecot.index.cache``, ``dovecot.index.log``, plus each
user's ``subscriptions``. When a folder changes, its ``.log`` (and with new UIDs its ``.cache``)
grows in place and ``dovecot.index`` (and with new UIDs ``dovecot-uidlist``) is replaced by a
rename, as Dovecot does; the in-place files are copied whole by every file-level method and are
a large part of ``written MB`` after a small change. Seeding is timed and printed but not part
of any result. Then the scenarios run in order, every method keeping its own history in its own
target:

- ``full``: the first backup (``--full-repeat`` > 1 wipes every target between repetitions);
- ``nochange``: nothing changed since the last backup;
- ``flags1``: before each repetition, 1 % of the messages get a flag change (the issue's
  "1 % flag changes": nothing else moves);
- ``renames``: before each repetition, 1 % of the messages get a flag change
  (``cur/X:2,S`` → ``cur/X:2,RS``), 0.5 % move to another folder of the same user under the
  same base name, 0.5 % of earlier deliveries move from ``new/`` to ``cur/``;
- ``newmail``: before each repetition, 1 % new messages are delivered into ``new/``;
- ``flags10``: before each repetition, 10 % of the messages get a flag change (a busy day);
- ``prune``: each repetition removes the oldest backup of each method with history:
  ``mailsnap prune`` of the job with ``keep_last`` one short (on a btrfs target a
  ``btrfs subvolume delete``; else one unlink per file), ``rm -rf`` of rsync's oldest tree.
  The benchmark has just read every backup, so their inodes are cached, and a btrfs delete
  evicts each from the cache in the foreground;
- ``prune-cold``: the same as a nightly prune finds it, where nothing read an old backup
  since it was made: the kernel's dentries and inodes are dropped first (``drop_caches``
  2), then, untimed, ``mailsnap prune --dry-run`` (``rm --version`` for rsync) brings the
  program's own files back;

With ``--floor`` (btrfs target), a night of renames (``flags1``, ``renames``, ``flags10``)
is first replayed without mailsnap: each renamed message's one rename from its name in the
backup to its name now, a folder at a time, in a fresh writable snapshot of mailsnap's newest
backup, then ``sync -f`` (``RenameFloor``). That is what btrfs alone costs for the night's
changes, before any listing, record or Dovecot file: a copier may overlap some of it with its
own work, but not the sync, and not the renames of folders it has not listed yet. A second
table sets it beside mailsnap's night and its quiet night.

A change set is applied once to the live source, then every method backs up that same state
once, the methods in a rotating order (each takes its own snapshot; nothing changes between
them). Methods, each a whole process timed from start to exit; peak RSS is the largest of
the process and its children (e.g. mailsnap's rsync), measured by ``/usr/bin/time -f %M``
(GNU time; without it, ``os.wait4``, whose figure never drops below this benchmark's own RSS:
a forked child starts from its parent's high-water mark):

- ``mailsnap-maildir``: ``python -m mailsnap backup --config CFG --job maildir --json``, a job
  with ``backend = "btrfs"`` and ``copier = "maildir"``. mailsnap runs from this source tree,
  its bytecode compiled once before the first run, as installing it would (not timed);
- ``mailsnap-rsync``: the same with ``copier = "rsync"``. If this mailsnap's config rejects the
  ``copier`` key (it is being added for #9), both jobs run without it, i.e. with the btrfs
  backend's default copier, and the table and JSON say so;
- ``rsync --link-dest``: bare ``rsync -aHAX --numeric-ids --link-dest=PREV SNAP/ NEW/`` from a
  read-only btrfs snapshot that the benchmark creates and deletes. The row times rsync alone;
  ``rsync --link-dest +snapshot`` adds the snapshot's create and delete;
- ``doveadm backup`` (dsync): a one-way mirror with no history, ``doveadm -c CONF -o
  mail_location=maildir:SNAP/<user>:INDEX=STATE:CONTROL=STATE backup maildir:DEST`` with
  ``USER``/``HOME`` in the environment instead of ``-u`` (no userdb lookup, so no running
  Dovecot is needed), run as the ``vmail`` user that owns the mail, one process per user in
  sequence (the row is their sum; RSS the largest). It reads its own read-only snapshot (its
  create/delete is not counted). Its source-side index and uidlist live in STATE, built once
  before the first backup and not timed, as a real server's indexes would already exist.

How to read the table. ``median s``: median wall seconds of the repetitions; ``× rsync``: that
median over the bare ``rsync --link-dest`` median of the same scenario (the machine is shared
and noisy: compare ratios, not seconds). ``written MB`` (10^6 bytes), ``copied`` and ``linked``
come from walking the new backup (or the doveadm mirror) after the run: a file is *linked*
when its inode (inode, mtime, size) already existed in that method's earlier backups, whatever
its path (so a renamed message that was hard-linked counts as linked, and Dovecot's COPY links
inside the store do not count as history); otherwise it is *copied*, and ``written`` is the
size of the distinct new inodes. This works the same for every method; ``nlink`` would not
(COPY links inflate it). For doveadm, *linked* means "kept in place in the mirror", and its
``copied`` includes the mirror's own Dovecot index files, rewritten on every run. The JSON
also keeps the target file system's ``statvfs`` used-bytes delta per run (noisy: other work on
the same disk shows up) and, for mailsnap, its own report (``files``, ``linked``, ``bytes`` and a
``copy`` object with ``bytes_written``/``copied``/``linked`` where this version reports one).
After every run the benchmark flushes (``sync``) and waits for btrfs to clean deleted
snapshots, outside the timing: rsync does not flush its writes, mailsnap ``syncfs``-es the
target before publishing (that is in its time). ``--cold`` drops the page cache before every
run. Targets are on the file system that holds ``--work`` (ext4 root here: btrfs source, ext4
target, like the earlier measurements); ``--target-fs btrfs`` puts them on a second btrfs loop
volume, where mailsnap's backups are subvolumes (``target_snapshots``); ``--target-fs source``
on the source's own btrfs beside the mail subvolume (new messages are reflinked: the full
backup writes no message data, and the run needs half the disk). ``folders listed`` is
mailsnap's own count of the ``cur/`` and ``new/`` it listed, of all it saw (the rest were
unchanged and taken over unlisted). Every loop device, mount and snapshot is removed on exit,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Sequence
import concurrent.futures
import contextlib
from dataclasses import asdict, dataclass, field
import email.utils
import functools
import json
import math
import multiprocessing
import os
from pathlib import Path
import pwd
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Protocol

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from tests.helpers.loopfs import btrfs_volume, mounts_under, privileged_skip_reason  # noqa: E402

HOST = "mx1.example.org"
BIG_CUR = 20_000  # messages in the INBOX cur/ of each of the big users
BIG_USERS_FROM = 100_000  # store size from which three users have a BIG_CUR INBOX
MIN_SIZE, MAX_SIZE = 2048, 51200
LINE = 77  # body lines: 76 hex digits and a newline
POOL_LINES = 4096
FLAG_ORDER = "DFPRST"  # Dovecot writes flags in ASCII order
# (folder, weight of its share of the user's mail, probability that a user has it)
FOLDER_KINDS = (
    ("", 40.0, 1.0),
    (".Sent", 12.0, 1.0),
    (".Drafts", 0.5, 1.0),
    (".Trash", 2.0, 1.0),
    (".Junk", 2.0, 1.0),
    (".Archive", 20.0, 0.7),
    (".Archive.2024", 10.0, 0.4),
    (".Lists.debian", 12.0, 0.3),
    (".Caf&AOk-", 3.0, 0.2),
)
FLAGS = ("S", "RS", "", "FS", "FRS", "ST")
FLAG_WEIGHTS = (70, 10, 8, 5, 2, 5)
NEW_SHARE = 0.05  # of INBOX and list mail, still in new/ (not yet seen by a client), at least
COPY_SHARE = 0.01  # messages also COPYed (hard-linked) into another folder
METHODS = ("mailsnap-maildir", "mailsnap-rsync", "rsync", "doveadm")
SCENARIOS = ("full", "nochange", "flags1", "renames", "newmail", "flags10", "prune",
             "prune-cold")
# Share of the store each scenario changes (for the plot against the change rate).
CHANGE_RATE = {"nochange": 0.0, "flags1": 0.01, "newmail": 0.01, "renames": 0.02,
               "flags10": 0.10}
RSYNC_ROW = "rsync --link-dest"
MiB = 1 << 20


_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- the store: a model of every folder, and the files that match it ---------------------------


class Bag:
    """A set of strings with O(1) add, remove and random pick."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.where: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: str) -> None:
        self.where[item] = len(self.items)
        self.items.append(item)

    def remove(self, item: str) -> None:
        i = self.where.pop(item)
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.where[last] = i

    def pick(self, rng: random.Random) -> str:
        return self.items[rng.randrange(len(self.items))]


@dataclass(eq=False)
class Folder:
    user: User
    name: str  # "" for INBOX (the Maildir root), else ".Sent", ".Lists.debian" …
    weight: float
    uidvalidity: int
    cur: Bag = field(default_factory=Bag)
    new: Bag = field(default_factory=Bag)
    flags: dict[str, str] = field(default_factory=dict)  # base name → flags, for cur/
    uids: dict[str, int] = field(default_factory=dict)
    next_uid: int = 1

    @property
    def path(self) -> Path:
        return self.user.root / self.name if self.name else self.user.root

    def cur_file(self, base: str, flags: str) -> Path:
        return self.path / "cur" / f"{base}:2,{flags}"

    def new_file(self, base: str) -> Path:
        return self.path / "new" / base

    def count(self) -> int:
        return len(self.cur) + len(self.new)

    def assign_uid(self, base: str) -> None:
        self.uids[base] = self.next_uid
        self.next_uid += 1


@dataclass(eq=False)
class User:
    name: str
    rel: str  # the Maildir's path under the store root
    root: Path
    folders: list[Folder] = field(default_factory=list)


@dataclass
class Store:
    root: Path
    users: list[User]
    uid: int
    gid: int
    next_n: int  # message counter: every message ever written has its own
    bytes: int = 0
    copies: int = 0
    # Every rename the last change set made (old path, new path), in order: what the
    # ``--floor`` row replays in a snapshot of the previous backup.
    journal: list[tuple[Path, Path]] = field(default_factory=list)

    def folders(self) -> list[Folder]:
        return [f for u in self.users for f in u.folders]

    def messages(self) -> int:
        return sum(f.count() for f in self.folders())

    def rename(self, old: Path, new: Path) -> None:
        os.rename(old, new)
        self.journal.append((old, new))


# -- message content ----------------------------------------------------------------------------


@functools.cache
def _pool() -> bytes:
    """Body text: POOL_LINES lines of LINE bytes, the same in every process."""
    rng = random.Random(20261201)
    return b"".join(rng.randbytes(LINE // 2).hex().encode() + b"\n" for _ in range(POOL_LINES))


@functools.cache
def _blob() -> bytes:
    return random.Random(9).randbytes(MiB)


def blob(size: int) -> bytes:
    """Filler for Dovecot's index files."""
    chunk = _blob()
    return (chunk * (size // len(chunk) + 1))[:size]


def header(n: int, user: str, when: int) -> bytes:
    sender = n % 997
    return (
        f"Return-Path: <sender{sender}@example.net>\n"
        f"Delivered-To: {user}@example.org\n"
        f"Message-ID: <{n}.{when}@bench.example.net>\n"
        f"Date: {email.utils.formatdate(when, usegmt=True)}\n"
        f"From: Sender {sender} <sender{sender}@example.net>\n"
        f"To: {user}@example.org\n"
        f"Subject: benchmark message {n}\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
    ).encode()


def message_bytes(n: int, user: str, when: int, size: int) -> bytes:
    """Exactly ``size`` bytes: the header, then body lines from the pool; ends in a newline."""
    head = header(n, user, when)
    body_len = size - len(head)
    start = (n * 7919 % (POOL_LINES - MAX_SIZE // LINE - 2)) * LINE
    body = bytearray(_pool()[start:start + body_len])
    if body_len % LINE:
        body[-1] = 0x0A
    return head + bytes(body)


def base_name(n: int, user: str, when: int, size: int) -> str:
    """Dovecot's name for the message ``message_bytes`` writes: W is the size with CRLF line
    ends (Dovecot checks both S and W against the file)."""
    head = header(n, user, when)
    body_len = size - len(head)
    lines = head.count(b"\n") + body_len // LINE + (1 if body_len % LINE else 0)
    return f"{when}.M{n * 7919 % 1_000_000}P{2000 + n % 28000}.{HOST},S={size},W={size + lines}"


def copy_name(base: str, n: int, when: int) -> str:
    """A new base name for a COPY of ``base`` (same content, so the same S and W)."""
    sizes = base[base.index(",S="):]
    return f"{when}.M{n * 7919 % 1_000_000}P{2000 + n % 28000}.{HOST}{sizes}"


def message_size(rng: random.Random) -> int:
    return min(max(int(rng.lognormvariate(8.7, 0.8)), MIN_SIZE), MAX_SIZE)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_message(path: str, n: int, user: str, when: int, size: int, uid: int,
                  gid: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, message_bytes(n, user, when, size))
        os.fchown(fd, uid, gid)
        os.utime(fd, ns=(when * 10**9, when * 10**9))
    finally:
        os.close(fd)


Job = tuple[str, int, str, int, int]  # path, n, user, time, size


def _write_chunk(chunk: list[Job], uid: int, gid: int) -> int:
    for path, n, user, when, size in chunk:
        write_message(path, n, user, when, size, uid, gid)
    return len(chunk)


def write_file(path: Path, data: bytes, uid: int, gid: int, *, atomic: bool = False) -> None:
    """Write ``path`` owned by the mail user; ``atomic``: a new file renamed over the old one,
    as Dovecot replaces dovecot-uidlist and dovecot.index."""
    target = path.with_name(path.name + ".bench-tmp") if atomic else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
    if atomic:
        os.replace(target, path)


def append_file(path: Path, size: int) -> None:
    """Dovecot appends to dovecot.index.log and dovecot.index.cache in place."""
    with open(path, "ab") as handle:
        handle.write(blob(size))


def mkdir_owned(path: Path, uid: int, gid: int) -> None:
    if path.is_dir():
        return
    mkdir_owned(path.parent, uid, gid)
    path.mkdir(mode=0o700)
    os.chown(path, uid, gid)


def uidlist(folder: Folder) -> bytes:
    guid = f"{folder.uidvalidity:08x}" * 4
    lines = [f"3 V{folder.uidvalidity} N{folder.next_uid} G{guid}"]
    lines += [f"{uid} :{base}" for base, uid in folder.uids.items()]
    return ("\n".join(lines) + "\n").encode()


def write_meta(store: Store, folder: Folder) -> None:
    """A folder's Dovecot files as they look after the seed."""
    count = folder.count()
    uid, gid = store.uid, store.gid
    write_file(folder.path / "dovecot-uidlist", uidlist(folder), uid, gid)
    write_file(folder.path / "dovecot.index", blob(64 + 36 * count), uid, gid)
    write_file(folder.path / "dovecot.index.cache", blob(300 * count), uid, gid)
    write_file(folder.path / "dovecot.index.log", blob(min(1024 + 64 * count, MiB)), uid, gid)
    if folder.name:
        write_file(folder.path / "maildirfolder", b"", uid, gid)


def update_meta(store: Store, folder: Folder, changes: int, new_uids: int) -> None:
    """What Dovecot does to a folder's files when it sees ``changes`` changes, ``new_uids`` of
    them new messages: appends to the log (and the cache), replaces dovecot.index, and
    replaces dovecot-uidlist when it assigned UIDs."""
    uid, gid = store.uid, store.gid
    append_file(folder.path / "dovecot.index.log", 96 * changes)
    if new_uids:
        write_file(folder.path / "dovecot-uidlist", uidlist(folder), uid, gid, atomic=True)
        append_file(folder.path / "dovecot.index.cache", 300 * new_uids)
    write_file(folder.path / "dovecot.index", blob(64 + 36 * folder.count()), uid, gid,
               atomic=True)


def seed(root: Path, messages: int, rng: random.Random, uid: int, gid: int) -> Store:
    """Plan the store in memory, then write it with one process per core."""
    n_users = max(4, messages // 4000)
    users: list[User] = []
    for i in range(n_users):
        name = f"u{i:04d}"
        rel = f"example.org/{name}/Maildir"
        user = User(name, rel, root / rel)
        for fname, weight, share in FOLDER_KINDS:
            if share >= 1 or rng.random() < share:
                user.folders.append(Folder(user, fname, weight, 1_700_000_000 + i))
        users.append(user)
    store = Store(root, users, uid, gid, next_n=0)

    # (folder, may it be in new/?): three big INBOXes first, the rest by user and folder weight.
    picks: list[tuple[Folder, bool]] = []
    if messages >= BIG_USERS_FROM:
        for user in users[:3]:
            picks += [(user.folders[0], False)] * BIG_CUR
    weights = [rng.lognormvariate(0, 1) for _ in users]
    per_user = Counter(rng.choices(range(n_users), weights=weights, k=messages - len(picks)))
    for i, count in sorted(per_user.items()):
        folders = users[i].folders
        chosen = rng.choices(folders, weights=[f.weight for f in folders], k=count)
        picks += [(f, f.name in ("", ".Lists.debian")) for f in chosen]
    rng.shuffle(picks)  # deliveries interleave over time, as on a real server

    # Enough unseen mail in new/ for every repetition's 0.5 % new/ -> cur/ moves (2.5 % of the
    # store), also when the big INBOXes (all in cur/) are most of it.
    eligible = sum(may_be_new for _, may_be_new in picks) or 1
    new_share = min(0.5, max(NEW_SHARE, 0.025 * messages / eligible))
    span = 3 * 365 * 86400
    now = int(time.time()) - 3600
    jobs: list[Job] = []
    for n, (folder, may_be_new) in enumerate(picks):
        size = message_size(rng)
        when = now - span + n * span // max(messages, 1)
        base = base_name(n, folder.user.name, when, size)
        if may_be_new and rng.random() < new_share:
            folder.new.add(base)
            path = folder.new_file(base)
        else:
            flags = {".Sent": "S", ".Drafts": "DS"}.get(folder.name) or rng.choices(
                FLAGS, weights=FLAG_WEIGHTS)[0]
            folder.cur.add(base)
            folder.flags[base] = flags
            path = folder.cur_file(base, flags)
        folder.assign_uid(base)
        jobs.append((str(path), n, folder.user.name, when, size))
        store.bytes += size
    store.next_n = messages

    # Dovecot's COPY: a hard link in another folder of the same user, under a new base name.
    links: list[tuple[Path, Path]] = []
    for _ in range(int(messages * COPY_SHARE)):
        folder = picks[rng.randrange(len(picks))][0]
        if not folder.cur:
            continue
        base = folder.cur.pick(rng)
        flags = folder.flags[base]
        dest = rng.choice([f for f in folder.user.folders if f is not folder])
        n = store.next_n
        store.next_n += 1
        copy = copy_name(base, n, now - rng.randrange(span // 10))
        dest.cur.add(copy)
        dest.flags[copy] = flags
        dest.assign_uid(copy)
        links.append((folder.cur_file(base, flags), dest.cur_file(copy, flags)))
    store.copies = len(links)

    for folder in store.folders():
        for sub in ("cur", "new", "tmp"):
            mkdir_owned(folder.path / sub, uid, gid)
    chunks = [jobs[i:i + 2000] for i in range(0, len(jobs), 2000)]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 2, mp_context=context) as pool:
        for _ in pool.map(functools.partial(_write_chunk, uid=uid, gid=gid), chunks):
            pass
    for source, dest_path in links:
        os.link(source, dest_path)
    for user in users:
        subscribed = "".join(f"{f.name[1:]}\n" for f in user.folders if f.name)
        write_file(user.root / "subscriptions", f"V\t2\n\n{subscribed}".encode(), uid, gid)
        for folder in user.folders:
            write_meta(store, folder)
    return store


# -- change sets --------------------------------------------------------------------------------


def _pick_by(rng: random.Random, folders: Sequence[Folder], size: Callable[[Folder], int],
             k: int) -> list[Folder]:
    weights = [size(f) for f in folders]
    return rng.choices(folders, weights=weights, k=k) if sum(weights) else []


def toggle_flag(flags: str, rng: random.Random) -> str:
    missing = [c for c in "RFT" if c not in flags]
    if missing:
        flags += rng.choice(missing)
    else:
        flags = flags.replace("F", "")
    return "".join(sorted(flags, key=FLAG_ORDER.index))


def apply_renames(store: Store, rng: random.Random) -> dict[str, int]:
    """1 % flag changes, 0.5 % moves to another folder of the same user, 0.5 % new/ → cur/."""
    total = store.messages()
    folders = store.folders()
    changes: Counter[Folder] = Counter()
    new_uids: Counter[Folder] = Counter()
    done = Counter[str]()
    for folder in _pick_by(rng, folders, lambda f: len(f.cur), max(1, round(total * 0.01))):
        if not folder.cur:
            continue
        base = folder.cur.pick(rng)
        old = folder.flags[base]
        new = toggle_flag(old, rng)
        store.rename(folder.cur_file(base, old), folder.cur_file(base, new))
        folder.flags[base] = new
        changes[folder] += 1
        done["flag_renames"] += 1
    for folder in _pick_by(rng, folders, lambda f: len(f.cur), max(1, round(total * 0.005))):
        if not folder.cur:
            continue
        dest = rng.choice([f for f in folder.user.folders if f is not folder])
        base = folder.cur.pick(rng)
        flags = folder.flags.pop(base)
        folder.cur.remove(base)
        del folder.uids[base]
        store.rename(folder.cur_file(base, flags), dest.cur_file(base, flags))
        dest.cur.add(base)
        dest.flags[base] = flags
        dest.assign_uid(base)
        changes[folder] += 1
        changes[dest] += 1
        new_uids[dest] += 1
        done["moves"] += 1
    for folder in _pick_by(rng, folders, lambda f: len(f.new), max(1, round(total * 0.005))):
        if not folder.new:
            continue
        base = folder.new.pick(rng)
        folder.new.remove(base)
        store.rename(folder.new_file(base), folder.cur_file(base, ""))
        folder.cur.add(base)
        folder.flags[base] = ""
        changes[folder] += 1
        done["new_to_cur"] += 1
    for folder, count in changes.items():
        update_meta(store, folder, count, new_uids[folder])
    return dict(done)


def apply_flags(store: Store, rng: random.Random, share: float) -> dict[str, int]:
    """``share`` of the messages get a flag change (a rename in cur/): a busy day."""
    folders = store.folders()
    changes: Counter[Folder] = Counter()
    done = 0
    for folder in _pick_by(rng, folders, lambda f: len(f.cur),
                           max(1, round(store.messages() * share))):
        if not folder.cur:
            continue
        base = folder.cur.pick(rng)
        old = folder.flags[base]
        new = toggle_flag(old, rng)
        store.rename(folder.cur_file(base, old), folder.cur_file(base, new))
        folder.flags[base] = new
        changes[folder] += 1
        done += 1
    for folder, count in changes.items():
        update_meta(store, folder, count, 0)
    return {"flag_renames": done}


def apply_newmail(store: Store, rng: random.Random) -> dict[str, int]:
    """1 % new messages into new/ (INBOX, some into a list folder), as LMTP delivers them."""
    count = max(1, round(store.messages() * 0.01))
    users = store.users
    weights = [sum(f.count() for f in u.folders) or 1 for u in users]
    changes: Counter[Folder] = Counter()
    written = 0
    now = int(time.time())
    for user in rng.choices(users, weights=weights, k=count):
        lists = [f for f in user.folders if f.name == ".Lists.debian"]
        folder = lists[0] if lists and rng.random() < 0.15 else user.folders[0]
        n = store.next_n
        store.next_n += 1
        size = message_size(rng)
        base = base_name(n, user.name, now, size)
        write_message(str(folder.new_file(base)), n, user.name, now, size, store.uid,
                      store.gid)
        folder.new.add(base)
        folder.assign_uid(base)
        changes[folder] += 1
        written += size
    for folder, added in changes.items():
        update_meta(store, folder, added, added)
    store.bytes += written
    return {"delivered": count, "bytes_delivered": written}


# -- running and measuring ----------------------------------------------------------------------


# GNU time, when there, measures the peak RSS. A child forked from this process inherits its
# resident set as the starting point of ru_maxrss (Linux keeps the pre-exec high-water mark), so
# os.wait4 here would report at least the benchmark's own RSS, which grows with the store model
# and the inventories. /usr/bin/time is forked from us too, but measures its own small child.
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the child's process group, then wait until every member is gone: GNU time
    dies at once, mailsnap first tears down its snapshot and mounts."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(ChildProcessError):
            proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            deadline = math.inf
        time.sleep(0.1)


def run_child(argv: Sequence[str], log_file: Path, *, env: dict[str, str] | None = None,
              stdout: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of one process run to its exit, including its own
    children; its stderr is appended to ``log_file``. Raises if it fails. The process gets its
    own process group, stopped with SIGTERM (mailsnap then tears down) if we are interrupted."""
    rss_file = log_file.with_suffix(".rss")
    wrapped = [GNU_TIME, "-f", "%M", "-o", str(rss_file), "--", *argv] if GNU_TIME else argv
    with open(log_file, "ab") as err, open(stdout or os.devnull, "wb") as out:
        err.write(f"$ {' '.join(argv)}\n".encode())
        err.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=out, stderr=err, env=env, process_group=0)
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            stop_group(proc)
            raise
        seconds = time.perf_counter() - started
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{argv[0]} exited {code} ({' '.join(argv)}):\n{tail}")
    peak = usage.ru_maxrss
    if GNU_TIME:
        peak = int(rss_file.read_text().split()[-1])
    return seconds, peak


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


Key = tuple[int, int, int]  # inode, mtime_ns, size


def inventory(root: Path) -> list[Key]:
    """(inode, mtime, size) of every regular file under ``root``."""
    out: list[Key] = []
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return out


class Snapshots:
    """Read-only snapshots of the source subvolume in ``<top>/.bench``; all deleted on exit."""

    def __init__(self, top: Path, mail: Path) -> None:
        self.top = top
        self.mail = mail
        self.dir = top / ".bench"
        self.dir.mkdir(mode=0o711, exist_ok=True)
        self.live: set[Path] = set()
        self.count = 0

    def create(self, tag: str) -> tuple[Path, float]:
        self.count += 1
        path = self.dir / f"{tag}-{self.count}"
        started = time.perf_counter()
        sh("btrfs", "subvolume", "snapshot", "-r", str(self.mail), str(path))
        self.live.add(path)
        return path, time.perf_counter() - started

    def delete(self, path: Path) -> float:
        started = time.perf_counter()
        sh("btrfs", "subvolume", "delete", str(path))
        self.live.discard(path)
        return time.perf_counter() - started

    def settle(self) -> None:
        """Wait until btrfs has cleaned every deleted snapshot (mailsnap's too). The commit
        first: the cleaner otherwise waits for the next periodic one (up to 30 s)."""
        sh("btrfs", "filesystem", "sync", str(self.top))
        sh("btrfs", "subvolume", "sync", str(self.top))

    def close(self) -> None:
        for path in list(self.live):
            subprocess.run(["btrfs", "subvolume", "delete", str(path)], check=False,
                           capture_output=True)
        self.live.clear()


@dataclass
class Outcome:
    seconds: float
    peak_kib: int
    tree: Path  # the new backup's content (or the mirror)
    snapshot_seconds: float | None = None  # the benchmark's own snapshot: create + delete
    report: dict[str, Any] | None = None


class Method(Protocol):
    name: str

    def run(self) -> Outcome: ...

    def wipe(self) -> None: ...

    def prune(self) -> Outcome | None: ...

    def warm(self) -> None: ...


class MailsnapMethod:
    def __init__(self, name: str, job: str, config: Path, target: Path, logs: Path,
                 env: dict[str, str]) -> None:
        self.name = name
        self.job = job
        self.config = config
        self.target = target
        self.logs = logs
        self.env = env
        self.count = 0

    def run(self) -> Outcome:
        self.count += 1
        out = self.logs / f"{self.name}-{self.count}.json"
        argv = [sys.executable, "-m", "mailsnap", "backup", "--config", str(self.config),
                "--job", self.job, "--json"]
        seconds, peak = run_child(argv, self.logs / f"{self.name}.log", env=self.env, stdout=out)
        job = json.loads(out.read_text())["jobs"][0]
        report = {k: job.get(k) for k in ("files", "bytes", "linked", "seconds", "stages")}
        copy = job.get("copy")
        if isinstance(copy, dict):
            report["copy"] = copy
        return Outcome(seconds, peak, Path(job["backup"]) / "mail", report=report)

    def backups(self) -> list[Path]:
        root = self.target / self.job
        return sorted(p for p in root.iterdir() if p.name[:1].isdigit()
                      and not p.name.endswith((".partial", ".deleting")))

    def prune(self) -> Outcome | None:
        """``mailsnap prune`` of the oldest backup: the job with ``keep_last`` one short."""
        config = self._prune_config()
        out = self.logs / f"{self.name}-prune.json"
        argv = [sys.executable, "-m", "mailsnap", "prune", "--config", str(config), "--job",
                self.job, "--json"]
        seconds, peak = run_child(argv, self.logs / f"{self.name}.log", env=self.env,
                                  stdout=out)
        removed = json.loads(out.read_text())["jobs"][0]["removed"]
        if len(removed) != 1:
            raise RuntimeError(f"mailsnap prune removed {removed}, not the oldest backup")
        return Outcome(seconds, peak, self.backups()[-1] / "mail")

    def _prune_config(self) -> Path:
        kept = len(self.backups()) - 1
        config = self.logs / f"{self.name}-prune.toml"
        config.write_text(self.config.read_text().replace(
            f'name = "{self.job}"', f'name = "{self.job}"\nkeep_last = {kept}'))
        return config

    def warm(self) -> None:
        """What a night's prune finds cached: Python and mailsnap (not the backups)."""
        subprocess.run([sys.executable, "-m", "mailsnap", "prune", "--dry-run", "--config",
                        str(self._prune_config()), "--job", self.job],
                       check=True, capture_output=True, env=self.env)

    def wipe(self) -> None:
        root = self.target / self.job
        for path in root.iterdir() if root.is_dir() else ():
            if os.lstat(path).st_ino == 256 and not path.is_symlink():  # a subvolume
                sh("btrfs", "subvolume", "delete", str(path))
        shutil.rmtree(root, ignore_errors=True)
        # A store that vanished after a published backup is refused (a backup disk that did
        # not mount); the benchmark removed it on purpose, so it makes it again.
        root.mkdir(mode=0o700, parents=True, exist_ok=True)


class RenameFloor:
    """``--floor``: what a night's renames cost btrfs alone, whatever a copier does around
    them. Before mailsnap's night, the renames of the change set (``Store.journal``, each
    message's first name to its last: one rename, or none if it came back) are made in a
    fresh writable snapshot of mailsnap's newest backup, a folder at a time, the folders
    shared among as many threads as mailsnap's copier runs, then ``sync -f``. Timed: the
    renames and the sync; not the snapshot, which a quiet night makes too. So a night of
    mailsnap on a btrfs target cannot cost much less than its quiet night plus this."""

    name = "btrfs floor"

    def __init__(self, mailsnap: MailsnapMethod, source: Path, scratch: Path,
                 threads: int) -> None:
        self.mailsnap = mailsnap
        self.source = source
        self.scratch = scratch
        self.threads = threads

    def measure(self, journal: list[tuple[Path, Path]], scenario: str, rep: int) -> Sample:
        first: dict[Path, Path] = {}  # a message's name now → its name in the backup
        for old, new in journal:
            first[new] = first.pop(old, old)
        moves = sorted((old, new) for new, old in first.items() if old != new)
        night = self.scratch / f"floor-{scenario}-{rep}"
        sh("btrfs", "subvolume", "snapshot", str(self.mailsnap.backups()[-1]), str(night))
        sh("sync", "-f", str(night))
        folders: dict[Path, list[tuple[Path, Path]]] = {}
        for old, new in moves:
            folders.setdefault(old.parent, []).append(
                (night / "mail" / old.relative_to(self.source),
                 night / "mail" / new.relative_to(self.source)))
        lanes: list[list[tuple[Path, Path]]] = [[] for _ in range(self.threads)]
        for i, pairs in enumerate(folders.values()):
            lanes[i % self.threads] += pairs
        try:
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(_rename_each, lanes))  # a failed rename raises here
            renamed = time.perf_counter() - started
            sh("sync", "-f", str(night))
            seconds = time.perf_counter() - started
        finally:
            sh("btrfs", "subvolume", "delete", str(night))
            sh("btrfs", "filesystem", "sync", str(self.scratch))
            sh("btrfs", "subvolume", "sync", str(self.scratch))
        return Sample(method=self.name, scenario=scenario, rep=rep, seconds=seconds,
                      peak_rss_mib=0.0, written_bytes=0, copied=0, linked=0, files=0,
                      statvfs_delta_bytes=0,
                      report={"renames": len(moves), "folders": len(folders),
                              "rename_seconds": renamed, "sync_seconds": seconds - renamed})


def _rename_each(pairs: list[tuple[Path, Path]]) -> None:
    for old, new in pairs:
        os.rename(old, new)


class RsyncMethod:
    name = "rsync"

    def __init__(self, snapshots: Snapshots, target: Path, logs: Path) -> None:
        self.snapshots = snapshots
        self.target = target
        self.logs = logs
        self.previous: Path | None = None
        self.count = 0

    def run(self) -> Outcome:
        self.count += 1
        new = self.target / f"{self.count:04d}" / "mail"
        new.parent.mkdir(parents=True, mode=0o700)
        snap, created = self.snapshots.create("rsync")
        argv = ["rsync", "-aHAX", "--numeric-ids"]
        if self.previous is not None:
            argv.append(f"--link-dest={self.previous}")
        argv += [f"{snap}/", f"{new}/"]
        try:
            seconds, peak = run_child(argv, self.logs / "rsync.log")
        finally:
            deleted = self.snapshots.delete(snap)
        self.previous = new
        return Outcome(seconds, peak, new, snapshot_seconds=created + deleted)

    def prune(self) -> Outcome | None:
        """``rm -rf`` of the oldest tree: one unlink per file."""
        oldest = sorted(self.target.iterdir())[0]
        seconds, peak = run_child(["rm", "-rf", str(oldest)], self.logs / "rsync.log")
        assert self.previous is not None
        return Outcome(seconds, peak, self.previous)

    def warm(self) -> None:
        sh("rm", "--version")

    def wipe(self) -> None:
        shutil.rmtree(self.target, ignore_errors=True)
        self.previous = None


class DoveadmMethod:
    """dsync, one ``doveadm backup`` per user, as the vmail user, from a read-only snapshot."""

    name = "doveadm"

    def __init__(self, store: Store, snapshots: Snapshots, work: Path, target: Path,
                 logs: Path) -> None:
        self.store = store
        self.snapshots = snapshots
        self.target = target
        self.logs = logs
        self.state = work / "dsync-state"
        self.config = work / "dovecot-bench.conf"
        self.config.write_text(
            f"mail_uid = {store.uid}\nmail_gid = {store.gid}\n"
            f"first_valid_uid = {store.uid}\nfirst_valid_gid = {store.gid}\n")
        for u in store.users:
            mkdir_owned(self.state / u.name, store.uid, store.gid)
        self.state.chmod(0o711)
        self._make_target()

    def _make_target(self) -> None:
        self.target.mkdir(mode=0o711, exist_ok=True)
        for u in self.store.users:
            dest = self.target / u.rel
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
            mkdir_owned(dest, self.store.uid, self.store.gid)

    def _argv(self, snap: Path, user: User, *command: str) -> list[str]:
        state = self.state / user.name
        location = f"maildir:{snap / user.rel}:INDEX={state}:CONTROL={state}"
        return ["doveadm", "-c", str(self.config), "-o", f"mail_location={location}", *command]

    def _env(self, user: User) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "USER": user.name,
                "HOME": str(self.state / user.name)}

    def prepare(self) -> float:
        """Build the source-side index and uidlist once (a server has them already)."""
        snap, _ = self.snapshots.create("dsync-index")
        started = time.perf_counter()
        try:
            for user in self.store.users:
                run_child(self._argv(snap, user, "force-resync", "*"),
                          self.logs / "doveadm.log", env=self._env(user))
        finally:
            self.snapshots.delete(snap)
        return time.perf_counter() - started

    def run(self) -> Outcome:
        snap, created = self.snapshots.create("dsync")
        seconds = 0.0
        peak = 0
        try:
            for user in self.store.users:
                dest = f"maildir:{self.target / user.rel}"
                took, rss = run_child(self._argv(snap, user, "backup", dest),
                                      self.logs / "doveadm.log", env=self._env(user))
                seconds += took
                peak = max(peak, rss)
        finally:
            deleted = self.snapshots.delete(snap)
        return Outcome(seconds, peak, self.target, snapshot_seconds=created + deleted)

    def wipe(self) -> None:
        shutil.rmtree(self.target, ignore_errors=True)
        self._make_target()

    def prune(self) -> Outcome | None:
        return None  # a mirror: no history to prune

    def warm(self) -> None:
        pass


@dataclass
class Sample:
    method: str
    scenario: str
    rep: int
    seconds: float
    peak_rss_mib: float
    written_bytes: int
    copied: int
    linked: int
    files: int
    statvfs_delta_bytes: int
    snapshot_seconds: float | None = None
    report: dict[str, Any] | None = None
    # The os.sync() right after the run: what the method left unwritten. mailsnap syncs its
    # target before publishing (its time includes that); rsync and doveadm return with their
    # data still in the page cache.
    flush_seconds: float = 0.0


def measure(method: Method, known: set[Key], target_fs: Path, scenario: str,
            rep: int) -> Sample:
    before = used_bytes(target_fs)
    outcome = method.run()
    started = time.perf_counter()
    os.sync()
    flush = time.perf_counter() - started
    after = used_bytes(target_fs)
    files = inventory(outcome.tree)
    fresh = [k for k in files if k not in known]
    written = sum(size for _ino, _mtime, size in set(fresh))
    known.update(files)
    return Sample(
        method=method.name, scenario=scenario, rep=rep, seconds=outcome.seconds,
        peak_rss_mib=outcome.peak_kib / 1024, written_bytes=written, copied=len(fresh),
        linked=len(files) - len(fresh), files=len(files), statvfs_delta_bytes=after - before,
        snapshot_seconds=outcome.snapshot_seconds, report=outcome.report, flush_seconds=flush)


def measure_prune(method: Method, scenario: str, rep: int) -> Sample | None:
    outcome = method.prune()
    if outcome is None:
        return None
    return Sample(method=method.name, scenario=scenario, rep=rep, seconds=outcome.seconds,
                  peak_rss_mib=outcome.peak_kib / 1024, written_bytes=0, copied=0, linked=0,
                  files=0, statvfs_delta_bytes=0)


def drop_caches(what: str = "3") -> None:
    """3: the page cache, dentries and inodes; 2: dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(f"{what}\n")


def vmail_owner(want_doveadm: bool) -> tuple[int, int]:
    """The mail's owner: ``vmail`` (created if missing and doveadm runs), else root."""
    if want_doveadm:
        from tests.livemail.dovecot import ensure_vmail_user

        return ensure_vmail_user()
    try:
        entry = pwd.getpwnam("vmail")
    except KeyError:
        return 0, 0
    return entry.pw_uid, entry.pw_gid


def mailsnap_config(path: Path, mail: Path, target: Path, work: Path, *,
                    copier_key: bool) -> None:
    jobs = []
    for job in ("maildir", "rsync"):
        lines = ["[[job]]", f"name = {json.dumps(job)}", 'backend = "btrfs"']
        if copier_key:
            lines.append(f"copier = {json.dumps(job)}")
        lines += [f"source = {json.dumps(str(mail))}", f"target = {json.dumps(str(target))}",
                  f"run_dir = {json.dumps(str(work / 'run'))}",
                  f"state_dir = {json.dumps(str(work / 'state'))}"]
        jobs.append("\n".join(lines))
    path.write_text("\n\n".join(jobs) + "\n")


def compile_bytecode(env: dict[str, str]) -> None:
    """Compile mailsnap's modules once, as installing it does, so that no run pays for it.
    The benchmark runs mailsnap from the source tree (``PYTHONPATH``), and under
    ``PYTHONDONTWRITEBYTECODE`` every run compiled its ~10,000 lines again (about a quarter of
    a small backup's start-up work); the libraries are installed, and compiled, already."""
    clean = {k: v for k, v in env.items() if k not in ("PYTHONDONTWRITEBYTECODE",
                                                        "PYTHONPYCACHEPREFIX")}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(TOP / "src" / "mailsnap")],
                   env=clean, check=True)
    log("compiled mailsnap's bytecode (as an install does; not measured)")


def copier_key_problem(config: Path, env: dict[str, str]) -> str | None:
    """Why this mailsnap's config rejects the ``copier`` key, or None if it takes it."""
    proc = subprocess.run(
        [sys.executable, "-m", "mailsnap", "check", "--config", str(config), "--job", "maildir",
         "--json"], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 2 or "copier" not in proc.stdout + proc.stderr:
        return None
    try:
        errors = [str(e) for e in json.loads(proc.stdout)["errors"]]
    except (ValueError, KeyError, TypeError):
        errors = (proc.stdout + proc.stderr).strip().splitlines()
    first = next((e for e in errors if "copier" in e), errors[0] if errors else "")
    return first.replace(f"{config}: ", "")[:300]


# -- results ------------------------------------------------------------------------------------


def row_name(method: str) -> str:
    return {"rsync": RSYNC_ROW, "doveadm": "doveadm backup"}.get(method, method)


def summarize(samples: list[Sample], method_order: Sequence[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for scenario in SCENARIOS:
        groups: dict[str, list[tuple[float, Sample]]] = {}
        for method in method_order:
            for s in samples:
                if s.scenario != scenario or s.method != method:
                    continue
                groups.setdefault(row_name(method), []).append((s.seconds, s))
                if method == "rsync" and s.snapshot_seconds is not None:
                    groups.setdefault(f"{RSYNC_ROW} +snapshot", []).append(
                        (s.seconds + s.snapshot_seconds, s))
                if method == "rsync" and not scenario.startswith("prune"):
                    # Its data on disk, as mailsnap's is when it publishes.
                    groups.setdefault(f"{RSYNC_ROW} +sync", []).append(
                        (s.seconds + s.flush_seconds, s))
        base = statistics.median(t for t, _ in groups[RSYNC_ROW]) if RSYNC_ROW in groups else None
        for name, group in groups.items():
            median = statistics.median(t for t, _ in group)
            picked = [s for _, s in group]
            rows.append({
                "method": name, "scenario": scenario, "runs": len(group),
                "median_seconds": median,
                "ratio_to_rsync": median / base if base else None,
                "written_mb": statistics.median(s.written_bytes for s in picked) / 1e6,
                "copied": statistics.median(s.copied for s in picked),
                "linked": statistics.median(s.linked for s in picked),
                "peak_rss_mib": max(s.peak_rss_mib for s in picked),
                "folders_listed": _median_copy(picked, "folders_listed"),
                "folders_unchanged": _median_copy(picked, "folders_unchanged"),
            })
    return rows


def _median_copy(picked: list[Sample], key: str) -> float | None:
    """A median of a key of mailsnap's own ``copy`` report (None for other methods)."""
    found = [s.report["copy"][key] for s in picked
             if s.report and isinstance(s.report.get("copy"), dict) and key in s.report["copy"]]
    return statistics.median(found) if found else None


def floor_table(samples: list[Sample], floors: list[Sample]) -> str:
    """mailsnap's nights of renames against its quiet night plus the btrfs floor of the
    same renames (medians)."""
    def median(method: str, scenario: str) -> float | None:
        found = [s.seconds for s in samples if s.method == method and s.scenario == scenario]
        return statistics.median(found) if found else None

    quiet = median("mailsnap-maildir", "nochange")
    out = ["| scenario | renames | floor s (renames + sync) | quiet + floor, × quiet "
           "| mailsnap s | mailsnap × quiet |", "|---|---:|---:|---:|---:|---:|"]
    for scenario in SCENARIOS:
        mine = [s for s in floors if s.scenario == scenario]
        if not mine:
            continue
        low = statistics.median(s.seconds for s in mine)
        count = statistics.median(s.report["renames"] for s in mine if s.report)
        night = median("mailsnap-maildir", scenario)
        out.append(
            f"| {scenario} | {count:.0f} | {low:.2f} | "
            + (f"{(quiet + low) / quiet:.2f}" if quiet else "–") + " | "
            + (f"{night:.2f}" if night is not None else "–") + " | "
            + (f"{night / quiet:.2f}" if night is not None and quiet else "–") + " |")
    return ("quiet night (mailsnap-maildir, nochange): "
            + (f"{quiet:.2f} s" if quiet else "not run") + "\n\n" + "\n".join(out))


def markdown(rows: list[dict[str, Any]], marks: dict[str, str]) -> str:
    out = ["| method | scenario | median s | × rsync | written MB | copied | linked "
           "| folders listed | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "–" if r["ratio_to_rsync"] is None else f"{r['ratio_to_rsync']:.2f}"
        listed = "–"
        if r.get("folders_listed") is not None:
            total = r["folders_listed"] + (r.get("folders_unchanged") or 0)
            listed = f"{r['folders_listed']:.0f} of {total:.0f}"
        out.append(
            f"| {r['method']}{marks.get(r['method'], '')} | {r['scenario']} "
            f"| {r['median_seconds']:.2f} | {ratio} | {r['written_mb']:.1f} "
            f"| {r['copied']:.0f} | {r['linked']:.0f} | {listed} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000,
                        help="messages in the store (200000 is the main size)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="repetitions of each incremental scenario")
    parser.add_argument("--full-repeat", type=int, default=1,
                        help="repetitions of the first backup (targets wiped in between)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1000 messages, one repetition")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before runs")
    parser.add_argument("--target-fs", choices=("ext4", "btrfs", "source"), default="ext4",
                        help="ext4: targets under --work; btrfs: on a second loop volume; "
                        "source: on the source's own btrfs, beside the mail subvolume (new "
                        "messages are reflinked, not written: half the disk of 'btrfs')")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"),
                        help="where the benchmark's directory goes (holds the images)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (loop devices are detached anyway)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, run in this order: {', '.join(SCENARIOS)}")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write raw numbers here")
    parser.add_argument("--floor", action="store_true",
                        help="btrfs target: before each mailsnap night of renames, time the "
                        "same renames in a fresh snapshot of its newest backup, and sync")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.repeat, args.full_repeat = 1000, 1, 1
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {','.join(METHODS)}")
    args.scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    if set(args.scenarios) - set(SCENARIOS) or args.scenarios[:1] != ["full"]:
        parser.error(f"--scenarios: 'full' first, then any of {', '.join(SCENARIOS[1:])}")
    if args.floor and (args.target_fs != "btrfs" or "mailsnap-maildir" not in args.methods):
        parser.error("--floor needs --target-fs btrfs and the mailsnap-maildir method")
    if args.messages < 100 or args.repeat < 1 or args.full_repeat < 1:
        parser.error("--messages must be at least 100, --repeat and --full-repeat at least 1")
    return args


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = parse_args()
    reason = privileged_skip_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    if shutil.which("rsync") is None:
        raise SystemExit("cannot run: rsync is not installed")
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (`… &`)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    notes: list[str] = []
    if not GNU_TIME:
        notes.append("no /usr/bin/time (Debian: time): peak RSS is os.wait4's, which counts "
                     "the benchmark's own resident set (inherited at fork) as a floor")
    methods_wanted: list[str] = args.methods
    if "doveadm" in methods_wanted and shutil.which("doveadm") is None:
        notes.append("doveadm backup skipped: doveadm is not installed "
                     "(apt-get install dovecot-core)")
        methods_wanted = [m for m in methods_wanted if m != "doveadm"]
    rng = random.Random(args.seed)
    uid, gid = vmail_owner("doveadm" in methods_wanted)
    estimate = args.messages * 9000  # bytes: median ~6 KB, mean ~8 KB, plus Dovecot's files
    samples: list[Sample] = []
    floors: list[Sample] = []
    changes: list[dict[str, Any]] = []

    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="mailsnap-bench-inc-", dir=args.work))
        work.chmod(0o711)  # the vmail user (doveadm) walks through it
        if not args.keep:
            stack.callback(shutil.rmtree, work, True)
        (work / "src").mkdir()
        copies = sum(m in methods_wanted for m in METHODS)
        on_source = copies + 1 if args.target_fs == "source" else 1
        src = stack.enter_context(btrfs_volume(work / "src", size=str(
            max(2 << 30, int(estimate * 2.5 * on_source) + (1 << 30)))))

        def unmount_leftovers() -> None:  # e.g. a mailsnap run killed mid-way
            for target in sorted(mounts_under(work), key=len, reverse=True):
                if target not in (str(src.top), str(src.mail)):
                    subprocess.run(["umount", target], check=False)

        stack.callback(unmount_leftovers)
        snapshots = Snapshots(src.top, src.mail)
        stack.callback(snapshots.close)
        if args.target_fs == "btrfs":
            (work / "tgt").mkdir()
            # Every night of every method adds metadata (DUP on btrfs: twice): a hard-link
            # tree a directory entry and an inode update per message, a subvolume the b-tree
            # leaves its changes copy. 1 KiB per message and night keeps a 200,000-message run
            # with --repeat 2 off ENOSPC (it ran out of metadata space at 8.5 GB).
            nights = args.full_repeat + args.repeat * len(args.scenarios)
            headroom = args.messages * 1024 * nights * copies
            tgt = stack.enter_context(btrfs_volume(
                work / "tgt",
                size=str(int(estimate * (copies + 1) * 1.3) + headroom + (2 << 30))))
            targets = tgt.mail
        elif args.target_fs == "source":
            targets = src.top / "targets"
            targets.mkdir(mode=0o711)
        else:
            targets = work / "targets"
            targets.mkdir(mode=0o711)
        logs = work / "logs"
        logs.mkdir()
        free = shutil.disk_usage(targets).free
        if free < estimate * copies * 1.2:
            log(f"warning: {free / 1e9:.1f} GB free under {targets}, the backups may need "
                f"{estimate * copies * 1.2 / 1e9:.1f} GB")

        log(f"seeding {args.messages} messages into {src.mail} …")
        started = time.perf_counter()
        store = seed(src.mail, args.messages, rng, uid, gid)
        os.sync()
        seed_seconds = time.perf_counter() - started
        folders = store.folders()
        biggest = max(len(f.cur) for f in folders)
        log(f"seeded in {seed_seconds:.1f} s: {store.messages()} messages, "
            f"{store.bytes / 1e6:.1f} MB, {len(store.users)} users, {len(folders)} folders, "
            f"{store.copies} COPY hard links, {sum(len(f.new) for f in folders)} in new/, "
            f"largest cur/ {biggest}")

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TOP / "src"), os.environ.get("PYTHONPATH", "")) if p)
        methods: list[Method] = []
        marks: dict[str, str] = {}
        mailsnap_wanted = [m for m in methods_wanted if m.startswith("mailsnap-")]
        if mailsnap_wanted:
            compile_bytecode(env)
            config = work / "mailsnap.toml"
            mailsnap_config(config, src.mail, targets / "mailsnap", work, copier_key=True)
            problem = copier_key_problem(config, env)
            if problem:
                # The copier key is being added for #9. Until it lands, both jobs run the btrfs
                # backend's default copier (rsync), so the two rows measure the same thing.
                mailsnap_config(config, src.mail, targets / "mailsnap", work, copier_key=False)
                notes.append("* this mailsnap rejects the `copier` job key, so both mailsnap "
                             "jobs ran without it, i.e. with the btrfs backend's default "
                             f"copier (rsync): {problem}")
                marks = {m: " *" for m in mailsnap_wanted}
            for name in mailsnap_wanted:
                methods.append(MailsnapMethod(name, name.removeprefix("mailsnap-"), config,
                                              targets / "mailsnap", logs, env))
        if "rsync" in methods_wanted:
            methods.append(RsyncMethod(snapshots, targets / "rsync", logs))
        if "doveadm" in methods_wanted:
            dsync = DoveadmMethod(store, snapshots, work, targets / "doveadm", logs)
            try:
                took = dsync.prepare()
                log(f"doveadm: source indexes built in {took:.1f} s (not measured)")
                methods.append(dsync)
            except RuntimeError as exc:
                notes.append(f"doveadm backup skipped: building its index failed: {exc}"[:500])
        known: dict[str, set[Key]] = {m.name: set() for m in methods}
        floor = None
        if args.floor:
            from mailsnap.copiers.frozen import default_threads

            scratch = targets / "floor"
            scratch.mkdir(mode=0o700)
            maildir = next(m for m in methods if m.name == "mailsnap-maildir")
            assert isinstance(maildir, MailsnapMethod)
            floor = RenameFloor(maildir, src.mail, scratch, default_threads())

        for si, scenario in enumerate(s for s in SCENARIOS if s in args.scenarios):
            reps = args.full_repeat if scenario == "full" else args.repeat
            for rep in range(reps):
                change: dict[str, Any] = {"scenario": scenario, "rep": rep + 1}
                store.journal.clear()
                started = time.perf_counter()
                if scenario == "full" and rep > 0:
                    for method in methods:
                        method.wipe()
                        known[method.name].clear()
                elif scenario == "flags1":
                    change |= apply_flags(store, rng, 0.01)
                elif scenario == "renames":
                    change |= apply_renames(store, rng)
                elif scenario == "newmail":
                    change |= apply_newmail(store, rng)
                elif scenario == "flags10":
                    change |= apply_flags(store, rng, 0.10)
                change["messages"] = store.messages()
                change["apply_seconds"] = round(time.perf_counter() - started, 3)
                changes.append(change)
                log(f"{scenario} {rep + 1}/{reps}: "
                    + ", ".join(f"{k} {v}" for k, v in change.items()
                                if k not in ("scenario", "rep")))
                if floor is not None and store.journal and floor.mailsnap in methods:
                    os.sync()
                    floors.append(floor.measure(store.journal, scenario, rep + 1))
                    log(f"  {floor.name}: {floors[-1].seconds:.2f} s, {floors[-1].report}")
                shift = (si + rep) % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    os.sync()
                    snapshots.settle()
                    if args.cold:
                        drop_caches()
                    try:
                        if scenario == "prune-cold":
                            drop_caches("2")
                            method.warm()
                        if scenario.startswith("prune"):
                            pruned = measure_prune(method, scenario, rep + 1)
                            if pruned is None:
                                continue
                            sample = pruned
                        else:
                            sample = measure(method, known[method.name], targets, scenario,
                                             rep + 1)
                    except RuntimeError as exc:  # its history is broken now: drop it
                        log(f"  {method.name} FAILED, dropped from the rest of the run: {exc}")
                        notes.append(f"{method.name} failed in {scenario} {rep + 1} and was "
                                     f"dropped: {str(exc)[:400]}")
                        methods.remove(method)
                        continue
                    finally:
                        snapshots.settle()
                    samples.append(sample)
                    log(f"  {method.name}: {sample.seconds:.2f} s, copied {sample.copied}, "
                        f"linked {sample.linked}, written {sample.written_bytes / 1e6:.1f} MB, "
                        f"peak {sample.peak_rss_mib:.0f} MiB"
                        + (f", its report: copy {sample.report['copy']}"
                           if sample.report and "copy" in sample.report else ""))

    rows = summarize(samples, [m for m in METHODS if m in methods_wanted])
    print(f"\n{args.messages} messages, {store.bytes / 1e6:.0f} MB, {len(store.users)} users, "
          f"{len(folders)} folders (largest cur/ {biggest}); btrfs source, {args.target_fs} "
          f"target; {'cold' if args.cold else 'warm'} cache; median of {args.repeat} "
          f"(full: {args.full_repeat}); seeding took {seed_seconds:.0f} s\n")
    print(markdown(rows, marks))
    if floors:
        print(f"\n{floor_table(samples, floors)}")
    for note in notes:
        print(f"\n{note}")
    if args.json:
        args.json.write_text(json.dumps({
            "messages": args.messages, "bytes": store.bytes, "users": len(store.users),
            "folders": len(folders), "largest_cur": biggest, "copies": store.copies,
            "seed_seconds": seed_seconds, "repeat": args.repeat,
            "full_repeat": args.full_repeat, "cold": args.cold, "target_fs": args.target_fs,
            "notes": notes, "changes": changes, "summary": rows,
            "samples": [asdict(s) for s in samples],
            "floor": [asdict(s) for s in floors],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        sys.exit(130)
