"""What a person at a terminal sees while a backup runs: the job and stage, and during a copy
the files and bytes so far, the rate and (when an earlier backup gives the size to expect) the
time left. Under cron or systemd there is no terminal and nothing of it is drawn: the log lines
are the whole output.

The CLI decides (``showing``) and the code below it reports through ``current()``, a no-op
unless a display is showing: ``session.stage`` names each stage, the copier reports its counts.
Log lines and the display share one rich ``Console`` on stderr (``stderr_console``), so a log
line is printed above the progress line instead of tearing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
from contextvars import ContextVar
import sys
from typing import TYPE_CHECKING

# rich is imported where a terminal display is made, not here: a run under cron or systemd
# (no terminal) never loads it.
if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

_console: Console | None = None


def stderr_console() -> Console:
    """The one rich console on stderr that both log lines and the display write to."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True)
    return _console


def on_terminal() -> bool:
    """Whether a person may be watching: stderr is a terminal (never under cron/systemd)."""
    return sys.stderr.isatty()


class Display:
    """Where progress goes when nobody watches: nowhere."""

    def job(self, name: str) -> None:
        """A job starts."""

    def stage(self, name: str) -> None:
        """A stage of the current job starts."""

    def expect(self, files: int, size: int) -> None:
        """About this much will be copied (from the previous backup): enables the time left."""

    def copied(self, files: int, size: int) -> None:
        """The copy so far: ``files`` files, ``size`` bytes."""

    def reporter(self) -> Callable[[int, int], None] | None:
        """What a copier should call with its counts, or None when nobody watches (then
        rsync is not even asked for its progress output)."""
        return None


class TerminalDisplay(Display):
    """One rich progress line per job while it runs: ``mail: copy (maildir) ━━━ 70% 1,234
    files 56.7/80.1 MB 12 MB/s 0:00:02 0:00:05``. It goes when the job ends: the command's
    own summary line says how it ended."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            TaskProgressColumn(),
            TextColumn("{task.fields[files]} files"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task: TaskID | None = None
        self.name = ""

    def __enter__(self) -> TerminalDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end_job()
        self.progress.stop()

    def _end_job(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def job(self, name: str) -> None:
        self._end_job()
        self.name = name
        self.task = self.progress.add_task(name, total=None, files=0)

    def stage(self, name: str) -> None:
        if self.task is None:
            self.job("mailsnap")
        assert self.task is not None
        self.progress.update(self.task, description=f"{self.name}: {name}")

    def expect(self, files: int, size: int) -> None:
        if self.task is not None and size > 0:
            self.progress.update(self.task, total=size)

    def reporter(self) -> Callable[[int, int], None] | None:
        return self.copied

    def copied(self, files: int, size: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=size, files=f"{files:,}")


_NOBODY = Display()
_current: ContextVar[Display | None] = ContextVar("mailsnap_display", default=None)


def current() -> Display:
    """The display of the run in progress; a no-op one when nobody watches."""
    return _current.get() or _NOBODY


@contextlib.contextmanager
def showing(enabled: bool) -> Iterator[Display]:
    """Show progress on the terminal for the block when ``enabled`` (and stderr is a
    terminal); otherwise report into the no-op display."""
    display: Display = Display()
    with contextlib.ExitStack() as stack:
        if enabled and on_terminal():
            display = stack.enter_context(TerminalDisplay(stderr_console()))
        token = _current.set(display)
        stack.callback(_current.reset, token)
        yield display
