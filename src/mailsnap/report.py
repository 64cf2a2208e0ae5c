"""The record of one run of a job, and where those records live.

``RunReport`` is the one record of a run, success or failure alike: ``backup --json`` prints it,
``backup`` keeps the last ``keep_reports`` of them in the job's state directory
(``<state_dir>/<job>/run-<started>.json``, default ``/var/lib/mailsnap/<job>/`` as root), and
``status`` and the Prometheus metrics read them back. The model is versioned (``schema``): a
reader meets reports written by older mailsnap versions in that directory.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
import json
import logging
import os
from pathlib import Path
import socket
import tempfile
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mailsnap import __version__
from mailsnap.config import Job
from mailsnap.errors import EXIT_INTERRUPTED, EXIT_OK, MailsnapError, TargetVanished
from mailsnap.recorder import Recorder
from mailsnap.store import BackupStore, make_private_dirs

if TYPE_CHECKING:
    from mailsnap.pipeline import BackupReport

log = logging.getLogger(__name__)

SCHEMA = 1
REPORT_PREFIX = "run-"
REPORT_SUFFIX = ".json"

Status = Literal["ok", "failed", "interrupted", "dry-run"]


class StageTime(BaseModel):
    """One stage of the run and how long it took; ``ok`` is false for the stage that failed."""

    model_config = ConfigDict(frozen=True)

    name: str
    seconds: float
    ok: bool = True


class RunReport(BaseModel):
    """One run of one job. Counts are None when the run ended before they were known."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    schema_version: int = Field(default=SCHEMA, alias="schema",
                                description="Version of this record's layout.")
    job: str
    status: Status
    exit_code: int
    started: datetime
    finished: datetime
    seconds: float = Field(description="Wall time of the whole run.")
    stages: list[StageTime] = Field(default_factory=list)
    snapshot_seconds: float | None = Field(
        default=None,
        description="How long the snapshot existed: from its stage's start to the end of its "
        "teardown. None for a live copy.")
    backup: str | None = Field(default=None, description="The published backup's path.")
    backend: str | None = None
    point_in_time: bool | None = None
    snapshot: str | None = None
    files: int | None = Field(default=None, description="Regular files in the backup.")
    bytes: int | None = Field(default=None, description="Their total size.")
    linked: int | None = Field(default=None,
                               description="Files unchanged since the previous backup "
                               "(hard links to it); files - linked were copied anew.")
    messages: int | None = None
    previous_messages: int | None = None
    passes: int | None = None
    copy_summary: dict[str, int] | None = Field(
        default=None, alias="copy",
        description="The Maildir copier's account (from its manifest): files copied and "
        "bytes_written, linked and bytes_linked to the previous backup, renames (linked "
        "under a new name or folder), hardlinked (hard links kept from the source). None for "
        "rsync.")
    pruned: list[str] | None = Field(
        default=None, description="Backups the retention policy removed after this one was "
        "published.")
    destinations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Each destination's part of the run: name, type, where, from (snapshot "
        "or local), status (ok, failed, skipped, dry-run), the id it stored, seconds, files, "
        "bytes_sent, pruned, error.")
    dry_run: bool = False
    estimated: bool = False
    warnings: list[str] = Field(default_factory=list)
    error: str | None = None
    host: str = Field(default_factory=socket.gethostname)
    mailsnap_version: str = __version__

    @property
    def new_files(self) -> int | None:
        return None if self.files is None or self.linked is None else self.files - self.linked

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def as_json(self) -> str:
        # Not model_dump_json: a path that is not UTF-8 (a surrogate-escaped byte) must not
        # make the report unwritable; json escapes it and reads it back unchanged.
        return json.dumps(self.as_dict(), indent=2)


def _common(recorder: Recorder, started: datetime, finished: datetime,
            seconds: float) -> dict[str, object]:
    return {
        "started": started,
        "finished": finished,
        "seconds": round(seconds, 3),
        "stages": [StageTime(name=n, seconds=s, ok=ok) for n, s, ok in recorder.stages],
        "snapshot_seconds": recorder.snapshot_seconds(),
        "warnings": list(recorder.warnings),
        "destinations": list(recorder.destinations),
    }


def succeeded(backup: BackupReport, recorder: Recorder, started: datetime,
              finished: datetime) -> RunReport:
    """The report of a run that published its backup (or a dry run that got to the end)."""
    return RunReport(
        job=backup.job,
        status="dry-run" if backup.dry_run else "ok",
        exit_code=EXIT_OK,
        backup=backup.backup,
        backend=backup.backend,
        point_in_time=backup.point_in_time,
        snapshot=backup.snapshot,
        files=backup.files,
        bytes=backup.bytes,
        linked=backup.linked,
        messages=backup.messages,
        previous_messages=backup.previous_messages,
        passes=backup.passes,
        copy_summary=backup.copy,
        pruned=backup.pruned,
        dry_run=backup.dry_run,
        estimated=backup.estimated,
        **_common(recorder, started, finished, backup.seconds),
    )


def failed(job: str, error: MailsnapError, recorder: Recorder, started: datetime,
           finished: datetime, *, dry_run: bool) -> RunReport:
    """The report of a run that ended with ``error``; nothing of it was published."""
    return RunReport(
        job=job,
        status="interrupted" if error.exit_code == EXIT_INTERRUPTED else "failed",
        exit_code=error.exit_code,
        error=str(error),
        dry_run=dry_run,
        **_common(recorder, started, finished,
                  (finished - started).total_seconds()),
    )


# -- the state directory -------------------------------------------------------------------


def report_name(started: datetime) -> str:
    # Microseconds keep two runs in one second apart; the names sort by time.
    return f"{REPORT_PREFIX}{started.astimezone(UTC):%Y%m%dT%H%M%S.%fZ}{REPORT_SUFFIX}"


def save_report(job: Job, report: RunReport) -> Path:
    """Write ``report`` into the job's state directory (0700) as a 0600 file, atomically
    (temporary file, fsync, rename), then remove all but the newest ``keep_reports``.
    Not called in dry run: a dry run leaves no record."""
    directory = job.state_path
    make_private_dirs(directory)
    path = directory / report_name(report.started)
    fd, tmp = tempfile.mkstemp(prefix=".run-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(report.as_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    for old in _report_files(directory)[:-job.keep_reports]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return path


def _report_files(directory: Path) -> list[Path]:
    try:
        names = sorted(p for p in directory.iterdir()
                       if p.name.startswith(REPORT_PREFIX) and p.name.endswith(REPORT_SUFFIX))
    except FileNotFoundError:
        return []
    return names


def load_reports(job: Job) -> list[RunReport]:
    """The job's kept reports, oldest first; an unreadable file is skipped with a warning.
    Read-only."""
    reports = []
    for path in _report_files(job.state_path):
        try:
            reports.append(RunReport.model_validate(json.loads(path.read_text())))
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("%s: not a readable run report, skipped (%s)", path,
                        str(exc).splitlines()[0])
    return reports


def last_report(job: Job) -> RunReport | None:
    """The newest report of a real run (dry runs leave none). Read-only."""
    reports = load_reports(job)
    return reports[-1] if reports else None


def check_store_present(job: Job) -> None:
    """Refuse a night whose store (``TARGET/<job>/``) is gone although the job's last
    successful run published a backup into it. That is what a backup disk that failed to
    mount looks like: its mount point is an empty directory on the file system below, and
    the night would write a full copy there, filling the root file system of a mail server
    instead of the backup disk. A store that was never there (the first run, a new target)
    is created as always; an admin who moved or removed the backups on purpose creates the
    directory, and the next run starts a new history there. Read-only."""
    store = job.target / job.name
    if os.path.lexists(store):
        return
    last = next((r for r in reversed(load_reports(job)) if r.status == "ok" and r.backup), None)
    # No backup yet, or the job's target was changed since: a new store is expected.
    if last is None or last.backup is None or Path(last.backup).parent != store:
        return
    raise TargetVanished(
        f"target {store}: not there, but the run of {last.started:%Y-%m-%d %H:%M} UTC "
        f"published {last.backup} into it. Is the backup disk mounted? Mount it; if the "
        f"backups were moved or removed on purpose, create {store} (mode 0700) and run "
        "again. Nothing was backed up")


def newest_backup_time(job: Job) -> tuple[str, datetime] | None:
    """The run id and finishing time of the job's newest published backup in its store
    (``TARGET/<job>/``), or None when there is none. Read-only."""
    newest = BackupStore(job.target / job.name, dry_run=True).latest()
    if newest is None:
        return None
    finished = newest.manifest.get("finished")
    try:
        when = datetime.fromisoformat(str(finished))
    except ValueError:
        # Manifest without a finishing time: the run id is the start, in UTC.
        when = datetime.strptime(newest.run_id.split(".")[0], "%Y%m%dT%H%M%SZ")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return newest.run_id, when
