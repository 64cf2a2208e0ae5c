"""The one place mailsnap runs external commands. Nothing else imports ``sh``.

Every command is an argv list (never a shell string) plus a ``mutates`` flag. The runner logs the
command as a line that can be pasted into a shell, times it, and under dry run skips commands that
would change the system while still running read-only discovery (``findmnt``, ``lvs``, ``zfs
list``), so the printed plan is built from real facts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import contextlib
from dataclasses import dataclass, field
import logging
import os
import shlex
import signal
import sys
import threading
import time
from typing import Any

import sh

from mailsnap.errors import CommandFailed, ToolMissing

log = logging.getLogger(__name__)

# Discovery answers in milliseconds; anything slower is a hung device or NFS server.
DEFAULT_TIMEOUT = 120.0
# How long a child gets to exit after SIGTERM before it is killed.
KILL_GRACE = 5.0


@dataclass(frozen=True)
class Result:
    """What a finished command printed. ``skipped`` is true for a mutating command in dry run."""

    argv: tuple[str, ...]
    stdout: str
    stderr: str
    exit_code: int
    duration: float
    skipped: bool = False


@dataclass
class Runner:
    """Runs argv lists; ``dry_run`` skips mutating commands. ``history`` records every call."""

    dry_run: bool = False
    history: list[Result] = field(default_factory=list)

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        mutates: bool,
        timeout: float | None = DEFAULT_TIMEOUT,
        ok_codes: Sequence[int] = (0,),
        env: Mapping[str, str] | None = None,
        hint: str = "",
        on_wait: Callable[[], None] | None = None,
        poll_interval: float = 5.0,
        passthrough: bool = False,
    ) -> Result:
        """Run ``argv`` and return its output, or raise ``CommandFailed``.

        Dry run: a mutating command is logged with a ``[dry-run]`` prefix and not run; read-only
        commands run as usual. ``timeout=None`` is only for long copies that have their own
        progress (rsync); anything that can hang on a device (umount, lvremove) gets a timeout.
        ``on_wait`` is called every ``poll_interval`` seconds while the command runs (e.g. to
        watch an LVM snapshot's COW space); if it raises, the command is stopped and the error
        propagates. ``passthrough`` connects the command to our stdin/stdout/stderr instead of
        capturing its output (for a user's own command). If this process is interrupted while
        the command runs, the child is stopped first (SIGTERM, then SIGKILL) and the
        interruption propagates, so teardown can start.
        """
        args = tuple(os.fspath(a) for a in argv)
        line = shlex.join(args)
        if mutates and self.dry_run:
            log.info("[dry-run] %s", line)
            result = Result(args, "", "", 0, 0.0, skipped=True)
            self.history.append(result)
            return result
        try:
            command = sh.Command(args[0])
        except sh.CommandNotFound:
            raise ToolMissing(
                f"`{args[0]}` is not installed or not on PATH: install it (see `mailsnap check`)"
            ) from None
        kwargs: dict[str, Any] = {
            "_bg": True,
            "_bg_exc": False,
            "_tty_out": False,
            "_ok_code": list(ok_codes),
            "_decode_errors": "replace",
        }
        if passthrough:
            kwargs.update(_out=sys.stdout, _err=sys.stderr, _in=sys.stdin)
        if env is not None:
            # sh's _env replaces the whole environment; callers pass a complete one.
            kwargs["_env"] = dict(env)
        start = time.monotonic()
        process: sh.RunningCommand = command(*args[1:], **kwargs)
        # Our own deadline: sh's _timeout polls in 0.1 s steps, which made every short
        # discovery command cost 0.1 s.
        expired = threading.Event()
        deadline = None
        if timeout is not None:
            deadline = threading.Timer(timeout, _expire, (process, expired))
            deadline.daemon = True
            deadline.start()
        try:
            _wait(process, on_wait, poll_interval)
        except sh.ErrorReturnCode as exc:
            duration = time.monotonic() - start
            if expired.is_set():
                log.error("%s  (timed out after %ss)", line, timeout)
                raise CommandFailed(args, None, f"no answer after {timeout}s",
                                    hint=hint) from None
            log.error("%s  (exit %d, %.2fs)", line, exc.exit_code, duration)
            raise CommandFailed(args, exc.exit_code, _text(exc.stderr), hint=hint) from None
        except BaseException:
            _stop(process)
            log.warning("%s  (stopped: mailsnap was interrupted)", line)
            raise
        finally:
            if deadline is not None:
                deadline.cancel()
        duration = time.monotonic() - start
        exit_code = int(process.exit_code or 0)
        log.info("%s  (%.2fs)", line, duration)
        result = Result(args, _text(process.stdout), _text(process.stderr), exit_code, duration)
        self.history.append(result)
        return result


def _expire(process: sh.RunningCommand, expired: threading.Event) -> None:
    """The deadline passed: kill the command (its wait then raises)."""
    expired.set()
    with contextlib.suppress(ProcessLookupError):
        process.process.signal(signal.SIGKILL)


def _wait(
    process: sh.RunningCommand, on_wait: Callable[[], None] | None, poll_interval: float
) -> None:
    """Wait for ``process``, calling ``on_wait`` between polls."""
    if on_wait is not None:
        while True:
            try:
                process.wait(timeout=poll_interval)
                break
            except sh.TimeoutException:
                if not process.is_alive():
                    break  # it ended just after the poll gave up
                on_wait()
    # A blocking wait also joins sh's output threads; a wait(timeout=...) alone does not, and
    # stdout could still be incomplete.
    process.wait()
    process.process.wait()


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


def _stop(process: sh.RunningCommand) -> None:
    """Stop a child we are abandoning: SIGTERM, a grace period, then SIGKILL."""
    try:
        if not process.is_alive():
            return
        process.process.signal(signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        while process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.is_alive():
            process.process.kill()
        process.wait()
    except (sh.ErrorReturnCode, ProcessLookupError):
        pass  # it exited because we signalled it; the error that made us stop it is what matters
