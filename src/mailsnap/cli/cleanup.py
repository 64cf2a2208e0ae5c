"""``mailsnap cleanup``: remove what killed runs of a job left, and say what."""

from __future__ import annotations

import json
from typing import Any

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
    guarded,
    select_jobs,
)
from mailsnap.errors import EXIT_OK, Interrupted, MailsnapError


@app.command()
def cleanup(
    config: ConfigOpt = None,
    job: JobOpt = None,
    source: SourceOpt = None,
    target: TargetOpt = None,
    backend: BackendOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Remove the snapshots, mounts and partial backups that killed runs left; exits 3 while
    the job runs. Every run does this when it starts; this does it now."""

    def body() -> int:
        from mailsnap.cleanup import run_cleanup
        from mailsnap.runner import Runner

        jobs = select_jobs(config, job, source, target, backend)
        runner = Runner(dry_run=dry_run)
        results: list[dict[str, Any]] = []
        worst = EXIT_OK
        for one in jobs:
            try:
                removed = run_cleanup(one, runner)
            except MailsnapError as exc:
                typer.echo(f"mailsnap: error: {one.name}: {exc}", err=True)
                results.append({"job": one.name, "status": "failed", "error": str(exc),
                                "exit_code": exc.exit_code})
                worst = max(worst, exc.exit_code)
                if isinstance(exc, Interrupted):
                    break
                continue
            results.append({"job": one.name, "status": "ok", "dry_run": dry_run,
                            "removed": removed})
            if not as_json:
                verb = "would remove" if dry_run else "removed"
                for line in removed:
                    typer.echo(f"{one.name}: {verb} {line}")
                if not removed:
                    typer.echo(f"{one.name}: nothing to clean up")
        if as_json:
            status = "ok" if worst == EXIT_OK else "failed"
            typer.echo(json.dumps({"status": status, "exit_code": worst, "jobs": results},
                                  indent=2))
        return worst

    guarded(debug, as_json, body)
