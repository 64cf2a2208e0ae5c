"""The typed errors mailsnap raises, and the exit code each one maps to.

Every message says what went wrong *and* what to do about it; the CLI prints it on one line.
The exit codes are documented in the README and mapped in exactly one place (``cli.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
import shlex

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


class Interrupted(MailsnapError):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped the run; teardown still ran."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, signal_name: str) -> None:
        self.signal_name = signal_name
        super().__init__(f"interrupted by {signal_name}; nothing was published")


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
