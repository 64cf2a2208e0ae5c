"""Real ZFS in the guest: single and recursive datasets, .zfs/snapshot, teardown, sweep."""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
import signal

import pytest

from mailsnap.backends.base import snapshot_name
from mailsnap.backends.zfs import ZfsBackend
from mailsnap.config import ZfsJob
from mailsnap.errors import BackendUnsuitable, MailsnapError
from mailsnap.runner import Runner
from tests.vm.guest.conftest import (
    ZfsSource,
    capture,
    mailsnap_zfs_snapshots,
    mounts_under,
    sh,
    tree,
)
from tests.vm.guest.flow import (
    big_files,
    mount_options,
    partials,
    published,
    run_cli,
    run_faulted,
    signal_group,
    snapshot_mounted,
    start_backup,
    wait_for_copy,
    write_config,
)

pytestmark = pytest.mark.vm

RUN_ID = "20250102T030405Z"
FINDMNT_LIST = ["findmnt", "--json", "--list", "--nofsroot", "--output",
                "TARGET,SOURCE,FSTYPE,FSROOT,OPTIONS"]
ZFS_LIST = ["zfs", "list", "-H", "-p", "-t", "filesystem", "-o",
            "name,mountpoint,mounted,canmount,type", "-r"]


def backend_for(src: ZfsSource, tmp_path: Path, **options: object) -> ZfsBackend:
    job = ZfsJob(backend="zfs", name="zmail", source=src.source, target=tmp_path / "target",
                 run_dir=tmp_path / "run", **options)
    return ZfsBackend(Runner(), job)


def change_live(src: ZfsSource) -> None:
    (src.source / "user0/Maildir/cur/new-after-snapshot:2,").write_text("late")
    (src.source / "user1/Maildir/dovecot-uidlist").unlink()
    sh("sync")


@pytest.mark.parametrize("children", [0, 2], ids=["single", "recursive"])
def test_snapshot_is_point_in_time_and_read_only(
    zfs_source: Callable[..., ZfsSource], tmp_path: Path, children: int
) -> None:
    src = zfs_source(children=children)
    before = tree(src.source)
    backend = backend_for(src, tmp_path)
    tag = "recursive" if children else "single"
    capture(f"findmnt-zfs-{tag}.json", "findmnt", "--json", "--nofsroot", "--target",
            src.source, "--output", "TARGET,SOURCE,FSTYPE,FSROOT,OPTIONS")
    capture(f"zfs-list-{tag}.txt", *ZFS_LIST, src.dataset)
    work = tmp_path / "work"
    with snapshot_mounted(backend, src.source, work, "zmail", RUN_ID) as (snapshot, path):
        capture(f"zfs-snapshots-{tag}.txt", "zfs", "list", "-H", "-p", "-t", "snapshot", "-o",
                "name", "-d", "1", src.dataset)
        expected = {f"{d}@{snapshot.name}" for d in (src.dataset, *src.children)}
        assert set(mailsnap_zfs_snapshots()) == expected
        capture(f"findmnt-list-zfs-{tag}-mounted.json", *FINDMNT_LIST)
        change_live(src)
        assert tree(path) == before
        assert {"ro", "nosuid", "nodev", "noexec"} <= mount_options(work / "snapshot")
        for child in range(children):
            assert "ro" in mount_options(work / "snapshot" / f"user{child}")
        with pytest.raises(OSError):
            (path / "write-test").write_text("x")
    assert mailsnap_zfs_snapshots() == []
    assert mounts_under(work) == []


def test_children_share_one_instant_only_with_recursive(
    zfs_source: Callable[..., ZfsSource], tmp_path: Path
) -> None:
    src = zfs_source(children=2)
    backend = backend_for(src, tmp_path, recursive=False)
    volume = backend.discover(src.source)
    assert json.loads(volume.details["children"]) == []
    snapshot = backend.create(volume, snapshot_name("zmail", RUN_ID))
    assert mailsnap_zfs_snapshots() == [f"{src.dataset}@{snapshot.name}"]
    backend.destroy(snapshot)
    assert mailsnap_zfs_snapshots() == []


def test_use_snapdir(zfs_source: Callable[..., ZfsSource], tmp_path: Path) -> None:
    src = zfs_source()
    before = tree(src.source)
    backend = backend_for(src, tmp_path, use_snapdir=True)
    with snapshot_mounted(backend, src.source, tmp_path / "work", "zmail", RUN_ID) as (
        snapshot, path
    ):
        assert path == src.source / ".zfs" / "snapshot" / snapshot.name
        change_live(src)
        assert tree(path) == before
    assert mailsnap_zfs_snapshots() == []
    assert [m for m in mounts_under(src.mountpoint) if ".zfs" in m] == []


def test_use_snapdir_refuses_children(
    zfs_source: Callable[..., ZfsSource], tmp_path: Path
) -> None:
    src = zfs_source(children=1)
    with pytest.raises(BackendUnsuitable, match="use_snapdir"):
        backend_for(src, tmp_path, use_snapdir=True).discover(src.source)


def test_destroy_unmounts_automount_is_idempotent_and_refuses_foreign_names(
    zfs_source: Callable[..., ZfsSource], tmp_path: Path
) -> None:
    src = zfs_source()
    backend = backend_for(src, tmp_path)
    volume = backend.discover(src.source)
    snapshot = backend.create(volume, snapshot_name("zmail", RUN_ID))
    # Someone browses .zfs/snapshot: ZFS automounts the snapshot, which blocks destroy.
    assert (src.source / ".zfs/snapshot" / snapshot.name / "user0").is_dir()
    assert [m for m in mounts_under(src.source) if ".zfs" in m] != []
    capture("findmnt-list-zfs-automount.json", *FINDMNT_LIST)
    backend.destroy(snapshot)
    backend.destroy(snapshot)
    assert mailsnap_zfs_snapshots() == []
    sh("zfs", "snapshot", f"{src.dataset}@manual")
    foreign = type(snapshot)(backend="zfs", name="manual", volume=volume,
                             details={"dataset": src.dataset})
    with pytest.raises(MailsnapError, match="refusing to destroy"):
        backend.destroy(foreign)
    sh("zfs", "destroy", f"{src.dataset}@manual")


# -- end to end, through `mailsnap backup` ---------------------------------------------------


def zfs_config(tmp_path: Path, src: ZfsSource, **extra: object) -> Path:
    return write_config(tmp_path / "mailsnap.toml", name="zmail", backend="zfs",
                        source=src.source, target=tmp_path / "target", run_dir=tmp_path / "run",
                        **extra)


def test_cli_backup_recursive(zfs_source: Callable[..., ZfsSource], tmp_path: Path) -> None:
    src = zfs_source(children=2)
    code, report, err = run_cli("backup", "--config", zfs_config(tmp_path, src))
    assert code == 0, err
    assert report["jobs"][0]["backend"] == "zfs"
    [backup] = published(tmp_path / "target", "zmail")
    assert tree(backup / "mail") == tree(src.source)
    assert any(p.startswith("user1/") for p in tree(backup / "mail"))  # a child dataset
    assert mailsnap_zfs_snapshots() == []
    assert mounts_under(tmp_path / "run") == []


def test_cli_sigterm_mid_copy_leaves_nothing(
    zfs_source: Callable[..., ZfsSource], tmp_path: Path
) -> None:
    src = zfs_source(children=1)
    big_files(src.source, count=150, size=1024**2)
    config = zfs_config(tmp_path, src)
    proc = start_backup(config)
    wait_for_copy(proc, tmp_path / "target", "zmail")
    signal_group(proc, signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert published(tmp_path / "target", "zmail") == []
    assert partials(tmp_path / "target", "zmail") == []
    assert mailsnap_zfs_snapshots() == []
    assert mounts_under(tmp_path / "run") == []


def test_cli_sweeps_what_a_killed_run_left(
    zfs_source: Callable[..., ZfsSource], tmp_path: Path
) -> None:
    src = zfs_source(children=1)
    big_files(src.source, count=150, size=1024**2)
    config = zfs_config(tmp_path, src)
    proc = start_backup(config)
    wait_for_copy(proc, tmp_path / "target", "zmail")
    signal_group(proc, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert mailsnap_zfs_snapshots() != []
    assert mounts_under(tmp_path / "run") != []
    code, _report, err = run_cli("backup", "--config", config)
    assert code == 0, err
    assert len(published(tmp_path / "target", "zmail")) == 1
    assert mailsnap_zfs_snapshots() == []
    assert mounts_under(tmp_path / "run") == []


@pytest.mark.parametrize("stage", ["after-snapshot", "after-mount"])
def test_cli_sigkill_at_a_fault_point_is_cleaned_up(
    zfs_source: Callable[..., ZfsSource], tmp_path: Path, stage: str
) -> None:
    """Fault matrix cells for the stages that differ per backend (tests/test_fault_matrix.py
    runs the whole matrix on btrfs): killed right after the snapshot or the mount, the snapshot
    stays until `mailsnap cleanup` removes it and says so; then the next backup succeeds."""
    src = zfs_source(children=1)
    config = zfs_config(tmp_path, src)
    code, _report, err = run_cli("backup", "--config", config)
    assert code == 0, err
    [first] = published(tmp_path / "target", "zmail")
    before = tree(first)
    code, err = run_faulted(config, f"{stage}:SIGKILL")
    assert code == -9, err
    assert mailsnap_zfs_snapshots() != []  # with child datasets: one per dataset
    if stage == "after-mount":
        assert mounts_under(tmp_path / "run") != []
    code, report, err = run_cli("cleanup", "--config", config)
    assert code == 0, err
    removed = report["jobs"][0]["removed"]
    assert any(r.startswith("snapshot mailsnap-zmail-") for r in removed), removed
    assert mailsnap_zfs_snapshots() == []
    assert mounts_under(tmp_path / "run") == []
    code, _report, err = run_cli("backup", "--config", config)
    assert code == 0, err
    assert len(published(tmp_path / "target", "zmail")) == 2
    assert tree(first) == before
    assert partials(tmp_path / "target", "zmail") == []
    assert mailsnap_zfs_snapshots() == []
    assert mounts_under(tmp_path / "run") == []
