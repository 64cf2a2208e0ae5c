"""`mailsnap verify` against real backups, each kind of damage found with one line, and the
per-job `verify = "snapshot"` comparison on real btrfs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from mailsnap import manifest as manifest_module
from mailsnap.config import Job, parse_config
from mailsnap.copiers.maildir import MaildirCopier
from mailsnap.errors import VerifyFailed
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from mailsnap.store import BackupStore
from tests.helpers.loopfs import BtrfsVolume
from tests.helpers.maildir_writer import seed


def job_of(source: Path, target: Path, backend: str = "live", **keys: object) -> Job:
    data = {"name": "mail", "source": str(source), "target": str(target), "backend": backend,
            **keys}
    return parse_config({"job": [data]}, origin="test").job[0]


def verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailsnap", "verify", *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=120)


@pytest.fixture
def backup(tmp_path: Path) -> Path:
    source = tmp_path / "Maildir"
    seed(source, per_folder=10)
    job = job_of(source, tmp_path / "b")
    run_backup(job, Runner())
    report = run_backup(job, Runner())  # the second one mostly hard links
    assert report.backup is not None
    return Path(report.backup)


def args_for(backup: Path) -> list[str | Path]:
    """A config naming the job whose store holds ``backup``."""
    target = backup.parent.parent
    config = target.parent / "verify.toml"
    config.write_text(f'[[job]]\nname = "{backup.parent.name}"\nsource = "{target.parent}/Maildir"'
                      f'\ntarget = "{target}"\nbackend = "live"\n')
    return ["--config", config]


def first_message(backup: Path) -> Path:
    return next(p for p in sorted((backup / "mail").rglob("*")) if p.parent.name == "cur"
                and p.is_file())


def test_an_intact_backup_verifies_deep(backup: Path) -> None:
    run = verify(*args_for(backup), "--deep", "--all")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("intact") == 2


def damage_missing(backup: Path) -> str:
    victim = first_message(backup)
    victim.unlink()
    return "missing"


def damage_size(backup: Path) -> str:
    victim = first_message(backup)
    with victim.open("ab") as handle:
        handle.write(b"x")
    return "the manifest says"


def damage_extra(backup: Path) -> str:
    (backup / "mail" / "cur" / "1800000000.M1P1.intruder:2,S").write_text("x")
    return "not in its manifest"


def damage_tmp(backup: Path) -> str:
    (backup / "mail" / "tmp" / "1800000000.M2P1.half").write_text("x")
    return "tmp/ is not empty"


def damage_lock(backup: Path) -> str:
    (backup / "mail" / "dovecot-uidlist.lock").write_text("")
    return "lock file"


def damage_mode(backup: Path) -> str:
    os.chmod(backup, 0o755)
    return "not 0700"


def damage_manifest(backup: Path) -> str:
    manifest = backup / "manifest.zst"
    manifest.write_bytes(manifest.read_bytes()[:-20])
    return "damaged"


def damage_digest(backup: Path) -> str:
    """The manifest still reads whole, but is not the one published (or the record is not)."""
    meta = backup / "mailsnap.json"
    record = json.loads(meta.read_text())
    record["manifest_sha256"] = hashlib.sha256(b"another").hexdigest()
    meta.write_text(json.dumps(record))
    return "not the manifest published with this backup"


@pytest.mark.parametrize("damage", [damage_missing, damage_size, damage_extra, damage_tmp,
                                    damage_lock, damage_mode, damage_manifest, damage_digest])
def test_each_kind_of_damage_is_one_line_and_exit_1(backup: Path, damage: object) -> None:
    expected = damage(backup)  # type: ignore[operator]
    run = verify(*args_for(backup))
    assert run.returncode == 1, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if backup.name in line]
    assert len(lines) == 1 and expected in lines[0], run.stdout


def test_the_next_backup_trusts_the_manifest_by_the_digest_recorded_at_publish(
    backup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = json.loads((backup / "mailsnap.json").read_text())
    assert record["manifest_sha256"] == hashlib.sha256(
        (backup / "manifest.zst").read_bytes()).hexdigest()
    monkeypatch.setattr(manifest_module, "_check_whole",
                        lambda path: pytest.fail(f"{path} decompressed whole"))
    job = job_of(backup.parent.parent.parent / "Maildir", backup.parent.parent)
    report = run_backup(job, Runner())
    assert report.copy is not None and report.copy["copied"] == 0
    assert report.linked == report.files


def test_same_size_different_content_needs_deep(backup: Path) -> None:
    victim = first_message(backup)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    assert verify(*args_for(backup)).returncode == 0
    deep = verify(*args_for(backup), "--deep", "--json")
    assert deep.returncode == 1
    report = json.loads(deep.stdout)
    problems = [p for b in report["backups"] for p in b["problems"]]
    assert problems and all("content differs" in p for p in problems)


def test_an_rsync_backup_gets_the_structure_checks(tmp_path: Path) -> None:
    source = tmp_path / "Maildir"
    seed(source, per_folder=3)
    content = tmp_path / "b" / "mail" / "20260101T000000Z"
    (content / "mail").mkdir(parents=True)
    subprocess.run(["rsync", "-a", "--exclude=tmp/*", f"{source}/", f"{content / 'mail'}/"],
                   check=True)
    (content / "mailsnap.json").write_text("{}")
    os.chmod(content, 0o700)
    run = verify(*args_for(content))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no manifest" in run.stdout


@pytest.mark.privileged
@pytest.mark.usefixtures("need_rsync")
def test_verify_snapshot_compares_before_publishing(
    btrfs: BtrfsVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    mail = btrfs.mail / "Maildir"
    seed(mail, per_folder=20)
    job = job_of(mail, tmp_path / "b", backend="btrfs", verify="snapshot", verify_deep=True)
    report = run_backup(job, Runner())
    assert report.backup is not None

    real = MaildirCopier.copy

    def copy_and_lose_one(self: MaildirCopier, source: Path, dest: Path, **kw: object) -> object:
        stats = real(self, source, dest, **kw)  # type: ignore[arg-type]
        next(p for p in sorted(dest.rglob("*")) if p.parent.name == "cur").unlink()
        return stats

    monkeypatch.setattr(MaildirCopier, "copy", copy_and_lose_one)
    with pytest.raises(VerifyFailed, match=r"missing from the backup.*nothing was published"):
        run_backup(job, Runner())
    assert [b.run_id for b in BackupStore(job.target / job.name).backups()] == [
        Path(report.backup).name]
