"""``mailsnap list`` and ``mailsnap check``: read-only looks at backups, config and system."""

from __future__ import annotations

from collections.abc import Callable
import json
import os
from pathlib import Path
import shutil
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mailsnap.cli.app import (
    BackendOpt,
    ConfigOpt,
    DebugOpt,
    DestinationOpt,
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


UserOpt = Annotated[str | None, typer.Option(
    "--user", help="Only this user's mail (alice@example.org), found by the job's `users`.")]


def _list_destination(config: Path | None, job: str | None, name: str, as_json: bool) -> int:
    from rich.console import Console
    from rich.table import Table

    from mailsnap.config import load_config
    from mailsnap.destinations.run import open_destination
    from mailsnap.runner import Runner

    rows: list[dict[str, Any]] = []
    for one in load_config(config or DEFAULT_CONFIG).select(job):
        _settings, where = open_destination(one, name, Runner())
        for item in where.backups():
            rows.append({"job": one.name, "destination": name, "where": where.where(),
                         "id": item.id, "time": item.time.isoformat(), "run_id": item.run_id})
    if as_json:
        typer.echo(json.dumps({"status": "ok", "backups": rows}, indent=2))
        return EXIT_OK
    table = Table("job", "destination", "id", "time", "run id")
    for r in rows:
        table.add_row(r["job"], r["destination"], r["id"], r["time"], str(r["run_id"]))
    Console().print(table if rows else "no backups there yet")
    return EXIT_OK


@app.command("list")
def list_backups(
    config: ConfigOpt = None,
    job: JobOpt = None,
    target: TargetOpt = None,
    user: UserOpt = None,
    destination: DestinationOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List published backups (from the config's jobs, or every job under --target). With
    --user, how much of that user's mail each backup holds. --json adds per-user totals for
    jobs with a `users` layout. --destination NAME lists what that destination holds."""

    def body() -> int:
        if destination not in (None, "local"):
            return _list_destination(config, job, destination, as_json)
        from rich.console import Console
        from rich.table import Table

        from mailsnap.browse import per_folder, per_user
        from mailsnap.config import load_config
        from mailsnap.store import BackupStore

        stores: list[tuple[str, BackupStore, str | None]] = []
        if target is not None:
            if user is not None:
                raise ConfigError("--user needs the job's `users` layout: use --config")
            root = target.expanduser().absolute()
            if not root.is_dir():
                raise ConfigError(f"--target {root}: no such directory")
            names = sorted(p.name for p in root.iterdir() if p.is_dir())
            stores = [(n, BackupStore(root / n), None) for n in names if job in (None, n)]
        else:
            for one in load_config(config or DEFAULT_CONFIG).select(job):
                stores.append((one.name, BackupStore(one.target / one.name), one.users))
        rows: list[dict[str, Any]] = []
        for name, store, layout in stores:
            for b in store.backups():
                m = b.manifest
                row: dict[str, Any] = {
                    "job": name, "backup": str(b.path), "run_id": b.run_id,
                    "backend": m.get("backend"), "point_in_time": m.get("point_in_time"),
                    "files": m.get("files"), "bytes": m.get("bytes"),
                    "messages": m.get("messages"),
                    "started": m.get("started"), "finished": m.get("finished")}
                if user is not None:
                    folders = per_folder(b, layout, user)
                    row["user"] = user
                    row["user_messages"] = sum(t.messages for t in folders.values())
                    row["user_bytes"] = sum(t.bytes for t in folders.values())
                elif as_json and layout is not None:
                    row["users"] = {u: t.as_dict() for u, t in per_user(b, layout).items()}
                rows.append(row)
        if as_json:
            typer.echo(json.dumps({"status": "ok", "backups": rows}, indent=2))
            return EXIT_OK
        if user is not None:
            table = Table("job", "backup", "kind", f"messages of {user}", "size")
            for r in rows:
                kind = "snapshot" if r["point_in_time"] else "live copy"
                table.add_row(r["job"], r["run_id"], kind, str(r["user_messages"]),
                              human_size(int(r["user_bytes"])))
        else:
            table = Table("job", "backup", "backend", "kind", "files", "size")
            for r in rows:
                kind = "snapshot" if r["point_in_time"] else "live copy"
                table.add_row(r["job"], r["run_id"], str(r["backend"]), kind, str(r["files"]),
                              human_size(int(r["bytes"] or 0)))
        Console().print(table if rows else "no backups yet")
        return EXIT_OK

    guarded(debug, as_json, body)


@app.command()
def show(
    backup: Annotated[str, typer.Argument(help="A backup's run id, or 'latest'.")],
    user: Annotated[str, typer.Option("--user", help="Whose mail (alice@example.org).")],
    config: ConfigOpt = None,
    job: JobOpt = None,
    folder: Annotated[str | None, typer.Option("--folder", help="Only this folder.")] = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per folder of one user in one backup: messages, size, oldest and newest date; to pick
    what to restore."""

    def body() -> int:
        from rich.console import Console
        from rich.table import Table

        from mailsnap.browse import exists, per_folder
        from mailsnap.store import BackupStore

        jobs = select_jobs(config, job, None, None, None)
        if len(jobs) != 1:
            raise ConfigError("show works on one job: give --job NAME")
        one = jobs[0]
        backups = BackupStore(one.target / one.name).backups()
        chosen = backups[-1:] if backup == "latest" else [
            b for b in backups if b.run_id == backup]
        if not chosen:
            raise ConfigError(f"job {one.name!r} has no published backup {backup!r}; "
                              f"`mailsnap list --job {one.name}` shows them")
        if not exists(chosen[0].content, one.users, user):
            raise ConfigError(f"--user {user!r}: not in backup {chosen[0].run_id}")
        folders = per_folder(chosen[0], one.users, user, folder)
        if as_json:
            typer.echo(json.dumps({"status": "ok", "job": one.name, "backup": chosen[0].run_id,
                                   "user": user, "folders": {
                                       f: t.as_dict() for f, t in folders.items()}}, indent=2))
            return EXIT_OK
        table = Table("folder", "messages", "size", "oldest", "newest")
        for name, totals in folders.items():
            info = totals.as_dict()
            table.add_row(name, str(totals.messages), human_size(totals.bytes),
                          str(info["oldest"] or "")[:10], str(info["newest"] or "")[:10])
        Console().print(table if folders else f"no mail of {user} in {chosen[0].run_id}")
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
    from mailsnap.report import check_store_present
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
    _check_destinations(job, add)
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
    try:
        check_store_present(job)
    except MailsnapError as exc:
        add("target", False, str(exc))
    else:
        add("target", writable, f"{tgt}" + ("" if writable else f": {existing} is not writable"))
    try:
        backend = make_backend(job, runner)
        volume = backend.discover(src)
        add("backend", True, f"{backend.name}: {volume.device or 'live tree'}")
    except MailsnapError as exc:
        add("backend", False, str(exc))
        return rows
    add("backups", True, _store_kind(job, runner, existing, backend.point_in_time))
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


def _store_kind(job: Job, runner: Runner, target: Path, point_in_time: bool) -> str:
    """How this job's backups are kept, in words (``target_snapshots``, ``full_check_every``)."""
    from mailsnap.mounts import find_mount

    try:
        fstype = find_mount(runner, target).fstype
    except MailsnapError:
        fstype = ""
    if job.copier != "maildir":
        return "hard-link trees (copier rsync: every folder listed every night)"
    seconds = int(job.full_check_every.total_seconds())
    every = next((f"{seconds // n}{unit}" for n, unit in ((86400, "d"), (3600, "h"), (60, "m"))
                  if seconds % n == 0), f"{seconds}s")
    folders = (f"unchanged folders taken over unlisted, all listed every {every}"
               if seconds else "every folder listed")
    snapshots = fstype in ("btrfs", "zfs")
    if snapshots and job.target_snapshots == "auto" and point_in_time:
        if fstype == "zfs":
            return (f"ZFS snapshots of the dataset mailsnap-{job.name}: the night's changes "
                    f"applied to it, then `zfs snapshot`, pruned by `zfs destroy`; {folders}")
        return (f"btrfs subvolumes: each backup a snapshot of the previous one with the "
                f"night's changes, pruned by `btrfs subvolume delete`; {folders}")
    why = ("target_snapshots = never" if snapshots and job.target_snapshots == "never" else
           "a live copy" if snapshots else "the target is not on btrfs or ZFS")
    return f"hard-link trees ({why}); {folders}"


def _check_destinations(job: Job, add: Callable[[str, bool, str], None]) -> None:
    """Each destination: its tools, and whether it answers (listing is read-only)."""
    from mailsnap.destinations.base import policy
    from mailsnap.destinations.run import destinations_of
    from mailsnap.runner import Runner

    tools = {"ssh": ["ssh", "rsync"], "restic": ["restic"], "local": []}
    for settings, where in destinations_of(job, Runner(dry_run=True)):
        check = f"destination {settings.name}"
        missing = [t for t in tools[settings.type] if shutil.which(t) is None]
        if missing:
            add(check, False, f"{settings.type}: missing {', '.join(missing)}")
            continue
        try:
            held = where.backups()
        except MailsnapError as exc:
            add(check, False, str(exc))
            continue
        rules = policy(settings)
        add(check, True, f"{settings.type} {where.where()}: {len(held)} backups, from "
            f"{settings.read_from}, retention: {rules.describe()}")


def _dovecot_mail_fsync(runner: Runner) -> str | None:
    """Dovecot's mail_fsync setting, or None where Dovecot is not installed here."""
    if shutil.which("doveconf") is None:
        return None
    try:
        return runner.run(["doveconf", "-h", "mail_fsync"], mutates=False).stdout.strip()
    except MailsnapError as exc:
        log.warning("could not read Dovecot's mail_fsync: %s", exc)
        return None
