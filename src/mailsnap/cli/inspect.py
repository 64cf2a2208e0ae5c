"""``mailsnap list`` and ``mailsnap check``: read-only looks at backups, config and system."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
from typing import TYPE_CHECKING, Any

import typer

from mailsnap.cli.app import (
    BackendOpt,
    ConfigOpt,
    DebugOpt,
    JobOpt,
    JsonOpt,
    SourceOpt,
    TargetOpt,
    app,
    guarded,
    human_size,
    log,
    select_jobs,
)
from mailsnap.constants import DEFAULT_CONFIG
from mailsnap.errors import EXIT_FAILED, EXIT_OK, ConfigError, MailsnapError

if TYPE_CHECKING:  # imported when the command runs (see cli/app.py)
    from mailsnap.config import Job
    from mailsnap.runner import Runner


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
        from rich.console import Console
        from rich.table import Table

        from mailsnap.config import load_config
        from mailsnap.store import BackupStore

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
                          human_size(int(r["bytes"] or 0)))
        Console().print(table if rows else "no backups yet")
        return EXIT_OK

    guarded(debug, as_json, body)


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
        from rich.console import Console
        from rich.table import Table

        from mailsnap.runner import Runner

        jobs = select_jobs(config, job, source, target, backend)
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

    guarded(debug, as_json, body)


def _check_job(job: Job, runner: Runner) -> list[dict[str, Any]]:
    from mailsnap.backends import make_backend
    from mailsnap.sources import MAX_DEPTH, find_first_maildir

    rows: list[dict[str, Any]] = []

    def add(check: str, ok: bool, detail: str) -> None:
        rows.append({"job": job.name, "check": check, "ok": ok, "detail": detail})

    add("config", True, f"backend = {job.backend}")
    from mailsnap.prune import policy_of

    policy = policy_of(job)
    add("retention", True, policy.describe() + (
        ": the target grows every night; set keep_daily, keep_weekly … to prune"
        if policy.keeps_everything else ""))
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
