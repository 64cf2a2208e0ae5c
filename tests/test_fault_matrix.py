"""Issue #8: the fault matrix on real btrfs loop volumes (privileged tier, CI runs it as root).

Every cell stops a real ``mailsnap backup`` at one stage (``MAILSNAP_FAULT``, see
``mailsnap.faults``) with one signal, after a good backup exists. Then ``mailsnap cleanup`` and
the next backup must leave no snapshot, no mount, no ``.partial`` and no process of the job, every
earlier backup must be byte-identical, and the next backup must succeed.

What each cell expects of the stopped run:
- SIGKILL: dies on the spot (-9); what it made stays until ``cleanup`` (or the next run) removes
  it, and ``cleanup`` names each thing it removed.
- SIGTERM/SIGINT/SIGHUP: teardown runs, exit 130, nothing is left and nothing published — except
  after the rename (the commit point): then the backup is published and the signal must not
  un-publish it or fail the run, so the run finishes and exits 0.
Retention does not exist yet, so there is no ``mid-prune`` cell.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import hashlib
import os
from pathlib import Path
import re
import subprocess
import sys
import time

import pytest

from mailsnap.config import one_off_job
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from mailsnap.store import BackupStore
from tests.helpers.loopfs import BtrfsVolume, mounts_under, subvolumes
from tests.helpers.maildir_writer import seed

pytestmark = [pytest.mark.privileged, pytest.mark.slow, pytest.mark.usefixtures("need_rsync")]

STAGES = ("after-snapshot", "after-mount", "mid-copy", "after-copy", "mid-publish",
          "after-rename")
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGHUP")
# What a SIGKILLed run leaves at each stage (and cleanup must report removing).
LEAVES_MOUNT = {"after-mount", "mid-copy", "after-copy", "mid-publish", "after-rename"}
LEAVES_PARTIAL = {"mid-copy", "after-copy", "mid-publish"}
BIG_MESSAGES = 40  # × 1 MiB new per mid-copy cell: rsync is still copying when the fault fires
MATRIX_SECONDS: dict[str, float] = {}
# A job name of our own: other tests' runs on this machine carry "mailsnap-mail-" markers too.
JOB = f"fm{os.getpid()}"


@pytest.fixture
def source(btrfs: BtrfsVolume) -> Path:
    root = btrfs.mail / "Maildir"
    seed(root, per_folder=60)  # 300 messages
    return root


def mailsnap(*args: str | Path, run_dir: Path, fault: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MAILSNAP_RUN_DIR=str(run_dir))
    env.pop("MAILSNAP_FAULT", None)
    if fault is not None:
        env["MAILSNAP_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "mailsnap", *map(str, args)], capture_output=True, text=True,
        start_new_session=True, env=env, timeout=timeout, check=False,
    )


def snapshots(btrfs: BtrfsVolume) -> list[str]:
    return [s for s in subvolumes(btrfs.top) if "mailsnap-" in s]


def owned_processes(job: str = JOB) -> list[str]:
    """Processes (ours or orphans) carrying this job's marker in their environment."""
    found = []
    marker = f"MAILSNAP_OWNER=mailsnap-{job}-".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(e.startswith(marker) for e in (proc / "environ").read_bytes().split(b"\0")):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    found.append(f"{proc.name} {(proc / 'comm').read_text().strip()}")
    return found


def no_owned_processes(timeout: float = 10) -> None:
    # A SIGKILLed mailsnap's children get their parent-death SIGKILL at once, but dying takes
    # the kernel a moment.
    deadline = time.monotonic() + timeout
    while owned_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert owned_processes() == []


def nothing_left(btrfs: BtrfsVolume, run_dir: Path, store: Path) -> None:
    assert snapshots(btrfs) == []
    assert mounts_under(run_dir) == []
    assert list(store.glob("*.partial")) == []
    no_owned_processes()


def fingerprint(store: Path) -> dict[str, dict[str, str]]:
    """sha256 of every file (mailsnap.json included) of every published backup."""
    out: dict[str, dict[str, str]] = {}
    for backup in BackupStore(store).backups():
        seen: dict[tuple[int, int], str] = {}  # hard links: hash each inode once
        files = {}
        for path in sorted(backup.path.rglob("*")):
            if path.is_file() and not path.is_symlink():
                st = path.stat()
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
                files[str(path.relative_to(backup.path))] = seen[key]
        out[backup.run_id] = files
    return out


def add_big_messages(source: Path, cell: str) -> None:
    for i in range(BIG_MESSAGES):
        (source / ".Archive" / "cur" / f"1760000000.M{i}P{cell}.big:2,S").write_bytes(
            os.urandom(1 << 20))


@pytest.mark.parametrize("stage", STAGES)
def test_fault_matrix(stage: str, btrfs: BtrfsVolume, source: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    target, run_dir = tmp_path / "b", tmp_path / "run"
    store = target / JOB
    job_args = ("--job", JOB, "--source", source, "--target", target, "--backend", "btrfs")
    first = mailsnap("backup", *job_args, run_dir=run_dir)
    assert first.returncode == 0, first.stderr
    for n, sig in enumerate(SIGNALS):
        cell = f"{stage}:{sig}"
        if stage == "mid-copy":
            add_big_messages(source, str(n))
        earlier = fingerprint(store)
        latest_before = os.readlink(store / "latest")

        run = mailsnap("backup", *job_args, run_dir=run_dir, fault=cell)
        published = sorted(set(fingerprint(store)) - set(earlier))
        assert f"fault point {stage}: sending {sig}" in run.stderr, (cell, run.stderr)
        if sig == "SIGKILL":
            assert run.returncode == -9, (cell, run.stderr)
            assert len(snapshots(btrfs)) == 1, cell
            assert bool(mounts_under(run_dir)) == (stage in LEAVES_MOUNT), cell
            assert len(list(store.glob("*.partial"))) == (stage in LEAVES_PARTIAL), cell
            no_owned_processes()  # even rsync, killed mid-copy: it died with mailsnap
        elif stage == "after-rename":
            # Past the commit point: published, and the signal did not fail the run.
            assert run.returncode == 0, (cell, run.stderr)
            assert f"{sig} received during publishing the backup" in run.stderr, cell
            nothing_left(btrfs, run_dir, store)
        else:
            assert run.returncode == 130, (cell, run.stderr)
            assert f"interrupted by {sig}" in run.stderr, cell
            nothing_left(btrfs, run_dir, store)
        if stage == "after-rename":
            assert len(published) == 1, cell
            if sig != "SIGKILL":
                assert os.readlink(store / "latest") == published[0], cell
        else:
            assert published == [], cell
            assert os.readlink(store / "latest") == latest_before, cell

        clean = mailsnap("cleanup", *job_args, run_dir=run_dir)
        assert clean.returncode == 0, (cell, clean.stderr)
        removed = clean.stdout.splitlines()
        if sig == "SIGKILL":
            assert any(re.fullmatch(rf"{JOB}: removed snapshot mailsnap-{JOB}-\S+", line)
                       for line in removed), (cell, removed)
            assert any(line.startswith(f"{JOB}: removed mount ") for line in removed) == (
                stage in LEAVES_MOUNT), (cell, removed)
            assert any(line.startswith(f"{JOB}: removed partial backup ") and
                       line.endswith(".partial") for line in removed) == (
                stage in LEAVES_PARTIAL), (cell, removed)
            if stage == "after-rename":  # killed before `latest` was switched
                assert f"{JOB}: removed stale link latest -> {published[0]} " \
                       f"(was {latest_before})" in removed, (cell, removed)
                assert os.readlink(store / "latest") == published[0], cell
        else:
            assert removed == [f"{JOB}: nothing to clean up"], (cell, removed)
        nothing_left(btrfs, run_dir, store)

        after = mailsnap("backup", *job_args, run_dir=run_dir)
        assert after.returncode == 0, (cell, after.stderr)
        nothing_left(btrfs, run_dir, store)
        now = fingerprint(store)
        for run_id, files in earlier.items():
            assert now[run_id] == files, f"{cell}: backup {run_id} changed"
        assert len(now) == len(earlier) + len(published) + 1, cell
    MATRIX_SECONDS[stage] = time.monotonic() - started
    print(f"\nfault matrix {stage}: {MATRIX_SECONDS[stage]:.1f}s for {len(SIGNALS)} cells")


def test_mid_copy_lands_while_rsync_runs(btrfs: BtrfsVolume, source: Path,
                                         tmp_path: Path) -> None:
    """The mid-copy cells are only worth something if rsync is still copying when the fault
    fires: the fault point is in the watch, which the runner calls only while rsync is alive."""
    add_big_messages(source, "x")
    target, run_dir = tmp_path / "b", tmp_path / "run"
    run = mailsnap("backup", "--source", source, "--target", target, "--backend", "btrfs",
                   "--copier", "rsync", run_dir=run_dir, fault="mid-copy:SIGTERM")
    assert run.returncode == 130, run.stderr
    assert re.search(r"rsync .*\(stopped: mailsnap was interrupted\)", run.stderr), run.stderr


# -- a source unmounted mid-run ----------------------------------------------------------------


def test_source_lazily_unmounted_after_the_snapshot_still_backs_up_the_snapshot(
    btrfs: BtrfsVolume, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The snapshot holds the data, so a source unmounted (``umount -l``) after the snapshot
    instant does not matter for this backup: it is complete and consistent, and teardown and
    the final sweep (which find the snapshots through the device, not the vanished path)
    leave nothing behind."""
    from mailsnap.backends.btrfs import BtrfsBackend

    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    expected = {str(p.relative_to(source)): p.read_bytes()
                for p in source.rglob("*") if p.is_file() and p.parent.name != "tmp"}
    real_mount = BtrfsBackend.mount

    def unmount_source_then_mount(self: BtrfsBackend, *args: object) -> Path:
        subprocess.run(["umount", "-l", str(btrfs.mail)], check=True)
        return real_mount(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(BtrfsBackend, "mount", unmount_source_then_mount)
    job = one_off_job(name="mail", source=source, target=tmp_path / "b", backend="btrfs")
    report = run_backup(job, Runner())
    assert not source.exists()  # it really was unmounted under the run
    assert report.status == "ok" and report.messages == 300
    content = Path(report.backup or "") / "mail"
    got = {str(p.relative_to(content)): p.read_bytes()
           for p in content.rglob("*") if p.is_file()}
    assert got == expected
    assert mounts_under(tmp_path / "run") == []
    assert snapshots(btrfs) == []


# -- a busy mount at teardown ------------------------------------------------------------------


@pytest.fixture
def foreign_holder() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


def test_busy_mount_at_teardown_is_bounded_names_the_holder_and_is_retried(
    btrfs: BtrfsVolume, source: Path, tmp_path: Path, foreign_holder: list[int],
) -> None:
    run_dir, pidfile = tmp_path / "run", tmp_path / "holder.pid"
    # The admin's command leaves a process behind, in the snapshot and without our marker:
    # mailsnap must neither kill it nor unmount from under it.
    script = ('cd "$MAILSNAP_SNAPSHOT" && env -u MAILSNAP_OWNER setsid sleep 120 '
              '</dev/null >/dev/null 2>&1 & echo $! > "$0"')
    started = time.monotonic()
    run = mailsnap("snapshot", "--job", JOB, "--source", source, "--backend", "btrfs", "--",
                   "sh", "-c", script, pidfile, run_dir=run_dir)
    took = time.monotonic() - started
    holder = int(pidfile.read_text())
    foreign_holder.append(holder)
    print(f"\nbusy mount: the run ended after {took:.1f}s")
    assert run.returncode == 4, run.stderr
    assert took < 40
    # The umount that gave up names who keeps the mount busy (not only `fuser -vm`).
    mount = run_dir / JOB / "snapshot"
    assert f"still mounted at {mount}; in use by pid {holder} (sleep)" in run.stderr
    assert "teardown incomplete" in run.stderr
    assert mounts_under(run_dir), "the snapshot stays mounted under its reader"

    job_args = ("--job", JOB, "--source", source, "--target", tmp_path / "b", "--backend",
                "btrfs")
    refused = mailsnap("backup", *job_args, run_dir=run_dir)
    assert refused.returncode == 1, refused.stderr
    assert f"pid {holder} (sleep)" in refused.stderr and "still in use" in refused.stderr
    refused_cleanup = mailsnap("cleanup", *job_args, run_dir=run_dir)
    assert refused_cleanup.returncode == 1 and f"pid {holder}" in refused_cleanup.stderr
    assert os.path.exists(f"/proc/{holder}"), "a foreign process is never signalled"

    os.kill(holder, 9)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{holder}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    ok = mailsnap("backup", *job_args, run_dir=run_dir)
    assert ok.returncode == 0, ok.stderr
    assert "sweep: unmounting" in ok.stderr
    nothing_left(btrfs, run_dir, tmp_path / "b" / JOB)


def test_cleanup_dry_run_removes_nothing_and_a_vanished_source_is_one_line(
    btrfs: BtrfsVolume, source: Path, tmp_path: Path,
) -> None:
    run_dir, target = tmp_path / "run", tmp_path / "b"
    job_args = ("--job", JOB, "--source", source, "--target", target, "--backend", "btrfs")
    killed = mailsnap("backup", *job_args, run_dir=run_dir, fault="after-copy:SIGKILL")
    assert killed.returncode == -9
    leftovers = (snapshots(btrfs), mounts_under(run_dir), list((target / JOB).glob("*")))
    dry = mailsnap("cleanup", *job_args, "--dry-run", run_dir=run_dir)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert any(line.startswith(f"{JOB}: would remove snapshot mailsnap-{JOB}-") for line in lines)
    assert any(line.startswith(f"{JOB}: would remove mount ") for line in lines)
    assert any(line.startswith(f"{JOB}: would remove partial backup ") for line in lines)
    assert (snapshots(btrfs), mounts_under(run_dir),
            list((target / JOB).glob("*"))) == leftovers

    gone = mailsnap("cleanup", "--job", JOB, "--source", tmp_path / "nowhere", "--target", target,
                    run_dir=run_dir)
    assert gone.returncode == 1
    (line,) = gone.stderr.strip().splitlines()
    assert "does not exist" in line and "nothing was removed" in line

    real = mailsnap("cleanup", *job_args, run_dir=run_dir)
    assert real.returncode == 0, real.stderr
    assert len(real.stdout.splitlines()) == 3
    nothing_left(btrfs, run_dir, target / JOB)
