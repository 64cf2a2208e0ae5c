"""Fault points: the seam the fault matrix (tests/test_fault_matrix.py) uses to stop a real
mailsnap run at an exact stage, not a production branch.

The pipeline calls ``fault_point("after-mount")`` and so on at each stage boundary. Normally
that is a no-op costing one dict lookup: ``MAILSNAP_FAULT`` is read once, on the first call.
When it is set to ``<point>:<SIGNAL>`` (e.g. ``after-mount:SIGKILL``; several separated by
commas), mailsnap sends that signal to itself at that point. SIGKILL ends it on the spot, like
the OOM killer or a power cut would; SIGTERM/SIGINT/SIGHUP become ``Interrupted`` (see
``signals``) and the normal unwinding runs, as under systemd or a Ctrl-C.

The points are ``POINTS`` below, in the order a backup reaches them (``mid-prune`` is reached
after publishing, and by ``mailsnap prune``).
"""

from __future__ import annotations

import functools
import logging
import os
import signal

from mailsnap.errors import ConfigError

log = logging.getLogger(__name__)

FAULT_ENV = "MAILSNAP_FAULT"
POINTS = (
    "after-snapshot",  # the snapshot exists and its undo is registered
    "after-mount",  # the snapshot is mounted read-only
    "mid-copy",  # the copier's first watch call: rsync (or the live copier) is still running
    "after-copy",  # the copy is complete; nothing is published yet
    "mid-publish",  # manifest written and synced; the .partial is not renamed yet
    "after-rename",  # the backup is published (renamed, or its ZFS snapshot taken); ``latest``
    # is not switched yet
    "mid-prune",  # a backup the policy removes is renamed to <id>.deleting, not yet deleted
    # (a subvolume backup: about to be deleted, in one step)
)
# How often the copier's watch runs while a fault is armed: "mid-copy" must land while rsync
# is still copying even a small test store (the normal interval is seconds).
ARMED_POLL_INTERVAL = 0.05


@functools.cache
def armed() -> dict[str, signal.Signals]:
    """The fault points ``MAILSNAP_FAULT`` arms, read from the environment once. A malformed
    value raises ``ConfigError``: a misspelt point would otherwise never fire, silently."""
    value = os.environ.get(FAULT_ENV, "").strip()
    found: dict[str, signal.Signals] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        point, _, name = item.partition(":")
        name = name.strip().upper()
        try:
            sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        except KeyError:
            sig = None
        if point not in POINTS or sig is None:
            raise ConfigError(
                f"{FAULT_ENV}={value!r}: expected <point>:<SIGNAL> with a point among "
                f"{', '.join(POINTS)} (e.g. after-mount:SIGKILL); unset it for normal runs"
            )
        found[point] = sig
    return found


def fault_point(name: str) -> None:
    """Send ourselves the signal armed for ``name``, if any; otherwise do nothing. Dry run is
    the same (the fault matrix does not use it)."""
    sig = armed().get(name)
    if sig is None:
        return
    log.warning("fault point %s: sending %s to myself (%s)", name, sig.name, FAULT_ENV)
    os.kill(os.getpid(), sig)


def poll_interval(default: float) -> float:
    """``default``, or a short interval while a fault is armed (see ``ARMED_POLL_INTERVAL``)."""
    return ARMED_POLL_INTERVAL if armed() else default
