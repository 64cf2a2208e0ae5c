"""Retention applied to real backups: after each backup, by `mailsnap prune`, and after a
SIGKILL in the middle of a prune (the privileged part runs on a btrfs loop volume)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from mailsnap.config import Job, parse_config
from mailsnap.errors import MailsnapError
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from mailsnap.store import BackupStore
from tests.helpers.loopfs import BtrfsVolume
from tests.helpers.maildir_writer import seed
from tests.helpers.trees import diff_trees

START = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)


def job_of(source: Path, target: Path, backend: str = "live", **keys: object) -> Job:
    data = {"name": "mail", "source": str(source), "target": str(target), "backend": backend,
            **keys}
    return parse_config({"job": [data]}, origin="test").job[0]


def make_backups(job: Job, times: list[datetime]) -> list[str]:
    ids = []
    for when in times:
        report = run_backup(job, Runner(), clock=lambda when=when: when)
        assert report.backup is not None
        ids.append(Path(report.backup).name)
    return ids


def store_of(job: Job) -> BackupStore:
    return BackupStore(job.target / job.name)


def published(job: Job) -> list[str]:
    return [b.run_id for b in store_of(job).backups()]


def mailsnap(*args: str | Path, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailsnap", *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=120,
                          env={**os.environ, **(env or {})})


def write_config(path: Path, job: Job, **keys: object) -> Path:
    lines = ["[[job]]", f'name = "{job.name}"', f'source = "{job.source}"',
             f'target = "{job.target}"', f'backend = "{job.backend}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- store level, on any file system -------------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "Maildir"
    seed(root, per_folder=5)
    return root


def test_backup_prunes_after_it_publishes(source: Path, tmp_path: Path) -> None:
    job = job_of(source, tmp_path / "b", keep_last=2)
    ids = make_backups(job, [START + timedelta(days=n) for n in range(4)])
    assert published(job) == ids[-2:]
    assert not list(store_of(job).root.glob("*.deleting"))


def test_no_policy_keeps_everything(source: Path, tmp_path: Path) -> None:
    job = job_of(source, tmp_path / "b")
    ids = make_backups(job, [START + timedelta(days=n) for n in range(3)])
    assert published(job) == ids
    check = mailsnap("check", "--config", write_config(tmp_path / "c.toml", job), "--json")
    rows = [r for r in json.loads(check.stdout)["checks"] if r["check"] == "retention"]
    assert rows and "keeps every backup" in rows[0]["detail"]


def test_latest_is_never_removed_even_when_not_newest(source: Path, tmp_path: Path) -> None:
    job = job_of(source, tmp_path / "b", keep_last=1)
    ids = make_backups(job, [START, START + timedelta(days=1)])
    assert published(job) == [ids[1]]
    store = store_of(job)
    # A newer-looking backup appears (copied in by hand); latest still points to ids[1].
    os.rename(store.root / ids[1], store.root / "20261231T000000Z")
    os.symlink("20261231T000000Z", store.root / "tmp-link")
    os.replace(store.root / "tmp-link", store.root / "latest")
    make_backups(job, [START + timedelta(days=2)])  # older than the hand-made one
    assert "20261231T000000Z" in published(job)


def test_prune_dry_run_removes_nothing_and_says_why(source: Path, tmp_path: Path) -> None:
    job = job_of(source, tmp_path / "b")
    ids = make_backups(job, [START + timedelta(hours=n) for n in range(3)])
    config = write_config(tmp_path / "c.toml", job, keep_last=1)
    run = mailsnap("prune", "--config", config, "--dry-run")
    assert run.returncode == 0, run.stderr
    assert f"would remove {ids[0]}  (matched no keep rule)" in run.stdout
    assert f"keep   {ids[2]}  (newest, last 1)" in run.stdout
    assert published(job) == ids
    run = mailsnap("prune", "--config", config, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)["jobs"][0]
    assert report["removed"] == ids[:2] and report["kept"] == [ids[2]]
    assert published(job) == [ids[2]]


def test_a_symlink_named_like_a_backup_is_never_followed(source: Path, tmp_path: Path) -> None:
    job = job_of(source, tmp_path / "b", keep_last=1)
    ids = make_backups(job, [START])
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "mailsnap.json").write_text("{}")
    (outside / "keep-me").write_text("x")
    store = store_of(job)
    os.symlink(outside, store.root / "20250101T000000Z")
    with pytest.raises(MailsnapError, match="not a directory"):
        store.remove("20250101T000000Z")
    make_backups(job, [START + timedelta(days=1)])
    assert (outside / "keep-me").exists()
    assert ids[0] not in published(job)


def test_a_failed_prune_fails_the_run_but_keeps_the_new_backup(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = job_of(source, tmp_path / "b", keep_last=1)
    make_backups(job, [START])

    def broken(self: BackupStore, run_id: str) -> None:
        raise PermissionError(13, "Permission denied", str(self.root / run_id))

    monkeypatch.setattr(BackupStore, "remove", broken)
    with pytest.raises(MailsnapError, match="was published, but removing old backups failed"):
        run_backup(job, Runner(), clock=lambda: START + timedelta(days=1))
    assert len(published(job)) == 2
    assert store_of(job).latest_target() == published(job)[-1]


# -- real btrfs, with a SIGKILL in the middle of a prune ------------------------------------


@pytest.mark.privileged
@pytest.mark.usefixtures("need_rsync")
@pytest.mark.parametrize("kept_as", ["hard-link trees", "subvolumes"])
def test_sigkill_mid_prune_then_a_normal_run_finishes_it(
    btrfs: BtrfsVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kept_as: str
) -> None:
    """A tree is renamed to .deleting first (no longer published, removed by the next run);
    a subvolume is deleted in one step, so the kill leaves it published and whole."""
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    mail = btrfs.mail / "Maildir"
    seed(mail, per_folder=40)
    target = btrfs.top / "backups"  # the target on btrfs too
    mode = "never" if kept_as == "hard-link trees" else "auto"
    job = job_of(mail, target, backend="btrfs", target_snapshots=mode)
    times = [START + timedelta(days=d, hours=h) for d in range(4) for h in (2, 14)]
    ids = make_backups(job, times)
    newest = store_of(job).backups()[-1]
    oldest = store_of(job).backups()[0]
    assert (os.lstat(oldest.path).st_ino == 256) == (kept_as == "subvolumes")
    config = write_config(tmp_path / "c.toml", job, keep_daily=2, target_snapshots=mode)
    expected_kept = [ids[5], ids[7]]  # the newest of each of the two newest days

    killed = mailsnap("prune", "--config", config, env={"MAILSNAP_FAULT": "mid-prune:SIGKILL"})
    assert killed.returncode == -9, killed.stderr
    store = store_of(job)
    left = sorted(p.name for p in store.root.glob("*.deleting"))
    if kept_as == "hard-link trees":
        assert left == [f"{ids[0]}.deleting"]  # renamed, not deleted: no longer published
        assert ids[0] not in published(job)
    else:
        assert left == [] and published(job) == ids
        assert diff_trees(mail, oldest.content) == []  # whole (the source did not change)
    assert store.latest_target() == ids[-1]

    again = mailsnap("prune", "--config", config, "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)["jobs"][0]
    finished = [f"{ids[0]}.deleting"] if kept_as == "hard-link trees" else []
    assert report["finished"] == finished
    assert published(job) == expected_kept
    assert not list(store.root.glob("*.deleting"))
    # What is left is whole: the newest backup still equals the source it was taken from.
    assert diff_trees(mail, newest.content) == []


def test_a_backup_killed_while_pruning_stays_published_and_the_next_run_finishes(
    source: Path, tmp_path: Path
) -> None:
    job = job_of(source, tmp_path / "b", keep_last=1)
    first = make_backups(job, [START])[0]
    config = write_config(tmp_path / "c.toml", job, keep_last=1)
    env = {"MAILSNAP_FAULT": "mid-prune:SIGKILL", "MAILSNAP_RUN_DIR": str(tmp_path / "run")}
    killed = mailsnap("backup", "--config", config, env=env)
    assert killed.returncode == -9, killed.stderr
    store = store_of(job)
    newest = published(job)
    assert len(newest) == 1 and newest[0] != first  # the new one is published …
    assert store.latest_target() == newest[0]
    assert [p.name for p in store.root.glob("*.deleting")] == [f"{first}.deleting"]
    cleanup = mailsnap("cleanup", "--config", config, "--dry-run",
                       env={"MAILSNAP_RUN_DIR": str(tmp_path / "run")})
    assert f"half-pruned backup {first}.deleting" in cleanup.stdout, cleanup.stdout
    again = mailsnap("backup", "--config", config,
                     env={"MAILSNAP_RUN_DIR": str(tmp_path / "run")})
    assert again.returncode == 0, again.stderr
    assert not list(store.root.glob("*.deleting"))
    assert len(published(job)) == 1
