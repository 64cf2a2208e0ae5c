"""Sending one run's backup to the job's destinations, and their retention.

Each destination is tried on its own: one that is unreachable, full or misconfigured fails
with its own line in the report, and the others (and the job's own backup, already
published) are not affected. The run then exits 1 so that somebody looks.

Retention is decided by the same ``retention.decide`` as for the job's own store, on what the
destination lists, with its own ``keep_*`` keys; the newest backup there is never removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
import logging
import time
from typing import Any
from zoneinfo import ZoneInfo

from mailsnap.config import Job
from mailsnap.destinations import Destination, Source, make_destination
from mailsnap.destinations.base import policy
from mailsnap.errors import Interrupted, MailsnapError
from mailsnap.prune import PruneResult
from mailsnap.retention import Candidate, decide
from mailsnap.runner import Runner
from mailsnap.session import stage

log = logging.getLogger(__name__)

# ``every = "7d"`` with a nightly timer: a copy 6 days 23 h 59 min old is due.
EVERY_SLACK = 0.1


@dataclass
class DestinationResult:
    """How one destination fared in one run; goes into the run's report."""

    name: str
    kind: str
    where: str
    read_from: str
    status: str = "ok"  # ok, failed, skipped (not due), dry-run
    id: str | None = None
    seconds: float = 0.0
    files: int | None = None
    bytes_sent: int | None = None
    pruned: list[str] = field(default_factory=list)
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.kind, "where": self.where,
                "from": self.read_from, "status": self.status, "id": self.id,
                "seconds": round(self.seconds, 3),
                # How long this destination kept the snapshot: all of its time when it read
                # the snapshot, none when it read the published backup.
                "snapshot_held_seconds": round(self.seconds, 3)
                if self.read_from == "snapshot" else 0.0,
                "files": self.files,
                "bytes_sent": self.bytes_sent, "pruned": self.pruned, "error": self.error,
                "details": self.details}


def destinations_of(job: Job, runner: Runner) -> list[tuple[Any, Destination]]:
    return [(settings, make_destination(job, settings, runner)) for settings in job.destination]


def is_due(destination: Destination, every: timedelta | None, now: datetime) -> str | None:
    """None when a copy is due; else why not (the newest one there is recent enough)."""
    if every is None:
        return None
    stored = destination.backups()
    if not stored:
        return None
    age = now - stored[-1].time
    if age >= every * (1 - EVERY_SLACK):
        return None
    return f"not due: the newest copy there ({stored[-1].id}) is {_hours(age)} old, every = " \
           f"{_hours(every)}"


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f}d" if hours >= 48 else f"{hours:.1f}h"


def send_one(job: Job, settings: Any, destination: Destination, source: Source,
             now: datetime, *, dry_run: bool) -> DestinationResult:
    """Send to one destination and apply its retention. Never raises a ``MailsnapError``
    (it becomes the result's error); an interruption does propagate."""
    result = DestinationResult(settings.name, destination.kind, destination.where(),
                               "local" if source.clean else "snapshot")
    started = time.monotonic()
    try:
        with stage(f"destination {settings.name}"):
            if dry_run:
                # Nothing is sent or removed; what would be is logged.
                result.status = "dry-run"
                log.info("[dry-run] destination %s: would send %s (%s) to %s, then apply its "
                         "retention (%s)", settings.name, source.tree, result.read_from,
                         destination.where(), policy(settings).describe())
                return result
            why_not = is_due(destination, settings.every, now)
            if why_not:
                result.status = "skipped"
                log.info("destination %s: %s", settings.name, why_not)
                return result
            sent = destination.send(source)
            result.id, result.files, result.bytes_sent = sent.id, sent.files, sent.bytes_sent
            result.details = sent.details
            result.pruned = prune_destination(job, settings, destination, now,
                                              dry_run=False).removed
            log.info("destination %s (%s): %s stored as %s (%s files, %s bytes sent)",
                     settings.name, destination.where(), source.run_id, sent.id,
                     sent.files, sent.bytes_sent)
    except Interrupted:
        raise
    except MailsnapError as exc:
        result.status, result.error = "failed", str(exc)
        log.error("destination %s: %s", settings.name, exc)
    except OSError as exc:
        result.status, result.error = "failed", f"destination {settings.name}: {exc}"
        log.error("destination %s: %s", settings.name, exc)
    finally:
        destination.close()
        result.seconds = time.monotonic() - started
    return result


def prune_destination(job: Job, settings: Any, destination: Destination,
                      now: datetime, *, dry_run: bool) -> PruneResult:
    """Apply the destination's own ``keep_*`` keys to what it holds. Dry run: decides and
    reports, removes nothing."""
    rules = policy(settings)
    result = PruneResult(f"{job.name}/{settings.name}", rules.describe(), dry_run=dry_run)
    if rules.keeps_everything:
        return result
    stored = destination.backups()
    tz = ZoneInfo(job.retention_timezone) if job.retention_timezone else None
    result.decisions = decide([Candidate(s.id, s.time) for s in stored], rules, now, tz)
    doomed_ids = {d.id for d in result.decisions if not d.keep}
    doomed = [s for s in stored if s.id in doomed_ids]  # oldest first
    for item in doomed:
        log.info("destination %s: %s %s", settings.name,
                 "would remove" if result.dry_run else "removing", item.id)
    if doomed and not result.dry_run:
        destination.remove(doomed)
    result.removed = [s.id for s in doomed]
    return result


def open_destination(job: Job, name: str, runner: Runner) -> tuple[Any, Destination]:
    """The destination called ``name`` of ``job`` (``ConfigError`` naming the ones it has)."""
    settings = job.destination_named(name)
    return settings, make_destination(job, settings, runner)


def find_stored(destination: Destination, wanted: str) -> Any:
    """A backup held by ``destination``: its id, the mailsnap run id it came from, or
    'latest'. ``ConfigError`` when there is none."""
    from mailsnap.errors import ConfigError

    stored = destination.backups()
    if wanted == "latest":
        if stored:
            return stored[-1]
    else:
        for item in stored:
            if wanted in (item.id, item.run_id):
                return item
    raise ConfigError(f"destination {destination.name} ({destination.where()}) has no backup "
                      f"{wanted!r}; `mailsnap list --destination {destination.name}` shows them")
