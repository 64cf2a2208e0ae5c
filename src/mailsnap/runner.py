"""The one place mailsnap runs external commands. Nothing else imports ``sh``.

Every command is an argv list (never a shell string) plus a ``mutates`` flag. The runner logs the
command as a line that can be pasted into a shell, times it, and under dry run skips commands that
would change the system while still running read-only discovery (``findmnt``, ``lvs``, ``zfs
list``), so the printed plan is built from real facts.

No child outlives mailsnap. Each one gets a parent-death signal (SIGKILL when mailsnap dies, even
by ``kill -9``), its own process group (so stopping it also stops what it forked), and the run's
marker in its environment (``MAILSNAP_OWNER=mailsnap-<job>-<run id>``), so a later sweep can tell
a process of ours that still holds a leftover mount from someone else's (see ``procs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import ctypes
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
from mailsnap.signals import held

log = logging.getLogger(__name__)

# Discovery answers in milliseconds; anything slower is a hung device or NFS server.
DEFAULT_TIMEOUT = 120.0
# How long a child gets to exit after SIGTERM before it is killed.
KILL_GRACE = 5.0
# The variable that carries the run's marker into every child's environment.
OWNER_ENV = "MAILSNAP_OWNER"

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Looked up once here, not in the forked child: between fork and exec the child must do as little
# as possible, and dlopen or a symbol lookup there could hang on a lock (the dynamic loader's,
# malloc's) that another thread of ours held at the moment of the fork.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = getattr(_libc, "prctl", None)  # Linux only; elsewhere children just lack the guard
if _prctl is not None:
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
    _prctl.restype = ctypes.c_int


@dataclass(frozen=True)
class Result:
    """What a finished command printed. ``skipped`` is true for a mutating command in dry run."""

    argv: tuple[str, ...]
    stdout: str
    stderr: str
    exit_code: int
    duration: float
    skipped: bool = False
    # stdout as the command wrote it: file names from another host are bytes, not UTF-8.
    stdout_bytes: bytes = b""


@dataclass
class Runner:
    """Runs argv lists; ``dry_run`` skips mutating commands. ``history`` records every call.

    ``owner`` is the ``mailsnap-<job>-<run id>`` marker of the run in progress (set with
    ``owned_by``); every child started meanwhile carries it as ``MAILSNAP_OWNER``.
    """

    dry_run: bool = False
    history: list[Result] = field(default_factory=list)
    owner: str | None = None

    @contextlib.contextmanager
    def owned_by(self, owner: str) -> Iterator[None]:
        """Mark every child started inside the block with ``owner``; restore the previous
        marker afterwards. Changes nothing on the system, so dry run is the same."""
        previous = self.owner
        self.owner = owner
        try:
            yield
        finally:
            self.owner = previous

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
        stdin: str | bytes | None = None,
        on_output: Callable[[str], None] | None = None,
    ) -> Result:
        """Run ``argv`` and return its output, or raise ``CommandFailed``.

        Dry run: a mutating command is logged with a ``[dry-run]`` prefix and not run; read-only
        commands run as usual. ``timeout=None`` is only for long copies that have their own
        progress (rsync); anything that can hang on a device (umount, lvremove) gets a timeout.
        ``on_wait`` is called every ``poll_interval`` seconds while the command runs (e.g. to
        watch an LVM snapshot's COW space); if it raises, the command is stopped and the error
        propagates. ``passthrough`` connects the command to our stdin/stdout/stderr instead of
        capturing its output (for a user's own command); ``stdin`` is text fed to the command
        (a mail for ``sendmail -t``). If this process is interrupted while
        the command runs, the child is stopped first (SIGTERM, then SIGKILL, to its whole process
        group) and the interruption propagates, so teardown can start. If mailsnap dies without
        a chance to stop it (``kill -9``), the kernel kills the child. ``on_output`` gets the
        command's stdout as it arrives, in chunks of any size (rsync's progress); the Result
        still holds all of it.
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
            # sh forks in the calling thread, and the kernel sends the parent-death signal when
            # the forking *thread* exits, not the process. mailsnap calls the runner from its
            # main thread; a caller on a short-lived worker thread must wait for its commands
            # before that thread ends (run() always does).
            "_preexec_fn": _die_with_parent(os.getpid()),
            # Its own process group, so _stop reaches what it forks (rsync's receiver, a
            # hook's children). Not for passthrough: a user's command on the terminal must stay
            # in our foreground group, or reading the terminal stops it with SIGTTIN and Ctrl-C
            # no longer reaches it.
            "_new_group": not passthrough,
        }
        if passthrough:
            kwargs.update(_out=sys.stdout, _err=sys.stderr, _in=sys.stdin)
        elif stdin is not None:
            kwargs["_in"] = stdin  # e.g. the message for `sendmail -t`
        streamed: list[str] = []
        if on_output is not None and not passthrough:
            stream = on_output
            failed: list[bool] = []

            # With an _out callback sh keeps no stdout of its own: collect it here. One
            # parameter exactly: sh passes more arguments to a callback that takes more.
            def _chunk(data: str) -> None:
                streamed.append(data)
                if failed:
                    return
                try:
                    stream(data)
                except Exception:
                    # An exception would end sh's reader thread, and the child would block on
                    # a full pipe forever; a broken progress display must not stop a backup.
                    log.exception("on_output of %s failed; no more progress from it", line)
                    failed.append(True)

            kwargs.update(_out=_chunk, _out_bufsize=256)
        if env is not None or self.owner is not None:
            # sh's _env replaces the whole environment: callers that pass one pass it complete,
            # and the marker goes into a copy of ours otherwise.
            child_env = dict(os.environ if env is None else env)
            if self.owner is not None:
                child_env[OWNER_ENV] = self.owner
            kwargs["_env"] = child_env
        start = time.monotonic()
        group = not passthrough
        launched: sh.RunningCommand | None = None
        try:
            with held(f"the start of `{args[0]}`"):
                launched = command(*args[1:], **kwargs)
        except BaseException:
            # Interrupted as the block ended: the child runs; stop it before unwinding.
            if launched is not None:
                _stop(launched, group)
                log.warning("%s  (stopped: mailsnap was interrupted)", line)
            raise
        process: sh.RunningCommand = launched
        # Our own deadline: sh's _timeout polls in 0.1 s steps, which made every short
        # discovery command cost 0.1 s.
        expired = threading.Event()
        deadline = None
        if timeout is not None:
            deadline = threading.Timer(timeout, _expire, (process, expired, group))
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
            _stop(process, group)
            log.warning("%s  (stopped: mailsnap was interrupted)", line)
            raise
        finally:
            if deadline is not None:
                deadline.cancel()
        duration = time.monotonic() - start
        exit_code = int(process.exit_code or 0)
        log.info("%s  (%.2fs)", line, duration)
        stdout = "".join(streamed) if on_output is not None else _text(process.stdout)
        raw = process.stdout if on_output is None and isinstance(process.stdout, bytes) else b""
        result = Result(args, stdout, _text(process.stderr), exit_code, duration,
                        stdout_bytes=raw)
        self.history.append(result)
        return result


def _die_with_parent(parent: int) -> Callable[[], None]:
    """The function sh runs in the forked child before exec: ask the kernel for SIGKILL when
    we die, so a ``kill -9``'d mailsnap leaves no copy running under PID 1 holding its mount."""
    prctl = _prctl
    kill = int(signal.SIGKILL)
    getppid = os.getppid
    exit_now = os._exit

    def preexec() -> None:
        if prctl is not None and prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0) != 0:
            # sh hands the child's exception to the parent, which raises it.
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # If we died between fork and prctl, the signal will never come: the child has
        # already been reparented. Then it must not start at all.
        if getppid() != parent:
            exit_now(1)

    return preexec


def _signal(process: sh.RunningCommand, sig: int, group: bool) -> None:
    """Send ``sig`` to the child, or to its whole process group; a child already gone is fine.
    So is one we may not signal (a set-user-ID program when we are not root): nothing more can
    be done, and the error that made us stop it is the one to report."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            # The group id is the child's pid, recorded at launch: it still reaches the
            # grandchildren after the child itself has exited and been reaped.
            os.killpg(process.process.pgid, sig)
        else:
            process.process.signal(sig)


def _group_alive(process: sh.RunningCommand) -> bool:
    """Whether a member of the child's process group still runs. Zombies do not count: where
    PID 1 does not reap orphans (some containers), an exited grandchild stays one forever."""
    pgid = process.process.pgid
    try:
        os.killpg(pgid, 0)  # the cheap answer when the group is empty
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # members we may not signal; the scan below still sees them
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            # state and pgrp follow the command name, which may itself contain ") ".
            state, _ppid, pgrp = stat[stat.rindex(b")") + 2:].split(maxsplit=3)[:3]
        except (OSError, ValueError):
            continue  # it exited while we looked
        if int(pgrp) == pgid and state not in (b"Z", b"X"):
            return True
    return False


def _expire(process: sh.RunningCommand, expired: threading.Event, group: bool) -> None:
    """The deadline passed: kill the command and what it forked (its wait then raises)."""
    expired.set()
    _signal(process, signal.SIGKILL, group)


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


def _stop(process: sh.RunningCommand, group: bool) -> None:
    """Stop a child we are abandoning: SIGTERM, a grace period, then SIGKILL. With ``group``,
    every signal goes to its process group, so its own children stop too."""
    try:
        if not group and not process.is_alive():
            return
        _signal(process, signal.SIGTERM, group)
        deadline = time.monotonic() + KILL_GRACE
        # is_alive() also reaps the child, so its pid stops counting as a group member.
        while time.monotonic() < deadline and (
            process.is_alive() or (group and _group_alive(process))
        ):
            time.sleep(0.05)
        if process.is_alive() or (group and _group_alive(process)):
            _signal(process, signal.SIGKILL, group)
        process.wait()
    except sh.ErrorReturnCode:
        pass  # it exited because we signalled it; the error that made us stop it is what matters
    except ChildProcessError:
        # A signal handled between sh's waitpid and its storing the exit code: the child is
        # reaped already, and ECHILD must not replace the interruption that brought us here.
        pass
