"""Who uses a mount, and stopping our own orphans (issue #7: children outlived a killed mailsnap).

Unit tier: real processes holding a plain temp directory (cwd, open file, deleted file, mapping),
with and without the ``MAILSNAP_OWNER`` marker. Privileged tier: the reported crash on real btrfs,
``kill -9`` of mailsnap mid-copy must not leave rsync running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest

from mailsnap import procs
from mailsnap.config import Job, one_off_job
from mailsnap.errors import EXIT_FAILED, MailsnapError, MountInUse
from mailsnap.procs import Holder, holders, release_mount, stop_owned
from mailsnap.runner import OWNER_ENV
from tests.helpers.loopfs import BtrfsVolume, mounts_under, subvolumes
from tests.helpers.maildir_writer import seed

OURS = "mailsnap-mail-20261128T020000Z"
OTHER_JOB = "mailsnap-mail-archive-20261128T020000Z"  # job "mail" must never claim these

Spawn = Callable[..., subprocess.Popen[str]]

# A child that holds ``argv[1]`` the way ``argv[2]`` says, reports "ready", and waits.
HOLD = """
import ctypes, signal, sys, time
path, how = sys.argv[1], sys.argv[2]
if how == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
f = open(path, "rb")
if how == "deleted":
    import os; os.unlink(path)
if how == "mapped":  # libc's mmap: Python's would keep a duplicate of the fd open
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    assert libc.mmap(None, 4096, 1, 1, f.fileno(), 0) not in (None, ctypes.c_void_p(-1).value)
    f.close()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start processes for a test; every one is killed and reaped afterwards."""
    started: list[subprocess.Popen[str]] = []

    def start(argv: Sequence[str], *, owner: str | None = None, cwd: Path | None = None,
              ready: bool = False) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
        if owner is not None:
            env[OWNER_ENV] = owner
        process = subprocess.Popen(list(argv), cwd=cwd, env=env, text=True,
                                   stdout=subprocess.PIPE if ready else None)
        started.append(process)
        if ready:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        return process

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=10)


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    """Stands in for a leftover snapshot mount: a directory with a file in it."""
    path = tmp_path / "mailsnap-mail-20261128T020000Z"
    path.mkdir()
    (path / "message").write_bytes(b"x" * 8192)
    return path


def hold(spawn: Spawn, path: Path, how: str = "open", owner: str | None = None,
         ) -> subprocess.Popen[str]:
    return spawn([sys.executable, "-c", HOLD, str(path), how], owner=owner, ready=True)


def sleeper(spawn: Spawn, cwd: Path, owner: str | None = None) -> subprocess.Popen[str]:
    return spawn(["sleep", "60"], cwd=cwd, owner=owner)


def pids(found: Sequence[Holder]) -> set[int]:
    return {h.pid for h in found}


# --- holders ---------------------------------------------------------------------------------


def test_a_working_directory_inside_is_a_holder(spawn: Spawn, mount: Path) -> None:
    inner = mount / "cur"
    inner.mkdir()
    process = sleeper(spawn, inner)
    assert holders(mount) == [Holder(process.pid, "sleep", None)]


def test_an_open_file_inside_is_a_holder(spawn: Spawn, mount: Path) -> None:
    process = hold(spawn, mount / "message")
    assert pids(holders(mount)) == {process.pid}


def test_a_deleted_open_file_inside_is_a_holder(spawn: Spawn, mount: Path) -> None:
    process = hold(spawn, mount / "message", "deleted")
    assert not (mount / "message").exists()
    assert pids(holders(mount)) == {process.pid}


def test_a_mapped_file_inside_is_a_holder(spawn: Spawn, mount: Path) -> None:
    process = hold(spawn, mount / "message", "mapped")
    fds = [os.readlink(f"/proc/{process.pid}/fd/{fd}") for fd in
           os.listdir(f"/proc/{process.pid}/fd")]
    assert not [fd for fd in fds if fd.startswith(str(mount))]  # only the mapping holds it
    assert pids(holders(mount)) == {process.pid}


def test_the_marker_is_read_from_the_environment(spawn: Spawn, mount: Path) -> None:
    ours = sleeper(spawn, mount, owner=OURS)
    theirs = sleeper(spawn, mount)
    assert holders(mount) == sorted(
        [Holder(ours.pid, "sleep", OURS), Holder(theirs.pid, "sleep", None)],
        key=lambda h: h.pid)


def test_neighbours_and_ourselves_are_not_holders(
    spawn: Spawn, mount: Path, tmp_path: Path
) -> None:
    neighbour = Path(f"{mount}-2")  # shares the mount's name as a prefix
    neighbour.mkdir()
    sleeper(spawn, neighbour)
    sleeper(spawn, tmp_path)  # above the mount, not in it
    with (mount / "message").open("rb"):  # this process: the sweep itself
        assert holders(mount) == []


def test_a_symlinked_path_is_resolved(spawn: Spawn, mount: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(mount)
    process = sleeper(spawn, mount)
    assert pids(holders(link)) == {process.pid}


def test_describe_names_pid_command_and_marker() -> None:
    assert Holder(1234, "rsync", OURS).describe() == f"pid 1234 (rsync, {OURS})"
    assert Holder(99, "bash", None).describe() == "pid 99 (bash)"


def test_holders_is_fast_enough(mount: Path) -> None:
    count = sum(1 for _ in procs._pids())
    started = time.perf_counter()
    holders(mount)
    elapsed = time.perf_counter() - started
    # A few hundred processes take milliseconds; a full second would stall every sweep.
    assert elapsed < 0.01 * count + 0.5, f"{elapsed:.3f}s for {count} processes"


# --- stop_owned ------------------------------------------------------------------------------


def test_only_this_jobs_processes_are_stopped(spawn: Spawn, mount: Path) -> None:
    ours = sleeper(spawn, mount, owner=OURS)
    unmarked = sleeper(spawn, mount)
    other_job = sleeper(spawn, mount, owner=OTHER_JOB)
    stopped = stop_owned(holders(mount), "mail", grace=5)
    assert pids(stopped) == {ours.pid}
    assert ours.wait(timeout=5) == -signal.SIGTERM
    assert procs.alive(unmarked.pid) and procs.alive(other_job.pid)
    assert pids(holders(mount)) == {unmarked.pid, other_job.pid}


def test_other_job_stops_only_its_own(spawn: Spawn, mount: Path) -> None:
    ours = sleeper(spawn, mount, owner=OURS)
    archive = sleeper(spawn, mount, owner=OTHER_JOB)
    assert pids(stop_owned(holders(mount), "mail-archive")) == {archive.pid}
    assert procs.alive(ours.pid)


def test_one_ignoring_sigterm_is_killed_after_the_grace(spawn: Spawn, mount: Path) -> None:
    stubborn = hold(spawn, mount / "message", "ignore-term", owner=OURS)
    started = time.monotonic()
    assert pids(stop_owned(holders(mount), "mail", grace=0.3)) == {stubborn.pid}
    assert stubborn.wait(timeout=5) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - started < 5


def test_a_pid_that_lost_its_marker_is_not_signalled(spawn: Spawn, mount: Path) -> None:
    # The scan saw our orphan at this pid; by the time we signal, someone else has the pid.
    stranger = sleeper(spawn, mount)
    stale = Holder(stranger.pid, "sleep", OURS)
    stop_owned([stale], "mail", grace=0.2)
    assert procs.alive(stranger.pid)


def test_dry_run_stops_nothing(spawn: Spawn, mount: Path) -> None:
    ours = sleeper(spawn, mount, owner=OURS)
    assert pids(stop_owned(holders(mount), "mail", dry_run=True)) == {ours.pid}
    assert procs.alive(ours.pid)


# --- release_mount ---------------------------------------------------------------------------


def test_release_stops_our_orphans_and_then_the_mount_is_free(
    spawn: Spawn, mount: Path
) -> None:
    sleeper(spawn, mount, owner=OURS)
    hold(spawn, mount / "message", owner=OURS)
    release_mount(mount, "mail")
    assert holders(mount) == []


def test_release_of_an_unused_mount_does_nothing(mount: Path) -> None:
    release_mount(mount, "mail")


def test_release_refuses_while_someone_else_reads(spawn: Spawn, mount: Path) -> None:
    ours = sleeper(spawn, mount, owner=OURS)
    reader = hold(spawn, mount / "message")
    archive = sleeper(spawn, mount, owner=OTHER_JOB)
    with pytest.raises(MountInUse) as info:
        release_mount(mount, "mail")
    error = info.value
    assert isinstance(error, MailsnapError) and error.exit_code == EXIT_FAILED
    assert pids(error.holders) == {reader.pid, archive.pid}
    message = str(error)
    assert "\n" not in message
    assert str(mount) in message
    assert f"pid {reader.pid} (python" in message
    assert f"pid {archive.pid} (sleep, {OTHER_JOB})" in message
    assert "never unmounts a snapshot someone is reading" in message
    # Our orphan is gone; the others were not touched.
    assert not procs.alive(ours.pid)
    assert procs.alive(reader.pid) and procs.alive(archive.pid)


def test_release_in_dry_run_signals_nobody(spawn: Spawn, mount: Path) -> None:
    ours = sleeper(spawn, mount, owner=OURS)
    release_mount(mount, "mail", dry_run=True)
    assert procs.alive(ours.pid)
    reader = sleeper(spawn, mount)
    with pytest.raises(MountInUse) as info:
        release_mount(mount, "mail", dry_run=True)
    assert pids(info.value.holders) == {reader.pid}


# --- the reported crash, on real btrfs -------------------------------------------------------


def _rsync_pids(marker: str) -> list[int]:
    """Running rsync processes with ``marker`` in their argv (zombies have an empty one)."""
    found = []
    for pid in procs._pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline[0].endswith(b"rsync") and marker.encode() in b" ".join(cmdline):
            found.append(pid)
    return found


@pytest.fixture
def crash_job(btrfs: BtrfsVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Job:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    source = btrfs.mail / "Maildir"
    seed(source, per_folder=400)
    # Enough data that rsync is still copying when mailsnap is killed.
    for i in range(160):
        (source / ".Archive" / "cur" / f"1750000000.M{i}P9.big:2,S").write_bytes(
            os.urandom(1 << 20))
    return one_off_job(name="mail", source=source, target=tmp_path / "backups", backend="btrfs")


@pytest.mark.privileged
@pytest.mark.slow
@pytest.mark.usefixtures("need_rsync")
def test_rsync_dies_with_a_killed_mailsnap(
    crash_job: Job, btrfs: BtrfsVolume, tmp_path: Path
) -> None:
    job = crash_job
    target = str(job.target)
    process = subprocess.Popen(
        [sys.executable, "-m", "mailsnap", "backup", "--source", str(job.source),
         "--target", target, "--backend", "btrfs", "--copier", "rsync"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, MAILSNAP_RUN_DIR=str(tmp_path / "run")),
    )
    try:
        deadline = time.monotonic() + 30
        while not _rsync_pids(target):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "rsync never started"
            time.sleep(0.005)
        # Only mailsnap itself, as `kill -9 <pid>` does: not its process group.
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
        deadline = time.monotonic() + 3
        while _rsync_pids(target) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _rsync_pids(target) == [], "rsync outlived the mailsnap that started it"
        # The crash left its mount; nobody holds it any more, so the next sweep can take it.
        left = mounts_under(tmp_path / "run")
        assert left
        for path in left:
            assert holders(Path(path)) == []
    finally:
        for pid in _rsync_pids(target):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
        # What a crash leaves is the next run's to sweep; done by hand here so this test does
        # not depend on the pipeline.
        for path in sorted(mounts_under(tmp_path / "run"), key=len, reverse=True):
            subprocess.run(["umount", path], check=False)
        for name in subvolumes(btrfs.top):
            if "mailsnap-" in name:
                subprocess.run(["btrfs", "subvolume", "delete", str(btrfs.top / name)],
                               check=False, capture_output=True)
    assert mounts_under(tmp_path / "run") == []
    assert [s for s in subvolumes(btrfs.top) if "mailsnap-" in s] == []
