"""Applying a job's retention policy to its backup store.

The decisions come from ``retention.decide`` (pure, table-tested); this module adds what only
the store knows: the backup ``latest`` points to is never removed, nor the newest one; a
backup is removed atomically (``BackupStore.remove``: a subvolume in one step, a hard-link tree
renamed to ``<id>.deleting`` first, so a crash mid-delete never leaves a half-deleted backup
looking published), and leftovers of an interrupted prune are finished first. It runs under the
store lock, so never beside a backup of the same job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
import logging
import time
from typing import Any
from zoneinfo import ZoneInfo

from mailsnap.config import Job
from mailsnap.retention import Candidate, Decision, RetentionPolicy, decide
from mailsnap.store import BackupStore

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    job: str
    policy: str
    decisions: list[Decision] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # .deleting leftovers completed
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def kept(self) -> list[str]:
        return [d.id for d in self.decisions if d.keep]

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job, "policy": self.policy, "dry_run": self.dry_run,
            "kept": self.kept, "removed": self.removed, "finished": self.finished,
            "seconds": round(self.seconds, 3),
            "decisions": [d.as_dict() for d in self.decisions],
        }


def backup_time(run_id: str) -> datetime:
    """A run id is the backup's UTC start time (``20261128T020000Z``, ``….1`` for a second run
    in the same second)."""
    return datetime.strptime(run_id.split(".", 1)[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def policy_of(job: Job) -> RetentionPolicy:
    return RetentionPolicy(
        keep_last=job.keep_last, keep_hourly=job.keep_hourly, keep_daily=job.keep_daily,
        keep_weekly=job.keep_weekly, keep_monthly=job.keep_monthly,
        keep_yearly=job.keep_yearly, keep_within=job.keep_within,
    )


def prune_store(store: BackupStore, job: Job, now: datetime) -> PruneResult:
    """Apply ``job``'s policy to ``store`` (whose lock the caller holds). Dry run: decides and
    reports, removes nothing."""
    started = time.monotonic()
    policy = policy_of(job)
    result = PruneResult(job.name, policy.describe(), dry_run=store.dry_run)
    result.finished = store.finish_deletions()
    backups = store.backups()
    tz = ZoneInfo(job.retention_timezone) if job.retention_timezone else None
    result.decisions = decide([Candidate(b.run_id, backup_time(b.run_id)) for b in backups],
                              policy, now, tz)
    latest = store.latest_target()
    for decision in result.decisions:
        if decision.id == latest and not decision.keep:
            decision.keep = True
            decision.reasons = ["latest points to it"]
    for decision in reversed(result.decisions):  # oldest first
        if decision.keep:
            continue
        log.info("%s %s (%s)", "would remove" if store.dry_run else "removing", decision.id,
                 ", ".join(decision.reasons))
        store.remove(decision.id)
        result.removed.append(decision.id)
    result.seconds = time.monotonic() - started
    log.info("retention (%s): %d kept, %d %s", result.policy, len(result.kept),
             len(result.removed), "to remove" if store.dry_run else "removed")
    return result
