"""Hooks: the admin's own commands around a job, configured per job as argv lists.

    before_snapshot  right before the snapshot is taken   fails → no snapshot; the run fails
    after_snapshot   right after it is taken (or failed)  fails → the run fails
    on_success       after the backup was published       fails → the run fails; the backup stays
    on_failure       after a failed or interrupted run    fails → logged; the run's error is kept

``after_snapshot`` always runs once ``before_snapshot`` succeeded (or when only
``after_snapshot`` is configured): also when taking the snapshot failed and when a signal
interrupted it, because it is usually the undo of ``before_snapshot`` (``fsfreeze -u`` after
``fsfreeze -f``, resuming something that was paused).

A live copy has no snapshot instant, so ``before_snapshot``/``after_snapshot`` do not run for
it: running them around the whole copy instead would hold whatever they freeze or pause for
the copy's full duration, minutes to hours of mail delivery.

Every hook runs through the runner (never a shell: no quoting, nothing interpreted), so it gets
the parent-death signal, its own process group, the run's ``MAILSNAP_OWNER`` marker and a
timeout (``hook_timeout``), and dry run prints it instead of running it. Its environment is
mailsnap's plus ``MAILSNAP_JOB``, ``MAILSNAP_RUN_ID``, ``MAILSNAP_SOURCE``, ``MAILSNAP_TARGET``,
``MAILSNAP_STATUS`` (running, ok, failed, interrupted), ``MAILSNAP_BACKUP`` (on success) and
``MAILSNAP_ERROR`` (on failure).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass
import logging
import os
import shlex
from typing import Literal

from mailsnap.backends.base import snapshot_name
from mailsnap.config import Job
from mailsnap.errors import CommandFailed, HookFailed, Interrupted, MailsnapError
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

HookName = Literal["before_snapshot", "after_snapshot", "on_success", "on_failure"]


@dataclass
class Hooks:
    """The hooks of one job's run. ``run_id`` is set once the run has one (a run that fails
    before that, e.g. on a wrong source, gives its ``on_failure`` hook an empty
    ``MAILSNAP_RUN_ID``)."""

    job: Job
    runner: Runner
    run_id: str | None = None

    def run(self, which: HookName, *, status: str, backup: str | None = None,
            error: str | None = None) -> None:
        """Run hook ``which`` if configured; raise ``HookFailed`` if it exits non-zero, times
        out or cannot be started. Dry run: prints the command, runs nothing."""
        argv = getattr(self.job, which)
        if argv is None:
            return
        env = dict(os.environ)
        env.update(
            MAILSNAP_JOB=self.job.name,
            MAILSNAP_RUN_ID=self.run_id or "",
            MAILSNAP_SOURCE=str(self.job.source),
            MAILSNAP_TARGET=str(self.job.target),
            MAILSNAP_STATUS=status,
        )
        if backup is not None:
            env["MAILSNAP_BACKUP"] = backup
        if error is not None:
            env["MAILSNAP_ERROR"] = error
        log.info("hook %s: %s", which, shlex.join(argv))
        owner: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self.run_id is not None and self.runner.owner is None:
            # on_success/on_failure run after the session released its marker; a hook left
            # running is still this run's, for the next sweep to recognise.
            owner = self.runner.owned_by(snapshot_name(self.job.name, self.run_id))
        try:
            with owner:
                result = self.runner.run(argv, mutates=True, timeout=self.job.hook_timeout,
                                         env=env)
        except CommandFailed as exc:
            code = exc.exit_code_of_command
            what = (f"timed out after {self.job.hook_timeout:g}s (hook_timeout)" if code is None
                    else f"exited {code}")
            last = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else ""
            raise HookFailed(
                f"{which} hook `{shlex.join(argv)}` {what}" + (f": {last}" if last else "")
            ) from None
        except Interrupted:
            raise
        except MailsnapError as exc:  # not installed, not executable
            raise HookFailed(f"{which} hook could not run: {exc}") from None
        for line in (result.stdout + result.stderr).splitlines():
            log.info("hook %s: | %s", which, line)

    @contextlib.contextmanager
    def around_snapshot(self) -> Iterator[None]:
        """``before_snapshot`` on entry, ``after_snapshot`` on exit, however the block (taking
        the snapshot) ends. If the block failed and ``after_snapshot`` fails too, the block's
        error is the one raised and the hook's is logged. Dry run: both are printed."""
        self.run("before_snapshot", status="running")
        try:
            yield
        except BaseException:
            try:
                self.run("after_snapshot", status="running")
            except MailsnapError as exc:
                log.error("%s (the run had already failed; that error follows)", exc)
            raise
        self.run("after_snapshot", status="running")

    def succeeded(self, backup: str | None) -> None:
        """``on_success`` after a finished run (``backup`` None for a dry run). A failing hook
        fails the run, but what was published stays published, and the message says so."""
        try:
            self.run("on_success", status="ok" if backup else "dry-run", backup=backup)
        except HookFailed as exc:
            if backup is None:
                raise
            raise HookFailed(f"{exc}; the backup {backup} was published and stays "
                             "published") from None

    def failed(self, error: BaseException) -> None:
        """``on_failure`` after a failed or interrupted run. Never raises: a failing hook is
        logged as an error and the run's own error stays the one reported."""
        status = "interrupted" if isinstance(error, Interrupted | KeyboardInterrupt) else "failed"
        try:
            self.run("on_failure", status=status, error=str(error) or type(error).__name__)
        except MailsnapError as exc:
            log.error("%s (the run's own error is kept: %s)", exc, error)
