"""``mailsnap prune``: apply each job's retention policy now, and say what is kept and why."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

from mailsnap.cli.app import (
    ConfigOpt,
    DebugOpt,
    DestinationOpt,
    DryRunOpt,
    JobOpt,
    JsonOpt,
    SourceOpt,
    TargetOpt,
    app,
    guarded,
    select_jobs,
)
from mailsnap.errors import EXIT_OK, Interrupted, MailsnapError

if TYPE_CHECKING:
    from mailsnap.config import Job
    from mailsnap.prune import PruneResult


def _show(result: PruneResult, label: str, dry_run: bool) -> None:
    typer.echo(f"{label}: {result.policy}")
    for name in result.finished:
        typer.echo(f"{label}: finished removing {name} (an interrupted prune)")
    verb = "would remove" if dry_run else "removed"
    for decision in result.decisions:
        what = "keep  " if decision.keep else f"{verb}"
        typer.echo(f"{label}: {what} {decision.id}  ({', '.join(decision.reasons)})")


def _prune_destination(job: Job, name: str, dry_run: bool) -> PruneResult:
    """``prune --destination``: the destination's own keep_* keys, under the job's lock (a
    backup of the job may be sending to it)."""
    from mailsnap.destinations.run import open_destination, prune_destination
    from mailsnap.pipeline import utc_now
    from mailsnap.runner import Runner
    from mailsnap.session import job_lock

    settings, where = open_destination(job, name, Runner(dry_run=dry_run))
    with job_lock(job, "prune", dry_run=dry_run):
        return prune_destination(job, settings, where, utc_now(), dry_run=dry_run)


@app.command()
def prune(
    config: ConfigOpt = None,
    job: JobOpt = None,
    source: SourceOpt = None,
    target: TargetOpt = None,
    destination: DestinationOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Remove the backups each job's keep_* rules no longer keep (every backup does this after
    it publishes). Never the newest backup or the one `latest` points to; exits 3 while the
    job runs. --dry-run says what it would remove and why."""
    from mailsnap.pipeline import utc_now
    from mailsnap.prune import prune_store
    from mailsnap.signals import signals_unwind
    from mailsnap.store import BackupStore

    def body() -> int:
        jobs = select_jobs(config, job, source, target, None)
        results: list[dict[str, Any]] = []
        worst = EXIT_OK
        for one in jobs:
            store = BackupStore(one.target / one.name, dry_run=dry_run)
            try:
                if destination not in (None, "local"):
                    with signals_unwind():
                        result = _prune_destination(one, destination, dry_run)
                    results.append({"status": "ok", "destination": destination,
                                    **result.as_dict()})
                    if not as_json:
                        _show(result, f"{one.name} {destination}", dry_run)
                    continue
                if not store.root.is_dir():
                    results.append({"job": one.name, "status": "ok", "dry_run": dry_run,
                                    "kept": [], "removed": [], "decisions": []})
                    if not as_json:
                        typer.echo(f"{one.name}: no backups in {store.root}")
                    continue
                with signals_unwind(), store.locked():
                    result = prune_store(store, one, utc_now())
            except MailsnapError as exc:
                typer.echo(f"mailsnap: error: {one.name}: {exc}", err=True)
                results.append({"job": one.name, "status": "failed", "error": str(exc),
                                "exit_code": exc.exit_code})
                worst = max(worst, exc.exit_code)
                if isinstance(exc, Interrupted):
                    break
                continue
            results.append({"status": "ok", **result.as_dict()})
            if not as_json:
                _show(result, one.name, dry_run)
        if as_json:
            status = "ok" if worst == EXIT_OK else "failed"
            typer.echo(json.dumps({"status": status, "exit_code": worst, "jobs": results},
                                  indent=2))
        return worst

    guarded(debug, as_json, body)
