"""A snapshot and a target on one btrfs: new messages are reflinked (FICLONE), not written;
on another file system the copier falls back to writing them, with the same result."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailsnap.config import parse_config
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from tests.helpers.loopfs import BtrfsVolume
from tests.helpers.maildir_writer import seed
from tests.helpers.trees import diff_trees

pytestmark = [pytest.mark.privileged]


@pytest.mark.parametrize("same_fs", [True, False], ids=["target-on-btrfs", "target-on-ext4"])
def test_new_messages_are_reflinked_when_they_can_be(
    btrfs: BtrfsVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_fs: bool
) -> None:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    mail = btrfs.mail / "Maildir"
    seed(mail, per_folder=30)
    target = btrfs.top / "backups" if same_fs else tmp_path / "backups"
    job = parse_config({"job": [{"name": "mail", "source": str(mail), "target": str(target),
                                 "backend": "btrfs"}]}, origin="test").job[0]
    report = run_backup(job, Runner())
    assert report.backup is not None and report.copy is not None
    content = Path(report.backup) / "mail"
    assert diff_trees(mail, content) == []
    messages = report.messages or 0
    if same_fs:
        assert report.copy["reflinked"] >= messages > 0
        assert report.copy["bytes_written"] < 64 * 1024  # only the few non-message files
    else:
        assert report.copy["reflinked"] == 0
        assert report.copy["bytes_written"] == report.bytes
    if same_fs:  # a subvolume of the target's btrfs (target_snapshots): a device number its own
        assert os.lstat(content.parent).st_ino == 256
    else:
        assert os.stat(content).st_dev == os.stat(target).st_dev
