"""The typer app, the options every command shares, and the one place errors become exit codes:

    0 ok · 1 failed · 2 usage or config error · 3 job already in use (its session lock is held)
    4 teardown incomplete (something may be left mounted, or a snapshot may remain)
    130 interrupted (SIGINT/SIGTERM/SIGHUP; teardown ran, nothing was published)
"""

from __future__ import annotations

from collections.abc import Callable
import errno
import json
import logging
import os
from pathlib import Path
import sys
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from mailsnap import __version__, progress
from mailsnap.constants import BACKEND_NAMES, DEFAULT_CONFIG
from mailsnap.errors import EXIT_FAILED, ConfigError, MailsnapError

if TYPE_CHECKING:
    from mailsnap.config import Job

# Start-up time counts (``--help``, and every cron run): this module and the command modules
# import only typer, the standard library and light mailsnap modules (errors, constants,
# progress) at the top. What a command needs (pydantic and the config models, rich, sh, the
# pipeline, the backends) is imported inside its body, so each command loads its own and
# ``--help`` loads none of it. tests/test_cli_imports.py checks this.

log = logging.getLogger("mailsnap")

app = typer.Typer(
    name="mailsnap",
    help="Consistent backups of a live Dovecot Maildir store from btrfs/LVM/ZFS snapshots, "
    "or with a Maildir-aware live copier where no snapshot is possible.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"Config file (default {DEFAULT_CONFIG})."),
]
JobOpt = Annotated[
    str | None,
    typer.Option("--job", "-j", help="Only this job (with --source: the one-off job's name)."),
]
SourceOpt = Annotated[
    Path | None, typer.Option("--source", help="One-off job: the live mail directory.")
]
TargetOpt = Annotated[
    Path | None, typer.Option("--target", help="One-off job: where backups go.")
]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", help=f"One-off job: {'|'.join(BACKEND_NAMES)} (default auto)."),
]
CopierOpt = Annotated[
    str | None,
    typer.Option("--copier", help="One-off job: maildir|rsync (default maildir; rsync needs a "
                 "snapshot backend)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
DestinationOpt = Annotated[
    str | None,
    typer.Option("--destination", "-d", help="A destination of the job ([[job.destination]] "
                 "name) instead of its own target ('local')."),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Debug logs and tracebacks.")]
DryRunOpt = Annotated[
    bool,
    typer.Option("--dry-run", "-n", help="Print the exact commands; change nothing."),
]


QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Only errors: no log lines, no progress display.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug log lines.")]


def log_level(*, debug: bool = False, verbose: bool = False, quiet: bool = False) -> int:
    """The stderr level the flags ask for; ``--debug`` implies ``--verbose``, and either wins
    over ``--quiet`` (asking for detail is the more deliberate request)."""
    if debug or verbose:
        return logging.DEBUG
    return logging.ERROR if quiet else logging.INFO


def setup_logging(debug: bool, level: int | None = None) -> None:
    """Log lines go to stderr from ``level`` up (INFO by default, DEBUG with ``debug``). The
    loggers stay at INFO or below, so a run's report collects its lines even under --quiet.
    On a terminal they go through rich's handler on the console the progress display draws
    on, so a log line is printed above the progress line instead of tearing it."""
    shown = level if level is not None else (logging.DEBUG if debug else logging.INFO)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if progress.on_terminal():
        from rich.logging import RichHandler

        handler = RichHandler(console=progress.stderr_console(), show_path=False, markup=False,
                              log_time_format="%H:%M:%S")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               "%H:%M:%S"))
    handler.setLevel(shown)
    root.addHandler(handler)
    root.setLevel(min(shown, logging.INFO))
    logging.getLogger("sh").setLevel(logging.WARNING)


def fail(exc: BaseException, *, debug: bool, as_json: bool) -> NoReturn:
    code = exc.exit_code if isinstance(exc, MailsnapError) else EXIT_FAILED
    lines = exc.lines if isinstance(exc, ConfigError) else [str(exc) or type(exc).__name__]
    if debug:
        log.exception("mailsnap failed")
    for line in lines:
        typer.echo(f"mailsnap: error: {line}", err=True)
    if as_json:
        typer.echo(json.dumps({"status": "failed", "exit_code": code, "errors": lines}))
    raise typer.Exit(code)


def guarded(
    debug: bool, as_json: bool, body: Callable[[], int], level: int | None = None
) -> NoReturn:
    """Run a command body; every error leaves through ``_fail`` with its documented code.
    ``level``: what stderr shows (see ``log_level``)."""
    setup_logging(debug, level)
    try:
        code = body()
    except MailsnapError as exc:
        fail(exc, debug=debug, as_json=as_json)
    except OSError as exc:
        if debug:
            log.exception("mailsnap failed")
        fail(MailsnapError(describe_os_error(exc)), debug=False, as_json=as_json)
    raise typer.Exit(code)


def select_jobs(
    config: Path | None,
    job: str | None,
    source: Path | None,
    target: Path | None,
    backend: str | None,
    copier: str | None = None,
) -> list[Job]:
    from mailsnap.config import load_config, one_off_job

    if source is not None or target is not None:
        if source is None or target is None:
            raise ConfigError("--source and --target go together; give both, or use --config")
        if config is not None:
            raise ConfigError("--config and --source/--target exclude each other; pick one")
        return [
            one_off_job(name=one_off_name(job), source=source, target=target,
                        backend=backend or "auto", copier=copier)
        ]
    if backend is not None:
        raise ConfigError("--backend only goes with --source/--target; set backend in the file")
    if copier is not None:
        raise ConfigError("--copier only goes with --source/--target; set copier in the file")
    return load_config(config or DEFAULT_CONFIG).select(job)


def one_off_name(job: str | None) -> str:
    # `--job ''` is a bad name to report, not a reason to fall back to the default.
    return "mail" if job is None else job



def describe_os_error(exc: OSError) -> str:
    """``[Errno 28] No space left on device: '/x'`` → one line that says what to do."""
    where = os.fsdecode(exc.filename) if exc.filename is not None else "a file"
    what = exc.strerror or str(exc)
    hint = {
        errno.ENOSPC: "free space on that file system",
        errno.EDQUOT: "raise the quota or free space",
        errno.EACCES: "run as root or fix the permissions",
        errno.EPERM: "run as root or fix the permissions",
        errno.EROFS: "the file system is read-only; remount it read-write or pick another "
                     "target",
        errno.ENAMETOOLONG: "a path is too long; check that the target is not inside the "
                            "source",
    }.get(exc.errno or 0, "check the path")
    return f"{where}: {what}; {hint}"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mailsnap {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """mailsnap."""


def main() -> None:
    """Console entry point. click already exits 2 on a usage error, as documented."""
    app()
