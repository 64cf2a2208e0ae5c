"""The pipeline on real files (live backend, real copier): publish, failure, interruption,
teardown failure, locking, crash sweep, dry run. Failures are injected at the seams."""

from __future__ import annotations

from datetime import UTC, datetime
import json
import os
from pathlib import Path
import shutil
import signal
import stat

import pytest

from mailsnap import session as session_module
from mailsnap.config import Job, one_off_job
from mailsnap.copiers.maildir import MaildirCopier
from mailsnap.errors import (
    CopyFailed,
    Interrupted,
    LockedError,
    TeardownIncomplete,
)
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from mailsnap.session import job_lock
from mailsnap.store import BackupStore

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"
FIXED = datetime(2026, 11, 28, 2, 0, 0, tzinfo=UTC)


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Job:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    shutil.copytree(EXAMPLE, tmp_path / "Maildir")
    return one_off_job(name="mail", source=tmp_path / "Maildir", target=tmp_path / "backups",
                       backend="live")


def published(job: Job) -> list[str]:
    return [b.run_id for b in BackupStore(job.target / job.name).backups()]


def leftovers(job: Job) -> list[str]:
    root = job.target / job.name
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".partial"))


def test_backup_is_published_private_and_described(job: Job) -> None:
    report = run_backup(job, Runner(), clock=lambda: FIXED)
    root = job.target / "mail"
    backup = root / "20261128T020000Z"
    assert report.backup == str(backup) and report.status == "ok"
    assert os.readlink(root / "latest") == "20261128T020000Z"
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o700
    manifest = json.loads((backup / "mailsnap.json").read_text())
    assert manifest["point_in_time"] is False and manifest["backend"] == "live"
    assert manifest["copier"] == "maildir" and manifest["files"] == report.files > 0
    assert (backup / "mail" / "cur").is_dir()
    assert not (backup / "mail" / "dovecot-uidlist.lock").exists()
    assert leftovers(job) == []


def test_second_run_gets_its_own_id_and_links_to_the_first(job: Job) -> None:
    run_backup(job, Runner(), clock=lambda: FIXED)
    second = run_backup(job, Runner(), clock=lambda: FIXED)
    assert published(job) == ["20261128T020000Z", "20261128T020000Z.1"]
    assert second.linked > 0
    message = next((job.target / "mail" / "20261128T020000Z.1" / "mail" / "cur").iterdir())
    assert message.stat().st_nlink == 2


def test_failed_copy_publishes_nothing_and_keeps_earlier_backups(
    job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_backup(job, Runner(), clock=lambda: FIXED)
    before = sorted(p.name for p in (job.target / "mail" / "20261128T020000Z").rglob("*"))

    def broken(self: MaildirCopier, *args: object, **kwargs: object) -> None:
        raise CopyFailed("disk full (injected)")

    monkeypatch.setattr(MaildirCopier, "copy", broken)
    with pytest.raises(CopyFailed):
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert published(job) == ["20261128T020000Z"]
    assert leftovers(job) == []
    after = sorted(p.name for p in (job.target / "mail" / "20261128T020000Z").rglob("*"))
    assert after == before
    assert os.readlink(job.target / "mail" / "latest") == "20261128T020000Z"


def test_sigterm_mid_copy_unwinds(job: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    swept: list[str] = []
    real_copy = MaildirCopier.copy
    real_sweep = session_module._final_sweep

    def copy_then_get_killed(self: MaildirCopier, *args: object, **kwargs: object) -> None:
        real_copy(self, *args, **kwargs)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGTERM)

    def spy_sweep(*args: object) -> None:
        swept.append("final sweep")
        real_sweep(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(MaildirCopier, "copy", copy_then_get_killed)
    monkeypatch.setattr(session_module, "_final_sweep", spy_sweep)
    with pytest.raises(Interrupted) as info:
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert info.value.exit_code == 130 and info.value.signal_name == "SIGTERM"
    assert published(job) == [] and leftovers(job) == []
    assert swept == ["final sweep"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_failing_undo_step_still_runs_the_others_and_says_so(
    job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    swept: list[str] = []

    def broken_discard(self: BackupStore, partial: Path) -> None:
        raise OSError("device busy (injected)")

    def spy_sweep(*args: object) -> None:
        swept.append("final sweep")

    monkeypatch.setattr(BackupStore, "discard", broken_discard)
    monkeypatch.setattr(session_module, "_final_sweep", spy_sweep)
    with pytest.raises(TeardownIncomplete) as info:
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert info.value.exit_code == 4
    assert "device busy (injected)" in str(info.value)
    assert swept  # the undo after it (in reverse order) still ran
    assert published(job) == ["20261128T020000Z"]  # the copy itself was complete


def test_a_failing_undo_after_sigterm_still_exits_130(
    job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = MaildirCopier.copy

    def copy_then_get_killed(self: MaildirCopier, *args: object, **kwargs: object) -> None:
        real_copy(self, *args, **kwargs)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGTERM)

    def broken_discard(self: BackupStore, partial: Path) -> None:
        raise OSError("device busy (injected)")

    monkeypatch.setattr(MaildirCopier, "copy", copy_then_get_killed)
    monkeypatch.setattr(BackupStore, "discard", broken_discard)
    with pytest.raises(Interrupted) as info:
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert info.value.exit_code == 130
    assert "device busy (injected)" in str(info.value) and "teardown incomplete" in str(info.value)


def test_second_run_of_the_same_job_is_refused(job: Job) -> None:
    store = BackupStore(job.target / job.name)
    with store.locked(), pytest.raises(LockedError, match="already running") as info:
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert info.value.exit_code == 3
    assert f"pid {os.getpid()}" in str(info.value)


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_held_job_session_refuses_backup_and_dry_run_with_the_holders_pid(
    job: Job, dry_run: bool
) -> None:
    with job_lock(job, "snapshot --exec", dry_run=False), \
            pytest.raises(LockedError) as info:
        run_backup(job, Runner(dry_run=dry_run), clock=lambda: FIXED)
    assert info.value.exit_code == 3
    assert f"pid {os.getpid()} (snapshot --exec)" in str(info.value)
    assert not (job.target / job.name).exists()


def test_partial_from_a_crashed_run_is_swept(job: Job) -> None:
    stale = job.target / "mail" / "20200101T000000Z.partial"
    (stale / "mail").mkdir(parents=True)
    foreign = job.target / "mail" / "keep-me.partial"
    foreign.mkdir()
    run_backup(job, Runner(), clock=lambda: FIXED)
    assert not stale.exists()
    assert foreign.exists()  # not a name mailsnap makes: never touched


def test_dry_run_changes_nothing(job: Job) -> None:
    report = run_backup(job, Runner(dry_run=True), clock=lambda: FIXED)
    assert report.status == "dry-run" and report.backup is None and report.files > 0
    assert not job.target.exists()
    assert not job.work_dir.exists()
