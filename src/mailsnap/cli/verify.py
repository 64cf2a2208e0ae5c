"""``mailsnap verify``: prove that backups are still intact."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from mailsnap.cli.app import (
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
    select_jobs,
)
from mailsnap.errors import EXIT_FAILED, EXIT_OK, ConfigError


def _verify_destination(jobs: list[Any], name: str, wanted: str, every: bool, deep: bool,
                        as_json: bool) -> int:
    """``verify --destination``: what the destination itself can prove (an SSH store against
    its manifest, a restic repository with restic check)."""
    from mailsnap.destinations.run import find_stored, open_destination
    from mailsnap.runner import Runner
    from mailsnap.session import job_lock

    results: list[dict[str, Any]] = []
    worst = EXIT_OK
    for one in jobs:
        _settings, where = open_destination(one, name, Runner())
        with job_lock(one, "verify", dry_run=False):
            chosen = where.backups() if every else [find_stored(where, wanted)]
            for item in chosen:
                problems = where.verify(item, deep=deep)
                results.append({"job": one.name, "destination": name, "backup": item.id,
                                "run_id": item.run_id, "ok": not problems,
                                "problems": problems, "deep": deep})
                if problems:
                    worst = EXIT_FAILED
                if as_json:
                    continue
                for problem in problems:
                    typer.echo(f"{one.name} {name} {item.id}: {problem}")
                if not problems:
                    typer.echo(f"{one.name} {name} {item.id}: intact ({where.where()}"
                               + (", content checked" if deep else "") + ")")
    if as_json:
        typer.echo(json.dumps({"status": "ok" if worst == EXIT_OK else "failed",
                               "exit_code": worst, "backups": results}, indent=2))
    return worst


@app.command()
def verify(
    backup: Annotated[str, typer.Argument(help="A backup's run id, or 'latest'.")] = "latest",
    config: ConfigOpt = None,
    job: JobOpt = None,
    source: SourceOpt = None,
    target: TargetOpt = None,
    every: Annotated[bool, typer.Option("--all", help="Every published backup.")] = False,
    deep: Annotated[bool, typer.Option(
        "--deep", help="Also hash every file and compare with the manifest's sha256.")] = False,
    destination: DestinationOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check backups against their manifests (every file there, its size, with --deep its
    sha256) and as Maildir stores (cur/ new/ tmp/, empty tmp/, no lock file, mode 0700).
    Exit 0 when all are intact, 1 with one line per problem."""
    from mailsnap.store import BackupStore
    from mailsnap.verify import verify_backup

    def body() -> int:
        jobs = select_jobs(config, job, source, target, None)
        if destination not in (None, "local"):
            return _verify_destination(jobs, destination, backup, every, deep, as_json)
        results: list[dict[str, Any]] = []
        worst = EXIT_OK
        for one in jobs:
            store = BackupStore(one.target / one.name)
            backups = store.backups()
            if every:
                chosen = backups
            elif backup == "latest":
                chosen = backups[-1:]
            else:
                chosen = [b for b in backups if b.run_id == backup]
                if not chosen:
                    raise ConfigError(f"job {one.name!r} has no published backup {backup!r} in "
                                      f"{store.root}; `mailsnap list --job {one.name}` shows them")
            if not chosen:
                typer.echo(f"{one.name}: no backups in {store.root}", err=True)
                worst = EXIT_FAILED
                results.append({"job": one.name, "ok": False, "backups": [],
                                "problems": ["no backups"]})
                continue
            for item in chosen:
                result = verify_backup(item, deep=deep)
                results.append({"job": one.name, **result.as_dict()})
                if not result.ok:
                    worst = EXIT_FAILED
                if as_json:
                    continue
                for problem in result.problems:
                    typer.echo(f"{one.name} {item.run_id}: {problem}")
                if result.ok:
                    what = (f"{result.files} files, {human_size(result.bytes)}"
                            + (f", {result.hashed} hashed" if deep else ""))
                    if not result.manifest:
                        what += "; no manifest (rsync): Maildir structure checked only"
                    typer.echo(f"{one.name} {item.run_id}: intact ({what})")
        if as_json:
            typer.echo(json.dumps({"status": "ok" if worst == EXIT_OK else "failed",
                                   "exit_code": worst, "backups": results}, indent=2))
        return worst

    guarded(debug, as_json, body)
