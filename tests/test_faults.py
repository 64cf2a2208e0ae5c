"""The fault-point seam (``mailsnap.faults``) that tests/test_fault_matrix.py drives, and the
store's ``latest`` repair that ``mailsnap cleanup`` uses. Unit tier: no root needed."""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import signal

import pytest

from mailsnap import faults
from mailsnap.errors import ConfigError, Interrupted
from mailsnap.signals import signals_unwind
from mailsnap.store import BackupStore


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    faults.armed.cache_clear()
    yield
    faults.armed.cache_clear()


def arm(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(faults.FAULT_ENV, value)
    faults.armed.cache_clear()


def test_unset_is_a_no_op_and_keeps_the_normal_poll_interval() -> None:
    for point in faults.POINTS:
        faults.fault_point(point)
    assert faults.armed() == {}
    assert faults.poll_interval(5.0) == 5.0


def test_the_environment_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    assert faults.armed() == {}
    monkeypatch.setenv(faults.FAULT_ENV, "after-mount:SIGTERM")
    assert faults.armed() == {}  # cached: the variable is not looked up on every call


@pytest.mark.parametrize("value", ["after-mount", "after-mount:SIGNOPE", "mid-nothing:SIGKILL",
                                   "aftermount:SIGKILL"])
def test_a_malformed_value_is_a_config_error_not_silence(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    arm(monkeypatch, value)
    with pytest.raises(ConfigError, match="expected <point>:<SIGNAL>"):
        faults.fault_point("after-mount")


def test_an_armed_handled_signal_unwinds_as_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    arm(monkeypatch, "after-copy:TERM, mid-copy:SIGHUP")
    assert faults.armed() == {"after-copy": signal.SIGTERM, "mid-copy": signal.SIGHUP}
    assert faults.poll_interval(5.0) == faults.ARMED_POLL_INTERVAL
    with signals_unwind():
        faults.fault_point("after-mount")  # not armed: nothing happens
        with pytest.raises(Interrupted, match="SIGHUP"):
            faults.fault_point("mid-copy")


def test_a_signal_after_the_commit_point_does_not_interrupt(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    arm(monkeypatch, "after-rename:SIGINT")
    with signals_unwind() as guard:
        guard.defer("publishing the backup")
        faults.fault_point("after-rename")
    assert "SIGINT received during publishing the backup" in caplog.text


def test_repair_latest_points_at_the_newest_backup(tmp_path: Path) -> None:
    root = tmp_path / "job"
    for run_id in ("20261201T010000Z", "20261202T010000Z"):
        (root / run_id).mkdir(parents=True)
        (root / run_id / "mailsnap.json").write_text("{}")
    os.symlink("20261201T010000Z", root / "latest")
    assert BackupStore(root, dry_run=True).repair_latest() == (
        "latest -> 20261202T010000Z (was 20261201T010000Z)")
    assert os.readlink(root / "latest") == "20261201T010000Z"  # dry run changed nothing
    assert BackupStore(root).repair_latest() is not None
    assert os.readlink(root / "latest") == "20261202T010000Z"
    assert BackupStore(root).repair_latest() is None
