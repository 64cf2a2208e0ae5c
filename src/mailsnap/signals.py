"""SIGINT, SIGTERM and SIGHUP become an ordinary exception, so ``with`` blocks unwind and the
snapshot is torn down. Once teardown starts, further signals are logged and ignored: a second
Ctrl-C must not leave a snapshot mounted halfway through its unmount (SIGKILL still works, and
the next run sweeps what it leaves).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from mailsnap.errors import Interrupted

log = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalGuard:
    def __init__(self) -> None:
        self.received: str | None = None
        self.deferring = False
        self.busy_with = "teardown"
        self.pending: str | None = None  # a signal that came while deferring

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.deferring or self.received is not None:
            log.warning("%s received during %s; finishing it first", name, self.busy_with)
            if self.received is None and self.pending is None:
                self.pending = name
            return
        self.received = name
        log.warning("%s received; stopping and tearing down", name)
        raise Interrupted(name)

    def defer(self, busy_with: str = "teardown") -> None:
        """From now on (teardown, or a backup already published), signals no longer
        interrupt; the first reason given is the one logged."""
        if not self.deferring:
            self.busy_with = busy_with
        self.deferring = True

    def resume(self) -> None:
        """Signals interrupt again (the destinations after a published backup: a long upload
        must stay stoppable). One that came while deferring interrupts now."""
        self.deferring = False
        if self.pending is not None and self.received is None:
            self.received, self.pending = self.pending, None
            raise Interrupted(self.received)

    @contextlib.contextmanager
    def deferred(self, busy_with: str) -> Iterator[None]:
        """No interruption inside the block (e.g. releasing the snapshot); one that came
        meanwhile interrupts when it ends."""
        was = self.deferring
        self.defer(busy_with)
        try:
            yield
        finally:
            if not was:
                self.deferring = False
                self.busy_with = "teardown"
        if not was:
            self.resume()


# The guard of the run in progress (set by signals_unwind), for held().
_active: SignalGuard | None = None


@contextlib.contextmanager
def held(busy_with: str) -> Iterator[None]:
    """No interruption inside the block; one that came meanwhile interrupts when it ends.
    For starting a command: sh forks, then sets up its reader threads, and an interruption
    raised in there lost the handle of a child already running, which went on writing into the
    backup while teardown removed it (``Directory not empty``). A no-op outside a run and off
    the main thread."""
    guard = _active
    if guard is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    with guard.deferred(busy_with):
        yield


@contextlib.contextmanager
def signals_unwind() -> Iterator[SignalGuard]:
    """Install the handlers for the duration of a run (main thread only; elsewhere, e.g. a
    test's worker thread, signals stay as they are)."""
    guard = SignalGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = {sig: signal.getsignal(sig) for sig in HANDLED}
    for sig in HANDLED:
        signal.signal(sig, guard._handle)
    previous_hook = sys.unraisablehook

    def unraisable(info: Any) -> None:
        # A signal that lands in code whose exceptions Python ignores (logging's fork
        # handlers while sh forks a command, a __del__) would be lost and the run would go
        # on. Forget it and send it again a moment later, to a main thread that can unwind.
        if isinstance(info.exc_value, Interrupted) and guard.received is not None:
            signum = signal.Signals[guard.received]
            guard.received = None
            timer = threading.Timer(0.01, os.kill, (os.getpid(), signum))
            timer.daemon = True
            timer.start()
            return
        previous_hook(info)

    sys.unraisablehook = unraisable
    global _active
    outer, _active = _active, guard
    try:
        yield guard
    finally:
        _active = outer
        sys.unraisablehook = previous_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)
