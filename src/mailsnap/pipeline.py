"""The backup run, top to bottom, as an admin's runbook:

    0. check the source is a Maildir tree     (nothing is created or locked for a wrong source)
    1. enter the job's session                (lock, discover, sweep leftovers; see session.py)
    2. lock the job's backup store            (TARGET/<job>/.lock), sweep its .partial leftovers
    3. take the snapshot                      → undo: destroy it
    4. mount it read-only                     → undo: unmount, remove the mount point
       (a live source has neither: it is read in place and watched for being unmounted)
    5. copy into <run id>.partial             → undo: remove the .partial directory
    6. check the snapshot (or live source) is still valid; count the messages; refuse a
       backup that shrank below ``min_keep_percent`` of the previous one
    7. publish by one rename, point ``latest`` at it
    8. apply the retention policy (``keep_*``): old backups renamed to .deleting, then deleted
    9. send to the destinations (ssh, restic, a second disk): those that read the snapshot,
       then release the snapshot, then those that read the published backup (``from``)
    … the session tears down in reverse and sweeps once more …

Each stage pushes its undo on the session's ``ExitStack`` the moment there is something to undo,
so teardown runs in reverse on success, on any error and on SIGINT/SIGTERM/SIGHUP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
import errno
import logging
import os
from pathlib import Path
import socket
import time
from typing import Any

from mailsnap import __version__, datasets, progress, subvolumes
from mailsnap.backends.base import Snapshot, snapshot_name
from mailsnap.config import Job
from mailsnap.copiers import Previous, make_copier
from mailsnap.errors import (
    CopyFailed,
    DestinationFailed,
    Interrupted,
    MailsnapError,
    PruneFailed,
    ShrinkRefused,
    TargetFull,
    VerifyFailed,
)
from mailsnap.faults import fault_point
from mailsnap.hooks import Hooks
from mailsnap.maildirs import survey
from mailsnap.manifest import MANIFEST_FILE
from mailsnap.mounts import find_mount
from mailsnap.prune import policy_of, prune_store
from mailsnap.recorder import record_destination, time_snapshot
from mailsnap.report import check_store_present
from mailsnap.runner import Runner
from mailsnap.session import Session, job_session, stage
from mailsnap.signals import SignalGuard, signals_unwind
from mailsnap.sources import SourceIdentity, check_source, check_target_outside_source
from mailsnap.store import CONTENT, Backup, BackupStore, TargetKind, run_id_for
from mailsnap.verify import compare_with_source

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Below this much free space (or with no free inode) a failed copy is reported as a full target.
FULL_BELOW_BYTES = 4 << 20
# … or below this much when the copy failed with "No space left on device" (a large message).
NO_SPACE_BELOW_BYTES = 256 << 20


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class View:
    """What the copy reads: a mounted read-only snapshot, or (``snapshot`` None) the live
    source itself. ``check`` raises when the view can no longer be trusted: an LVM snapshot
    that overflowed, a live source that was unmounted or replaced."""

    path: Path
    snapshot: Snapshot | None
    check: Callable[[], None]
    # Wall-clock ns no later than the moment the view shows (taken before the snapshot, or
    # before the live copy starts): see mailsnap.copiers.changes.
    since_ns: int = 0

    @property
    def point_in_time(self) -> bool:
        return self.snapshot is not None


@dataclass
class BackupReport:
    job: str
    status: str
    backup: str | None
    backend: str
    point_in_time: bool
    snapshot: str | None
    files: int
    bytes: int
    linked: int
    messages: int
    previous_messages: int | None
    passes: int
    seconds: float
    dry_run: bool
    estimated: bool  # dry run of a snapshot backend: counted on the live source
    copy: dict[str, int] | None = None  # the Maildir copier's summary (copied, linked …)
    pruned: list[str] | None = None  # backups the retention policy removed after publishing

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def open_view(session: Session, run_id: str) -> View:
    """Stages 3–4: snapshot and read-only mount, each with its undo on the session; for a
    backend without snapshots, the live source with its identity recorded. Every child process
    from here on carries the run's ``mailsnap-<job>-<run id>`` marker, so a sweep can tell our
    orphans from a stranger's processes. Dry run: prints the commands, returns the paths."""
    job, backend, runner = session.job, session.backend, session.runner
    name = snapshot_name(job.name, run_id)
    session.enter(runner.owned_by(name))
    if not backend.point_in_time:
        log.warning(
            "live copy of %s: no snapshot, so the backup is not a single point in time "
            "(messages are re-found by base name when Dovecot renames or moves them)",
            job.source,
        )
        if job.before_snapshot or job.after_snapshot:
            log.info("hooks before_snapshot/after_snapshot: not run for a live copy (there is "
                     "no snapshot instant; see mailsnap.hooks)")
        identity = SourceIdentity.of(job.source)
        return View(job.source, None, identity.verify, time.time_ns())
    time_snapshot(session.stack)  # the report's snapshot hold time: from here to its teardown
    since_ns = time.time_ns()
    with Hooks(job, runner, run_id).around_snapshot(), stage("snapshot"):
        snapshot = backend.create(session.volume, name)
        session.undo(f"destroy snapshot {name}", lambda: backend.destroy(snapshot))
    fault_point("after-snapshot")
    with stage("mount"):
        mountpoint = job.work_dir / "snapshot"
        if not runner.dry_run:
            mountpoint.mkdir(mode=0o700, exist_ok=True)
        session.undo(f"remove {mountpoint}", lambda: _remove_mountpoint(mountpoint, runner))
        path = backend.mount(snapshot, mountpoint)
        session.undo(f"unmount {mountpoint}", lambda: backend.unmount(snapshot, mountpoint))
    fault_point("after-mount")
    return View(path, snapshot, lambda: backend.check_healthy(snapshot), since_ns)


def _watched(check: Callable[[], None]) -> Callable[[], None]:
    """``check`` as the copier's watch, with the ``mid-copy`` fault point on its first call
    (the copy is running then: the runner calls a watch only while rsync is alive)."""
    first = [True]

    def watch() -> None:
        if first[0]:
            first[0] = False
            fault_point("mid-copy")
        check()

    return watch


def _remove_mountpoint(path: Path, runner: Runner) -> None:
    if not runner.dry_run:
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()


def run_backup(
    job: Job, runner: Runner, *, clock: Clock = utc_now, allow_shrink: bool = False
) -> BackupReport:
    """One backup of ``job``: stages 0–7, then its ``on_success`` or ``on_failure`` hook.
    Raises a ``MailsnapError`` subclass on failure. Dry run: discovery and read-only walks
    run; every change (and every hook) is only printed."""
    hooks = Hooks(job, runner)
    try:
        report = _run_backup(job, runner, hooks, clock=clock, allow_shrink=allow_shrink)
    except BaseException as exc:
        hooks.failed(exc)
        raise
    hooks.succeeded(report.backup)
    return report


def _run_backup(
    job: Job, runner: Runner, hooks: Hooks, *, clock: Clock, allow_shrink: bool
) -> BackupReport:
    started_at = clock()
    started = time.monotonic()
    with stage("check source"):
        check_source(job.source)
        check_target_outside_source(job.source, job.target)
        check_store_present(job)
    with signals_unwind() as guard, \
            job_session(job, runner, guard, purpose="backup") as session:
        store = BackupStore(job.target / job.name, dry_run=runner.dry_run, runner=runner)
        if not runner.dry_run:
            session.enter(store.locked())
        store.sweep_partials()
        store.finish_deletions()  # a prune killed midway: no policy needed to finish it
        run_id = store.new_run_id(clock())
        hooks.run_id = run_id
        scope = session.enter(session.scope())  # the snapshot: released before from=local
        view = open_view(scope, run_id)
        copier = make_copier(
            job.copier,
            point_in_time=view.point_in_time,
            runner=runner,
            max_passes=getattr(job, "max_passes", 10),
            progress=progress.current().reporter(),
            full_check_every=job.full_check_every,
            since_ns=view.since_ns,
        )
        previous = store.latest()
        if previous is not None:  # about as much as last time: the display can show time left
            progress.current().expect(_recorded(previous, "files"), _recorded(previous, "bytes"))
        kind, base = target_snapshots(job, store, view, copier.name, previous)
        partial = store.begin(run_id, kind=kind, base=base)
        # Unwinds first: an unpublished .partial goes before the snapshot does. After publish
        # the .partial name no longer exists and this is a no-op.
        scope.undo(f"remove unpublished {partial.name}", lambda: store.discard(partial))
        with stage(f"copy ({copier.name})"), full_target_explained(store.root):
            try:
                stats = copier.copy(
                    view.path,
                    partial / CONTENT,
                    previous=Previous.of(previous, in_place=base is not None)
                    if previous else None,
                    excludes=job.excludes,
                    watch=_watched(view.check),
                    manifest=partial / MANIFEST_FILE,
                )
            except CopyFailed:
                view.check()  # "cannot read …" because the volume went away: say that instead
                raise
        progress.current().copied(stats.files, stats.bytes)
        fault_point("after-copy")
        with stage("verify snapshot" if view.point_in_time else "verify source"):
            view.check()
        if job.verify == "snapshot":
            compare_with_snapshot(job, view, partial / CONTENT, dry_run=runner.dry_run)
        estimated = runner.dry_run and view.point_in_time
        if stats.messages is not None and not estimated:
            messages = stats.messages  # counted by the copier as it went
        else:
            with stage("count messages"):
                counted = survey(job.source if estimated else
                                 (view.path if runner.dry_run else partial / CONTENT),
                                 job.excludes)
            messages = counted.messages
            if estimated:
                # The copy did not run and the snapshot was never mounted: say what the source
                # holds.
                stats.files, stats.bytes = counted.files, counted.bytes
        previous_messages = _messages_in(previous, job) if previous else None
        shrink_guard(job, messages, previous, previous_messages,
                     allow=allow_shrink or runner.dry_run)
        manifest = {
            "job": job.name,
            "run_id": run_id,
            "source": str(job.source),
            "backend": session.backend.name,
            "snapshot": view.snapshot.name if view.snapshot else None,
            "point_in_time": view.point_in_time,
            "copier": copier.name,
            "started": started_at.isoformat(),
            "finished": clock().isoformat(),
            "files": stats.files,
            "bytes": stats.bytes,
            "linked": stats.linked,
            "messages": messages,
            "passes": stats.passes,
            "copy": stats.summary.as_dict() if stats.manifest else None,
            "manifest": MANIFEST_FILE if stats.manifest else None,
            "manifest_sha256": stats.manifest_sha256,
            "previous": previous.run_id if previous else None,
            "allowed_shrink": allow_shrink,
            "host": socket.gethostname(),
            "mailsnap_version": __version__,
        }
        with stage("publish"), full_target_explained(store.root):
            # From the rename on the backup is published: a signal then must not fail (or
            # seem to un-publish) it; the run finishes and tears down as on success.
            backup = store.publish(partial, manifest,
                                   on_commit=lambda: guard.defer("publishing the backup"))
        pruned = _prune_after(store, job, clock(), backup.run_id)
        if job.destination:
            send_to_destinations(job, runner, guard, scope, view, backup, run_id, clock)
    if not runner.dry_run:
        log.info("backup %s published (%d messages, %d files, %d bytes, %d hard-linked)",
                 backup.path, messages, stats.files, stats.bytes, stats.linked)
    return BackupReport(
        job=job.name,
        status="ok" if not runner.dry_run else "dry-run",
        backup=None if runner.dry_run else str(backup.path),
        backend=session.backend.name,
        point_in_time=view.point_in_time,
        snapshot=view.snapshot.name if view.snapshot else None,
        files=stats.files,
        bytes=stats.bytes,
        linked=stats.linked,
        messages=messages,
        previous_messages=previous_messages,
        copy=stats.summary.as_dict() if stats.manifest else None,
        passes=stats.passes,
        seconds=round(time.monotonic() - started, 3),
        dry_run=runner.dry_run,
        estimated=estimated,
        pruned=pruned,
    )


def target_snapshots(job: Job, store: BackupStore, view: View, copier: str,
                     previous: Backup | None) -> tuple[TargetKind, Backup | None]:
    """What this backup is (``target_snapshots``): a btrfs subvolume or a snapshot of the
    job's ZFS dataset when the target allows it, else a hard-link tree; and the previous
    backup it starts as a copy of (None: it starts empty)."""
    if (job.target_snapshots != "auto" or copier != "maildir" or not view.point_in_time
            or store.dry_run):
        return "tree", None
    fstype = find_mount(store.runner, store.root).fstype
    kind: TargetKind
    if fstype == "btrfs":
        kind, what, follows = "subvolume", "btrfs subvolumes", subvolumes.is_subvolume
    elif fstype == "zfs":
        kind, what, follows = "dataset", "ZFS snapshots", datasets.is_view
    else:
        return "tree", None
    if previous is None:
        return kind, None
    if follows(previous.path) and (previous.path / MANIFEST_FILE).exists():
        return kind, previous
    log.warning("backups of %s become %s from this one on (target_snapshots); %s is not one, "
                "so this backup clones or copies its files rather than starting from it",
                job.name, what, previous.run_id)
    return kind, None


def send_to_destinations(job: Job, runner: Runner, guard: SignalGuard, scope: Session,
                         view: View, backup: Backup, run_id: str, clock: Clock) -> None:
    """Stage 9: each destination gets its copy; ``from = "snapshot"`` ones while the snapshot
    is still mounted, then the snapshot is released, then the ``from = "local"`` ones read
    the published backup. A live job's destinations always read the published backup (a
    second read of the live tree would be a second, different copy). Signals interrupt again
    here: a slow upload must stay stoppable, and the published backup stays published.
    A failed destination does not stop the others; the run then fails with all of them named.
    """
    from mailsnap.destinations.base import Source
    from mailsnap.destinations.run import destinations_of, send_one

    everything = destinations_of(job, runner)
    early = [(s, d) for s, d in everything if s.read_from == "snapshot" and view.point_in_time]
    late = [(s, d) for s, d in everything if (s, d) not in early]
    host = socket.gethostname()
    results = []
    published = f"backup {backup.run_id} was published in {backup.path.parent}"
    try:
        guard.resume()
        if early:
            source = Source(view.path, clean=False, stable=view.path == job.work_dir / "snapshot",
                            local=backup.path, run_id=run_id, excludes=job.excludes, host=host)
            for settings, destination in early:
                results.append(send_one(job, settings, destination, source, clock(),
                                        dry_run=runner.dry_run))
                record_destination(results[-1].as_dict())
        with guard.deferred("releasing the snapshot"):
            scope.stack.close()
        if late:
            source = Source(backup.content, clean=True, stable=False, local=backup.path,
                            run_id=run_id, excludes=job.excludes, host=host)
            for settings, destination in late:
                results.append(send_one(job, settings, destination, source, clock(),
                                        dry_run=runner.dry_run))
                record_destination(results[-1].as_dict())
    except Interrupted as exc:
        done = {r.name for r in results if r.status != "failed"}
        raise Interrupted(exc.signal_name, published=f"{published}; destinations not done: "
                          + ", ".join(s.name for s, _ in everything if s.name not in done)
                          ) from exc
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise DestinationFailed(
            f"{published}, but {len(failed)} of {len(results)} destinations failed: "
            + "; ".join(r.error or r.name for r in failed)
            + (f" (done: {', '.join(r.name for r in results if r.status != 'failed')})"
               if len(failed) < len(results) else ""))


def compare_with_snapshot(job: Job, view: View, content: Path, *, dry_run: bool) -> None:
    """``verify = "snapshot"``: the copy against the still-mounted snapshot, before anything
    is published. A difference fails the run; the .partial copy is discarded."""
    if not view.point_in_time:
        log.info("verify = snapshot: skipped, this run read the live tree (no snapshot)")
        return
    if dry_run:
        log.info("[dry-run] would compare the copy with the snapshot%s",
                 " (content too)" if job.verify_deep else "")
        return
    with stage("compare with snapshot"):
        problems = compare_with_source(view.path, content, job.excludes, deep=job.verify_deep)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; … {len(problems) - 10} more"
                                            if len(problems) > 10 else "")
        raise VerifyFailed(f"the copy differs from the snapshot in {len(problems)} places "
                           f"({shown}); nothing was published")
    log.info("the copy matches the snapshot (names, sizes%s)",
             ", content" if job.verify_deep else "")


def _prune_after(store: BackupStore, job: Job, now: datetime, published: str) -> list[str]:
    """Stage 8: apply the retention policy, under the store lock still held. The new backup
    is published whatever happens here; a failure fails the run so that someone looks
    before the disk fills up."""
    if policy_of(job).keeps_everything:
        return []
    with stage("prune"):
        try:
            return prune_store(store, job, now).removed
        except (OSError, MailsnapError) as exc:
            raise PruneFailed(
                f"backup {published} was published, but removing old backups failed: {exc}; "
                f"fix that and run `mailsnap prune --job {job.name}`"
            ) from exc


def _recorded(backup: Backup, key: str) -> int:
    value = backup.manifest.get(key)
    return value if isinstance(value, int) else 0


def _messages_in(backup: Backup, job: Job) -> int:
    """The message count a published backup recorded; counted on disk for backups made
    before mailsnap recorded it."""
    recorded = backup.manifest.get("messages")
    if isinstance(recorded, int):
        return recorded
    return survey(backup.content, job.excludes).messages


def shrink_guard(
    job: Job, messages: int, previous: Backup | None, previous_messages: int | None,
    *, allow: bool,
) -> None:
    """Refuse to publish a backup holding fewer than ``min_keep_percent`` of the previous
    backup's messages. Users expunge mail every day, so some shrinking is normal; losing half of
    it overnight is what an unmounted volume, a wrong source or a broken sync looks like, and
    publishing that would make the bad backup ``latest`` (and, with retention, age the good
    ones out)."""
    if previous is None or not previous_messages:
        log.info("messages: %d (no earlier backup to compare with)", messages)
        return
    percent = 100.0 * messages / previous_messages
    log.info("messages: %d, %.1f%% of the %d in %s", messages, percent, previous_messages,
             previous.run_id)
    if percent >= job.min_keep_percent:
        return
    if allow:
        log.warning("messages dropped to %.1f%% of the previous backup (below min_keep_percent "
                    "= %d); publishing anyway (--allow-shrink or dry run)", percent,
                    job.min_keep_percent)
        return
    raise ShrinkRefused(
        f"backup of job {job.name!r} holds {messages} messages, {percent:.1f}% of the "
        f"{previous_messages} in {previous.run_id} (min_keep_percent = {job.min_keep_percent}): "
        "not published. Check that the mail volume is mounted and `source` is right; if the "
        "mail really was deleted, run again with --allow-shrink"
    )


@contextlib.contextmanager
def full_target_explained(root: Path) -> Iterator[None]:
    """A full target shows up as anything from rsync's "Broken pipe" (exit 10) to a raw
    ``[Errno 28]`` from mkdir. When a copy or publish fails and the target has no room left,
    say that instead."""
    try:
        yield
    except (CopyFailed, OSError) as exc:
        full = target_full(root, exc)
        if full:
            raise TargetFull(
                f"target {root} is full ({full}): free space there or move the target; nothing "
                "was published and earlier backups are untouched"
            ) from exc
        raise


def target_full(root: Path, exc: BaseException | None = None) -> str | None:
    """How full the target is when it is too full to go on, else None. Read-only."""
    try:
        info = os.statvfs(root)
    except OSError:
        return None
    as_root = os.geteuid() == 0
    free = (info.f_bfree if as_root else info.f_bavail) * info.f_frsize
    inodes = info.f_ffree if as_root else info.f_favail
    no_space = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    no_space = no_space or "No space left on device" in str(exc or "")
    # ENOSPC with room to spare is a quota or a reserved-blocks limit, not a full disk: the
    # original error says more then.
    if (free < FULL_BELOW_BYTES or (info.f_files and inodes == 0)
            or (no_space and free < NO_SPACE_BELOW_BYTES)):
        return f"{free // 1024} KiB and {inodes} inodes free"
    return None


def run_with_snapshot(
    job: Job, runner: Runner, argv: Sequence[str], *, clock: Clock = utc_now
) -> int:
    """``mailsnap snapshot --exec``: run ``argv`` with ``$MAILSNAP_SNAPSHOT`` set to the
    read-only snapshot of the source, then tear down. Returns the command's exit code.
    It enters the same job session as ``backup``, so the two never sweep each other."""
    with signals_unwind() as guard, \
            job_session(job, runner, guard, purpose="snapshot --exec") as session:
        view = open_view(session, run_id_for(clock()))
        env = dict(os.environ, MAILSNAP_SNAPSHOT=str(view.path))
        log.info("exec: MAILSNAP_SNAPSHOT=%s", view.path)
        result = runner.run(
            argv, mutates=True, timeout=None, env=env, passthrough=True,
            ok_codes=tuple(range(256)),
        )
        return result.exit_code
