"""Which backups to keep: a pure function of the backups, the policy and the time.

The rules mean what they mean in restic (``restic forget``), and nearly what they mean in borg:
- ``keep_last N``: the N newest backups.
- ``keep_hourly/daily/weekly/monthly/yearly N``: for each of the N newest hours (days, ISO
  weeks, months, years) that hold a backup, the newest backup in it. Periods are calendar
  periods in the policy's time zone, so a DST change makes one hour hold two hours of backups
  (or none), as in restic and borg.
- ``keep_within D``: every backup less than D older than the *newest* backup (restic's
  meaning; borg measures from now). A job that stopped backing up keeps its last D of history
  instead of losing it all as the clock moves on.
Each rule picks independently; a backup is kept when any rule picks it, and its reasons say
which. The newest backup is always kept. A policy with no rule keeps everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo

PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: timedelta | None = None

    @property
    def keeps_everything(self) -> bool:
        return all(value is None for value in vars(self).values())

    def describe(self) -> str:
        if self.keeps_everything:
            return "keeps every backup (no keep_* keys)"
        parts = [f"{name}={value}" for name, value in vars(self).items() if value is not None]
        return ", ".join(parts)


@dataclass(frozen=True)
class Candidate:
    """A published backup as retention sees it: its id and its time (UTC, aware)."""

    id: str
    time: datetime


@dataclass
class Decision:
    id: str
    time: datetime
    keep: bool = False
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "time": self.time.isoformat(), "keep": self.keep,
                "reasons": list(self.reasons)}


def decide(backups: Sequence[Candidate], policy: RetentionPolicy, now: datetime,
           tz: tzinfo | None = None) -> list[Decision]:
    """Keep or remove, with reasons, for each backup; newest first. ``tz`` is the zone the
    calendar periods are counted in (None: the host's local zone). ``now`` only matters to
    say how old things are; no rule removes a backup because the clock moved."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    ordered = sorted(backups, key=lambda b: (b.time, b.id), reverse=True)
    decisions = [Decision(b.id, b.time) for b in ordered]
    if not decisions:
        return []
    if policy.keeps_everything:
        for decision in decisions:
            decision.keep = True
            decision.reasons.append("no retention policy")
        return decisions
    decisions[0].keep = True
    decisions[0].reasons.append("newest")
    if policy.keep_last:
        for decision in decisions[: policy.keep_last]:
            _keep(decision, f"last {policy.keep_last}")
    for period, bucket_of in PERIODS.items():
        count = getattr(policy, f"keep_{period}")
        if not count:
            continue
        seen: set[tuple[int, ...]] = set()
        for decision in decisions:  # newest first: the first in each period is its newest
            bucket = bucket_of(decision.time.astimezone(tz))
            if bucket in seen:
                continue
            seen.add(bucket)
            _keep(decision, f"{period} {len(seen)}/{count}")
            if len(seen) == count:
                break
    if policy.keep_within is not None:
        newest = decisions[0].time
        for decision in decisions:
            if newest - decision.time < policy.keep_within:
                _keep(decision, f"within {_age(policy.keep_within)} of the newest")
    for decision in decisions:
        if not decision.keep:
            decision.reasons.append("matched no keep rule")
    return decisions


def _keep(decision: Decision, reason: str) -> None:
    decision.keep = True
    decision.reasons.append(reason)


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
