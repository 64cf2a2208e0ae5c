"""Issue #3, part b: ``mailsnap backup`` of a Maildir under live load loses nothing.

Each backend runs ``scale().runs`` backups, one after another, of the same store while LMTP
deliveries and IMAP flag changes, MOVEs, COPYs and EXPUNGEs go on. Every run must have: no message
missing that existed for the whole backup window, no base name twice in one folder, nothing from
``tmp/`` and no ``dovecot-uidlist.lock``. All runs are made (and reported) before asserting.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.loopfs import BtrfsVolume
from tests.livemail.harness import LiveMail, RunReport, mailsnap_backup, scale

pytestmark = [pytest.mark.dovecot, pytest.mark.privileged, pytest.mark.slow]
MIN_CHANGES = 50


@pytest.mark.parametrize("backend", ["btrfs", "live"])
def test_mailsnap_backup_under_load_loses_nothing(
    backend: str, live: LiveMail, btrfs: BtrfsVolume, tmp_path: Path, report: list[RunReport]
) -> None:
    target = tmp_path / "target"
    runs: list[RunReport] = []
    for n in range(scale().runs):
        run = live.copy_under_load(
            f"mailsnap --backend {backend} #{n + 1}",
            lambda: mailsnap_backup(btrfs.mail, target, backend, tmp_path / "run"),
            warmup=scale().warmup,
        )
        runs.append(run)
        report.append(run)
    failures = [run.line() + "\n  " + run.result.summary() for run in runs if not run.result.ok]
    assert not failures, "\n".join(failures)
    for run in runs:
        # A quiet window proves nothing; the load generator must really have been busy.
        assert run.result.changes_in_window >= MIN_CHANGES, run.result.summary()
        meta = run.detail["meta"]
        assert meta.get("backend") == backend, meta
        assert meta.get("point_in_time") is (backend == "btrfs"), meta
    backups = sorted(
        p.name for p in (target / "livemail").iterdir() if p.is_dir() and not p.is_symlink()
    )
    assert len(backups) == scale().runs, backups
