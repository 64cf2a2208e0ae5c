"""The ``mailsnap`` command line. The one place errors become exit codes:

    0 ok · 1 failed · 2 usage or config error · 3 job already running
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
import shlex
import shutil
import sys
from typing import Annotated, Any, NoReturn

from rich.console import Console
from rich.table import Table
import typer

from mailsnap import __version__
from mailsnap.backends import make_backend
from mailsnap.config import (
    BACKEND_NAMES,
    DEFAULT_CONFIG,
    Job,
    default_run_dir,
    load_config,
    one_off_job,
)
from mailsnap.errors import (
    EXIT_FAILED,
    EXIT_OK,
    ConfigError,
    Interrupted,
    MailsnapError,
)
from mailsnap.pipeline import run_backup, run_with_snapshot
from mailsnap.runner import Runner
from mailsnap.signals import signals_unwind
from mailsnap.sources import MAX_DEPTH, find_first_maildir
from mailsnap.store import BackupStore

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
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Debug logs and tracebacks.")]
DryRunOpt = Annotated[
    bool,
    typer.Option("--dry-run", "-n", help="Print the exact commands; change nothing."),
]


def _setup_logging(debug: bool) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("sh").setLevel(logging.WARNING)


def _fail(exc: BaseException, *, debug: bool, as_json: bool) -> NoReturn:
    code = exc.exit_code if isinstance(exc, MailsnapError) else EXIT_FAILED
    lines = exc.lines if isinstance(exc, ConfigError) else [str(exc) or type(exc).__name__]
    if debug:
        log.exception("mailsnap failed")
    for line in lines:
        typer.echo(f"mailsnap: error: {line}", err=True)
    if as_json:
        typer.echo(json.dumps({"status": "failed", "exit_code": code, "errors": lines}))
    raise typer.Exit(code)


def _guarded(debug: bool, as_json: bool, body: Callable[[], int]) -> NoReturn:
    """Run a command body; every error leaves through ``_fail`` with its documented code."""
    _setup_logging(debug)
    try:
        code = body()
    except MailsnapError as exc:
        _fail(exc, debug=debug, as_json=as_json)
    except OSError as exc:
        if debug:
            log.exception("mailsnap failed")
        _fail(MailsnapError(describe_os_error(exc)), debug=False, as_json=as_json)
    raise typer.Exit(code)


def _select_jobs(
    config: Path | None,
    job: str | None,
    source: Path | None,
    target: Path | None,
    backend: str | None,
) -> list[Job]:
    if source is not None or target is not None:
        if source is None or target is None:
            raise ConfigError("--source and --target go together; give both, or use --config")
        if config is not None:
            raise ConfigError("--config and --source/--target exclude each other; pick one")
        return [
            one_off_job(name=_one_off_name(job), source=source, target=target,
                        backend=backend or "auto")
        ]
    if backend is not None:
        raise ConfigError("--backend only goes with --source/--target; set backend in the file")
    return load_config(config or DEFAULT_CONFIG).select(job)


def _one_off_name(job: str | None) -> str:
    # `--job ''` is a bad name to report, not a reason to fall back to the default.
    return "mail" if job is None else job


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
        jobs = _select_jobs(config, job, source, target, backend)
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

    _guarded(debug, as_json, body)


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


def _print_reports(reports: list[dict[str, Any]]) -> None:
    console = Console()
    for r in reports:
        if r["status"] == "failed":
            console.print(f"[red]✗[/] {r['job']}: {r['error']}", highlight=False, soft_wrap=True)
        elif r["dry_run"]:
            where = ("counted on the live source; the snapshot was not taken" if r["estimated"]
                     else "counted on the source")
            console.print(f"[yellow]dry run[/] {r['job']}: would copy {r['files']} files "
                          f"({_size(r['bytes'])}, {r['messages']} messages; {where}) with "
                          f"{r['backend']}; nothing was changed",
                          highlight=False, soft_wrap=True)
        else:
            kind = "snapshot" if r["point_in_time"] else "live copy (not point-in-time)"
            console.print(f"[green]✓[/] {r['job']}: {r['backup']}  {r['files']} files, "
                          f"{_size(r['bytes'])}, {r['linked']} unchanged (hard-linked), "
                          f"{kind} via {r['backend']}, {r['seconds']:.1f}s",
                          highlight=False, soft_wrap=True)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@app.command("list")
def list_backups(
    config: ConfigOpt = None,
    job: JobOpt = None,
    target: TargetOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List published backups (from the config's jobs, or every job under --target)."""

    def body() -> int:
        stores: list[tuple[str, BackupStore]] = []
        if target is not None:
            root = target.expanduser().absolute()
            if not root.is_dir():
                raise ConfigError(f"--target {root}: no such directory")
            names = sorted(p.name for p in root.iterdir() if p.is_dir())
            stores = [(n, BackupStore(root / n)) for n in names if job in (None, n)]
        else:
            for one in load_config(config or DEFAULT_CONFIG).select(job):
                stores.append((one.name, BackupStore(one.target / one.name)))
        rows = []
        for name, store in stores:
            for b in store.backups():
                m = b.manifest
                rows.append({"job": name, "backup": str(b.path), "run_id": b.run_id,
                             "backend": m.get("backend"), "point_in_time": m.get("point_in_time"),
                             "files": m.get("files"), "bytes": m.get("bytes"),
                             "started": m.get("started"), "finished": m.get("finished")})
        if as_json:
            typer.echo(json.dumps({"status": "ok", "backups": rows}, indent=2))
            return EXIT_OK
        table = Table("job", "backup", "backend", "kind", "files", "size")
        for r in rows:
            kind = "snapshot" if r["point_in_time"] else "live copy"
            table.add_row(r["job"], r["run_id"], str(r["backend"]), kind, str(r["files"]),
                          _size(int(r["bytes"] or 0)))
        Console().print(table if rows else "no backups yet")
        return EXIT_OK

    _guarded(debug, as_json, body)


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
) -> None:
    """Take a consistent read-only snapshot, run a command with its path in $MAILSNAP_SNAPSHOT,
    tear down. The command: --exec 'CMD ARGS' or everything after `--`."""

    def body() -> int:
        argv = shlex.split(exec_) if exec_ else list(ctx.args)
        if not argv:
            raise ConfigError("snapshot needs a command: --exec 'CMD' or `-- CMD ARGS…`")
        if exec_ and ctx.args:
            raise ConfigError("give the command once: either --exec or after `--`")
        if source is not None:
            jobs = [one_off_job(name=_one_off_name(job), source=source,
                                target=_private_target(), backend=backend or "auto")]
        else:
            jobs = _select_jobs(config, job, None, None, backend)
        if len(jobs) != 1:
            raise ConfigError("snapshot takes one job: pass --job NAME")
        code = run_with_snapshot(jobs[0], Runner(dry_run=dry_run), argv)
        if code != 0:
            log.error("`%s` exited %d", shlex.join(argv), code)
            return EXIT_FAILED
        return EXIT_OK

    _guarded(debug, False, body)


def _private_target() -> Path:
    """A one-off ``snapshot`` has no target; its run lock lives in mailsnap's run directory."""
    return default_run_dir() / "snapshot-locks"


@app.command()
def check(
    config: ConfigOpt = None,
    job: JobOpt = None,
    source: SourceOpt = None,
    target: TargetOpt = None,
    backend: BackendOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check config, tools, privileges, source and target without changing anything."""

    def body() -> int:
        jobs = _select_jobs(config, job, source, target, backend)
        runner = Runner(dry_run=True)
        rows = [row for one in jobs for row in _check_job(one, runner)]
        failed = any(not r["ok"] for r in rows)
        if as_json:
            typer.echo(json.dumps({"status": "failed" if failed else "ok", "checks": rows},
                                  indent=2))
        else:
            table = Table("job", "check", "", "detail")
            for r in rows:
                table.add_row(r["job"], r["check"], "[green]ok[/]" if r["ok"] else "[red]FAIL[/]",
                              r["detail"])
            Console().print(table)
        return EXIT_FAILED if failed else EXIT_OK

    _guarded(debug, as_json, body)


def _check_job(job: Job, runner: Runner) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(check: str, ok: bool, detail: str) -> None:
        rows.append({"job": job.name, "check": check, "ok": ok, "detail": detail})

    add("config", True, f"backend = {job.backend}")
    src = job.source
    if not src.is_dir():
        add("source", False, f"{src}: not a directory")
        return rows
    readable = os.access(src, os.R_OK | os.X_OK)
    add("source", readable, f"{src}" + ("" if readable else ": not readable"))
    first = find_first_maildir(src)
    add("maildir", first is not None, f"found a Maildir at {first}" if first is not None
        else f"no Maildir (cur/ and new/) at the top or up to {MAX_DEPTH} levels down; is the "
        "volume mounted and source right?")
    tgt = job.target
    existing = tgt if tgt.exists() else next((p for p in tgt.parents if p.exists()), Path("/"))
    writable = os.access(existing, os.W_OK | os.X_OK)
    add("target", writable, f"{tgt}" + ("" if writable else f": {existing} is not writable"))
    try:
        backend = make_backend(job, runner)
        volume = backend.discover(src)
        add("backend", True, f"{backend.name}: {volume.device or 'live tree'}")
    except MailsnapError as exc:
        add("backend", False, str(exc))
        return rows
    tools = list(backend.tools) + (["rsync"] if backend.point_in_time else [])
    missing = [t for t in tools if shutil.which(t) is None]
    add("tools", not missing, "missing: " + ", ".join(missing) if missing else ", ".join(tools)
        or "none needed")
    if backend.point_in_time:
        fsync = _dovecot_mail_fsync(runner)
        if fsync is not None:
            add("dovecot", fsync != "never",
                f"mail_fsync = {fsync}" + ("" if fsync != "never" else
                "; a snapshot can hold delivered messages whose data never reached the disk "
                "(seen as empty files); set mail_fsync = optimized"))
    root_ok = not backend.needs_root or os.geteuid() == 0
    add("privileges", root_ok, "root" if os.geteuid() == 0 else
        ("not root: fine for live" if root_ok else f"{backend.name} needs root"))
    return rows


def _dovecot_mail_fsync(runner: Runner) -> str | None:
    """Dovecot's mail_fsync setting, or None where Dovecot is not installed here."""
    if shutil.which("doveconf") is None:
        return None
    try:
        return runner.run(["doveconf", "-h", "mail_fsync"], mutates=False).stdout.strip()
    except MailsnapError as exc:
        log.warning("could not read Dovecot's mail_fsync: %s", exc)
        return None


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
