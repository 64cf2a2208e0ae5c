#!/usr/bin/env python3
"""Copy a live Dovecot store under load, several ways, and count what each copy lost.

    sudo .venv/bin/python scripts/bench_livemail.py [--runs 5] [--messages-per-user 2500]
        [--methods rsync,live,live+uidlist-lock,btrfs]

Uses the test harness (tests/livemail): a real Dovecot on 127.0.0.1 with 4 users, LMTP
deliveries and IMAP flag changes, MOVE, COPY and EXPUNGE while each copy runs. Methods run
round-robin. ``live+uidlist-lock`` is the live copier that also holds Dovecot's
``dovecot-uidlist.lock`` (dotlock protocol) while it copies each folder: it answers issue #3's
question whether taking Dovecot's lock makes the live copy any better.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
import contextlib
import os
from pathlib import Path
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from mailsnap.config import DEFAULT_EXCLUDES  # noqa: E402, I001
from mailsnap.copiers import maildir as maildir_module  # noqa: E402
from mailsnap.copiers.maildir import MaildirCopier  # noqa: E402
from mailsnap.runner import Runner  # noqa: E402
from tests.helpers.loopfs import btrfs_volume  # noqa: E402
from tests.livemail.harness import (  # noqa: E402
    LiveMail,
    LoadProfile,
    RunReport,
    SeedSpec,
    bind_mount,
    dovecot_skip_reason,
    mailsnap_backup,
    private_dir,
    rsync_copy,
)

LOCK = "dovecot-uidlist.lock"
LOCK_WAIT = 0.005
LOCK_GIVE_UP = 30.0


class UidlistLocking:
    """Patch the live copier so it holds each folder's dovecot-uidlist.lock while it lists and
    copies that folder's messages (Dovecot's dotlock: create the file exclusively, remove it).
    Counts how long it waited for Dovecot."""

    def __init__(self) -> None:
        self.waited = 0.0
        self.taken = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        original = maildir_module._Run._messages

        def locked(run: Any, folder_rel: str) -> None:
            folder = run.source / folder_rel if folder_rel else run.source
            lock = folder / LOCK
            began = time.monotonic()
            while True:
                try:
                    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    break
                except FileExistsError:
                    if time.monotonic() - began > LOCK_GIVE_UP:
                        raise RuntimeError(f"{lock} held for {LOCK_GIVE_UP}s") from None
                    time.sleep(LOCK_WAIT)
                except FileNotFoundError:
                    return original(run, folder_rel)  # folder deleted meanwhile
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            self.waited += time.monotonic() - began
            self.taken += 1
            try:
                return original(run, folder_rel)
            finally:
                os.unlink(lock)

        maildir_module._Run._messages = locked  # type: ignore[method-assign]
        try:
            yield
        finally:
            maildir_module._Run._messages = original  # type: ignore[method-assign]


def live_copy(
    source: Path, dest: Path, locking: UidlistLocking | None
) -> tuple[Path, dict[str, Any]]:
    dest.mkdir(parents=True)
    context = locking.active() if locking else contextlib.nullcontext()
    with context:
        stats = MaildirCopier(Runner()).copy(source, dest, previous=None,
                                             excludes=DEFAULT_EXCLUDES)
    detail: dict[str, Any] = {"passes": stats.passes, "moved": stats.moved}
    if locking:
        detail |= {"lock_wait_s": round(locking.waited, 3), "locks_taken": locking.taken}
    return dest, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--messages-per-user", type=int, default=2500)
    parser.add_argument("--lmtp-workers", type=int, default=1)
    parser.add_argument("--methods", default="rsync,live,live+uidlist-lock,btrfs")
    args = parser.parse_args()
    reason = dovecot_skip_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    methods = args.methods.split(",")

    work = Path(tempfile.mkdtemp(prefix="mailsnap-livemail-"))
    reports: dict[str, list[RunReport]] = {m: [] for m in methods}
    try:
        with contextlib.ExitStack() as stack:
            mail = stack.enter_context(btrfs_volume(work, size="4G")).mail
            private = stack.enter_context(private_dir())
            mail_root = stack.enter_context(bind_mount(mail, private / "mail"))
            live = stack.enter_context(LiveMail(
                private / "dovecot", mail_root, users=args.users,
                profile=LoadProfile(lmtp_workers=args.lmtp_workers)))
            seconds = live.seed(SeedSpec(messages_per_user=args.messages_per_user))
            print(f"seeded {live.seeded} messages in {seconds:.1f}s", file=sys.stderr)
            copies: dict[str, Callable[[int], tuple[Path, dict[str, Any]]]] = {
                "rsync": lambda i: rsync_copy(mail, work / f"rsync-{i}"),
                "live": lambda i: live_copy(mail, work / f"live-{i}", None),
                "live+uidlist-lock": lambda i: live_copy(mail, work / f"lock-{i}",
                                                         UidlistLocking()),
                "btrfs": lambda i: mailsnap_backup(mail, work / "backups", "btrfs",
                                                   work / "run"),
            }
            for i in range(args.runs):
                for method in methods:
                    report = live.copy_under_load(
                        method, lambda m=method, n=i: copies[m](n))  # type: ignore[misc]
                    reports[method].append(report)
                    print(f"  {report.line()}  {report.detail if method != 'btrfs' else ''}",
                          file=sys.stderr)
                    if method != "btrfs":
                        shutil.rmtree(report.root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.users} users, {args.users * args.messages_per_user} messages seeded, "
          f"{args.runs} runs per method (round-robin)")
    print(f"{'method':20} {'changes/s':>9} {'missing':>16} {'dup/folder':>10} "
          f"{'cross-folder':>14} {'tmp':>4} {'locks':>5} {'wall (median)':>13}")
    for method, runs in reports.items():
        r = [x.result for x in runs]
        print(f"{method:20} {statistics.mean(x.changes_per_second for x in runs):9.0f} "
              f"{'/'.join(str(len(x.missing)) for x in r):>16} "
              f"{sum(len(x.duplicated) for x in r):10d} "
              f"{'/'.join(str(len(x.cross_folder_duplicates)) for x in r):>14} "
              f"{sum(len(x.tmp_files) for x in r):4d} {sum(len(x.lock_files) for x in r):5d} "
              f"{statistics.median(x.wall for x in runs):12.2f}s")


if __name__ == "__main__":
    main()
