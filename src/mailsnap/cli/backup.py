"""``mailsnap backup``: every job (or one), each failure contained in its own report entry."""

from __future__ import annotations

import json
from typing import Annotated, Any

from rich.console import Console
import typer

from mailsnap.cli.app import (
    BackendOpt,
    ConfigOpt,
    DebugOpt,
    DryRunOpt,
    JobOpt,
    JsonOpt,
    SourceOpt,
    TargetOpt,
    app,
    describe_os_error,
    guarded,
    human_size,
    log,
    select_jobs,
)
from mailsnap.errors import EXIT_OK, Interrupted, MailsnapError
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from mailsnap.signals import signals_unwind


@app.command()
def backup(
    config: ConfigOpt = None,
    job: JobOpt = None,
    source: SourceOpt = None,
    target: TargetOpt = None,
    backend: BackendOpt = None,
    allow_shrink: Annotated[
        bool,
        typer.Option("--allow-shrink",
                     help="Publish even if the backup holds fewer than min_keep_percent of the "
                     "previous backup's messages (after a real mass deletion)."),
    ] = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Snapshot, mount read-only, copy into TARGET/<job>/<UTC time>/, publish, tear down."""

    def body() -> int:
        jobs = select_jobs(config, job, source, target, backend)
        runner = Runner(dry_run=dry_run)
        reports: list[dict[str, Any]] = []
        worst = EXIT_OK
        # One job's failure is that job's; the others still run. An interrupt stops them all.
        with signals_unwind():
            for one in jobs:
                try:
                    report = run_backup(one, runner, allow_shrink=allow_shrink)
                    reports.append(report.as_dict())
                    continue
                except Exception as exc:
                    error = _job_error(one.name, exc, debug=debug)
                log.error("job %s failed: %s", one.name, error)
                reports.append({"job": one.name, "status": "failed", "error": str(error),
                                "exit_code": error.exit_code})
                worst = max(worst, error.exit_code)
                if isinstance(error, Interrupted):
                    break
        if as_json:
            status = "ok" if worst == EXIT_OK else "failed"
            typer.echo(json.dumps({"status": status, "exit_code": worst, "jobs": reports},
                                  indent=2))
        else:
            _print_reports(reports)
        return worst

    guarded(debug, as_json, body)

def _job_error(name: str, exc: Exception, *, debug: bool) -> MailsnapError:
    """Any failure of one job as a ``MailsnapError`` with a one-line message."""
    if isinstance(exc, MailsnapError):
        return exc
    if debug:
        log.exception("job %s failed", name)
    if isinstance(exc, OSError):
        return MailsnapError(describe_os_error(exc))
    return MailsnapError(
        f"internal error ({type(exc).__name__}: {exc}); run with --debug for the traceback "
        "and report it"
    )


def _print_reports(reports: list[dict[str, Any]]) -> None:
    console = Console()
    for r in reports:
        if r["status"] == "failed":
            console.print(f"[red]✗[/] {r['job']}: {r['error']}", highlight=False, soft_wrap=True)
        elif r["dry_run"]:
            where = ("counted on the live source; the snapshot was not taken" if r["estimated"]
                     else "counted on the source")
            console.print(f"[yellow]dry run[/] {r['job']}: would copy {r['files']} files "
                          f"({human_size(r['bytes'])}, {r['messages']} messages; {where}) with "
                          f"{r['backend']}; nothing was changed",
                          highlight=False, soft_wrap=True)
        else:
            kind = "snapshot" if r["point_in_time"] else "live copy (not point-in-time)"
            console.print(f"[green]✓[/] {r['job']}: {r['backup']}  {r['files']} files, "
                          f"{human_size(r['bytes'])}, {r['linked']} unchanged (hard-linked), "
                          f"{kind} via {r['backend']}, {r['seconds']:.1f}s",
                          highlight=False, soft_wrap=True)
