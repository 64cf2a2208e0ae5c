"""Real LVM in the guest: classic (ext4, XFS) and thin snapshots, overflow, teardown, sweep."""

from __future__ import annotations

from collections.abc import Callable
import json
from pathlib import Path
import signal

import pytest

from mailsnap.backends.base import snapshot_name
from mailsnap.backends.lvm import LvmBackend, list_lvs
from mailsnap.config import LvmJob
from mailsnap.errors import BackendUnsuitable, MailsnapError, SnapshotInvalid
from mailsnap.runner import Runner
from tests.vm.guest.conftest import (
    LvSource,
    capture,
    mailsnap_lvs,
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
LVS = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-a", "-o",
       "lv_name,vg_name,lv_path,lv_dm_path,lv_attr,lv_size,origin,origin_size,data_percent,"
       "segtype,pool_lv,lv_active"]


def backend_for(src: LvSource, tmp_path: Path, **options: object) -> LvmBackend:
    job = LvmJob(backend="lvm", name="lvmail", source=src.source, target=tmp_path / "target",
                 run_dir=tmp_path / "run", **options)
    return LvmBackend(Runner(), job)


@pytest.mark.parametrize(
    ("fstype", "thin", "expected"),
    [
        ("ext4", False, {"noload"}),
        ("xfs", False, {"nouuid", "norecovery"}),
        ("ext4", True, {"noload"}),
    ],
    ids=["ext4", "xfs", "thin-ext4"],
)
def test_snapshot_is_point_in_time_and_read_only(
    lv_source: Callable[..., LvSource], tmp_path: Path, fstype: str, thin: bool,
    expected: set[str],
) -> None:
    src = lv_source(fstype=fstype, thin=thin)
    before = tree(src.source)
    backend = backend_for(src, tmp_path, snapshot_size="64M")
    tag = f"{fstype}{'-thin' if thin else ''}"
    capture(f"findmnt-{tag}.json", "findmnt", "--json", "--nofsroot", "--target", src.source,
            "--output", "TARGET,SOURCE,FSTYPE,FSROOT,OPTIONS")
    capture(f"lvs-{tag}-origin.json", *LVS)
    with snapshot_mounted(backend, src.source, tmp_path / "work", "lvmail", RUN_ID) as (
        snapshot, path
    ):
        capture(f"lvs-{tag}-with-snapshot.json", *LVS)
        assert snapshot.details["lv"] == f"mail_{snapshot_name('lvmail', RUN_ID)}"
        # The live volume changes after the snapshot; the snapshot must not.
        (src.source / "user0/Maildir/cur/new-after-snapshot:2,").write_text("late")
        (src.source / "user1/Maildir/dovecot-uidlist").unlink()
        sh("sync")
        assert tree(path) == before
        assert {"ro", "nosuid", "nodev", "noexec"} <= mount_options(tmp_path / "work/snapshot")
        # ext4 does not list noload in /proc/mounts: check what mailsnap asked for.
        [mount] = [r.argv for r in backend.runner.history if r.argv[0] == "mount"]
        assert expected <= set(mount[mount.index("-o") + 1].split(","))
        with pytest.raises(OSError):
            (path / "write-test").write_text("x")
        copy = tmp_path / "copy"
        sh("rsync", "-a", f"{path}/", f"{copy}/")
        assert tree(copy) == before
        backend.check_healthy(snapshot)
    assert mailsnap_lvs() == []
    assert mounts_under(tmp_path / "work") == []


def test_refuses_before_creating_when_vg_lacks_space(
    lv_source: Callable[..., LvSource], tmp_path: Path
) -> None:
    src = lv_source()
    backend = backend_for(src, tmp_path, snapshot_size="100G")
    volume = backend.discover(src.source)
    with pytest.raises(BackendUnsuitable, match="free, but the snapshot of vgmail/mail needs"):
        backend.create(volume, snapshot_name("lvmail", RUN_ID))
    assert mailsnap_lvs() == []


def test_cow_overflow_invalidates_and_teardown_leaves_nothing(
    lv_source: Callable[..., LvSource], tmp_path: Path
) -> None:
    src = lv_source()
    backend = backend_for(src, tmp_path, snapshot_size="8M")
    with pytest.raises(SnapshotInvalid, match="became invalid"):
        with snapshot_mounted(backend, src.source, tmp_path / "work", "lvmail", RUN_ID) as (
            snapshot, _path
        ):
            sh("dd", "if=/dev/urandom", f"of={src.mountpoint}/filler", "bs=1M", "count=48",
               "conv=fsync")
            sh("sync")
            capture("lvs-overflowed.json", *LVS)
            backend.check_healthy(snapshot)
    assert mailsnap_lvs() == []
    assert mounts_under(tmp_path / "work") == []


def test_auto_extend_grows_the_snapshot(
    lv_source: Callable[..., LvSource], tmp_path: Path
) -> None:
    src = lv_source()
    backend = backend_for(src, tmp_path, snapshot_size="16M", cow_warn_percent=20,
                          auto_extend=True)
    with snapshot_mounted(backend, src.source, tmp_path / "work", "lvmail", RUN_ID) as (
        snapshot, _path
    ):
        sh("dd", "if=/dev/urandom", f"of={src.mountpoint}/filler", "bs=1M", "count=6",
           "conv=fsync")
        capture("lvs-cow-filling.json", *LVS)
        backend.check_healthy(snapshot)
        rows = {lv.name: lv for lv in list_lvs(Runner(), ["vgmail"])}
        assert rows[snapshot.details["lv"]].size == 32 * 1024**2
        assert not rows[snapshot.details["lv"]].invalid


def test_destroy_is_idempotent_and_refuses_foreign_names(
    lv_source: Callable[..., LvSource], tmp_path: Path
) -> None:
    src = lv_source()
    backend = backend_for(src, tmp_path)
    volume = backend.discover(src.source)
    snapshot = backend.create(volume, snapshot_name("lvmail", RUN_ID))
    backend.destroy(snapshot)
    backend.destroy(snapshot)  # already gone: success
    assert mailsnap_lvs() == []
    sh("lvcreate", "-q", "-s", "-L", "8M", "-n", "mail_manual", "vgmail/mail")
    foreign = type(snapshot)(backend="lvm", name="manual", volume=volume,
                             details={"vg": "vgmail", "lv": "mail_manual"})
    with pytest.raises(MailsnapError, match="refusing to remove"):
        backend.destroy(foreign)
    assert "mail_manual" in sh("lvs", "--noheadings", "-o", "lv_name", "vgmail")
    sh("lvremove", "-q", "-y", "vgmail/mail_manual")


def test_list_owned_finds_only_this_jobs_snapshots(
    lv_source: Callable[..., LvSource], tmp_path: Path
) -> None:
    src = lv_source()
    backend = backend_for(src, tmp_path, snapshot_size="8M")
    volume = backend.discover(src.source)
    mine = backend.create(volume, snapshot_name("lvmail", RUN_ID))
    other_job = LvmBackend(Runner(), LvmJob(backend="lvm", name="lvmail-archive",
                                            source=src.source, target=tmp_path / "t",
                                            snapshot_size="8M"))
    theirs = other_job.create(volume, snapshot_name("lvmail-archive", RUN_ID))
    capture("lvs-two-jobs.json", *LVS)
    assert [s.name for s in backend.list_owned(volume, "lvmail")] == [mine.name]
    assert [s.details["lv"] for s in other_job.list_owned(volume, "lvmail-archive")] == [
        theirs.details["lv"]
    ]
    backend.destroy(mine)
    other_job.destroy(theirs)


# -- end to end, through `mailsnap backup` ---------------------------------------------------


def lvm_config(tmp_path: Path, src: LvSource, **extra: object) -> Path:
    return write_config(tmp_path / "mailsnap.toml", name="lvmail", backend="lvm",
                        source=src.source, target=tmp_path / "target", run_dir=tmp_path / "run",
                        **extra)


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_cli_backup(lv_source: Callable[..., LvSource], tmp_path: Path, fstype: str) -> None:
    src = lv_source(fstype=fstype)
    config = lvm_config(tmp_path, src, snapshot_size="32M")
    code, report, err = run_cli("backup", "--config", config)
    assert code == 0, err
    assert report["jobs"][0]["backend"] == "lvm"
    [backup] = published(tmp_path / "target", "lvmail")
    assert tree(backup / "mail") == tree(src.source)
    manifest = json.loads((backup / "mailsnap.json").read_text())
    assert manifest["backend"] == "lvm" and manifest["point_in_time"] is True
    assert mailsnap_lvs() == []
    assert mounts_under(tmp_path / "run") == []


def test_cli_overflow_fails_and_leaves_nothing(
    lv_source: Callable[..., LvSource], tmp_path: Path
) -> None:
    src = lv_source()
    big_files(src.source, count=100, size=1024**2)
    config = lvm_config(tmp_path, src, snapshot_size="4M")
    sh("dmesg", "-C")
    proc = start_backup(config)
    wait_for_copy(proc, tmp_path / "target", "lvmail")
    # Rewrite a file on the origin while the copy runs: every block rewritten after the
    # snapshot is first copied into its 4 MiB COW space, which overflows at once.
    sh("dd", "if=/dev/urandom", f"of={src.mountpoint}/churn", "bs=1M", "count=24",
       "conv=fsync", "status=none")
    out, err = proc.communicate(timeout=300)
    print(out, err[-3000:])
    assert "Invalidating snapshot" in sh("dmesg")
    assert proc.returncode == 1, err
    report = json.loads(out)
    assert report["jobs"][0]["status"] == "failed"
    assert published(tmp_path / "target", "lvmail") == []
    assert partials(tmp_path / "target", "lvmail") == []
    assert mailsnap_lvs() == []
    assert mounts_under(tmp_path / "run") == []


def test_cli_sigterm_mid_copy_leaves_nothing(
    lv_source: Callable[..., LvSource], tmp_path: Path
) -> None:
    src = lv_source()
    big_files(src.source, count=150, size=1024**2)
    config = lvm_config(tmp_path, src, snapshot_size="32M")
    proc = start_backup(config)
    wait_for_copy(proc, tmp_path / "target", "lvmail")
    signal_group(proc, signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert published(tmp_path / "target", "lvmail") == []
    assert partials(tmp_path / "target", "lvmail") == []
    assert mailsnap_lvs() == []
    assert mounts_under(tmp_path / "run") == []


def test_cli_sweeps_what_a_killed_run_left(
    lv_source: Callable[..., LvSource], tmp_path: Path
) -> None:
    src = lv_source()
    big_files(src.source, count=150, size=1024**2)
    config = lvm_config(tmp_path, src, snapshot_size="32M")
    proc = start_backup(config)
    wait_for_copy(proc, tmp_path / "target", "lvmail")
    signal_group(proc, signal.SIGKILL)  # no teardown at all
    proc.communicate(timeout=60)
    assert len(mailsnap_lvs()) == 1
    assert mounts_under(tmp_path / "run") != []
    code, _report, err = run_cli("backup", "--config", config)
    assert code == 0, err
    assert "left by an earlier run" in err
    assert len(published(tmp_path / "target", "lvmail")) == 1
    assert partials(tmp_path / "target", "lvmail") == []
    assert mailsnap_lvs() == []
    assert mounts_under(tmp_path / "run") == []


@pytest.mark.parametrize("stage", ["after-snapshot", "after-mount"])
def test_cli_sigkill_at_a_fault_point_is_cleaned_up(
    lv_source: Callable[..., LvSource], tmp_path: Path, stage: str
) -> None:
    """Fault matrix cells for the stages that differ per backend (tests/test_fault_matrix.py
    runs the whole matrix on btrfs): killed right after the snapshot or the mount, the snapshot
    stays until `mailsnap cleanup` removes it and says so; then the next backup succeeds."""
    src = lv_source()
    config = lvm_config(tmp_path, src, snapshot_size="32M")
    code, _report, err = run_cli("backup", "--config", config)
    assert code == 0, err
    [first] = published(tmp_path / "target", "lvmail")
    before = tree(first)
    code, err = run_faulted(config, f"{stage}:SIGKILL")
    assert code == -9, err
    assert len(mailsnap_lvs()) == 1
    if stage == "after-mount":
        assert mounts_under(tmp_path / "run") != []
    code, report, err = run_cli("cleanup", "--config", config)
    assert code == 0, err
    removed = report["jobs"][0]["removed"]
    assert any(r.startswith("snapshot mailsnap-lvmail-") for r in removed), removed
    assert mailsnap_lvs() == []
    assert mounts_under(tmp_path / "run") == []
    code, _report, err = run_cli("backup", "--config", config)
    assert code == 0, err
    assert len(published(tmp_path / "target", "lvmail")) == 2
    assert tree(first) == before
    assert partials(tmp_path / "target", "lvmail") == []
    assert mailsnap_lvs() == []
    assert mounts_under(tmp_path / "run") == []
