"""What one job's run noted while it ran: its stages with their durations, how long its snapshot
existed, the warnings it logged and the last lines of its log.

The backup command starts a ``Recorder`` per job (``recording``); the code below it does not pass
it around: ``session.stage()`` and ``pipeline.open_view`` reach the current one through a context
variable, and do nothing when no run is being recorded (``snapshot --exec``, tests). The run's
report (``mailsnap.report.RunReport``) is built from it when the job ends, however it ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
import logging
import time

# Enough log to see what led to a failure in an alert, short enough for a mail or a ping body.
TAIL_LINES = 50
# A run that warns on every message would otherwise make a report of megabytes.
MAX_WARNINGS = 100
# The loggers whose lines a run's report and alerts collect: mailsnap's own.
LOGGER = "mailsnap"


@dataclass
class Recorder:
    """The notes of one job's run in progress. Times are ``time.monotonic()`` seconds."""

    stages: list[tuple[str, float, bool]] = field(default_factory=list)
    snapshot_taken: float | None = None
    snapshot_gone: float | None = None
    warnings: list[str] = field(default_factory=list)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    destinations: list[dict[str, object]] = field(default_factory=list)

    def snapshot_seconds(self) -> float | None:
        """How long the snapshot existed: from the start of its stage to the end of its
        teardown (or until now, if the run is still unwinding)."""
        if self.snapshot_taken is None:
            return None
        end = self.snapshot_gone if self.snapshot_gone is not None else time.monotonic()
        return round(end - self.snapshot_taken, 3)

    def _release(self) -> None:
        self.snapshot_gone = time.monotonic()


_current: ContextVar[Recorder | None] = ContextVar("mailsnap_recorder", default=None)


def record_stage(name: str, seconds: float, *, ok: bool) -> None:
    """Note a finished stage in the run being recorded, if any."""
    recorder = _current.get()
    if recorder is not None:
        recorder.stages.append((name, round(seconds, 3), ok))


def record_destination(result: dict[str, object]) -> None:
    """Note how one destination fared, in the run being recorded, if any."""
    recorder = _current.get()
    if recorder is not None:
        recorder.destinations.append(result)


def time_snapshot(stack: contextlib.ExitStack) -> None:
    """Start the snapshot's clock now; it stops when ``stack`` unwinds past this point, which
    is after the snapshot's own undo steps (they are pushed later, so they run earlier)."""
    recorder = _current.get()
    if recorder is not None:
        recorder.snapshot_taken = time.monotonic()
        stack.callback(recorder._release)


class _Collector(logging.Handler):
    """Keeps WARNING+ messages as the run's warnings and the last lines as its log tail."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(logging.INFO)
        self.recorder = recorder
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                            "%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            self.recorder.tail.append(line)
            if (record.levelno >= logging.WARNING
                    and len(self.recorder.warnings) < MAX_WARNINGS):
                self.recorder.warnings.append(record.getMessage())
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Record the run of one job inside the block: stages, snapshot time, warnings, log tail.
    Changes nothing on the system (dry run alike)."""
    recorder = Recorder()
    token = _current.set(recorder)
    handler = _Collector(recorder)
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        yield recorder
    finally:
        logger.removeHandler(handler)
        _current.reset(token)
