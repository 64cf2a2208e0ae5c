"""Who is using a mount, and stopping our own orphans.

A run killed with ``kill -9`` leaves its snapshot mounted. Its children die with it (the runner
asks the kernel for that), but the kernel's parent-death signal reaches only them, not what they
started: a grandchild, say the background job of a ``snapshot --exec`` script, can survive. Such
a process keeps the mount busy, and the next run's sweep must not fight it with a retried
``umount`` or, worse, a lazy one under a live reader. So before
unmounting a leftover mount the sweep asks ``/proc`` who still uses it: processes carrying this
job's marker (``MAILSNAP_OWNER``, set by the runner) are ours and are stopped; anyone else is
reported by pid and the mount is left alone.

Everything here reads ``/proc`` directly (Linux only) rather than running ``fuser``/``lsof``:
their output differs between versions and distributions, and they are not always installed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
from dataclasses import dataclass
import logging
import os
from pathlib import Path
import signal
import time

from mailsnap.backends.base import owned_by
from mailsnap.errors import MountInUse
from mailsnap.runner import OWNER_ENV

log = logging.getLogger(__name__)

PROC = Path("/proc")
# readlink of an fd, cwd or mapping whose file was removed ends like this.
DELETED = " (deleted)"
# After SIGKILL a process needs a moment to release its files (longer if it is in I/O).
KILL_WAIT = 2.0
# Errors that mean "this process (or this fd) went away, or is not ours to inspect".
_GONE = (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError)


@dataclass(frozen=True)
class Holder:
    """A process that keeps a mount busy. ``owner`` is its ``MAILSNAP_OWNER`` marker, if any."""

    pid: int
    command: str
    owner: str | None

    def describe(self) -> str:
        """``pid 1234 (rsync, mailsnap-mail-20261128T020000Z)`` or ``pid 99 (bash)``."""
        detail = self.command if self.owner is None else f"{self.command}, {self.owner}"
        return f"pid {self.pid} ({detail})"


def holders(path: Path) -> list[Holder]:
    """Every process but this one whose working directory, root directory, an open file or a
    mapped file is at or below ``path``, ordered by pid. Read-only, so dry run runs it too.

    Processes that exit during the scan are skipped; so are those whose ``/proc`` entries we
    may not read (only when not root, and then ``umount`` would fail anyway).
    """
    top = os.path.realpath(path).encode()
    below = top if top.endswith(b"/") else top + b"/"
    me = os.getpid()
    found = []
    for pid in sorted(_pids()):
        if pid != me and _uses(pid, top, below):
            with contextlib.suppress(*_GONE):
                found.append(Holder(pid, _command(pid), owner_of(pid)))
    return found


def stop_owned(
    found: Sequence[Holder], job: str, *, grace: float = 5.0, dry_run: bool = False
) -> list[Holder]:
    """Stop the holders whose marker says they belong to ``job`` (a run of it that was killed):
    SIGTERM, up to ``grace`` seconds, then SIGKILL. Returns the ones signalled. A holder without
    the marker, or with another job's, is never signalled; nor is one whose pid, by the time
    we signal, no longer carries the same marker (the process ended and the pid was reused).

    Dry run: logs which processes it would stop and signals none (returns them all the same).
    """
    ours = [h for h in found if h.owner is not None and owned_by(h.owner, job)]
    for holder in ours:
        log.warning("%sstopping %s, left by an earlier run of %s",
                    "[dry-run] " if dry_run else "", holder.describe(), job)
    if dry_run:
        return ours
    signalled = [h for h in ours if _signal_if_ours(h, signal.SIGTERM)]
    if not _wait_gone(signalled, grace):
        for holder in signalled:
            _signal_if_ours(holder, signal.SIGKILL)
        _wait_gone(signalled, KILL_WAIT)
    return signalled


def release_mount(path: Path, job: str, *, dry_run: bool = False) -> None:
    """Make sure nobody uses the leftover mount ``path`` before it is unmounted: stop this
    job's orphans (``stop_owned``), and raise ``MountInUse`` naming every other process that
    still uses it. mailsnap never unmounts a snapshot someone is reading.

    Dry run: reports what it would stop and raises the same ``MountInUse`` for anyone else.
    """
    found = holders(path)
    if not found:
        return
    stopped = stop_owned(found, job, dry_run=dry_run)
    if dry_run:
        remaining = [h for h in found if h not in stopped]
    else:
        remaining = holders(path)
    if remaining:
        raise MountInUse(path, remaining)


def owner_of(pid: int) -> str | None:
    """The ``MAILSNAP_OWNER`` marker in ``pid``'s environment (as it was at exec), or None."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except _GONE:
        return None
    key = OWNER_ENV.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(key):
            return entry[len(key):].decode("utf-8", "replace")
    return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone, since it
    holds no files and no signal can reach it."""
    state = _state(pid)
    return state is not None and state not in ("Z", "X")


def _pids() -> Iterator[int]:
    for name in os.listdir(PROC):
        if name.isdigit():
            yield int(name)


def _uses(pid: int, top: bytes, below: bytes) -> bool:
    """Whether ``pid``'s cwd, root, an fd or a mapping is at ``top`` or below it."""
    base = b"/proc/%d/" % pid

    def inside(target: bytes) -> bool:
        if target.endswith(DELETED.encode()):
            target = target[: -len(DELETED)]
        return target == top or target.startswith(below)

    for link in (b"cwd", b"root"):
        with contextlib.suppress(*_GONE):
            if inside(os.readlink(base + link)):
                return True
    try:
        fds = os.listdir(base + b"fd")
    except _GONE:
        return False  # gone, or not ours to read: then its maps are not readable either
    for fd in fds:
        with contextlib.suppress(*_GONE):
            if inside(os.readlink(base + b"fd/" + fd)):
                return True
    try:
        with open(base + b"maps", "rb") as maps:
            data = maps.read()
    except _GONE:
        return False
    if top not in data:  # one substring search spares parsing every line
        return False
    for line in data.splitlines():
        # address perms offset dev inode [pathname]; the pathname may contain spaces.
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and inside(parts[5]):
            return True
    return False


def _command(pid: int) -> str:
    return (PROC / str(pid) / "comm").read_text(errors="replace").strip()


def _stat_fields(pid: int) -> list[str]:
    """Fields of ``/proc/<pid>/stat`` after the command name: state, ppid, pgrp, …"""
    stat = (PROC / str(pid) / "stat").read_text(errors="replace")
    # The command name is in parentheses and may itself contain ") ".
    return stat[stat.rindex(")") + 2:].split()


def _state(pid: int) -> str | None:
    try:
        return _stat_fields(pid)[0]
    except (*_GONE, ValueError, IndexError):
        return None


def _signal_if_ours(holder: Holder, sig: signal.Signals) -> bool:
    """Signal ``holder`` if its pid still carries its marker; False if it is gone (or the pid
    now belongs to someone else: it may have been reused since the scan)."""
    if owner_of(holder.pid) != holder.owner:
        return False
    try:
        os.kill(holder.pid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(found: Sequence[Holder], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not any(alive(h.pid) for h in found):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
