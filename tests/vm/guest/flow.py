"""Helpers shared by the guest tests: drive a backend through one run, run the CLI."""

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
from typing import Any

from mailsnap.backends.base import Snapshot, SnapshotBackend, snapshot_name


@contextlib.contextmanager
def snapshot_mounted(
    backend: SnapshotBackend, source: Path, work: Path, job: str, run_id: str
) -> Iterator[tuple[Snapshot, Path]]:
    """discover → create → mount, then unmount → destroy, like the pipeline does."""
    volume = backend.discover(source)
    snapshot = backend.create(volume, snapshot_name(job, run_id))
    mountpoint = work / "snapshot"
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        path = backend.mount(snapshot, mountpoint)
        try:
            yield snapshot, path
        finally:
            backend.unmount(snapshot, mountpoint)
    finally:
        backend.destroy(snapshot)
        mountpoint.rmdir()


def mount_options(path: Path) -> set[str]:
    """Options of the mount exactly at ``path`` (from /proc/self/mounts)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return set(fields[3].split(","))
    raise AssertionError(f"nothing mounted at {path}")


def write_config(path: Path, **job: Any) -> Path:
    lines = ["[[job]]"]
    for key, value in job.items():
        lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def mailsnap(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "mailsnap", *map(str, args)]


def run_cli(*args: str | Path, timeout: float = 600) -> tuple[int, dict[str, Any], str]:
    """``mailsnap ARGS --json``: exit code, parsed JSON, stderr."""
    proc = subprocess.run(mailsnap(*args, "--json"), capture_output=True, text=True,
                          timeout=timeout)
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {"unparsed": proc.stdout}
    return proc.returncode, data, proc.stderr


def run_faulted(config: Path, fault: str, timeout: float = 600) -> tuple[int, str]:
    """``mailsnap backup --config CONFIG`` stopped at a fault point (``MAILSNAP_FAULT``, e.g.
    ``after-mount:SIGKILL``): its exit code (-9 for SIGKILL) and stderr."""
    proc = subprocess.run(mailsnap("backup", "--config", config), capture_output=True,
                          text=True, timeout=timeout, start_new_session=True,
                          env=dict(os.environ, MAILSNAP_FAULT=fault))
    return proc.returncode, proc.stderr


def published(target: Path, job: str) -> list[Path]:
    root = target / job
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.is_symlink() and not p.name.endswith(".partial")
                  and not p.name.startswith("."))


def partials(target: Path, job: str) -> list[Path]:
    root = target / job
    return sorted(root.glob("*.partial")) if root.is_dir() else []


def start_backup(config: Path) -> subprocess.Popen[str]:
    """Start ``mailsnap backup`` in its own process group (so a test can kill all of it)."""
    return subprocess.Popen(mailsnap("backup", "--config", config, "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_copy(proc: subprocess.Popen[str], target: Path, job: str,
                  timeout: float = 300) -> None:
    """Block until the run is copying (its ``.partial`` directory has content)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"backup ended (exit {proc.returncode}) before the copy "
                                 f"was seen:\n{out}\n{err[-3000:]}")
        for partial in partials(target, job):
            mail = partial / "mail"
            if mail.is_dir() and any(mail.iterdir()):
                return
        time.sleep(0.02)
    raise AssertionError("the copy never started")


def signal_group(proc: subprocess.Popen[str], signum: signal.Signals) -> None:
    if signum == signal.SIGKILL:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)


def big_files(root: Path, count: int, size: int) -> None:
    """Large messages so the copy takes long enough to be interrupted."""
    folder = root / "bulk" / "Maildir" / "cur"
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(size)
    for i in range(count):
        (folder / f"{1710000000 + i}.M{i}P9.guest,S={size}:2,S").write_bytes(block)
