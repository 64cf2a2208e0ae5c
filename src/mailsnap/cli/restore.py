"""``mailsnap restore``: a user's mail back from a backup, into the live store or a path."""

from __future__ import annotations

from datetime import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mailsnap.cli.app import (
    ConfigOpt,
    DebugOpt,
    DestinationOpt,
    DryRunOpt,
    JobOpt,
    JsonOpt,
    app,
    guarded,
    human_size,
    select_jobs,
)
from mailsnap.errors import EXIT_OK, ConfigError

if TYPE_CHECKING:
    from mailsnap.config import Job
    from mailsnap.restore import RestoreResult, Selection


def _date(value: str | None, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: give a date like 2026-11-28 or "
                          "2026-11-28T14:00") from None
    return parsed if parsed.tzinfo else parsed.astimezone()


def _from_destination(job: Job, name: str, wanted: str, user: str, into: str,
                      selection: Selection, as_folder: str | None,
                      dry_run: bool) -> RestoreResult:
    """Restore from a destination: fetch the user's part of the backup into a private
    staging directory (rsync over SSH, restic restore), then the same Maildir-aware restore
    as from the job's own store. The job's lock is held, so no prune removes it meanwhile."""
    from mailsnap.destinations.base import staging
    from mailsnap.destinations.run import find_stored, open_destination
    from mailsnap.restore import restore_user, user_path
    from mailsnap.runner import Runner
    from mailsnap.session import job_lock

    _settings, where = open_destination(job, name, Runner())
    with job_lock(job, "restore", dry_run=False), staging(job.work_dir) as scratch:
        stored = find_stored(where, wanted)
        content = where.fetch(stored, user_path(job.users, user), scratch)
        return restore_user(
            job_name=job.name, backup_content=content, backup_id=f"{name}:{stored.id}",
            layout=job.users, user=user, into=into, live_root=job.source,
            selection=selection, as_folder=as_folder, dry_run=dry_run)


@app.command()
def restore(
    user: Annotated[str, typer.Option("--user", help="The user whose mail comes back "
                                      "(alice@example.org), found by the job's `users`.")],
    into: Annotated[str, typer.Option("--into", help="'live': into the user's Maildir while "
                                      "Dovecot runs; or a directory for a new Maildir++ tree.")],
    config: ConfigOpt = None,
    job: JobOpt = None,
    backup: Annotated[str, typer.Option("--backup", help="Run id, or 'latest'.")] = "latest",
    folder: Annotated[list[str] | None, typer.Option(
        "--folder", help="Only this folder (IMAP name: INBOX, Sent, Lists/debian); repeat "
        "for more.")] = None,
    message_id: Annotated[list[str] | None, typer.Option(
        "--message-id", help="Only the message with this Message-ID; repeat for more.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only mail received on or "
                                              "after this date.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Only mail received before "
                                              "this date.")] = None,
    as_folder: Annotated[str | None, typer.Option(
        "--as-folder", help="Put everything under this new folder (e.g. Restored-2026-11-28), "
        "so the user sees what came back.")] = None,
    destination: DestinationOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Put a user's messages back: by the Maildir delivery protocol into the live store
    (tmp/, fsync, link into cur/ with the original flags), skipping every message whose base
    name or Message-ID the folder already has, so running it twice restores nothing twice.
    Never touches dovecot-uidlist, dovecot-keywords or index files."""
    from mailsnap.restore import Selection, restore_user
    from mailsnap.signals import signals_unwind
    from mailsnap.store import BackupStore

    def body() -> int:
        jobs = select_jobs(config, job, None, None, None)
        if len(jobs) != 1:
            raise ConfigError("restore works on one job: give --job NAME")
        one = jobs[0]
        selection = Selection(tuple(folder or ()), tuple(message_id or ()),
                              _date(since, "--since"), _date(until, "--until"))
        into_path = "live" if into == "live" else str(Path(into).expanduser().absolute())
        if destination not in (None, "local"):
            with signals_unwind():
                result = _from_destination(one, destination, backup, user, into_path,
                                           selection, as_folder, dry_run)
        else:
            store = BackupStore(one.target / one.name, dry_run=dry_run)
            backups = store.backups()
            chosen = backups[-1:] if backup == "latest" else [
                b for b in backups if b.run_id == backup]
            if not chosen:
                raise ConfigError(f"job {one.name!r} has no published backup {backup!r} in "
                                  f"{store.root}; `mailsnap list --job {one.name}` shows them")
            # The store lock: no prune removes the backup while it is read.
            with signals_unwind(), store.locked():
                result = restore_user(
                    job_name=one.name, backup_content=chosen[0].content,
                    backup_id=chosen[0].run_id, layout=one.users, user=user, into=into_path,
                    live_root=one.source, selection=selection, as_folder=as_folder,
                    dry_run=dry_run)
        if as_json:
            typer.echo(json.dumps({"status": "ok", **result.as_dict()}, indent=2))
            return EXIT_OK
        verb = "would restore" if dry_run else "restored"
        for f in result.folders:
            into_text = f" into {f.into}" if f.into != f.folder else ""
            made = " (folder created)" if f.created else ""
            typer.echo(f"{f.folder}{into_text}: {verb} {f.restored} "
                       f"({human_size(f.bytes)}), {f.skipped} already there{made}")
        typer.echo(f"{user} from {result.backup}: {verb} {result.restored} messages, "
                   f"{result.skipped} already there")
        return EXIT_OK

    guarded(debug, as_json, body)
