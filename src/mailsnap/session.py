"""One ``Session`` per job: the single place that decides who may touch a job's snapshots,
mounts and work files, and that tidies them.

Every command that creates or sweeps anything of a job (``backup``, ``snapshot --exec``, a dry
run of either) enters the job's session:

    1. lock ``<run_dir>/<job>/.lock``        a second user of the job exits 3 with the holder's pid
    2. discover the volume behind the source (read-only)
    3. sweep what a killed run left           its mounts (after stopping its orphaned children;
                                              never from under a foreign reader) and snapshots
    … the command's own stages, each pushing its undo on the session's ExitStack …
    4. undo in reverse, every step even if one fails
    5. sweep again                           nothing of the job may outlive the session

The lock is keyed by the job's work directory because that is what the sweep touches: the mount
point ``<run_dir>/<job>/snapshot`` and the ``mailsnap-<job>-`` names. Two commands of one job
(a backup and an admin's ``snapshot --exec``; two one-off backups to different targets) used to
take different locks and sweep each other's snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
import fcntl
import logging
import os
from pathlib import Path
import time
from typing import IO, TypeVar

from mailsnap import progress
from mailsnap.backends import make_backend
from mailsnap.backends.base import SnapshotBackend, Volume
from mailsnap.config import Job
from mailsnap.errors import Interrupted, LockedError, TeardownIncomplete
from mailsnap.mounts import mounts_under, unmount
from mailsnap.procs import release_mount
from mailsnap.recorder import record_stage
from mailsnap.runner import Runner
from mailsnap.signals import SignalGuard
from mailsnap.store import make_private_dirs

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
T = TypeVar("T")


class Teardown:
    """Runs undo steps so that one failing step never stops the others."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def push(self, stack: contextlib.ExitStack, what: str, fn: Callable[[], None]) -> None:
        stack.callback(self._step, what, fn)

    def _step(self, what: str, fn: Callable[[], None]) -> None:
        started = time.monotonic()
        try:
            fn()
        except Exception as exc:
            log.error("teardown: %s FAILED: %s", what, exc)
            self.failures.append(f"{what}: {exc}")
            return
        log.info("teardown: %s (%.2fs)", what, time.monotonic() - started)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """One log line per stage with how long it took; the run's report gets it too."""
    started = time.monotonic()
    log.debug("%s: starting", name)
    progress.current().stage(name)
    ok = False
    try:
        yield
        ok = True
    finally:
        record_stage(name, time.monotonic() - started, ok=ok)
    log.info("%s: done (%.2fs)", name, time.monotonic() - started)


@dataclass
class Session:
    """A job's run in progress: its backend, the volume behind its source, and the ExitStack
    every stage pushes its undo on."""

    job: Job
    runner: Runner
    backend: SnapshotBackend
    volume: Volume
    stack: contextlib.ExitStack
    teardown: Teardown
    # What the sweep on entry removed (or, in dry run, would remove): ``mailsnap cleanup``
    # reports it.
    swept: list[str] = field(default_factory=list)

    @property
    def dry_run(self) -> bool:
        return self.runner.dry_run

    def undo(self, what: str, fn: Callable[[], None]) -> None:
        """Push an undo step; it runs when the session ends, in reverse order of pushing."""
        self.teardown.push(self.stack, what, fn)

    def enter(self, context: AbstractContextManager[T]) -> T:
        """Hold ``context`` until the session ends."""
        return self.stack.enter_context(context)

    @contextlib.contextmanager
    def scope(self) -> Iterator[Session]:
        """A part of the session whose undo steps run when the block ends, not when the
        session does (the snapshot, released before the slow destinations read the
        published backup). On an error they unwind with the rest, in order."""
        with contextlib.ExitStack() as inner:
            yield replace(self, stack=inner)


@contextlib.contextmanager
def job_session(
    job: Job,
    runner: Runner,
    guard: SignalGuard,
    *,
    purpose: str,
    backend_factory: Callable[[Job, Runner], SnapshotBackend] = make_backend,
) -> Iterator[Session]:
    """Stages 1–3 on entry, 4–5 on exit, however the block ends. ``purpose`` ("backup",
    "snapshot") goes into the lock file so a refused second user learns who holds the job.
    Dry run: the lock is checked (a running job makes a dry run exit 3, instead of reporting
    that job's snapshot as a leftover) but nothing is created; the sweep only prints."""
    backend = backend_factory(job, runner)
    teardown = Teardown()
    try:
        with contextlib.ExitStack() as stack:
            try:
                with stage("lock"):
                    stack.enter_context(job_lock(job, purpose, dry_run=runner.dry_run))
                with stage("discover"):
                    volume = backend.discover(job.source)
                    log.info("discover: %s: backend %s, %s", job.source, backend.name,
                             volume.device or "no snapshot (live copy)")
                with stage("sweep"):
                    swept = sweep(job, runner, backend, volume)
                if not runner.dry_run:
                    # Pushed first, so it runs last: after every undo, nothing of the job may
                    # remain. A step that failed above gets a second try here.
                    teardown.push(stack, "final sweep",
                                  lambda: _final_sweep(job, runner, backend, volume))
                yield Session(job, runner, backend, volume, stack, teardown, swept)
            finally:
                guard.defer()
    except Interrupted as exc:
        if teardown.failures:
            raise Interrupted(exc.signal_name,
                              teardown=incomplete(teardown.failures, job)) from exc
        raise
    except BaseException as exc:
        if teardown.failures:
            raise TeardownIncomplete(incomplete(teardown.failures, job) +
                                     f"; the run had already failed: {exc}") from exc
        raise
    if teardown.failures:
        raise TeardownIncomplete(incomplete(teardown.failures, job))


def incomplete(failures: Sequence[str], job: Job) -> str:
    return (
        "teardown incomplete (" + "; ".join(failures) + "); the next run of job "
        f"{job.name!r} removes what is left, or remove it by hand"
    )


# -- the lock ------------------------------------------------------------------------------


@contextlib.contextmanager
def job_lock(job: Job, purpose: str, *, dry_run: bool) -> Iterator[None]:
    """Hold ``<run_dir>/<job>/.lock`` (flock) for the session. The work directory is made
    private (0700) on the way, since it holds the snapshot's mount point."""
    path = job.work_dir / LOCK_NAME
    if dry_run:
        if not path.exists():
            yield  # no run of this job has held it since boot (run_dir is on tmpfs)
            return
        with path.open("r") as handle:
            _try_lock(handle, path, job)
            yield
        return
    make_private_dirs(job.work_dir)
    with path.open("a+") as handle:
        _try_lock(handle, path, job)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({purpose})\n")
        handle.flush()
        yield


def _try_lock(handle: IO[str], path: Path, job: Job) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise LockedError(
            f"job {job.name!r} is already running: {holder} holds {path}; wait for it to finish"
        ) from None


# -- the sweep -----------------------------------------------------------------------------


def sweep(job: Job, runner: Runner, backend: SnapshotBackend, volume: Volume) -> list[str]:
    """Remove what an earlier, killed session of this job left: its mounts under the job's work
    directory and its snapshots (names carrying ``mailsnap-<job>-``). Safe because we hold the
    job's lock. A leftover mount that a process still reads is released first: the process is
    stopped if it is one of ours (it carries the job's marker), otherwise the sweep refuses
    with its pid, never unmounting from under a reader. Returns what it removed.
    Dry run: prints what it would do."""
    removed: list[str] = []
    for mount in mounts_under(runner, job.work_dir):
        log.warning("sweep: unmounting %s left by an earlier run", mount.target)
        release_mount(mount.target, job.name, dry_run=runner.dry_run)
        unmount(runner, mount.target)
        removed.append(f"mount {mount.target}")
    for snapshot in backend.list_owned(volume, job.name):
        log.warning("sweep: destroying snapshot %s left by an earlier run", snapshot.name)
        backend.destroy(snapshot)
        removed.append(f"snapshot {snapshot.name}")
    return removed


def _final_sweep(job: Job, runner: Runner, backend: SnapshotBackend, volume: Volume) -> None:
    removed = sweep(job, runner, backend, volume)
    if removed:
        log.warning("final sweep removed what teardown left: %s", ", ".join(removed))
