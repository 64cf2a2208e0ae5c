"""``mailsnap status``: is every job's newest backup recent, and did its last run succeed?

Built to be a Nagios/Icinga (or any exit-code based) check as it is: one line per job on stdout,
``MAILSNAP OK - …`` or ``MAILSNAP WARNING - …`` with the backup's age as performance data, and

    0  every job is fine
    1  a job needs attention: no backup yet, the newest is older than its ``max_age``, or its
       last run failed or was interrupted (after the newest backup)
    2  usage or config error

It reads the store (``TARGET/<job>/``) for the newest backup and the job's state directory for
its last run report; it changes nothing and takes no lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
import json
from typing import TYPE_CHECKING, Any

import typer

from mailsnap.cli.app import (
    ConfigOpt,
    DebugOpt,
    JobOpt,
    JsonOpt,
    SourceOpt,
    TargetOpt,
    app,
    guarded,
    select_jobs,
)
from mailsnap.errors import EXIT_FAILED, EXIT_OK

if TYPE_CHECKING:  # imported when the command runs (see cli/app.py)
    from mailsnap.config import Job
    from mailsnap.report import RunReport


@dataclass(frozen=True)
class JobStatus:
    """What ``status`` found for one job; ``problems`` empty means OK."""

    job: str
    checked: datetime
    max_age: timedelta
    newest_backup: str | None
    newest_finished: datetime | None
    age: timedelta | None
    last_run: RunReport | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "state": "ok" if self.ok else "warning",
            "problems": list(self.problems),
            "max_age_seconds": self.max_age.total_seconds(),
            "newest_backup": self.newest_backup,
            "newest_backup_finished": (self.newest_finished.isoformat()
                                       if self.newest_finished else None),
            "age_seconds": round(self.age.total_seconds()) if self.age is not None else None,
            "last_run": self.last_run.as_dict() if self.last_run else None,
        }

    def line(self) -> str:
        """The Nagios-style line: state, summary, ``| perfdata``."""
        word = "OK" if self.ok else "WARNING"
        parts = []
        if self.age is not None:
            parts = [f"newest backup {self.newest_backup} is {ago(self.age)} old "
                     f"(max_age {ago(self.max_age)})"]
        if self.last_run is not None:
            when = ago(self.checked - self.last_run.finished)
            # With problems, the error is already among them: say it once.
            error = self.last_run.error if self.last_run.error and not self.problems else None
            parts.append(f"last run {self.last_run.status} {when} ago"
                         + (f": {error}" if error else ""))
        else:
            parts.append("no run report")
        summary = "; ".join(self.problems) if self.problems else ", ".join(parts)
        if self.problems:
            summary += " (" + ", ".join(parts) + ")"
        perf = ""
        if self.age is not None:
            perf = (f" | age={round(self.age.total_seconds())}s;"
                    f"{round(self.max_age.total_seconds())}")
        return f"MAILSNAP {word} - {self.job}: {summary}{perf}"


def assess(job: Job, now: datetime) -> JobStatus:
    """The status of ``job`` at ``now``. Read-only."""
    from mailsnap.report import last_report, newest_backup_time

    newest = newest_backup_time(job)
    last = last_report(job)
    problems = []
    age = now - newest[1] if newest else None
    if newest is None:
        problems.append("no backup yet")
    elif age is not None and age > job.max_age:
        problems.append(f"newest backup is {ago(age)} old, older than max_age {ago(job.max_age)}")
    # A failure that a later backup made good is history, not a problem.
    if last is not None and last.status in ("failed", "interrupted") and (
            newest is None or last.finished > newest[1]):
        problems.append(f"last run {last.status}: {last.error}")
    problems += _destination_problems(job, now)
    return JobStatus(job.name, now, job.max_age, newest[0] if newest else None,
                     newest[1] if newest else None, age, last, tuple(problems))


def _destination_problems(job: Job, now: datetime) -> list[str]:
    """A destination whose newest copy (as the run reports recorded it) is older than
    ``max_age`` plus its ``every``. Reads the state directory only: no network."""
    if not job.destination:
        return []
    from mailsnap.metrics import destination_facts
    from mailsnap.report import load_reports

    seen = destination_facts(load_reports(job))
    problems = []
    for settings in job.destination:
        stamp = seen.get(settings.name, {}).get(
            "mailsnap_destination_last_success_timestamp_seconds")
        allowed = job.max_age + (settings.every or timedelta(0))
        if stamp is None:
            problems.append(f"destination {settings.name}: no copy stored in the recorded runs")
            continue
        age = now - datetime.fromtimestamp(stamp, UTC)
        if age > allowed:
            problems.append(f"destination {settings.name}: newest copy is {ago(age)} old, "
                            f"older than {ago(allowed)}")
    return problems


def ago(delta: timedelta) -> str:
    """``timedelta(hours=27, minutes=5)`` → ``27h5m``, ``timedelta(days=4, hours=1)`` →
    ``4d1h``: days from three days on (max_age is usually given in hours), seconds below a
    minute."""
    seconds = max(int(delta.total_seconds()), 0)
    days, rest = divmod(seconds, 86400) if seconds >= 3 * 86400 else (0, seconds)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m" if minutes else f"{secs}s"


@app.command()
def status(
    config: ConfigOpt = None,
    job: JobOpt = None,
    source: SourceOpt = None,
    target: TargetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Each job's newest backup and last run; exit 1 when one is too old, missing or failed
    (usable as a Nagios/Icinga check)."""

    def body() -> int:
        # --source/--target: the one-off job a cron line like `backup --source … --target …`
        # runs (same name rule, default state directory), so it can be checked too.
        from mailsnap.pipeline import utc_now

        jobs = select_jobs(config, job, source, target, None)
        now = utc_now()
        found = [assess(one, now) for one in jobs]
        code = EXIT_OK if all(s.ok for s in found) else EXIT_FAILED
        if as_json:
            typer.echo(json.dumps({"status": "ok" if code == EXIT_OK else "warning",
                                   "exit_code": code,
                                   "jobs": [s.as_dict() for s in found]}, indent=2))
        else:
            for one in found:
                typer.echo(one.line())
        return code

    guarded(debug, as_json, body)
