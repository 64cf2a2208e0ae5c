"""``mailsnap cleanup`` through the CLI with the live backend (no root needed): what it removes
and says, dry run, a running job, a vanished source. The btrfs cases (snapshots and mounts a
killed run left) are in tests/test_fault_matrix.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil

import pytest
from typer.testing import CliRunner

from mailsnap.cli import app
from mailsnap.config import one_off_job
from mailsnap.session import job_lock

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"
OLD, NEW = "20261130T010000Z", "20261201T010000Z"


@pytest.fixture
def job_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    source = tmp_path / "Maildir"
    shutil.copytree(EXAMPLE, source)
    store = tmp_path / "b" / "mail"
    for run_id in (OLD, NEW):  # two published backups; `latest` still at the older one
        (store / run_id / "mail").mkdir(parents=True)
        (store / run_id / "mailsnap.json").write_text("{}")
    os.symlink(OLD, store / "latest")
    (store / "20261201T020000Z.partial" / "mail").mkdir(parents=True)  # a killed run's
    (store / "notes.partial").mkdir()  # not a mailsnap name: never touched
    return ["--source", str(source), "--target", str(tmp_path / "b"), "--backend", "live"]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cleanup_says_what_it_removes_and_a_second_one_finds_nothing(
    job_args: list[str], tmp_path: Path
) -> None:
    store = tmp_path / "b" / "mail"
    code, out, err = invoke("cleanup", *job_args, "--dry-run")
    assert code == 0, err
    assert out.splitlines() == [
        f"mail: would remove partial backup {store / '20261201T020000Z.partial'}",
        f"mail: would remove stale link latest -> {NEW} (was {OLD})",
    ]
    assert (store / "20261201T020000Z.partial").exists() and os.readlink(store / "latest") == OLD

    code, out, err = invoke("cleanup", *job_args)
    assert code == 0, err
    assert out.splitlines() == [
        f"mail: removed partial backup {store / '20261201T020000Z.partial'}",
        f"mail: removed stale link latest -> {NEW} (was {OLD})",
    ]
    assert not (store / "20261201T020000Z.partial").exists()
    assert (store / "notes.partial").is_dir() and os.readlink(store / "latest") == NEW
    assert sorted(p.name for p in store.iterdir() if p.name[0].isdigit()) == [OLD, NEW]

    code, out, err = invoke("cleanup", *job_args, "--json")
    assert code == 0, err
    assert json.loads(out)["jobs"] == [
        {"job": "mail", "status": "ok", "dry_run": False, "removed": []}]
    code, out, _ = invoke("cleanup", *job_args)
    assert out.splitlines() == ["mail: nothing to clean up"]


def test_cleanup_of_a_running_job_exits_3_and_removes_nothing(
    job_args: list[str], tmp_path: Path
) -> None:
    job = one_off_job(name="mail", source=tmp_path / "Maildir", target=tmp_path / "b",
                      backend="live")
    with job_lock(job, "backup", dry_run=False):
        code, _out, err = invoke("cleanup", *job_args)
    assert code == 3
    assert f"pid {os.getpid()} (backup)" in err
    assert (tmp_path / "b" / "mail" / "20261201T020000Z.partial").exists()


def test_cleanup_of_a_vanished_source_is_one_clear_line(
    job_args: list[str], tmp_path: Path
) -> None:
    shutil.rmtree(tmp_path / "Maildir")
    code, _out, err = invoke("cleanup", *job_args)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert "Maildir does not exist" in line and "nothing was removed" in line
    assert (tmp_path / "b" / "mail" / "20261201T020000Z.partial").exists()
