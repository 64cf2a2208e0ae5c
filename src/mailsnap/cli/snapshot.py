"""``mailsnap snapshot``: a consistent read-only view for an admin's own command."""

from __future__ import annotations

from pathlib import Path
import shlex
from typing import Annotated

import typer

from mailsnap.cli.app import (
    BackendOpt,
    ConfigOpt,
    DebugOpt,
    DryRunOpt,
    JobOpt,
    QuietOpt,
    SourceOpt,
    VerboseOpt,
    app,
    guarded,
    log,
    log_level,
    one_off_name,
    select_jobs,
)
from mailsnap.errors import EXIT_FAILED, EXIT_OK, ConfigError


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def snapshot(
    ctx: typer.Context,
    config: ConfigOpt = None,
    job: JobOpt = None,
    source: SourceOpt = None,
    backend: BackendOpt = None,
    exec_: Annotated[
        str | None,
        typer.Option("--exec", help="Command to run, split like a shell would (no shell runs)."),
    ] = None,
    dry_run: DryRunOpt = False,
    debug: DebugOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Take a consistent read-only snapshot, run a command with its path in $MAILSNAP_SNAPSHOT,
    tear down. The command: --exec 'CMD ARGS' or everything after `--`."""

    def body() -> int:
        from mailsnap.config import one_off_job
        from mailsnap.pipeline import run_with_snapshot
        from mailsnap.runner import Runner

        argv = shlex.split(exec_) if exec_ else list(ctx.args)
        if not argv:
            raise ConfigError("snapshot needs a command: --exec 'CMD' or `-- CMD ARGS…`")
        if exec_ and ctx.args:
            raise ConfigError("give the command once: either --exec or after `--`")
        if source is not None:
            jobs = [one_off_job(name=one_off_name(job), source=source,
                                target=_private_target(), backend=backend or "auto")]
        else:
            jobs = select_jobs(config, job, None, None, backend)
        if len(jobs) != 1:
            raise ConfigError("snapshot takes one job: pass --job NAME")
        code = run_with_snapshot(jobs[0], Runner(dry_run=dry_run), argv)
        if code != 0:
            log.error("`%s` exited %d", shlex.join(argv), code)
            return EXIT_FAILED
        return EXIT_OK

    guarded(debug, False, body, log_level(debug=debug, verbose=verbose, quiet=quiet))


def _private_target() -> Path:
    """A one-off ``snapshot`` has no target; its run lock lives in mailsnap's run directory."""
    from mailsnap.config import default_run_dir

    return default_run_dir() / "snapshot-locks"
