"""A bounded load generator: LMTP deliveries and IMAP changes against a DovecotInstance.

Threads, bounded in number and in time, that stop by themselves (``duration``, ``max_changes``) or
on ``stop()``:

* LMTP deliverers send new messages to random users' INBOXes (``smtplib.LMTP`` over TCP);
* one IMAP worker per user (each user's mailboxes belong to exactly one connection, so no worker
  ever touches a UID another one moved away) SELECTs folders and runs ``UID STORE`` flag changes
  (``\\Seen``, ``\\Flagged``, ``\\Answered``: each a file rename), ``UID MOVE``, ``UID COPY``
  and ``UID EXPUNGE``.

Every change goes to the shared :class:`EventLog` with a monotonic timestamp. Which UID holds
which message instance is kept in a :class:`MailboxModel` per user that outlives one generator, so
several generators can run one after another against the same store (e.g. one per backup run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
import imaplib
import random
import re
import threading
import time
from typing import Any

from tests.livemail.dovecot import DovecotInstance
from tests.livemail.events import EventLog
from tests.livemail.seed import FOLDERS, build_message, imap_mailbox, message_id

_FETCH_UID = re.compile(rb"UID (\d+)")
_HDR_ID = re.compile(rb"X-Mailsnap-Id:\s*(\S+)", re.IGNORECASE)
FLAGS = ("\\Seen", "\\Flagged", "\\Answered")


def uid_set(text: str) -> list[int]:
    """Expand an IMAP UID set (``3:5,9``) in the order given (ranges may run downwards)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        a, b = int(lo), int(hi or lo)
        out.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
    return out


@dataclass
class MailboxModel:
    """What one user's IMAP worker knows: per folder, UID -> event-log instance id."""

    folders: dict[str, dict[int, int]] = field(
        default_factory=lambda: {f: {} for f in FOLDERS}
    )
    # Per folder: the lowest UID whose message is not in ``folders`` yet (to discover deliveries).
    discover_from: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FOLDERS, 1))


@dataclass(frozen=True)
class LoadProfile:
    """How hard to push. Weights are per IMAP operation; the rest picks a new folder."""

    lmtp_workers: int = 1  # IMAP workers: always one per user, the owner of its UIDs
    flag: float = 0.50
    move: float = 0.30
    copy: float = 0.04
    expunge: float = 0.06
    reselect_every: int = 30  # ops before SELECTing another folder
    batch: int = 3  # flag changes, MOVEs and EXPUNGEs take 1..batch UIDs per command
    delivery_size: tuple[int, int] = (1500, 8000)
    rate_per_worker: float | None = None  # changes/s per thread; None = as fast as it goes


MAX_THREADS = 16


class LoadGenerator:
    """Run load until ``duration`` seconds passed, ``max_changes`` were made, or ``stop()``.

    Use as a context manager; ``wait_until_busy()`` returns once every worker has made changes.
    ``errors`` holds what a worker died of (a test should assert it is empty). Only one generator
    may run at a time on one set of ``models``.
    """

    def __init__(
        self,
        dovecot: DovecotInstance,
        users: Sequence[str],
        log: EventLog,
        models: dict[str, MailboxModel],
        *,
        profile: LoadProfile | None = None,
        duration: float = 60.0,
        max_changes: int = 1_000_000,
        seed: int = 0,
    ) -> None:
        self.dovecot = dovecot
        self.users = list(users)
        self.log = log
        self.models = models
        self.profile = profile or LoadProfile()
        self.duration = duration
        self.max_changes = max_changes
        self.seed = seed
        self.errors: list[str] = []
        self.started = 0.0
        self.stopped = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changes = 0
        self._busy: set[str] = set()
        self._threads: list[threading.Thread] = []

    # -- control -----------------------------------------------------------------------------

    def __enter__(self) -> LoadGenerator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        threads = len(self.users) + self.profile.lmtp_workers
        if threads > MAX_THREADS:
            raise ValueError(f"{threads} load threads asked for; at most {MAX_THREADS}")
        self.started = time.monotonic()
        self._deadline = self.started + self.duration
        for user in self.users:
            self.models.setdefault(user, MailboxModel())
            name = f"imap-{user}"
            self._threads.append(threading.Thread(target=self._guard, args=(name, self._imap,
                                                                             user), name=name))
        for n in range(self.profile.lmtp_workers):
            name = f"lmtp-{n}"
            self._threads.append(threading.Thread(target=self._guard, args=(name, self._lmtp, n),
                                                  name=name))
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every worker and wait for it; idempotent."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                self.errors.append(f"{thread.name} did not stop within {timeout}s")
        if not self.stopped:
            self.stopped = time.monotonic()

    def wait_until_busy(self, timeout: float = 60.0, settle: float = 0.0) -> None:
        """Block until every worker has made a change (then ``settle`` more seconds)."""
        deadline = time.monotonic() + timeout
        while len(self._busy) < len(self._threads):
            if self.errors:
                raise RuntimeError(f"load generator failed: {self.errors}")
            if time.monotonic() > deadline or self._stop.is_set():
                raise RuntimeError(f"load generator not busy after {timeout}s: {self._busy}")
            time.sleep(0.02)
        time.sleep(settle)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _done(self) -> bool:
        return (
            self._stop.is_set()
            or time.monotonic() >= self._deadline
            or self._changes >= self.max_changes
        )

    def _count(self, worker: str, n: int = 1) -> None:
        with self._lock:
            self._changes += n
            self._busy.add(worker)

    def _pace(self, began: float, done: int) -> None:
        rate = self.profile.rate_per_worker
        if rate:
            ahead = began + done / rate - time.monotonic()
            if ahead > 0:
                self._stop.wait(ahead)

    def _guard(self, name: str, target: Callable[[str, Any], None], arg: Any) -> None:
        try:
            target(name, arg)
        except Exception as exc:  # a dead worker must fail the test, not hang it
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            self._stop.set()

    # -- LMTP --------------------------------------------------------------------------------

    def _lmtp(self, name: str, n: int) -> None:
        rng = random.Random(f"{self.seed}-lmtp-{n}-{self.log.tag}")
        lo, hi = self.profile.delivery_size
        conn = self.dovecot.lmtp()
        began, done = time.monotonic(), 0
        try:
            while not self._done():
                user = rng.choice(self.users)
                token = self.log.new_token("d")
                data = build_message(token, user, rng, rng.randint(lo, hi))
                refused = conn.sendmail("load@example.test", [user], data)
                if refused:
                    raise RuntimeError(f"LMTP refused {user}: {refused}")
                self.log.created(message_id(token), "deliver", user=user, folder="")
                self._count(name)
                done += 1
                if done % 200 == 0:  # a fresh session now and then, like a real MTA
                    conn.quit()
                    conn = self.dovecot.lmtp()
                self._pace(began, done)
        finally:
            try:
                conn.quit()
            except Exception:  # noqa: S110 - already closed by the server is fine
                pass

    # -- IMAP --------------------------------------------------------------------------------

    def _imap(self, name: str, user: str) -> None:
        rng = random.Random(f"{self.seed}-imap-{user}-{self.log.tag}")
        model = self.models[user]
        folders = list(model.folders)
        p = self.profile
        kinds = ("flag", "move", "copy", "expunge")
        weights = (p.flag, p.move, p.copy, p.expunge)
        conn = self.dovecot.imap(user)
        began, done = time.monotonic(), 0
        try:
            while not self._done():
                # INBOX more often: that is where deliveries land and new/ -> cur/ happens.
                folder = "" if rng.random() < 0.35 else rng.choice(folders)
                self._command(conn, "SELECT", imap_mailbox(folder))
                self._discover(conn, user, model, folder)
                uids = model.folders[folder]
                for _ in range(p.reselect_every):
                    if self._done() or not uids:
                        break
                    kind = rng.choices(kinds, weights)[0]
                    size = 1 if kind == "copy" else rng.randint(1, max(1, p.batch))
                    picked = sorted(rng.sample(list(uids), min(size, len(uids))))
                    made = getattr(self, f"_{kind}")(conn, rng, user, model, folder, picked)
                    self._count(name, made)
                    done += made
                    self._pace(began, done)
        finally:
            try:
                conn.logout()
            except Exception:  # noqa: S110 - the server may already have closed it
                pass

    @staticmethod
    def _command(conn: imaplib.IMAP4, *args: str) -> list[object]:
        """Run one command; fail on anything but OK; always drop buffered untagged data."""
        try:
            if args[0] == "UID":
                typ, data = conn.uid(*args[1:])
            else:
                typ, data = getattr(conn, args[0].lower())(*args[1:])
            if typ != "OK":
                raise RuntimeError(f"IMAP {' '.join(args)} -> {typ} {data!r}")
            return list(data)
        finally:
            conn.untagged_responses.clear()

    def _copyuid(self, conn: imaplib.IMAP4, *args: str) -> dict[int, int]:
        """Run UID COPY/MOVE and return {source UID: new UID} from the COPYUID code."""
        try:
            typ, data = conn.uid(*args)
            if typ != "OK":
                raise RuntimeError(f"IMAP UID {' '.join(args)} -> {typ} {data!r}")
            codes = conn.untagged_responses.get("COPYUID") or []
            if not codes:
                raise RuntimeError(f"IMAP UID {' '.join(args)}: no COPYUID ({data!r})")
            mapping: dict[int, int] = {}
            for code in codes:  # a MOVE may report several (one per chunk)
                _, source, dest = code.decode().split()
                mapping.update(zip(uid_set(source), uid_set(dest), strict=True))
            return mapping
        finally:
            conn.untagged_responses.clear()

    def _discover(
        self, conn: imaplib.IMAP4, user: str, model: MailboxModel, folder: str
    ) -> None:
        """Learn the UIDs of seeded or delivered messages this worker has not placed itself."""
        known = model.folders[folder]
        low = model.discover_from[folder]
        data = self._command(
            conn, "UID", "FETCH", f"{low}:*", "(UID BODY.PEEK[HEADER.FIELDS (X-MAILSNAP-ID)])"
        )
        unresolved: list[int] = []
        highest = low - 1
        for item in data:
            if not isinstance(item, tuple):
                continue
            uid_match = _FETCH_UID.search(item[0])
            id_match = _HDR_ID.search(item[1])
            if not uid_match or not id_match:
                continue
            uid = int(uid_match.group(1))
            if uid < low or uid in known:
                continue
            highest = max(highest, uid)
            inst = self.log.first_instance(message_id(id_match.group(1).decode()))
            if inst is None:  # the deliverer has not logged it yet: next time
                unresolved.append(uid)
            else:
                known[uid] = inst
        model.discover_from[folder] = min(unresolved) if unresolved else max(low, highest + 1)

    def _flag(self, conn: imaplib.IMAP4, rng: random.Random, user: str, model: MailboxModel,
              folder: str, uids: list[int]) -> int:
        flag = rng.choice(FLAGS)
        sign = "+" if rng.random() < 0.6 else "-"
        self._command(conn, "UID", "STORE", ",".join(map(str, uids)), f"{sign}FLAGS.SILENT",
                      f"({flag})")
        at = time.monotonic()
        for uid in uids:
            self.log.changed("flag", model.folders[folder][uid], at, user=user, folder=folder)
        return len(uids)

    def _move(self, conn: imaplib.IMAP4, rng: random.Random, user: str, model: MailboxModel,
              folder: str, uids: list[int]) -> int:
        dest = rng.choice([f for f in model.folders if f != folder])
        mapping = self._copyuid(conn, "MOVE", ",".join(map(str, uids)), imap_mailbox(dest))
        at = time.monotonic()
        if sorted(mapping) != uids:
            raise RuntimeError(f"MOVE {uids} to {dest!r} reported COPYUID for {sorted(mapping)}")
        for uid, new_uid in mapping.items():
            inst = model.folders[folder].pop(uid)
            model.folders[dest][new_uid] = inst
            self.log.changed("move", inst, at, user=user, folder=folder, to=dest)
        return len(uids)

    def _copy(self, conn: imaplib.IMAP4, rng: random.Random, user: str, model: MailboxModel,
              folder: str, uids: list[int]) -> int:
        dest = rng.choice([f for f in model.folders if f != folder])
        mapping = self._copyuid(conn, "COPY", ",".join(map(str, uids)), imap_mailbox(dest))
        at = time.monotonic()
        for uid, new_uid in mapping.items():
            mid = self.log.message_id_of(model.folders[folder][uid])
            model.folders[dest][new_uid] = self.log.created(mid, "copy", at, user=user,
                                                            folder=dest)
        return len(mapping)

    def _expunge(self, conn: imaplib.IMAP4, rng: random.Random, user: str,
                 model: MailboxModel, folder: str, uids: list[int]) -> int:
        uid_list = ",".join(map(str, uids))
        self._command(conn, "UID", "STORE", uid_list, "+FLAGS.SILENT", "(\\Deleted)")
        at = time.monotonic()
        for uid in uids:
            self.log.destroyed(model.folders[folder].pop(uid), at, user=user, folder=folder)
        self._command(conn, "UID", "EXPUNGE", uid_list)
        return len(uids)

    # -- reporting ---------------------------------------------------------------------------

    @property
    def changes(self) -> int:
        return self._changes
