"""Real btrfs on a loop device, as root: backups under concurrent writes, hard links between
backups, SIGTERM and SIGKILL mid-copy, dry run, and `snapshot --exec`. After every test: no
mailsnap subvolume, no mount and no .partial directory remains."""

from __future__ import annotations

from collections.abc import Iterator
import hashlib
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest

from mailsnap.config import Job, one_off_job
from mailsnap.copiers.maildir import MaildirCopier
from mailsnap.copiers.rsync import RsyncCopier
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from mailsnap.store import BackupStore
from tests.helpers.loopfs import BtrfsVolume, mounts_under, subvolumes
from tests.helpers.maildir_writer import MaildirWriter, seed

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("need_rsync")]


@pytest.fixture
def source(btrfs: BtrfsVolume) -> Path:
    root = btrfs.mail / "Maildir"
    seed(root, per_folder=400)
    return root


@pytest.fixture
def job(btrfs: BtrfsVolume, source: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Job]:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    made = one_off_job(name="mail", source=source, target=tmp_path / "backups", backend="btrfs")
    yield made
    assert_nothing_left(btrfs, made, tmp_path)


def assert_nothing_left(btrfs: BtrfsVolume, job: Job, tmp_path: Path) -> None:
    assert mounts_under(tmp_path / "run") == []
    assert [s for s in subvolumes(btrfs.top) if "mailsnap-" in s] == []
    root = job.target / job.name
    if root.exists():
        assert [p.name for p in root.iterdir() if p.name.endswith(".partial")] == []
    # The snapshot never appears inside the live mail tree (Dovecot would see a folder).
    assert not any(".mailsnap" in p.name for p in btrfs.mail.rglob(".mailsnap*"))


def tree(root: Path) -> dict[str, str]:
    """relative path → sha256 of every file below root."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("copier", ["maildir", "rsync"])
def test_backup_under_concurrent_writes_equals_the_snapshot(
    job: Job, source: Path, monkeypatch: pytest.MonkeyPatch, copier: str
) -> None:
    job = job.model_copy(update={"copier": copier})
    seen: dict[str, dict[str, str]] = {}
    kind = RsyncCopier if copier == "rsync" else MaildirCopier
    real_copy = kind.copy

    def copy_and_record(self: object, src: Path, dest: Path, **kwargs: object) -> object:
        stats = real_copy(self, src, dest, **kwargs)  # type: ignore[arg-type]
        seen["snapshot"] = tree(src)  # the frozen snapshot, still mounted read-only
        return stats

    monkeypatch.setattr(kind, "copy", copy_and_record)
    writer = MaildirWriter(source)
    writer.start()
    try:
        time.sleep(0.2)
        before = writer.ops
        report = run_backup(job, Runner())
        during = writer.ops - before
    finally:
        writer.stop()
    assert during > 0, "the writer made no change while the backup ran"
    backup = tree(Path(report.backup or "") / "mail")
    expected = {
        rel: digest for rel, digest in seen["snapshot"].items()
        if "/tmp/" not in f"/{rel}" and not rel.endswith("dovecot-uidlist.lock")
    }
    assert backup == expected
    assert not [r for r in backup if "/tmp/" in f"/{r}"]
    assert not [r for r in backup if r.endswith(".lock")]
    # Per folder, each message (base name) exactly once.
    per_folder: dict[str, list[str]] = {}
    for rel in backup:
        parts = rel.rsplit("/", 2)
        if len(parts) >= 2 and parts[-2] in ("cur", "new"):
            folder = parts[0] if len(parts) == 3 else ""
            per_folder.setdefault(folder, []).append(parts[-1].split(":", 1)[0])
    for folder, bases in per_folder.items():
        assert len(bases) == len(set(bases)), folder
    manifest = json.loads(Path(report.backup or "", "mailsnap.json").read_text())
    assert manifest["point_in_time"] is True and manifest["backend"] == "btrfs"


def test_second_backup_hard_links_unchanged_messages(job: Job, source: Path) -> None:
    first = Path(run_backup(job, Runner()).backup or "")
    victim = next((source / "cur").iterdir())
    victim.unlink()
    second_report = run_backup(job, Runner())
    second = Path(second_report.backup or "")
    assert second_report.linked > 0
    same = 0
    for path in (first / "mail" / ".Sent" / "cur").iterdir():
        twin = second / "mail" / ".Sent" / "cur" / path.name
        assert os.stat(path).st_ino == os.stat(twin).st_ino
        same += 1
    assert same == 400
    assert not (second / "mail" / "cur" / victim.name).exists()
    assert (first / "mail" / "cur" / victim.name).exists()


def test_dry_run_leaves_no_trace(job: Job, btrfs: BtrfsVolume) -> None:
    report = run_backup(job, Runner(dry_run=True))
    assert report.status == "dry-run"
    assert not job.target.exists()


def _start(job: Job, tmp_path: Path) -> subprocess.Popen[str]:
    """A backup with rsync, whose process the caller waits for (the Maildir copier's
    interruptions are in the fault matrix)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mailsnap", "backup", "--source", str(job.source),
         "--target", str(job.target), "--backend", "btrfs", "--copier", "rsync"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, MAILSNAP_RUN_DIR=str(tmp_path / "run")),
    )


def _rsync_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"rsync") and marker.encode() in b" ".join(cmdline):
                pids.append(int(entry.name))
    return pids


def _wait_for_rsync(marker: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not _rsync_pids(marker):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "rsync never started"
        time.sleep(0.005)


@pytest.fixture
def big_source(source: Path) -> Path:
    # Enough data that rsync is still copying when the signal arrives.
    for i in range(160):
        (source / ".Archive" / "cur" / f"1750000000.M{i}P9.big:2,S").write_bytes(
            os.urandom(1 << 20))
    return source


@pytest.mark.slow
@pytest.mark.usefixtures("big_source")
def test_sigterm_mid_copy_publishes_nothing_and_leaves_nothing(
    job: Job, tmp_path: Path
) -> None:
    process = _start(job, tmp_path)
    _wait_for_rsync(str(job.target), process)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "SIGTERM" in err
    assert BackupStore(job.target / job.name).backups() == []
    assert _rsync_pids(str(job.target)) == []  # the copy was stopped, not orphaned


@pytest.mark.slow
@pytest.mark.usefixtures("big_source")
def test_killed_run_is_swept_by_the_next_run(
    job: Job, btrfs: BtrfsVolume, tmp_path: Path
) -> None:
    process = _start(job, tmp_path)
    _wait_for_rsync(str(job.target), process)
    os.killpg(process.pid, signal.SIGKILL)  # no teardown at all: a crash
    process.communicate(timeout=60)
    # The crash left its snapshot, its mount and its .partial behind …
    assert [s for s in subvolumes(btrfs.top) if "mailsnap-mail-" in s]
    assert mounts_under(tmp_path / "run")
    assert list((job.target / job.name).glob("*.partial"))
    # … and the next run sweeps all of it, then makes a good backup.
    report = run_backup(job, Runner())
    assert report.status == "ok"
    assert [b.path for b in BackupStore(job.target / job.name).backups()] == [
        Path(report.backup or "")]


def test_snapshot_exec_is_read_only_and_outside_the_mail_tree(
    job: Job, btrfs: BtrfsVolume, tmp_path: Path
) -> None:
    out = tmp_path / "exec.out"
    script = (
        'findmnt -no OPTIONS --mountpoint "$(dirname "$MAILSNAP_SNAPSHOT")" > "$0"; '
        'touch "$MAILSNAP_SNAPSHOT/new-file" 2>> "$0" || echo write-refused >> "$0"; '
        'ls -a "$1" >> "$0"'
    )
    result = subprocess.run(
        [sys.executable, "-m", "mailsnap", "snapshot", "--source", str(job.source),
         "--backend", "btrfs", "--", "sh", "-c", script, str(out), str(btrfs.mail)],
        capture_output=True, text=True, check=False,
        env=dict(os.environ, MAILSNAP_RUN_DIR=str(tmp_path / "run")),
    )
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    options = text.splitlines()[0].split(",")
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(options)
    assert "write-refused" in text
    live_tree = text.split("write-refused", 1)[1].split()
    assert "Maildir" in live_tree and ".mailsnap" not in live_tree  # no snapshot in the tree


@pytest.mark.parametrize(("setting", "code"), [("optimized", 0), ("never", 1)])
def test_check_warns_when_dovecot_skips_fsync(
    job: Job, tmp_path: Path, setting: str, code: int
) -> None:
    # Dovecot with mail_fsync=never renames a delivery into new/ before its data is on disk; a
    # snapshot taken then holds an empty message (seen by the live-mail tests).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "doveconf"
    fake.write_text(f"#!/bin/sh\n[ \"$*\" = '-h mail_fsync' ] && echo {setting}\n")
    fake.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-m", "mailsnap", "check", "--source", str(job.source), "--target",
         str(job.target), "--backend", "btrfs", "--json"],
        capture_output=True, text=True, check=False,
        env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"),
    )
    assert result.returncode == code, result.stdout + result.stderr
    rows = {r["check"]: r for r in json.loads(result.stdout)["checks"]}
    assert rows["dovecot"]["ok"] is (setting != "never")
    assert f"mail_fsync = {setting}" in rows["dovecot"]["detail"]
