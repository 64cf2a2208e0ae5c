"""Issue #7, parts 2, 3, 5 and 6 on plain directories (run anywhere): a source that is not mail
is refused before anything is created, a live source unmounted or replaced mid-copy fails the
run, the shrink guard keeps a mass disappearance from becoming ``latest``, one job's failure is
its own, an interrupt wins, and the smaller rules (job names, config files, symlinked targets,
the live backend is not a snapshot). The same defects on real btrfs volumes, and the session
lock between commands of one job, are in ``test_never_lose_mail_btrfs.py``."""

from __future__ import annotations

from datetime import UTC, datetime
import json
import os
from pathlib import Path
import shutil
import signal
import stat

import pytest
from typer.testing import CliRunner

from mailsnap.backends.live import LiveBackend
from mailsnap.cli import app
from mailsnap.config import Job, one_off_job
from mailsnap.copiers.maildir import MaildirCopier
from mailsnap.errors import ShrinkRefused, SourceRejected
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from mailsnap.store import BackupStore

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"
FIXED = datetime(2026, 11, 28, 2, 0, 0, tzinfo=UTC)


def invoke(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def make_store(root: Path, users: int = 2, per_user: int = 20) -> Path:
    """``root/example.com/<user>/Maildir`` with ``per_user`` messages each."""
    for u in range(users):
        maildir = root / "example.com" / f"user{u}" / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        for i in range(per_user):
            (maildir / "cur" / f"17000000{i:02d}.M{i}P{u}.host,S=5:2,S").write_text("hello")
    return root


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def live_job(source: Path, target: Path, name: str = "mail") -> Job:
    return one_off_job(name=name, source=source, target=target, backend="live")


def published(target: Path, job: str = "mail") -> list[str]:
    return [b.run_id for b in BackupStore(target / job).backups()]


# -- part 2: sources that are not mail -------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty", "etc-like", "missing"])
def test_a_source_that_is_not_mail_is_refused_and_nothing_is_created(
    tmp_path: Path, run_dir: Path, kind: str
) -> None:
    source = tmp_path / "srv-mail"
    if kind != "missing":
        source.mkdir()
    if kind == "etc-like":
        (source / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        (source / "ssh").mkdir()
        (source / "ssh" / "sshd_config").write_text("Port 22\n")
    target = tmp_path / "backups"
    code, out, err = invoke("backup", "--source", source, "--target", target, "--backend",
                            "live", "--json")
    assert code == 1, err
    (entry,) = json.loads(out)["jobs"]
    assert entry["status"] == "failed"
    assert f"source {source}" in entry["error"]
    if kind == "empty":
        assert "unmounted" in entry["error"]
    assert not target.exists()  # no TARGET/<job>/.lock, nothing
    assert not run_dir.exists()


def test_a_tree_of_maildirs_three_levels_down_is_accepted(tmp_path: Path) -> None:
    source = make_store(tmp_path / "vmail")
    report = run_backup(live_job(source, tmp_path / "backups"), Runner(), clock=lambda: FIXED)
    assert report.messages == 40 and report.status == "ok"


def test_live_source_replaced_mid_copy_fails_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `umount -l` does to a live copy: every path now resolves to another directory (the
    # empty mount point), so the rest of the messages "vanish". On real btrfs with a real lazy
    # unmount in test_never_lose_mail_btrfs.py; here the source directory is swapped.
    source = make_store(tmp_path / "vmail", users=3, per_user=30)
    job = live_job(source, tmp_path / "backups")
    run_backup(job, Runner(), clock=lambda: FIXED)
    real = MaildirCopier.copy

    def copy_while_the_volume_goes(self: MaildirCopier, *args: object, **kw: object) -> object:
        source.rename(tmp_path / "moved-away")
        source.mkdir()
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(MaildirCopier, "copy", copy_while_the_volume_goes)
    with pytest.raises(SourceRejected, match="unmounted or replaced"):
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert published(job.target) == ["20261128T020000Z"]
    assert os.readlink(job.target / "mail" / "latest") == "20261128T020000Z"
    assert not list((job.target / "mail").glob("*.partial"))


# -- part 2: the shrink guard ------------------------------------------------------------------


def test_mass_disappearance_is_not_published_unless_allowed(tmp_path: Path) -> None:
    source = make_store(tmp_path / "vmail", users=2, per_user=20)
    job = live_job(source, tmp_path / "backups")
    first = run_backup(job, Runner(), clock=lambda: FIXED)
    assert first.messages == 40
    for path in sorted((source / "example.com").rglob("cur/*"))[:25]:
        path.unlink()  # 15 of 40 left: 37.5% < 50%
    with pytest.raises(ShrinkRefused, match=r"15 messages, 37\.5% of the 40") as info:
        run_backup(job, Runner(), clock=lambda: FIXED)
    assert info.value.exit_code == 1 and "--allow-shrink" in str(info.value)
    assert published(job.target) == ["20261128T020000Z"]
    assert not list((job.target / "mail").glob("*.partial"))
    # The admin confirms the mail really went:
    report = run_backup(job, Runner(), clock=lambda: FIXED, allow_shrink=True)
    assert report.messages == 15
    manifest = json.loads(Path(report.backup or "", "mailsnap.json").read_text())
    assert manifest["messages"] == 15 and manifest["allowed_shrink"] is True


def test_normal_expunges_and_min_keep_percent_zero_pass(tmp_path: Path) -> None:
    source = make_store(tmp_path / "vmail", users=2, per_user=20)
    job = live_job(source, tmp_path / "backups")
    run_backup(job, Runner(), clock=lambda: FIXED)
    for path in sorted((source / "example.com").rglob("cur/*"))[:5]:
        path.unlink()  # 35 of 40: a normal night
    assert run_backup(job, Runner(), clock=lambda: FIXED).messages == 35
    shutil.rmtree(source / "example.com" / "user1")
    off = job.model_copy(update={"min_keep_percent": 0})
    assert run_backup(off, Runner(), clock=lambda: FIXED).messages == 15


def test_shrink_guard_through_the_cli(tmp_path: Path) -> None:
    source = make_store(tmp_path / "vmail", users=2, per_user=10)
    args = ("backup", "--source", source, "--target", tmp_path / "b", "--backend", "live")
    assert invoke(*args)[0] == 0
    shutil.rmtree(source / "example.com" / "user0")
    shutil.rmtree(source / "example.com" / "user1" / "Maildir" / "cur")
    (source / "example.com" / "user1" / "Maildir" / "cur").mkdir()
    code, _, err = invoke(*args)
    assert code == 1 and "min_keep_percent" in err
    assert invoke(*args, "--allow-shrink")[0] == 0


# -- part 5: one job's failure is its own; an interrupt wins ---------------------------------


def two_job_config(tmp_path: Path, first_source: Path, second_source: Path) -> Path:
    config = tmp_path / "mailsnap.toml"
    config.write_text(
        f'[[job]]\nname = "first"\nsource = "{first_source}"\ntarget = "{tmp_path / "b"}"\n'
        'backend = "live"\n\n'
        f'[[job]]\nname = "second"\nsource = "{second_source}"\ntarget = "{tmp_path / "b"}"\n'
        'backend = "live"\n'
    )
    return config


def test_an_os_error_in_one_job_is_reported_and_the_next_job_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_store(tmp_path / "one")
    second = make_store(tmp_path / "two")
    config = two_job_config(tmp_path, first, second)
    real = MaildirCopier.copy

    def enospc_for_the_first(self: MaildirCopier, source: Path, *a: object, **kw: object) -> object:
        if source == first:
            raise OSError(28, "No space left on device", str(tmp_path / "b" / "x"))
        return real(self, source, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(MaildirCopier, "copy", enospc_for_the_first)
    code, out, _ = invoke("backup", "--config", config, "--json")
    report = json.loads(out)
    assert code == 1 and report["exit_code"] == 1
    by_job = {j["job"]: j for j in report["jobs"]}
    assert by_job["first"]["status"] == "failed"
    assert "No space left on device" in by_job["first"]["error"]
    assert "[Errno" not in by_job["first"]["error"]
    assert by_job["second"]["status"] == "ok"


def test_an_unexpected_error_is_contained_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_store(tmp_path / "one")
    config = two_job_config(tmp_path, first, make_store(tmp_path / "two"))
    real = MaildirCopier.copy

    def broken(self: MaildirCopier, source: Path, *a: object, **kw: object) -> object:
        if source == first:
            raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
        return real(self, source, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(MaildirCopier, "copy", broken)
    code, out, err = invoke("backup", "--config", config, "--json")
    by_job = {j["job"]: j for j in json.loads(out)["jobs"]}
    assert code == 1 and "internal error (UnicodeEncodeError" in by_job["first"]["error"]
    assert by_job["second"]["status"] == "ok"
    assert "Traceback" not in err


def test_sigterm_with_a_failing_undo_exits_130_and_stops_the_job_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = two_job_config(tmp_path, make_store(tmp_path / "one"), make_store(tmp_path / "two"))
    real = MaildirCopier.copy

    def copy_then_sigterm(self: MaildirCopier, *a: object, **kw: object) -> object:
        real(self, *a, **kw)  # type: ignore[arg-type]
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not interrupt")

    def broken_discard(self: BackupStore, partial: Path) -> None:
        raise OSError("device busy (injected)")

    monkeypatch.setattr(MaildirCopier, "copy", copy_then_sigterm)
    monkeypatch.setattr(BackupStore, "discard", broken_discard)
    code, out, _ = invoke("backup", "--config", config, "--json")
    report = json.loads(out)
    assert code == 130 and report["exit_code"] == 130
    (entry,) = report["jobs"]  # "second" never started
    assert entry["job"] == "first" and "SIGTERM" in entry["error"]
    assert "device busy (injected)" in entry["error"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_non_utf8_names_in_the_source_are_backed_up(tmp_path: Path) -> None:
    source = make_store(tmp_path / "vmail", users=1, per_user=3)
    odd = os.fsencode(source / "example.com" / "user0" / "Maildir") + b"/.Caf\xe9"
    for sub in (b"cur", b"new", b"tmp"):
        os.makedirs(odd + b"/" + sub)
    with open(odd + b"/cur/1.M1P1.h,S=2:2,S", "wb") as handle:
        handle.write(b"hi")
    code, out, err = invoke("backup", "--source", source, "--target", tmp_path / "b",
                            "--backend", "live", "--json")
    assert code == 0, err
    (entry,) = json.loads(out)["jobs"]
    assert entry["messages"] == 4
    copied = os.fsencode(entry["backup"]) + b"/mail/example.com/user0/Maildir/.Caf\xe9/cur"
    assert os.listdir(copied) == [b"1.M1P1.h,S=2:2,S"]


def test_non_utf8_source_path_is_backed_up(tmp_path: Path) -> None:
    source = Path(os.fsdecode(os.fsencode(tmp_path) + b"/v\xffmail"))
    make_store(source, users=1, per_user=3)
    code, out, err = invoke("backup", "--source", source, "--target", tmp_path / "b",
                            "--backend", "live", "--json")
    assert code == 0, err
    assert json.loads(out)["jobs"][0]["messages"] == 3


@pytest.mark.parametrize("kind", ["latin-1", "directory"])
def test_config_that_is_not_utf8_or_is_a_directory_exits_2(tmp_path: Path, kind: str) -> None:
    config = tmp_path / "mailsnap.toml"
    if kind == "directory":
        config.mkdir()
    else:
        config.write_bytes(b'[[job]]\nname = "caf\xe9"\n')
    code, _, err = invoke("backup", "--config", config)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and "Traceback" not in err
    assert ("UTF-8" if kind == "latin-1" else "directory") in lines[0]


# -- part 6: the smaller ones --------------------------------------------------------------------


def test_empty_job_name_is_an_error_that_says_what_is_allowed(tmp_path: Path) -> None:
    source = make_store(tmp_path / "vmail")
    code, _, err = invoke("backup", "--source", source, "--target", tmp_path / "b", "--job", "")
    assert code == 2
    assert "--job: '' is not a valid job name" in err and "letters, digits" in err
    assert "[A-Za-z0-9]" not in err  # not the raw regex
    assert not (tmp_path / "b").exists()


def test_target_reaching_into_the_source_through_a_symlink_is_refused(tmp_path: Path) -> None:
    source = make_store(tmp_path / "vmail")
    (tmp_path / "link").symlink_to(source / "example.com")
    code, _, err = invoke("backup", "--source", source, "--target", tmp_path / "link" / "bk",
                          "--backend", "live")
    assert code == 2 and "inside source" in err and "with symlinks resolved" in err
    assert not (source / "example.com" / "bk").exists()


def test_live_backup_is_not_described_as_a_snapshot(tmp_path: Path) -> None:
    source = make_store(tmp_path / "vmail")
    code, out, err = invoke("backup", "--source", source, "--target", tmp_path / "b",
                            "--backend", "live", "--json")
    assert code == 0
    (entry,) = json.loads(out)["jobs"]
    manifest = json.loads(Path(entry["backup"], "mailsnap.json").read_text())
    assert manifest["snapshot"] is None and manifest["point_in_time"] is False
    assert entry["snapshot"] is None
    assert "destroy snapshot" not in err and "unmount" not in err
    assert "findmnt" in LiveBackend.tools


def test_work_dir_is_private(tmp_path: Path, run_dir: Path) -> None:
    source = make_store(tmp_path / "vmail")
    run_backup(live_job(source, tmp_path / "b"), Runner(), clock=lambda: FIXED)
    assert stat.S_IMODE(os.stat(run_dir / "mail").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700


# -- a backup disk that did not mount ---------------------------------------------------------


def test_a_backup_disk_that_did_not_mount_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    """The backup disk's mount point is an empty directory when the disk did not mount: a night
    that created TARGET/<job> there would write a full copy onto the file system below. The
    job's last run published into TARGET/<job>, so its absence is refused; the admin mounts
    the disk, or creates the directory to start a new history on purpose."""
    source = make_store(tmp_path / "vmail")
    mount_point = tmp_path / "mnt" / "backup"
    mount_point.mkdir(parents=True)
    args = ("backup", "--source", source, "--target", mount_point, "--backend", "live",
            "--job", "mail")
    assert invoke(*args)[0] == 0
    first = published(mount_point)
    disk = tmp_path / "disk-not-mounted"
    os.rename(mount_point, disk)
    mount_point.mkdir()  # what is left when the disk is not mounted

    code, _out, err = invoke(*args)
    assert code == 1
    said = [line for line in err.splitlines() if "not there" in line]
    assert len(said) == 1, err
    assert f"target {mount_point / 'mail'}: not there" in said[0]
    assert "Is the backup disk mounted?" in said[0] and "Nothing was backed up" in said[0]
    assert list(mount_point.iterdir()) == []  # not even TARGET/<job>
    checked = invoke("check", "--source", source, "--target", mount_point, "--backend", "live",
                     "--job", "mail", "--json")
    assert checked[0] == 1
    (target_row,) = [r for r in json.loads(checked[1])["checks"] if r["check"] == "target"]
    assert not target_row["ok"] and "Is the backup disk mounted?" in target_row["detail"]

    mount_point.rmdir()
    os.rename(disk, mount_point)  # mounted again: the history goes on, linked
    assert invoke(*args)[0] == 0
    assert published(mount_point)[: len(first)] == first and len(published(mount_point)) == 2

    # Moved away on purpose: the admin creates the directory, a new history starts.
    os.rename(mount_point, disk)
    (mount_point / "mail").mkdir(parents=True, mode=0o700)
    assert invoke(*args)[0] == 0
    assert len(published(mount_point)) == 1


def test_a_job_pointed_at_a_new_target_starts_there(tmp_path: Path) -> None:
    """Only the store the last run published into counts: a changed ``target`` is not a
    vanished one."""
    source = make_store(tmp_path / "vmail", users=1, per_user=3)
    common = ("backup", "--source", source, "--backend", "live", "--job", "mail")
    assert invoke(*common, "--target", tmp_path / "old")[0] == 0
    assert invoke(*common, "--target", tmp_path / "new")[0] == 0
    assert len(published(tmp_path / "new")) == 1
