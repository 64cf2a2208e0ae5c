"""Hooks through a real backup: small sh scripts that write what they saw (their environment,
the state of the volume at that moment) to a log file. The live backend needs no root; the
btrfs tests prove the order around the real snapshot instant."""

from __future__ import annotations

from datetime import UTC, datetime
import logging
import os
from pathlib import Path
import shutil
import signal
from typing import Any

import pytest

from mailsnap.backends.btrfs import BtrfsBackend
from mailsnap.config import Job, one_off_job
from mailsnap.errors import (
    CommandFailed,
    HookFailed,
    Interrupted,
    ShrinkRefused,
    SourceRejected,
)
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from mailsnap.store import BackupStore
from tests.helpers.loopfs import BtrfsVolume, mounts_under, subvolumes

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"
FIXED = datetime(2026, 11, 28, 2, 0, 0, tzinfo=UTC)
ENV_KEYS = ("MAILSNAP_JOB", "MAILSNAP_RUN_ID", "MAILSNAP_SOURCE", "MAILSNAP_TARGET",
            "MAILSNAP_STATUS", "MAILSNAP_BACKUP", "MAILSNAP_ERROR", "MAILSNAP_OWNER")


def hook_script(tmp_path: Path, name: str, body: str = "", *, exit_code: int = 0) -> list[str]:
    """A hook that appends its name and environment to ``tmp_path/hooks.log``, runs ``body``
    (output appended to the log too) and exits ``exit_code``."""
    script = tmp_path / f"{name}.sh"
    env_lines = "\n".join(f'echo "  {k}=${{{k}-<unset>}}"' for k in ENV_KEYS)
    script.write_text(
        "#!/bin/sh\n"
        f"log={tmp_path / 'hooks.log'}\n"
        "{\n"
        f"echo {name}\n"
        f"{env_lines}\n"
        f"{body}\n"
        '} >> "$log" 2>&1\n'
        f"echo '{name} says bye' >&2\n"
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return [str(script)]


def with_hooks(job: Job, **keys: Any) -> Job:
    return type(job).model_validate({**job.model_dump(), **keys})


def hook_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "hooks.log"
    return path.read_text().splitlines() if path.exists() else []


def called(tmp_path: Path) -> list[str]:
    return [line for line in hook_log(tmp_path) if not line.startswith(" ")]


def env_of(tmp_path: Path, hook: str) -> dict[str, str]:
    lines = hook_log(tmp_path)
    start = lines.index(hook) + 1
    out = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        key, _, value = line.strip().partition("=")
        out[key] = value
    return out


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Job:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    shutil.copytree(EXAMPLE, tmp_path / "Maildir")
    return one_off_job(name="mail", source=tmp_path / "Maildir", target=tmp_path / "backups",
                       backend="live")


def all_hooks(tmp_path: Path, **exit_codes: int) -> dict[str, list[str]]:
    return {name: hook_script(tmp_path, name, exit_code=exit_codes.get(name, 0))
            for name in ("before_snapshot", "after_snapshot", "on_success", "on_failure")}


# -- live backend (no root) ---------------------------------------------------------------


def test_on_success_gets_the_published_backup(job: Job, tmp_path: Path) -> None:
    job = with_hooks(job, **all_hooks(tmp_path))
    report = run_backup(job, Runner(), clock=lambda: FIXED)
    # A live copy has no snapshot instant: the snapshot hooks do not run.
    assert called(tmp_path) == ["on_success"]
    env = env_of(tmp_path, "on_success")
    assert env["MAILSNAP_JOB"] == "mail"
    assert env["MAILSNAP_RUN_ID"] == Path(str(report.backup)).name
    assert env["MAILSNAP_SOURCE"] == str(job.source)
    assert env["MAILSNAP_TARGET"] == str(job.target)
    assert env["MAILSNAP_STATUS"] == "ok"
    assert env["MAILSNAP_BACKUP"] == report.backup
    assert env["MAILSNAP_ERROR"] == "<unset>"
    # The run's marker: a hook left running is recognisable as this run's.
    assert env["MAILSNAP_OWNER"] == f"mailsnap-mail-{env['MAILSNAP_RUN_ID']}"


def test_on_failure_gets_the_error_and_the_error_is_kept(job: Job, tmp_path: Path) -> None:
    shutil.rmtree(job.source)
    job.source.mkdir()  # an unmounted mail volume: the source check refuses it
    job = with_hooks(job, **all_hooks(tmp_path, on_failure=3))
    with pytest.raises(SourceRejected):
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert called(tmp_path) == ["on_failure"]
    env = env_of(tmp_path, "on_failure")
    assert env["MAILSNAP_STATUS"] == "failed"
    assert "it is empty" in env["MAILSNAP_ERROR"]
    assert env["MAILSNAP_RUN_ID"] == ""  # it failed before it had one
    assert env["MAILSNAP_BACKUP"] == "<unset>"


def test_failing_on_failure_is_logged_not_swallowed(
    job: Job, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_backup(job, Runner(), clock=lambda: FIXED)
    for path in [*job.source.rglob("cur/*"), *job.source.rglob("new/*")]:
        path.unlink()  # the next backup holds no message: the shrink guard refuses it
    job = with_hooks(job, on_failure=hook_script(tmp_path, "on_failure", exit_code=7))
    with pytest.raises(ShrinkRefused):
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert called(tmp_path) == ["on_failure"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("on_failure hook" in e and "exited 7" in e and "on_failure says bye" in e
               and "own error is kept" in e for e in errors), errors


def test_failing_on_success_fails_the_run_but_the_backup_stays(
    job: Job, tmp_path: Path
) -> None:
    job = with_hooks(job, **all_hooks(tmp_path, on_success=5))
    with pytest.raises(HookFailed) as info:
        run_backup(job, Runner(), clock=lambda: FIXED)
    message = str(info.value)
    assert "on_success hook" in message and "exited 5" in message
    assert "was published and stays published" in message
    assert info.value.exit_code == 1
    store = BackupStore(job.target / job.name)
    assert [b.run_id for b in store.backups()] == [store.latest().run_id]  # type: ignore[union-attr]
    # on_success failed: on_failure is not run on top of it (it would report the backup lost).
    assert called(tmp_path) == ["on_success"]


def test_a_hung_hook_is_killed_at_hook_timeout(job: Job, tmp_path: Path) -> None:
    job = with_hooks(job, hook_timeout=0.5,
                     on_success=hook_script(tmp_path, "on_success", "sleep 30"))
    with pytest.raises(HookFailed, match=r"timed out after 0.5s \(hook_timeout\)"):
        run_backup(job, Runner(), clock=lambda: FIXED)


def test_a_missing_hook_program_fails_the_run_with_its_name(job: Job, tmp_path: Path) -> None:
    job = with_hooks(job, on_success=[str(tmp_path / "no-such-hook")])
    with pytest.raises(HookFailed, match=r"on_success hook could not run: .*no-such-hook"):
        run_backup(job, Runner(), clock=lambda: FIXED)


def test_dry_run_prints_hooks_and_runs_none(
    job: Job, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    job = with_hooks(job, **all_hooks(tmp_path))
    runner = Runner(dry_run=True)
    run_backup(job, runner, clock=lambda: FIXED)
    assert called(tmp_path) == []
    assert any(r.skipped and r.argv[0].endswith("on_success.sh") for r in runner.history)
    assert any("[dry-run]" in r.getMessage() and "on_success.sh" in r.getMessage()
               for r in caplog.records)


def test_on_failure_runs_after_an_interrupt(
    job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailsnap.copiers.maildir import MaildirCopier

    def killed(self: MaildirCopier, *args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MaildirCopier, "copy", killed)
    job = with_hooks(job, **all_hooks(tmp_path))
    with pytest.raises(Interrupted):
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert called(tmp_path) == ["on_failure"]
    assert env_of(tmp_path, "on_failure")["MAILSNAP_STATUS"] == "interrupted"


# -- real btrfs: the snapshot instant ------------------------------------------------------


def volume_state(btrfs: BtrfsVolume, job: Job) -> str:
    """A hook body recording, at its moment, the snapshots on the volume and the backups."""
    return (f"echo \"  snapshots=$(btrfs subvolume list {btrfs.top} | grep -c mailsnap-)\"\n"
            f"echo \"  backups=$(ls {job.target / job.name} 2>/dev/null | grep -vc '^latest$')\"")


@pytest.fixture
def btrfs_job(btrfs: BtrfsVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Job:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    shutil.copytree(EXAMPLE, btrfs.mail / "Maildir")
    job = one_off_job(name="mail", source=btrfs.mail / "Maildir",
                      target=tmp_path / "backups", backend="btrfs")
    hooks = {name: hook_script(tmp_path, name, volume_state(btrfs, job))
             for name in ("before_snapshot", "after_snapshot", "on_success", "on_failure")}
    return with_hooks(job, **hooks)


def states(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(hook, snapshots on the volume, backups in the target) at each hook's moment."""
    out = []
    lines = hook_log(tmp_path)
    for i, line in enumerate(lines):
        if line.startswith(" "):
            continue
        block = []
        for following in lines[i + 1:]:
            if not following.startswith(" "):
                break
            block.append(following.strip().split("=", 1))
        values = dict(block)
        out.append((line, values.get("snapshots", "?"), values.get("backups", "?")))
    return out


def assert_clean(btrfs: BtrfsVolume, tmp_path: Path) -> None:
    assert [s for s in subvolumes(btrfs.top) if "mailsnap-" in s] == []
    assert mounts_under(tmp_path / "run") == []


@pytest.mark.privileged
@pytest.mark.usefixtures("need_rsync")
def test_order_around_a_real_btrfs_snapshot(
    btrfs: BtrfsVolume, btrfs_job: Job, tmp_path: Path
) -> None:
    run_backup(btrfs_job, Runner(), clock=lambda: FIXED)
    assert states(tmp_path) == [
        ("before_snapshot", "0", "0"),  # before: no snapshot yet
        ("after_snapshot", "1", "0"),  # right after create: the snapshot, nothing copied
        ("on_success", "0", "1"),  # after the copy and teardown: a backup, no snapshot
    ]
    assert_clean(btrfs, tmp_path)


@pytest.mark.privileged
def test_after_snapshot_runs_when_create_fails(
    btrfs: BtrfsVolume, btrfs_job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: BtrfsBackend, *args: object, **kwargs: object) -> None:
        raise CommandFailed(["btrfs", "subvolume", "snapshot"], 1, "ERROR: injected")

    monkeypatch.setattr(BtrfsBackend, "create", broken)
    with pytest.raises(CommandFailed, match="injected"):
        run_backup(btrfs_job, Runner(), clock=lambda: FIXED)
    assert [s[0] for s in states(tmp_path)] == ["before_snapshot", "after_snapshot",
                                                "on_failure"]
    assert_clean(btrfs, tmp_path)


@pytest.mark.privileged
def test_after_snapshot_runs_on_sigterm_during_create(
    btrfs: BtrfsVolume, btrfs_job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_create = BtrfsBackend.create

    def create_then_sigterm(self: BtrfsBackend, *args: Any, **kwargs: Any) -> Any:
        made = real_create(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return made

    monkeypatch.setattr(BtrfsBackend, "create", create_then_sigterm)
    with pytest.raises(Interrupted):
        run_backup(btrfs_job, Runner(), clock=lambda: FIXED)
    # after_snapshot ran while the snapshot still existed, before teardown destroyed it.
    assert states(tmp_path) == [("before_snapshot", "0", "0"), ("after_snapshot", "1", "0"),
                                ("on_failure", "0", "0")]
    assert_clean(btrfs, tmp_path)


@pytest.mark.privileged
def test_failing_before_snapshot_takes_no_snapshot(
    btrfs: BtrfsVolume, btrfs_job: Job, tmp_path: Path
) -> None:
    job = with_hooks(btrfs_job, before_snapshot=hook_script(tmp_path, "before_snapshot",
                                                            exit_code=2))
    with pytest.raises(HookFailed, match=r"before_snapshot hook .* exited 2"):
        run_backup(job, Runner(), clock=lambda: FIXED)
    # Not "succeeded", so its undo half does not run; nothing was created.
    assert [s[0] for s in states(tmp_path)] == ["before_snapshot", "on_failure"]
    assert_clean(btrfs, tmp_path)


@pytest.mark.privileged
def test_failing_after_snapshot_fails_the_run_and_tears_down(
    btrfs: BtrfsVolume, btrfs_job: Job, tmp_path: Path
) -> None:
    job = with_hooks(btrfs_job, after_snapshot=hook_script(tmp_path, "after_snapshot",
                                                           exit_code=4))
    with pytest.raises(HookFailed, match=r"after_snapshot hook .* exited 4"):
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert BackupStore(job.target / job.name).latest() is None
    assert_clean(btrfs, tmp_path)
