"""The backup run, top to bottom, as an admin's runbook:

    1. take the job's run lock               (a second run exits 3, "already running")
    2. find the volume behind the source     (read-only discovery)
    3. sweep what a crashed run left         (its mounts, snapshots and .partial directory)
    4. take the snapshot                     → undo: destroy it
    5. mount it read-only                    → undo: unmount, remove the mount point
    6. copy into <run id>.partial            → undo: remove the .partial directory
    7. check the snapshot is still valid, publish by one rename, point ``latest`` at it

Each stage pushes its undo on an ``ExitStack`` the moment there is something to undo, so teardown
runs in reverse on success, on any error and on SIGINT/SIGTERM/SIGHUP. A failing undo step is
logged and the others still run; the run then ends with ``TeardownIncomplete`` (exit 4) naming
what may remain, and the next run's sweep (stage 3) removes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
import logging
import os
from pathlib import Path
import socket
import time
from typing import Any

from mailsnap import __version__
from mailsnap.backends import make_backend
from mailsnap.backends.base import Snapshot, SnapshotBackend, Volume, snapshot_name
from mailsnap.config import Job
from mailsnap.copiers import make_copier
from mailsnap.errors import TeardownIncomplete
from mailsnap.mounts import mounts_under, unmount
from mailsnap.runner import Runner
from mailsnap.signals import SignalGuard, signals_unwind
from mailsnap.store import CONTENT, BackupStore

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class View:
    """A consistent, read-only view of the source for the length of a ``with`` block."""

    job: Job
    backend: SnapshotBackend
    store: BackupStore
    run_id: str
    snapshot: Snapshot
    path: Path  # read from here
    undo: Callable[[str, Callable[[], None]], None]  # push a later stage's undo on the stack


@dataclass
class BackupReport:
    job: str
    status: str
    backup: str | None
    backend: str
    point_in_time: bool
    snapshot: str
    files: int
    bytes: int
    linked: int
    passes: int
    seconds: float
    dry_run: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    """One log line per stage with how long it took."""
    started = time.monotonic()
    log.debug("%s: starting", name)
    yield
    log.info("%s: done (%.2fs)", name, time.monotonic() - started)


@contextlib.contextmanager
def consistent_view(
    job: Job, runner: Runner, guard: SignalGuard, *, clock: Clock = utc_now
) -> Iterator[View]:
    """Stages 1–5: lock, discover, sweep, snapshot, mount read-only. Tears everything down when
    the block ends, however it ends. Dry run: discovery runs, every change is only printed."""
    backend = make_backend(job, runner)
    store = BackupStore(job.target / job.name, dry_run=runner.dry_run)
    teardown = Teardown()
    try:
        with contextlib.ExitStack() as stack:
            try:
                if not runner.dry_run:
                    with stage("lock"):
                        stack.enter_context(store.locked())
                with stage("discover"):
                    volume = backend.discover(job.source)
                    log.info("discover: %s: backend %s, %s", job.source, backend.name,
                             volume.device or "no snapshot (live copy)")
                with stage("sweep"):
                    sweep_leftovers(job, runner, backend, volume, store)
                run_id = store.new_run_id(clock())
                name = snapshot_name(job.name, run_id)
                with stage("snapshot"):
                    snapshot = backend.create(volume, name)
                    teardown.push(stack, f"destroy snapshot {name}",
                                  lambda: backend.destroy(snapshot))
                with stage("mount"):
                    mountpoint = _make_mountpoint(job.work_dir / "snapshot", runner)
                    teardown.push(stack, f"remove {mountpoint}",
                                  lambda: _remove_mountpoint(mountpoint, runner))
                    path = backend.mount(snapshot, mountpoint)
                    teardown.push(stack, f"unmount {mountpoint}",
                                  lambda: backend.unmount(snapshot, mountpoint))
                yield View(job, backend, store, run_id, snapshot, path,
                           undo=lambda what, fn: teardown.push(stack, what, fn))
            finally:
                guard.defer()
    except BaseException as exc:
        if teardown.failures:
            raise TeardownIncomplete(_incomplete(teardown.failures, job) +
                                     f"; the run had already failed: {exc}") from exc
        raise
    if teardown.failures:
        raise TeardownIncomplete(_incomplete(teardown.failures, job))


def _incomplete(failures: Sequence[str], job: Job) -> str:
    return (
        "teardown incomplete (" + "; ".join(failures) + "); the next run of job "
        f"{job.name!r} removes what is left, or remove it by hand"
    )


def sweep_leftovers(
    job: Job, runner: Runner, backend: SnapshotBackend, volume: Volume, store: BackupStore
) -> None:
    """Stage 3: tidy what a killed run of this job left. Safe because we hold the job's lock,
    and limited to this job's own directory and names carrying its ``mailsnap-<job>-`` marker."""
    for mount in mounts_under(runner, job.work_dir):
        log.warning("sweep: unmounting %s left by an earlier run", mount.target)
        unmount(runner, mount.target)
    for snapshot in backend.list_owned(volume, job.name):
        log.warning("sweep: destroying snapshot %s left by an earlier run", snapshot.name)
        backend.destroy(snapshot)
    store.sweep_partials()


def _make_mountpoint(path: Path, runner: Runner) -> Path:
    if not runner.dry_run:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.mkdir(mode=0o700, exist_ok=True)
    return path


def _remove_mountpoint(path: Path, runner: Runner) -> None:
    if not runner.dry_run:
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()


def run_backup(job: Job, runner: Runner, *, clock: Clock = utc_now) -> BackupReport:
    """One backup of ``job``: stages 1–7. Raises a ``MailsnapError`` subclass on failure."""
    started_at = clock()
    started = time.monotonic()
    with signals_unwind() as guard, consistent_view(job, runner, guard, clock=clock) as view:
        copier = make_copier(
            point_in_time=view.snapshot.point_in_time,
            runner=runner,
            max_passes=getattr(job, "max_passes", 10),
        )
        previous = view.store.latest()
        partial = view.store.begin(view.run_id)
        # Unwinds first: an unpublished .partial goes before the snapshot does. After publish
        # the .partial name no longer exists and this is a no-op.
        view.undo(f"remove unpublished {partial.name}", lambda: view.store.discard(partial))
        with stage(f"copy ({copier.name})"):
            stats = copier.copy(
                view.path,
                partial / CONTENT,
                previous=previous.content if previous else None,
                excludes=job.excludes,
                watch=lambda: view.backend.check_healthy(view.snapshot),
            )
        with stage("verify snapshot"):
            view.backend.check_healthy(view.snapshot)
        manifest = {
            "job": job.name,
            "run_id": view.run_id,
            "source": str(job.source),
            "backend": view.backend.name,
            "snapshot": view.snapshot.name,
            "point_in_time": view.snapshot.point_in_time,
            "copier": copier.name,
            "started": started_at.isoformat(),
            "finished": clock().isoformat(),
            "files": stats.files,
            "bytes": stats.bytes,
            "linked": stats.linked,
            "passes": stats.passes,
            "previous": previous.run_id if previous else None,
            "host": socket.gethostname(),
            "mailsnap_version": __version__,
        }
        with stage("publish"):
            backup = view.store.publish(partial, manifest)
    if not runner.dry_run:
        log.info("backup %s published (%d files, %d bytes, %d hard-linked)",
                 backup.path, stats.files, stats.bytes, stats.linked)
    return BackupReport(
        job=job.name,
        status="ok" if not runner.dry_run else "dry-run",
        backup=None if runner.dry_run else str(backup.path),
        backend=view.backend.name,
        point_in_time=view.snapshot.point_in_time,
        snapshot=view.snapshot.name,
        files=stats.files,
        bytes=stats.bytes,
        linked=stats.linked,
        passes=stats.passes,
        seconds=round(time.monotonic() - started, 3),
        dry_run=runner.dry_run,
    )


def run_with_snapshot(job: Job, runner: Runner, argv: Sequence[str]) -> int:
    """``mailsnap snapshot --exec``: run ``argv`` with ``$MAILSNAP_SNAPSHOT`` set to the
    read-only snapshot of the source, then tear down. Returns the command's exit code."""
    with signals_unwind() as guard, consistent_view(job, runner, guard) as view:
        env = dict(os.environ, MAILSNAP_SNAPSHOT=str(view.path))
        log.info("exec: MAILSNAP_SNAPSHOT=%s", view.path)
        result = runner.run(
            argv, mutates=True, timeout=None, env=env, passthrough=True,
            ok_codes=tuple(range(256)),
        )
        return result.exit_code
