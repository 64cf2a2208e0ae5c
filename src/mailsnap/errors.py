"""The typed errors mailsnap raises, and the exit code each one maps to.

Every message says what went wrong *and* what to do about it; the CLI prints it on one line.
The exit codes are documented in the README and mapped in exactly one place (``cli.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from mailsnap.procs import Holder

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_TEARDOWN_INCOMPLETE = 4
EXIT_INTERRUPTED = 130


class MailsnapError(Exception):
    """Base class: a failure mailsnap understood and can explain."""

    exit_code = EXIT_FAILED


class ConfigError(MailsnapError):
    """The configuration (file or flags) is invalid; ``lines`` holds one message per bad field."""

    exit_code = EXIT_USAGE

    def __init__(self, lines: Sequence[str] | str) -> None:
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class LockedError(MailsnapError):
    """Another run of the same job holds the run lock."""

    exit_code = EXIT_LOCKED


class ToolMissing(MailsnapError):
    """An external program the job needs is not installed."""


class BackendUnsuitable(MailsnapError):
    """The source is not on a volume this backend can snapshot."""


class SnapshotInvalid(MailsnapError):
    """The snapshot became unusable while it was read (e.g. an LVM snapshot overflowed)."""


class CopyFailed(MailsnapError):
    """The copy from the snapshot into the backup did not complete."""


class TeardownIncomplete(MailsnapError):
    """One or more undo steps failed: something mailsnap created may still exist."""

    exit_code = EXIT_TEARDOWN_INCOMPLETE


class SourceRejected(MailsnapError):
    """The source is not a Maildir or a tree of Maildirs (an empty mount point, a wrong path),
    or it changed under a live copy (unmounted, replaced)."""


class ShrinkRefused(MailsnapError):
    """The new backup holds far fewer messages than the one before; not published."""


class TargetVanished(MailsnapError):
    """The job's store is gone although its last run published a backup into it."""


class TargetFull(MailsnapError):
    """The target file system ran out of space or inodes."""


class VerifyFailed(MailsnapError):
    """The finished copy differs from the snapshot it was made from (``verify = snapshot``)."""


class PruneFailed(MailsnapError):
    """Retention could not remove an old backup (the new one is published)."""


class HookFailed(MailsnapError):
    """A configured hook (``before_snapshot``, ``after_snapshot``, ``on_success``) exited
    non-zero or timed out. The message names the hook and says whether a backup was published
    anyway (a published backup stays published)."""


class ToolOutputError(MailsnapError):
    """An external tool printed something mailsnap could not parse."""


class MountInUse(MailsnapError):
    """A leftover mount is still used by processes that are not this job's; it stays mounted.

    ``holders`` are the processes found (pid, command, marker).
    """

    def __init__(self, mountpoint: Path, holders: Sequence[Holder]) -> None:
        self.mountpoint = mountpoint
        self.holders = list(holders)
        users = ", ".join(h.describe() for h in self.holders)
        super().__init__(
            f"{mountpoint} is still in use by {users}: stop them, then run the job again; "
            "mailsnap never unmounts a snapshot someone is reading"
        )


class Interrupted(MailsnapError):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped the run; teardown still ran.

    An interruption wins over everything that fails after it: the exit code stays 130 and the
    job loop stops, even when a teardown step then failed too (``teardown`` says which).
    """

    exit_code = EXIT_INTERRUPTED

    def __init__(self, signal_name: str, *, teardown: str = "", published: str = "") -> None:
        self.signal_name = signal_name
        self.teardown = teardown
        self.published = published
        message = (f"interrupted by {signal_name}; {published}" if published
                   else f"interrupted by {signal_name}; nothing was published")
        if teardown:
            message += f"; {teardown}"
        super().__init__(message)


class CommandFailed(MailsnapError):
    """An external command exited non-zero, timed out, or could not be started."""

    def __init__(
        self, argv: Sequence[str], exit_code: int | None, stderr: str, *, hint: str = ""
    ) -> None:
        self.argv = list(argv)
        self.exit_code_of_command = exit_code
        self.stderr = stderr
        self.hint = hint
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        status = "timed out" if exit_code is None else f"exited {exit_code}"
        message = f"`{shlex.join(self.argv)}` {status}: {last}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


@contextlib.contextmanager
def parsing(tool: str) -> Iterator[None]:
    """Turn a parse failure of ``tool``'s output into ``ToolOutputError`` (never a traceback)."""
    try:
        yield
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ToolOutputError(
            f"could not read the output of `{tool}` ({type(exc).__name__}: {exc}); is it a "
            "supported version? Run with --debug and report it"
        ) from exc


class DestinationFailed(MailsnapError):
    """A destination (ssh, restic, a second local store) did not get its copy, or could not
    be listed, pruned, verified or read. The job's own backup is published all the same."""
