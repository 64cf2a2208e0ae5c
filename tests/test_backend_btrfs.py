"""btrfs backend, command level: exact argv from real captured tool output (tests/data/btrfs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailsnap.backends.base import Snapshot, Volume
from mailsnap.backends.btrfs import BtrfsBackend
from mailsnap.config import one_off_job
from mailsnap.errors import BackendUnsuitable, MailsnapError
from tests.helpers.fake_runner import FakeRunner

DATA = Path(__file__).parent / "data" / "btrfs"
FINDMNT = (DATA / "findmnt-target.json").read_text()
SUBVOLUMES = (DATA / "subvolume-list-a.txt").read_text()
# The captured list has a nested subvolume "mail/nested" and two snapshots: one of job "mail",
# one of job "mail-archive". Without the nested one:
NO_NESTED = "\n".join(line for line in SUBVOLUMES.splitlines() if "nested" not in line)


def backend(tmp_path: Path, subvolumes: str = NO_NESTED, dry_run: bool = False,
            source: str = "/tmp/bt/mail/Maildir") -> tuple[BtrfsBackend, FakeRunner]:
    runner = FakeRunner(dry_run=dry_run)
    runner.on("findmnt", "--json", "--nofsroot", "--target", stdout=FINDMNT)
    runner.on("findmnt", "--json", "--mountpoint", stdout='{"filesystems": []}')
    runner.on("btrfs", "inspect-internal", "rootid", stdout="256\n")
    runner.on("btrfs", "inspect-internal", "subvolid-resolve", "256", stdout="mail\n")
    runner.on("btrfs", "subvolume", "list", "-a", stdout=subvolumes)
    job = one_off_job(name="mail", source=Path(source), target=tmp_path / "t", backend="btrfs")
    job = job.model_copy(update={"run_dir": tmp_path / "run"})
    return BtrfsBackend(runner, job), runner


def test_discover(tmp_path: Path) -> None:
    b, runner = backend(tmp_path)
    volume = b.discover(Path("/tmp/bt/mail/Maildir"))
    assert volume.device == "/dev/loop1"
    assert volume.relative == Path("Maildir")
    assert volume.details == {"subvolume": "/mail", "subvolume_id": "256"}
    assert runner.ran(mutating=True, executed=True) == []


def test_discover_reads_the_subvolume_path_from_the_list(tmp_path: Path) -> None:
    b, runner = backend(tmp_path)
    b.discover(Path("/tmp/bt/mail/Maildir"))
    assert [c for c in runner.ran(executed=True) if c.startswith("btrfs")] == [
        "btrfs inspect-internal rootid /tmp/bt/mail/Maildir",
        "btrfs subvolume list -a /tmp/bt/mail",
    ]


def test_a_subvolume_missing_from_the_list_is_resolved(tmp_path: Path) -> None:
    b, runner = backend(tmp_path)
    runner.on("btrfs", "inspect-internal", "rootid", stdout="300\n")
    runner.on("btrfs", "inspect-internal", "subvolid-resolve", "300", stdout="mail\n")
    assert b.discover(Path("/tmp/bt/mail/Maildir")).details["subvolume"] == "/mail"
    assert "btrfs inspect-internal subvolid-resolve 300 /tmp/bt/mail" in runner.ran()


def test_the_sweep_after_discover_uses_its_list_once(tmp_path: Path) -> None:
    """discover's list serves the sweep that follows it; the final sweep, and any listing
    after a snapshot was made or removed, asks btrfs again."""
    b, runner = backend(tmp_path)
    volume = b.discover(Path("/tmp/bt/mail/Maildir"))

    def lists() -> int:
        return sum(c.startswith("btrfs subvolume list") for c in runner.ran())

    assert [s.name for s in b.list_owned(volume, "mail")] == ["mailsnap-mail-20261128T010203Z"]
    assert lists() == 1
    b.list_owned(volume, "mail")
    assert lists() == 2
    b.discover(Path("/tmp/bt/mail/Maildir"))
    b.create(volume, "mailsnap-mail-20261128T010204Z")
    b.list_owned(volume, "mail")
    assert lists() == 4


def test_discover_refuses_nested_subvolumes(tmp_path: Path) -> None:
    b, _ = backend(tmp_path, subvolumes=SUBVOLUMES, source="/tmp/bt/mail")
    with pytest.raises(BackendUnsuitable, match="/mail/nested"):
        b.discover(Path("/tmp/bt/mail"))


def test_discover_refuses_other_file_systems(tmp_path: Path) -> None:
    b, runner = backend(tmp_path)
    ext4 = json.loads(FINDMNT)
    ext4["filesystems"][0]["fstype"] = "ext4"
    runner.on("findmnt", "--json", "--nofsroot", "--target", stdout=json.dumps(ext4))
    with pytest.raises(BackendUnsuitable, match="on ext4, not btrfs"):
        b.discover(Path("/tmp/bt/mail/Maildir"))


def test_discover_refuses_the_top_level(tmp_path: Path) -> None:
    b, runner = backend(tmp_path)
    runner.on("btrfs", "inspect-internal", "rootid", stdout="5\n")
    with pytest.raises(BackendUnsuitable, match="top-level subvolume"):
        b.discover(Path("/tmp/bt/mail/Maildir"))


def test_create_mount_unmount_destroy_command_lines(tmp_path: Path) -> None:
    b, runner = backend(tmp_path)
    volume = b.discover(Path("/tmp/bt/mail/Maildir"))
    snap = b.create(volume, "mailsnap-mail-20261128T010203Z")
    path = b.mount(snap, tmp_path / "snap")
    top = tmp_path / "run" / "mail" / "top"
    assert path == tmp_path / "snap" / "Maildir"
    assert runner.ran(mutating=True, executed=True) == [
        f"mount -t btrfs -o subvolid=5,nosuid,nodev,noexec /dev/loop1 {top}",
        f"btrfs subvolume snapshot -r {top}/mail {top}/.mailsnap/mailsnap-mail-20261128T010203Z",
        f"umount {top}",
        "mount -t btrfs -o ro,nosuid,nodev,noexec,"
        f"subvol=/.mailsnap/mailsnap-mail-20261128T010203Z /dev/loop1 {tmp_path}/snap",
    ]
    # Nothing mounted there any more (umount fails, findmnt agrees): idempotent.
    runner.on("umount", exit_code=32, stderr=f"umount: {tmp_path}/snap: not mounted.")
    b.unmount(snap, tmp_path / "snap")
    assert runner.ran(executed=True)[-2:] == [
        f"umount {tmp_path}/snap",
        f"findmnt --json --mountpoint {tmp_path}/snap --output TARGET",
    ]


def test_destroy_refuses_foreign_names(tmp_path: Path) -> None:
    b, runner = backend(tmp_path)
    volume = b.discover(Path("/tmp/bt/mail/Maildir"))
    with pytest.raises(MailsnapError, match="not created by mailsnap"):
        b.destroy(Snapshot("btrfs", "daily-2026-11-28", volume))
    assert runner.ran(mutating=True, executed=True) == []


def test_list_owned_only_this_jobs_snapshots(tmp_path: Path) -> None:
    b, _ = backend(tmp_path)
    volume = b.discover(Path("/tmp/bt/mail/Maildir"))
    owned = b.list_owned(volume, "mail")
    assert [s.name for s in owned] == ["mailsnap-mail-20261128T010203Z"]
    assert owned[0].details["path"] == "/.mailsnap/mailsnap-mail-20261128T010203Z"
    assert [s.name for s in b.list_owned(volume, "mail-archive")] == [
        "mailsnap-mail-archive-20261128T010203Z"]


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    b, runner = backend(tmp_path, dry_run=True)
    volume = b.discover(Path("/tmp/bt/mail/Maildir"))
    snap = b.create(volume, "mailsnap-mail-20261128T010203Z")
    b.mount(snap, tmp_path / "snap")
    b.destroy(snap)
    assert runner.ran(mutating=True, executed=True) == []
    assert not (tmp_path / "run").exists()
    assert any(c.argv[:3] == ("btrfs", "subvolume", "snapshot") for c in runner.calls)


def test_volume_records_are_plain_data() -> None:
    v = Volume("btrfs", Path("/srv/mail"), "/dev/sda1", Path("."), "btrfs")
    assert v.details == {}
