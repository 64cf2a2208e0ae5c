"""ZfsBackend against a fake runner fed real zfs/findmnt output captured in the guest
(tests/data/vm/, written by tests/vm/guest). Exact command lines, dry run, refusals."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mailsnap.backends import BACKENDS
from mailsnap.backends import zfs as zfs_module
from mailsnap.backends.base import Snapshot, SnapshotBackend, snapshot_name
from mailsnap.backends.zfs import ZfsBackend, parse_zfs_list
from mailsnap.config import ZfsJob, parse_config
from mailsnap.errors import BackendUnsuitable, CommandFailed, MailsnapError, TeardownIncomplete
from tests.helpers.fake_runner import FakeRunner, data

RUN_ID = "20250102T030405Z"
NAME = snapshot_name("zmail", RUN_ID)
DS = "mailpool/mail/vmail"
SNAP = f"{DS}@{NAME}"
OPTS = "ro,nosuid,nodev,noexec"
FINDMNT_LIST = ("findmnt", "--json", "--list")
ZFS_LIST = ("zfs", "list", "-H", "-p", "-t", "filesystem")
NO_MOUNTS = '{"filesystems": []}'


def make(
    kind: str = "single", *, dry_run: bool = False, **options: object
) -> tuple[ZfsBackend, FakeRunner, Path]:
    runner = FakeRunner(dry_run=dry_run)
    findmnt = data(f"findmnt-zfs-{kind}.json")
    source = Path(json.loads(findmnt)["filesystems"][0]["target"])
    runner.on("findmnt", "--json", "--nofsroot", "--target", stdout=findmnt)
    runner.on(*ZFS_LIST, stdout=data(f"zfs-list-{kind}.txt"))
    runner.on(*FINDMNT_LIST, stdout=NO_MOUNTS)
    runner.on("findmnt", "--json", "--mountpoint", exit_code=1)
    runner.on("zfs", "list", "-H", "-p", "-t", "snapshot", "-o", "name", SNAP,
              stdout=SNAP + "\n")
    job = ZfsJob(backend="zfs", name="zmail", source=source, target=Path("/backup"),
                 **options)  # type: ignore[arg-type]
    return ZfsBackend(runner, job), runner, source


def snapshot_gone(runner: FakeRunner) -> None:
    runner.on("zfs", "list", "-H", "-p", "-t", "snapshot", "-o", "name", SNAP, exit_code=1,
              stderr=f"cannot open '{SNAP}': dataset does not exist")


def test_satisfies_the_protocol_and_is_registered() -> None:
    backend, _runner, _source = make()
    assert isinstance(backend, SnapshotBackend)
    assert BACKENDS["zfs"] is ZfsBackend
    assert (ZfsBackend.name, ZfsBackend.point_in_time, ZfsBackend.needs_root) == (
        "zfs", True, True)


def test_discover_single_dataset() -> None:
    backend, runner, source = make()
    volume = backend.discover(source)
    assert (volume.device, volume.fstype, volume.relative) == (DS, "zfs", Path("."))
    assert volume.details["dataset"] == DS
    assert json.loads(volume.details["children"]) == []
    assert runner.ran() == [
        f"findmnt --json --nofsroot --target {source} --output TARGET,SOURCE,FSTYPE,FSROOT,OPTIONS",
        f"zfs list -H -p -t filesystem -o name,mountpoint,mounted,canmount,type -r {DS}",
    ]


def test_discover_recursive_lists_children_below_the_source_in_mount_order() -> None:
    backend, _runner, source = make("recursive")
    volume = backend.discover(source)
    assert json.loads(volume.details["children"]) == [
        [f"{DS}/user0", "user0"], [f"{DS}/user1", "user1"]
    ]


def test_discover_of_a_subdirectory_leaves_out_children_elsewhere() -> None:
    backend, _runner, source = make("recursive")
    volume = backend.discover(source / "shared")
    assert volume.relative == Path("shared")
    assert json.loads(volume.details["children"]) == []


def test_discover_refuses_a_source_not_on_zfs() -> None:
    backend, runner, source = make()
    runner.on("findmnt", "--json", "--nofsroot", "--target", stdout=data("findmnt-ext4.json"))
    with pytest.raises(BackendUnsuitable, match="is on ext4, not ZFS"):
        backend.discover(source)


def test_not_recursive_warns_that_children_are_left_out(caplog: pytest.LogCaptureFixture) -> None:
    backend, _runner, source = make("recursive", recursive=False)
    with caplog.at_level(logging.WARNING):
        volume = backend.discover(source)
    assert json.loads(volume.details["children"]) == []
    assert f"not in the backup: {DS}/user0, {DS}/user1" in caplog.text


def test_use_snapdir_refuses_child_datasets() -> None:
    backend, _runner, source = make("recursive", use_snapdir=True)
    with pytest.raises(BackendUnsuitable, match="set use_snapdir = false"):
        backend.discover(source)


@pytest.mark.parametrize(("recursive", "argv"), [
    (True, f"zfs snapshot -r {SNAP}"),
    (False, f"zfs snapshot {SNAP}"),
])
def test_create_one_atomic_snapshot(recursive: bool, argv: str) -> None:
    backend, runner, source = make("recursive", recursive=recursive)
    snapshot = backend.create(backend.discover(source), NAME)
    assert runner.ran(mutating=True) == [argv]
    assert snapshot.details == {"dataset": DS, "snapshot": SNAP}


def test_mount_parent_then_children_read_only(tmp_path: Path) -> None:
    backend, runner, source = make("recursive")
    snapshot = backend.create(backend.discover(source), NAME)
    for child in ("user0", "user1"):
        (tmp_path / child).mkdir()
    assert backend.mount(snapshot, tmp_path) == tmp_path / "."
    assert runner.ran(mutating=True)[1:] == [
        f"mount -t zfs -o {OPTS} {SNAP} {tmp_path}",
        f"mount -t zfs -o {OPTS} {DS}/user0@{NAME} {tmp_path}/user0",
        f"mount -t zfs -o {OPTS} {DS}/user1@{NAME} {tmp_path}/user1",
    ]


def test_failed_child_mount_unmounts_the_rest(tmp_path: Path) -> None:
    backend, runner, source = make("recursive")
    snapshot = backend.create(backend.discover(source), NAME)
    for child in ("user0", "user1"):
        (tmp_path / child).mkdir()
    runner.on("mount", "-t", "zfs", "-o", OPTS, f"{DS}/user1@{NAME}", exit_code=1,
              stderr="filesystem already mounted")
    runner.on("findmnt", "--json", "--mountpoint", stdout='{"filesystems": [{"target": "x"}]}')
    with pytest.raises(CommandFailed, match="already mounted"):
        backend.mount(snapshot, tmp_path)
    assert runner.ran(mutating=True)[-2:] == [f"umount {tmp_path}/user0", f"umount {tmp_path}"]


def test_use_snapdir_mounts_nothing() -> None:
    backend, runner, source = make(use_snapdir=True)
    snapshot = backend.create(backend.discover(source), NAME)
    path = backend.mount(snapshot, Path("/run/mailsnap/zmail/snapshot"))
    assert path == source / ".zfs" / "snapshot" / NAME
    assert runner.ran(mutating=True) == [f"zfs snapshot -r {SNAP}"]


def test_dry_run_discovers_for_real_and_skips_every_change(tmp_path: Path) -> None:
    backend, runner, source = make("recursive", dry_run=True)
    snapshot = backend.create(backend.discover(source), NAME)
    backend.mount(snapshot, tmp_path / "snapshot")  # does not even need to exist
    backend.unmount(snapshot, tmp_path / "snapshot")
    backend.destroy(snapshot)
    assert runner.ran(mutating=True, executed=True) == []
    assert runner.ran(mutating=True, executed=False) == [
        f"zfs snapshot -r {SNAP}",
        f"mount -t zfs -o {OPTS} {SNAP} {tmp_path}/snapshot",
        f"mount -t zfs -o {OPTS} {DS}/user0@{NAME} {tmp_path}/snapshot/user0",
        f"mount -t zfs -o {OPTS} {DS}/user1@{NAME} {tmp_path}/snapshot/user1",
        f"zfs destroy -r {SNAP}",
    ]


def test_destroy_unmounts_the_snapdir_automount_first() -> None:
    backend, runner, source = make()
    snapshot = backend.create(backend.discover(source), NAME)
    listing = data("findmnt-list-zfs-automount.json")
    automount = next(m["target"] for m in json.loads(listing)["filesystems"]
                     if m["source"] == SNAP)
    runner.on(*FINDMNT_LIST, stdout=listing, times=1)
    runner.on("findmnt", "--json", "--mountpoint", automount, stdout=listing, times=1)
    backend.destroy(snapshot)
    assert runner.ran(mutating=True)[1:] == [f"umount {automount}", f"zfs destroy -r {SNAP}"]


def test_destroy_is_idempotent() -> None:
    backend, runner, source = make()
    snapshot = backend.create(backend.discover(source), NAME)
    snapshot_gone(runner)
    backend.destroy(snapshot)
    assert runner.ran(mutating=True) == [f"zfs snapshot -r {SNAP}"]


def test_destroy_refuses_names_without_the_marker() -> None:
    backend, runner, source = make()
    volume = backend.discover(source)
    for name in ("daily-2025-01-02", "mailsnap-zmail", "x-mailsnap-zmail-20250102T030405Z"):
        with pytest.raises(MailsnapError, match="refusing to destroy"):
            backend.destroy(Snapshot("zfs", name, volume, details={"dataset": DS}))
    assert runner.ran(mutating=True) == []


def test_destroy_that_stays_busy_names_what_remains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zfs_module, "DESTROY_DELAY", 0.0)
    backend, runner, source = make()
    snapshot = backend.create(backend.discover(source), NAME)
    runner.on("zfs", "destroy", exit_code=1, stderr=f"cannot destroy snapshot {SNAP}: "
              "dataset is busy")
    with pytest.raises(TeardownIncomplete, match=f"ZFS snapshot {SNAP} still exists after 4"):
        backend.destroy(snapshot)


def test_list_owned_only_this_jobs_snapshots_of_this_dataset() -> None:
    backend, runner, source = make()
    volume = backend.discover(source)
    real = data("zfs-snapshots-single.txt")
    listing = real + real.replace("zmail", "zmail-archive") + f"{DS}@daily\n"
    runner.on("zfs", "list", "-H", "-p", "-t", "snapshot", "-o", "name", "-d", "1", DS,
              stdout=listing)
    assert [s.name for s in backend.list_owned(volume, "zmail")] == [NAME]
    assert [s.name for s in backend.list_owned(volume, "zmail-archive")] == [
        "mailsnap-zmail-archive-20250102T030405Z"
    ]


def test_parse_zfs_list() -> None:
    rows = parse_zfs_list(data("zfs-list-recursive.txt"))
    assert [r.name for r in rows] == [DS, f"{DS}/user0", f"{DS}/user1"]
    assert all(r.mounted and r.type == "filesystem" for r in rows)


def test_config_accepts_zfs_keys() -> None:
    config = parse_config({"job": [{"name": "z", "backend": "zfs", "source": "/srv/mail",
                                    "target": "/b", "recursive": False, "use_snapdir": True}]})
    job = config.job[0]
    assert isinstance(job, ZfsJob) and not job.recursive and job.use_snapdir


def test_unmount_takes_children_down_before_the_parent() -> None:
    backend, runner, source = make("recursive")
    snapshot = backend.create(backend.discover(source), NAME)
    listing = data("findmnt-list-zfs-recursive-mounted.json")
    mountpoint = Path(next(m["target"] for m in json.loads(listing)["filesystems"]
                           if m["source"] == SNAP))
    runner.on(*FINDMNT_LIST, stdout=listing, times=1)
    runner.on("findmnt", "--json", "--mountpoint", stdout=listing)
    backend.unmount(snapshot, mountpoint)
    assert runner.ran(mutating=True)[1:] == [
        f"umount {mountpoint}/user0", f"umount {mountpoint}/user1", f"umount {mountpoint}"
    ]
