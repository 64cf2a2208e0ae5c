"""Backups on a ZFS target (``target_snapshots = "auto"``, issue #12), on real ZFS in the guest:
one dataset per job, each night's changes applied to it and then ``zfs snapshot``, the dated
backups read-only views of those snapshots, retention by ``zfs destroy``.

The source is a ZFS dataset too (backend zfs); its tree is tests/test_incremental_btrfs.py's
five users (folder names with spaces, ``&``, quotes, non-ASCII and non-UTF-8 bytes, COPY hard
links, a symlink), changed by its day of Dovecot. Every backup must be exactly its snapshot
(tests/helpers/trees.py: names, content, modes, owners, times, hard-link structure) and stay
so after later nights.
"""

from __future__ import annotations

from collections.abc import Iterator
import errno
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import time
from typing import Any

import pytest

from tests.helpers.trees import diff_trees, snapshot_tree
from tests.test_incremental_btrfs import (
    ALICE,
    BOB,
    JOERG,
    PLANS,
    build_store,
    change_store,
    maildir,
)
from tests.vm.guest.conftest import ZfsSource, mounts_under, sh
from tests.vm.guest.flow import big_files, mailsnap, run_faulted, write_config

pytestmark = pytest.mark.vm

JOB = "mail"


@pytest.fixture
def zfs_target(pool: str, tmp_path: Path) -> Iterator[Path]:
    """``mailpool/backup`` mounted at tmp_path/target: the backup disk."""
    target = tmp_path / "target"
    sh("zfs", "create", "-o", f"mountpoint={target}", f"{pool}/backup")
    yield target
    for mount in sorted(mounts_under(target), key=len, reverse=True):
        sh("umount", mount, check=False)
    for attempt in range(5):
        if subprocess.run(["zfs", "destroy", "-r", "-f", f"{pool}/backup"]).returncode == 0:
            break
        time.sleep(0.5 * (attempt + 1))


@pytest.fixture
def source(zfs_source: Any) -> Path:
    src: ZfsSource = zfs_source()
    root = src.source / "S"
    root.mkdir()
    return root


def age(root: Path, seconds: float = 3600) -> None:
    """Every directory last changed an hour ago, as a night finds a store."""
    then = time.time() - seconds
    for dirpath, _dirs, _files in os.walk(root):
        os.utime(dirpath, (then, then), follow_symlinks=False)


def configure(tmp_path: Path, source: Path, target: Path, **extra: object) -> Path:
    return write_config(tmp_path / "mailsnap.toml", name=JOB, backend="zfs", source=source,
                        target=target, run_dir=tmp_path / "run", **extra)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(mailsnap(*args, "--config", config, "--json"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-4000:])
    return done


def backup(config: Path) -> tuple[dict[str, Any], str]:
    done = cli(config, "backup")
    (entry,) = json.loads(done.stdout)["jobs"]
    assert entry["status"] == "ok", done.stderr
    return entry, done.stderr


def exact(source: Path, backup_dir: Path) -> None:
    differences = diff_trees(source, backup_dir / "mail")
    assert not differences, "\n".join(differences)


def image(path: Path) -> dict[str, Any]:
    tree = snapshot_tree(path / "mail", excludes=())
    return {rel: (e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.sha256, e.target)
            for rel, e in tree.entries.items()}


def dataset_of(target: Path) -> str:
    return f"mailpool/backup/mailsnap-{JOB}"


def snapshots(target: Path) -> list[str]:
    out = sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-s", "createtxg",
             "-d", "1", dataset_of(target))
    return [line.split("@")[1] for line in out.split()]


def views(target: Path) -> list[str]:
    return sorted(p.name for p in (target / JOB).iterdir()
                  if p.is_symlink() and p.name[0].isdigit())


def test_nights_on_a_zfs_target_are_snapshots_holding_exactly_their_source(
    source: Path, zfs_target: Path, tmp_path: Path
) -> None:
    copies = build_store(source)
    age(source)
    config = configure(tmp_path, source, zfs_target, keep_last=3,
                       users="{domain}/{user}/Maildir")
    first, err = backup(config)
    b1 = Path(first["backup"])
    assert os.readlink(b1) == f".mirror/.zfs/snapshot/{b1.name}"
    assert f"zfs create -o mountpoint={zfs_target / JOB / '.mirror'}" in err
    assert f"zfs snapshot {dataset_of(zfs_target)}@{b1.name}" in err
    exact(source, b1)
    before = image(b1)
    with pytest.raises(OSError) as refused:
        (b1 / "mail" / "intruder").write_text("x")
    assert refused.value.errno == errno.EROFS
    assert sh("zfs", "get", "-H", "-o", "value", "mailsnap:store",
              dataset_of(zfs_target)).strip() == str(zfs_target / JOB)
    assert os.stat(zfs_target / JOB / ".mirror").st_mode & 0o777 == 0o700

    changes = change_store(source, copies)
    os.rename(source / maildir(BOB, ".Sent"), source / maildir(BOB, ".Sent Items"))
    shutil.rmtree(source / maildir(JOERG, PLANS))
    second, err = backup(config)
    b2 = Path(second["backup"])
    assert "zfs rollback" not in err  # the mirror was as night 1 left it
    exact(source, b2)
    assert image(b1) == before  # the earlier backup is as it was
    copy = second["copy"]
    assert copy["folders_unchanged"] > 0 and copy["folders_listed"] > 0
    assert copy["renames"] >= len(changes.renamed)
    assert copy["removed"] > 0
    # Renamed messages were renamed in the dataset, not written again.
    for old, now in changes.renamed:
        if (source / now).exists():
            assert os.lstat(b2 / "mail" / now).st_ino == os.lstat(b1 / "mail" / old).st_ino

    done = cli(config, "verify", "--all", "--deep")
    report = json.loads(done.stdout)
    assert len(report["backups"]) == 2
    assert [p for b in report["backups"] for p in b["problems"]] == [], done.stdout
    # Mail comes back out of the older backup's read-only view.
    out = tmp_path / "restored"
    cli(config, "restore", "--user", "alice@example.com", "--backup", b1.name, "--into",
        str(out))
    alice = b1 / "mail" / maildir(ALICE)
    assert sorted(os.listdir(out / "cur")) == sorted(os.listdir(alice / "cur"))

    # zfs-auto-snapshot is off for the dataset, but an admin's (or sanoid's) snapshot after
    # the newest backup must not stop the next night.
    assert sh("zfs", "get", "-H", "-o", "value", "com.sun:auto-snapshot",
              dataset_of(zfs_target)).strip() == "false"
    sh("zfs", "snapshot", f"{dataset_of(zfs_target)}@autosnap_2026-12-02_03:00:00_hourly")
    third, _ = backup(config)  # a quiet night
    b3 = Path(third["backup"])
    assert (third["copy"]["copied"], third["copy"]["bytes_written"]) == (0, 0)
    exact(source, b3)

    # Views ZFS mounted for this test's reads go; then someone browses the oldest backup.
    snapdir = zfs_target / JOB / ".mirror" / ".zfs" / "snapshot"
    for mount in mounts_under(snapdir):
        sh("umount", mount)
    os.listdir(b1 / "mail")
    fourth, err = backup(config)  # keep_last = 3 prunes the (mounted) first backup
    b4 = Path(fourth["backup"])
    assert fourth["pruned"] == [b1.name]
    assert f"zfs destroy {dataset_of(zfs_target)}@{b1.name}" in err
    # The night read the newest backup's manifest only: no other view was mounted.
    assert {Path(m).name for m in mounts_under(snapdir)} <= {b3.name, b4.name}
    exact(source, b4)
    assert snapshots(zfs_target) == [b2.name, "autosnap_2026-12-02_03:00:00_hourly",
                                     b3.name, b4.name]
    assert views(zfs_target) == [b2.name, b3.name, b4.name]
    assert os.readlink(zfs_target / JOB / "latest") == b4.name


def test_a_run_killed_mid_copy_or_right_after_its_snapshot_is_finished_by_the_next(
    source: Path, zfs_target: Path, tmp_path: Path
) -> None:
    copies = build_store(source)
    age(source)
    config = configure(tmp_path, source, zfs_target)
    first, _ = backup(config)
    change_store(source, copies)
    big_files(source, count=10, size=1024**2)  # the copy still runs when the fault fires

    code, err = run_faulted(config, "mid-copy:SIGKILL")
    assert code == -9, err
    assert views(zfs_target) == [Path(first["backup"]).name]
    second, err = backup(config)  # the mirror is rolled back, then the night runs again
    assert f"zfs rollback {dataset_of(zfs_target)}@{Path(first['backup']).name}" in err
    exact(source, Path(second["backup"]))

    (source / maildir(BOB) / "cur" / "1710000000.M9P9.late:2,S").write_bytes(b"late\n")
    code, err = run_faulted(config, "after-rename:SIGKILL")  # snapshot taken, not named
    assert code == -9, err
    orphan = snapshots(zfs_target)[-1]
    assert orphan not in views(zfs_target)
    third, err = backup(config)
    assert "it is published now" in err
    assert views(zfs_target) == sorted([Path(first["backup"]).name,
                                        Path(second["backup"]).name, orphan,
                                        Path(third["backup"]).name])
    exact(source, zfs_target / JOB / orphan)
    exact(source, Path(third["backup"]))
    assert os.readlink(zfs_target / JOB / "latest") == Path(third["backup"]).name

    # A night the shrink guard refuses fails after its copy: the mirror goes back to the
    # newest backup at once, and nothing new is published.
    newest = Path(third["backup"])
    for gone in ("example.com", "example.net", "bulk"):
        shutil.rmtree(source / gone)
    done = subprocess.run(mailsnap("backup", "--config", config), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0 and "min_keep_percent" in done.stderr, done.stderr[-3000:]
    assert f"zfs rollback {dataset_of(zfs_target)}@{newest.name}" in done.stderr
    assert diff_trees(newest / "mail", zfs_target / JOB / ".mirror" / "mail") == []
    assert views(zfs_target)[-1] == newest.name
    assert snapshots(zfs_target)[-1] == newest.name


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def fill_pool(pool: str, filler: str, leave: int) -> None:
    """Reserve all of ``pool``'s free space but ``leave`` bytes for dataset ``filler``. The
    free space ZFS reports lags the writes of the open transaction group: sync first, and
    retry with what it says then."""
    for _attempt in range(5):
        sh("sync")
        sh("zpool", "sync", pool)
        free = int(sh("zfs", "get", "-H", "-p", "-o", "value", "available", pool))
        done = subprocess.run(["zfs", "set", f"reservation={free - leave}", filler],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"could not reserve the free space of {pool}: {done.stderr}")


def test_a_full_dataset_or_pool_two_runs_at_once_and_unmounted_datasets_lose_nothing(
    source: Path, zfs_target: Path, tmp_path: Path, pool: str
) -> None:
    """The worst nights on a ZFS target; after each, every backup is as it was and the next
    night is exact.

    - The source's dataset not mounted (the mail volume missing): refused before any
      snapshot.
    - The job's dataset not mounted: refused with how to mount it. Its dated names, which
      then point nowhere, are kept (a sweep must not take them for an interrupted prune's).
    - A second run while one is stopped mid-copy, and a prune then: refused (exit 3), and
      the stopped run, resumed, publishes an exact backup.
    - A quota reached mid-copy: the night fails with ZFS's error, the mirror is rolled back
      to the newest backup and nothing is published.
    - The pool itself full mid-copy (a reservation of another dataset holds all its free
      space, so every dataset of it gets ENOSPC, the source's too): the same, and once
      space is freed the next night is exact."""
    build_store(source)
    age(source)
    config = configure(tmp_path, source, zfs_target)
    first, _ = backup(config)
    b1 = Path(first["backup"])
    before = image(b1)
    dataset = dataset_of(zfs_target)

    def refused(*args: str) -> tuple[int, str]:
        done = subprocess.run(mailsnap(*(args or ("backup",)), "--config", config),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode != 0, done.stderr[-3000:]
        return done.returncode, done.stderr

    def as_it_was(*names: str) -> None:
        assert views(zfs_target) == list(names)
        assert snapshots(zfs_target) == list(names)
        assert image(b1) == before
        leftovers = sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", f"{pool}/mail")
        assert "mailsnap" not in leftovers
        assert mounts_under(tmp_path / "run") == []

    sh("zfs", "unmount", f"{pool}/mail/vmail")
    _code, err = refused()
    said = err.strip().splitlines()[-1]
    assert str(source) in said, err[-3000:]
    assert "zfs snapshot" not in err and "zfs rollback" not in err
    sh("zfs", "mount", f"{pool}/mail/vmail")
    as_it_was(b1.name)

    for mount in mounts_under(zfs_target / JOB / ".mirror" / ".zfs" / "snapshot"):
        sh("umount", mount)  # the views this test read
    sh("zfs", "unmount", dataset)
    _code, err = refused()
    said = err.strip().splitlines()[-1]
    assert f"{dataset} belongs to this store but is not mounted" in said, err[-3000:]
    assert os.path.lexists(b1) and "zfs rollback" not in err
    sh("zfs", "mount", dataset)
    as_it_was(b1.name)

    big_files(source, count=40, size=1024**2)  # the copy runs long enough to be stopped
    first_run = subprocess.Popen(mailsnap("backup", "--config", config), text=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 start_new_session=True,
                                 env=dict(os.environ, MAILSNAP_FAULT="mid-copy:SIGSTOP"))
    try:
        deadline = time.monotonic() + 300
        while not stopped(first_run.pid):
            assert first_run.poll() is None, "the run ended before its mid-copy fault point"
            assert time.monotonic() < deadline, "the run never reached mid-copy"
            time.sleep(0.1)
        code, err = refused("backup")
        assert code == 3 and "already running" in err, err[-3000:]
        code, err = refused("prune")
        assert code == 3, err[-3000:]
    finally:
        os.kill(first_run.pid, signal.SIGCONT)
    _out, err = first_run.communicate(timeout=600)
    assert first_run.returncode == 0, err[-3000:]
    b2 = zfs_target / JOB / views(zfs_target)[-1]
    exact(source, b2)
    before2 = image(b2)

    (source / maildir(BOB) / "cur").joinpath("1710000100.M1P9.big:2,S").write_bytes(
        os.urandom(40 * 1024**2))
    used = int(sh("zfs", "get", "-H", "-p", "-o", "value", "used", f"{pool}/backup"))
    sh("zfs", "set", f"quota={used + 2 * 1024**2}", f"{pool}/backup")
    try:
        _code, err = refused()
    finally:
        sh("zfs", "set", "quota=none", f"{pool}/backup")
    said = err.strip().splitlines()[-1]
    assert any(why in said for why in ("is full", "quota exceeded", "No space left")), \
        err[-3000:]
    assert f"zfs rollback {dataset}@{b2.name}" in err
    as_it_was(b1.name, b2.name)
    assert image(b2) == before2
    assert diff_trees(b2 / "mail", zfs_target / JOB / ".mirror" / "mail") == []
    third, _ = backup(config)
    b3 = Path(third["backup"])
    exact(source, b3)
    before3 = image(b3)

    # A new message larger than what is left, written before the pool fills (the source is on
    # it too), then all the pool's free space but 2 MiB reserved for another dataset: the
    # snapshots can still be taken, the copy cannot finish.
    (source / maildir(ALICE) / "cur").joinpath("1710000200.M2P9.big:2,S").write_bytes(
        os.urandom(8 * 1024**2))
    sh("zfs", "create", "-o", "mountpoint=none", f"{pool}/filler")
    fill_pool(pool, f"{pool}/filler", leave=2 * 1024**2)
    try:
        _code, err = refused()
    finally:
        sh("zfs", "destroy", f"{pool}/filler")
    said = err.strip().splitlines()[-1]
    assert f"target {zfs_target / JOB} is full" in said, err[-3000:]
    assert f"zfs rollback {dataset}@{b3.name}" in err
    as_it_was(b1.name, b2.name, b3.name)
    assert image(b2) == before2 and image(b3) == before3
    assert diff_trees(b3 / "mail", zfs_target / JOB / ".mirror" / "mail") == []
    fourth, _ = backup(config)
    exact(source, Path(fourth["backup"]))
