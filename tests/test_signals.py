"""SignalGuard: a signal becomes an ``Interrupted`` the run can unwind from, even when it
lands where Python ignores exceptions."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mailsnap.errors import Interrupted
from mailsnap.signals import held, signals_unwind


class _RaisesInDel:
    """A signal handled inside ``__del__`` (as inside logging's fork handlers while a
    command is started): Python prints "Exception ignored in" and goes on."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGTERM)


def test_a_signal_lost_in_code_whose_exceptions_are_ignored_is_delivered_again() -> None:
    started = time.monotonic()
    with pytest.raises(Interrupted, match="SIGTERM"), signals_unwind():
        _RaisesInDel()  # freed at once: the handler runs in __del__, its exception is lost
        while time.monotonic() - started < 5:
            time.sleep(0.001)
    assert time.monotonic() - started < 1


def test_a_signal_while_deferring_interrupts_when_resumed() -> None:
    with signals_unwind() as guard:
        guard.defer("publishing the backup")
        signal.raise_signal(signal.SIGINT)  # logged, not raised
        with pytest.raises(Interrupted, match="SIGINT"):
            guard.resume()


def test_deferred_blocks_interrupt_only_after_them() -> None:
    with signals_unwind() as guard:
        done = []
        with pytest.raises(Interrupted, match="SIGTERM"):
            with guard.deferred("releasing the snapshot"):
                signal.raise_signal(signal.SIGTERM)
                done.append("the whole block ran")
        assert done == ["the whole block ran"]


def test_a_signal_while_a_command_starts_interrupts_once_it_has_started() -> None:
    """held(): the runner starts a command inside it, so an interruption never lands between
    the fork and the moment the runner holds the child (and can stop it)."""
    reached: list[str] = []
    with pytest.raises(Interrupted), signals_unwind():
        with held("the start of `rsync`"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # Python runs the handler here, were it not held
            reached.append("started")
        reached.append("after")  # never: the signal interrupts as the block ends
    assert reached == ["started"]


def test_held_is_a_no_op_outside_a_run() -> None:
    with held("anything"):
        pass
