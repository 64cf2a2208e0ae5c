"""``mailsnap backup``: every job (or one), each failure contained in its own report entry."""

from __future__ import annotations

from collections.abc import Sequence
import json
from typing import TYPE_CHECKING, Annotated

import typer

from mailsnap import progress
from mailsnap.cli.app import (
    BackendOpt,
    ConfigOpt,
    CopierOpt,
    DebugOpt,
    DryRunOpt,
    JobOpt,
    JsonOpt,
    QuietOpt,
    SourceOpt,
    TargetOpt,
    VerboseOpt,
    app,
    describe_os_error,
    guarded,
    human_size,
    log,
    log_level,
    select_jobs,
)
from mailsnap.errors import EXIT_OK, MailsnapError

if TYPE_CHECKING:  # the run's own modules are imported when it runs (see cli/app.py)
    from mailsnap.config import Job
    from mailsnap.report import RunReport
    from mailsnap.runner import Runner


@app.command()
def backup(
    config: ConfigOpt = None,
    job: JobOpt = None,
    source: SourceOpt = None,
    target: TargetOpt = None,
    backend: BackendOpt = None,
    copier: CopierOpt = None,
    allow_shrink: Annotated[
        bool,
        typer.Option("--allow-shrink",
                     help="Publish even if the backup holds fewer than min_keep_percent of the "
                     "previous backup's messages (after a real mass deletion)."),
    ] = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Snapshot, mount read-only, copy into TARGET/<job>/<UTC time>/, publish, tear down.
    On a terminal a progress line shows the stage, files, bytes and rate (not with --quiet;
    never under cron or systemd)."""

    def body() -> int:
        jobs = select_jobs(config, job, source, target, backend, copier)
        # Jobs that share a metrics file with the selected ones (see metrics.py).
        one_off = source is not None or target is not None
        everyone = jobs if job is None or one_off else select_jobs(config, None, None, None,
                                                                   None)

        from mailsnap.runner import Runner
        from mailsnap.signals import signals_unwind

        runner = Runner(dry_run=dry_run)
        reports: list[RunReport] = []
        worst = EXIT_OK
        # One job's failure is that job's; the others still run. An interrupt stops them all.
        with signals_unwind(), progress.showing(not quiet) as display:
            for one in jobs:
                display.job(one.name)
                report = _run_one(one, runner, everyone, allow_shrink=allow_shrink, debug=debug)
                reports.append(report)
                worst = max(worst, report.exit_code)
                if report.status == "interrupted":
                    break
        if as_json:
            status = "ok" if worst == EXIT_OK else "failed"
            typer.echo(json.dumps({"status": status, "exit_code": worst,
                                   "jobs": [r.as_dict() for r in reports]}, indent=2))
        elif not quiet:  # a failure was logged as an error already
            _print_reports(reports)
        return worst

    guarded(debug, as_json, body, log_level(debug=debug, verbose=verbose, quiet=quiet))


def _run_one(job: Job, runner: Runner, everyone: Sequence[Job], *, allow_shrink: bool,
             debug: bool) -> RunReport:
    """One backup of ``job``, recorded: ping its healthcheck's start, run it, then, however it
    ended, keep its report in the state directory, rewrite its metrics file, ping success or
    failure and send its alerts. None of those four can fail the backup or change its exit
    code; each logs a warning instead. Dry run: no report, metrics, ping or alert."""
    from mailsnap.alerts import ping_end, ping_start, send_alerts
    from mailsnap.metrics import update_metrics
    from mailsnap.pipeline import run_backup, utc_now
    from mailsnap.recorder import recording
    from mailsnap.report import failed, save_report, succeeded

    started = utc_now()
    with recording() as recorder:
        if not runner.dry_run:
            ping_start(job)
        try:
            backup = run_backup(job, runner, allow_shrink=allow_shrink)
            report = succeeded(backup, recorder, started, utc_now())
        except Exception as exc:
            error = _job_error(job.name, exc, debug=debug)
            log.error("job %s failed: %s", job.name, error)
            report = failed(job.name, error, recorder, started, utc_now(),
                            dry_run=runner.dry_run)
    if runner.dry_run:
        return report
    try:
        save_report(job, report)
    except OSError as exc:
        log.warning("run report not kept in %s: %s; `mailsnap status` still reads the "
                    "backups themselves", job.state_path, describe_os_error(exc))
    update_metrics(job, everyone)
    tail = list(recorder.tail)
    ping_end(job, report, tail)
    send_alerts(job, report, tail, runner)
    return report


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


def _print_reports(reports: list[RunReport]) -> None:
    from rich.console import Console

    console = Console()
    for r in reports:
        if r.error is not None:
            console.print(f"[red]✗[/] {r.job}: {r.error}", highlight=False, soft_wrap=True)
        elif r.dry_run:
            where = ("counted on the live source; the snapshot was not taken" if r.estimated
                     else "counted on the source")
            console.print(f"[yellow]dry run[/] {r.job}: would copy {r.files} files "
                          f"({human_size(r.bytes or 0)}, {r.messages} messages; {where}) with "
                          f"{r.backend}; nothing was changed",
                          highlight=False, soft_wrap=True)
        else:
            kind = "snapshot" if r.point_in_time else "live copy (not point-in-time)"
            console.print(f"[green]✓[/] {r.job}: {r.backup}  {r.files} files, "
                          f"{human_size(r.bytes or 0)}, {r.linked} unchanged (hard-linked), "
                          f"{kind} via {r.backend}, {r.seconds:.1f}s",
                          highlight=False, soft_wrap=True)
        for d in r.destinations:
            if d["status"] == "failed":
                mark, what = "[red]✗[/]", "failed (see above)"
            elif d["status"] == "skipped":
                mark, what = "[yellow]-[/]", "not due (every)"
            elif d["status"] == "dry-run":
                mark, what = "[yellow]-[/]", "dry run: nothing sent"
            else:
                sent = human_size(d["bytes_sent"]) if d["bytes_sent"] is not None else "?"
                mark, what = "[green]✓[/]", f"{d['id']}, {d['files']} files, {sent} sent"
            console.print(f"  {mark} {d['name']} ({d['type']} {d['where']}, from {d['from']}): "
                          f"{what}, {d['seconds']:.1f}s", highlight=False, soft_wrap=True)
