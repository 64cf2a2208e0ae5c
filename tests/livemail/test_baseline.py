"""Issue #3, part a: the harness sees the race.

A plain ``rsync -a`` of the live tree must lose messages under load; if it ever stops doing so, the
load is too light for this machine and must be raised (never weaken the assertion). The opposite
control — a raw read-only btrfs snapshot copied by rsync, no mailsnap involved, loses nothing — is
``test_restore.py``'s ``raw-snapshot`` case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.loopfs import BtrfsVolume
from tests.livemail.harness import LiveMail, RunReport, rsync_copy, scale

pytestmark = [pytest.mark.dovecot, pytest.mark.privileged, pytest.mark.slow]


def test_plain_rsync_of_the_live_tree_loses_mail(
    live: LiveMail, btrfs: BtrfsVolume, tmp_path: Path, report: list[RunReport]
) -> None:
    for n in range(scale().baseline_runs):
        run = live.copy_under_load(
            "plain rsync", lambda n=n: rsync_copy(btrfs.mail, tmp_path / f"rsync-{n}"),
            warmup=scale().warmup,
        )
        report.append(run)
        assert run.result.changes_in_window > 0, run.result.summary()
        assert run.result.missing, (
            "plain rsync lost nothing: the load is too light to show the race on this machine; "
            f"raise it. {run.result.summary()}"
        )

