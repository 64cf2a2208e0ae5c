"""Issue #7 on real btrfs loop volumes (privileged tier, CI runs it as root): a live source
lazily unmounted mid-copy, one session per job shared by `backup`, `snapshot --exec` and dry
runs, leftover mounts that somebody still reads, a full target, and what a dry run reports.
Each test failed on the code before the fix."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest

from mailsnap.config import one_off_job
from mailsnap.copiers.live import LiveCopy as _Run
from mailsnap.errors import SourceRejected
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from mailsnap.store import BackupStore
from tests.helpers.loopfs import BtrfsVolume, mounts_under, subvolumes
from tests.helpers.maildir_writer import seed

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("need_rsync")]


@pytest.fixture
def source(btrfs: BtrfsVolume) -> Path:
    root = btrfs.mail / "Maildir"
    seed(root, per_folder=200)
    return root


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def mailsnap(*args: str | Path, run_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailsnap", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, MAILSNAP_RUN_DIR=str(run_dir)),
    )


def wait_for(condition: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def snapshots(btrfs: BtrfsVolume) -> list[str]:
    return [s for s in subvolumes(btrfs.top) if "mailsnap-" in s]


def nothing_left(btrfs: BtrfsVolume, run_dir: Path) -> None:
    assert mounts_under(run_dir) == []
    assert snapshots(btrfs) == []


# -- part 2: a live copy whose source is unmounted under it ----------------------------------


def test_live_copy_of_a_lazily_unmounted_source_fails_and_keeps_latest(
    btrfs: BtrfsVolume, source: Path, tmp_path: Path, run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The source is the mount point itself, as in /srv/mail: after `umount -l` it is an empty
    # directory, and every message not read yet "vanishes".
    job = one_off_job(name="mail", source=btrfs.mail, target=tmp_path / "b", backend="live")
    first = run_backup(job, Runner())
    real = _Run._copy_message
    calls = [0]

    def copy_then_unmount(self: _Run, *args: object) -> bool:
        calls[0] += 1
        if calls[0] == 300:  # mid-copy: an admin (or an automounter) unmounts the volume
            subprocess.run(["umount", "-l", str(btrfs.mail)], check=True)
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_Run, "_copy_message", copy_then_unmount)
    with pytest.raises(SourceRejected, match=r"unmounted or replaced|disappeared"):
        run_backup(job, Runner())
    store = BackupStore(job.target / "mail")
    assert [b.run_id for b in store.backups()] == [Path(first.backup or "").name]
    assert os.readlink(job.target / "mail" / "latest") == Path(first.backup or "").name
    assert not list((job.target / "mail").glob("*.partial"))


# -- part 3: one session per job -------------------------------------------------------------


@pytest.fixture
def held_snapshot(
    btrfs: BtrfsVolume, source: Path, run_dir: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A running `mailsnap snapshot --exec` of job "mail", whose command waits for a file."""
    release = tmp_path / "release"
    seen = tmp_path / "seen"
    script = ('ls "$MAILSNAP_SNAPSHOT/cur" | wc -l > "$0"; '
              'while [ ! -e "$1" ]; do sleep 0.05; done; '
              'ls "$MAILSNAP_SNAPSHOT/cur" | wc -l >> "$0"')
    process = mailsnap("snapshot", "--source", source, "--backend", "btrfs", "--",
                       "sh", "-c", script, seen, release, run_dir=run_dir)
    wait_for(lambda: seen.exists() and seen.read_text().strip(), "the snapshot command")
    try:
        yield process, release
    finally:
        release.touch()
        if process.poll() is None:
            process.communicate(timeout=60)
        process.wait(timeout=60)
        nothing_left(btrfs, run_dir)


def test_backup_and_dry_run_of_a_job_whose_snapshot_is_held_exit_3(
    held_snapshot: tuple[subprocess.Popen[str], Path], btrfs: BtrfsVolume, source: Path,
    tmp_path: Path, run_dir: Path,
) -> None:
    process, release = held_snapshot
    before = snapshots(btrfs)
    mounts = mounts_under(run_dir)
    assert len(before) == 1 and mounts
    for extra in ([], ["--dry-run"]):
        other = mailsnap("backup", "--source", source, "--target", tmp_path / "b",
                         "--backend", "btrfs", *extra, run_dir=run_dir)
        _, err = other.communicate(timeout=60)
        assert other.returncode == 3, err
        assert f"pid {process.pid}" in err and "snapshot --exec" in err
    # The running snapshot was not touched: same subvolume, still mounted, still readable.
    assert snapshots(btrfs) == before and mounts_under(run_dir) == mounts
    assert not (tmp_path / "b").exists()
    release.touch()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    counts = (tmp_path / "seen").read_text().split()
    assert counts[0] == counts[1] != "0"


def test_snapshot_exec_while_a_backup_runs_exits_3_and_the_backup_completes(
    btrfs: BtrfsVolume, source: Path, tmp_path: Path, run_dir: Path
) -> None:
    # The backup is held right after its snapshot by an after_snapshot hook that waits for a
    # file, so the overlap does not depend on how fast this machine copies.
    started, release = tmp_path / "hook-started", tmp_path / "release"
    hook = ["sh", "-c", 'touch "$0"; while [ ! -e "$1" ]; do sleep 0.05; done',
            str(started), str(release)]
    config = tmp_path / "mailsnap.toml"
    config.write_text(
        f'[[job]]\nname = "mail"\nsource = "{source}"\ntarget = "{tmp_path / "b"}"\n'
        f'backend = "btrfs"\nafter_snapshot = {json.dumps(hook)}\n'
    )
    backup = mailsnap("backup", "--config", config, run_dir=run_dir)
    try:
        wait_for(started.exists, "the backup's after_snapshot hook")
        snap = mailsnap("snapshot", "--source", source, "--backend", "btrfs", "--", "true",
                        run_dir=run_dir)
        _, err = snap.communicate(timeout=60)
        assert snap.returncode == 3, err
        assert f"pid {backup.pid} (backup)" in err
        # A one-off backup of the same source to another target: the same job, refused.
        other = mailsnap("backup", "--source", source, "--target", tmp_path / "other",
                         "--backend", "btrfs", run_dir=run_dir)
        _, err = other.communicate(timeout=60)
        assert other.returncode == 3, err
        assert not (tmp_path / "other").exists()
    finally:
        release.touch()
    _, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    assert len(BackupStore(tmp_path / "b" / "mail").backups()) == 1
    nothing_left(btrfs, run_dir)


# -- part 4: leftover mounts that somebody still reads ---------------------------------------


def kill_mid_snapshot(source: Path, run_dir: Path, tmp_path: Path, script: str) -> Path:
    """A `snapshot --exec` whose mailsnap is SIGKILLed: its snapshot and mount are left."""
    ready = tmp_path / "ready"
    process = mailsnap("snapshot", "--source", source, "--backend", "btrfs", "--",
                       "sh", "-c", script, ready, run_dir=run_dir)
    wait_for(ready.exists, "the snapshot command")
    os.kill(process.pid, signal.SIGKILL)  # mailsnap only: its children must not outlive it
    process.wait(timeout=30)  # not communicate(): an orphan may still hold the output pipes
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    (mount,) = mounts_under(run_dir)
    return Path(mount)


def test_sweep_refuses_to_unmount_from_under_a_foreign_reader(
    btrfs: BtrfsVolume, source: Path, tmp_path: Path, run_dir: Path
) -> None:
    mount = kill_mid_snapshot(source, run_dir, tmp_path, 'touch "$0"; exec sleep 60')
    # An admin's shell, say:
    reader = subprocess.Popen(["sleep", "60"], cwd=mount / "Maildir" / "cur")
    try:
        job = mailsnap("backup", "--source", source, "--target", tmp_path / "b",
                       "--backend", "btrfs", run_dir=run_dir)
        _, err = job.communicate(timeout=60)
        assert job.returncode == 1, err
        assert f"pid {reader.pid}" in err and "sleep" in err
        assert reader.poll() is None  # not ours: never signalled
        assert mounts_under(run_dir) == [str(mount)]  # not yanked from under the reader
    finally:
        reader.kill()
        reader.wait()
    report = run_backup(one_off_job(name="mail", source=source, target=tmp_path / "b",
                                    backend="btrfs"), Runner())
    assert report.status == "ok"
    nothing_left(btrfs, run_dir)


def test_sweep_stops_an_orphan_of_our_own_and_goes_on(
    btrfs: BtrfsVolume, source: Path, tmp_path: Path, run_dir: Path
) -> None:
    # The shell dies with mailsnap (parent-death signal); its background child, reading the
    # snapshot, is a grandchild and survives — but carries the run's marker.
    mount = kill_mid_snapshot(
        source, run_dir, tmp_path,
        '(cd "$MAILSNAP_SNAPSHOT" && exec sleep 60) & sleep 0.2; touch "$0"; wait')
    orphans = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cwd_in(p, mount)]
    try:
        assert orphans, "the test needs an orphan that still uses the snapshot"
        report = run_backup(one_off_job(name="mail", source=source, target=tmp_path / "b",
                                        backend="btrfs"), Runner())
        assert report.status == "ok"
        assert not [p for p in orphans if _alive(p)]
        nothing_left(btrfs, run_dir)
    finally:
        for proc in orphans:
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGKILL)


def _alive(proc: Path) -> bool:
    """Running, not a zombie (an orphan is reaped by whatever PID 1 this machine has)."""
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cwd_in(proc: Path, mount: Path) -> bool:
    try:
        return os.readlink(proc / "cwd").startswith(str(mount))
    except OSError:
        return False


# -- part 5/6: a full target, and what a dry run reports ---------------------------------------


@pytest.fixture
def tiny_target(tmp_path: Path) -> Iterator[Path]:
    image = tmp_path / "tiny.img"
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


@pytest.mark.parametrize("backend", ["btrfs", "live"])
def test_full_target_is_reported_as_full_and_keeps_the_earlier_backup(
    btrfs: BtrfsVolume, source: Path, tiny_target: Path, run_dir: Path, backend: str
) -> None:
    job = one_off_job(name="mail", source=source, target=tiny_target, backend=backend)
    first = run_backup(job, Runner())
    for i in range(12):
        (source / "cur" / f"1760000000.M{i}P7.big:2,S").write_bytes(os.urandom(1 << 20))
    process = mailsnap("backup", "--source", source, "--target", tiny_target, "--backend",
                       backend, "--json", run_dir=run_dir)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    (entry,) = json.loads(out)["jobs"]
    assert f"target {tiny_target / 'mail'} is full" in entry["error"]
    assert "Broken pipe" not in entry["error"] and "[Errno" not in entry["error"]
    store = BackupStore(tiny_target / "mail")
    assert [b.run_id for b in store.backups()] == [Path(first.backup or "").name]
    assert not list((tiny_target / "mail").glob("*.partial"))
    nothing_left(btrfs, run_dir)


def test_dry_run_of_a_snapshot_backend_reports_what_the_source_holds(
    btrfs: BtrfsVolume, source: Path, tmp_path: Path, run_dir: Path
) -> None:
    process = mailsnap("backup", "--source", source, "--target", tmp_path / "b",
                       "--backend", "btrfs", "--dry-run", run_dir=run_dir)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "would copy 0 files" not in out
    assert "counted on the live source" in out
    messages = sum(1 for p in source.rglob("*") if p.parent.name in ("cur", "new"))
    assert f"{messages} messages" in out
    assert not (tmp_path / "b").exists()
    nothing_left(btrfs, run_dir)
