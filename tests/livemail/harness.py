"""The live-mail harness in one import: Dovecot + seeding + load + checker, and copy methods.

A benchmark or a test does::

    with private_dir() as private, LiveMail(private / "dovecot", private / "mail") as live:
        live.seed(SeedSpec(messages_per_user=2500))
        report = live.copy_under_load("rsync", lambda: rsync_copy(live.mail_root, dest))
        print(report.line())

(``workdir`` and ``mail_root`` must be reachable by Dovecot's unprivileged processes: keep them
below ``private_dir()``, bind-mounting a volume there if needed — see conftest.py.)

Scale comes from ``scale()``: the default keeps CI fast; ``MAILSNAP_SOAK=1`` (or pytest's
``--livemail-soak``) runs more messages, longer and more often.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
import json
import os
from pathlib import Path
import secrets
import subprocess
import sys
import time
from typing import Any

from tests.livemail.checker import BackupMessage, CheckResult, check_backup, scan_backup
from tests.livemail.dovecot import (
    DovecotInstance,
    bind_mount,
    dovecot_skip_reason,
    private_dir,
    user_name,
)
from tests.livemail.events import EventLog
from tests.livemail.load import LoadGenerator, LoadProfile, MailboxModel
from tests.livemail.seed import SeedSpec, seed_store

__all__ = [
    "BackupMessage",
    "CheckResult",
    "DovecotInstance",
    "EventLog",
    "LiveMail",
    "LoadGenerator",
    "LoadProfile",
    "RunReport",
    "Scale",
    "SeedSpec",
    "bind_mount",
    "btrfs_snapshot_copy",
    "check_backup",
    "dovecot_skip_reason",
    "mailsnap_backup",
    "private_dir",
    "rsync_copy",
    "scale",
    "scan_backup",
]

RSYNC_OK = (0, 23, 24)  # 23/24: files vanished or changed under rsync; expected on a live tree


@dataclass(frozen=True)
class Scale:
    users: int
    messages_per_user: int
    runs: int  # mailsnap backups per backend in the repeated tests
    baseline_runs: int  # plain-rsync copies in the baseline test
    warmup: float  # seconds of load before a copy starts
    lmtp_workers: int  # parallel LMTP sessions delivering


CI_SCALE = Scale(
    users=4, messages_per_user=2500, runs=3, baseline_runs=1, warmup=1.0, lmtp_workers=1
)
SOAK_SCALE = Scale(
    users=4, messages_per_user=6000, runs=10, baseline_runs=5, warmup=3.0, lmtp_workers=2
)


def soak_requested() -> bool:
    return os.environ.get("MAILSNAP_SOAK") == "1"


def scale() -> Scale:
    return SOAK_SCALE if soak_requested() else CI_SCALE


@dataclass
class RunReport:
    """One copy under load: the checker's verdict plus what the load did meanwhile."""

    method: str
    root: Path  # the Maildir tree the copy produced
    result: CheckResult
    changes_per_second: float
    wall: float  # seconds the copy took
    detail: dict[str, Any]

    def line(self) -> str:
        r = self.result
        return (
            f"{self.method}: {r.files} messages, {self.changes_per_second:.0f} changes/s, "
            f"missing {len(r.missing)}, duplicated {len(r.duplicated)}, "
            f"cross-folder {len(r.cross_folder_duplicates)}, tmp {len(r.tmp_files)}, "
            f"locks {len(r.lock_files)}, damaged {len(set(r.unidentified) | set(r.wrong_size))}, "
            f"wall {self.wall:.2f}s"
        )


class LiveMail:
    """A running Dovecot with seeded users, an event log and the per-user UID models."""

    def __init__(
        self,
        workdir: Path,
        mail_root: Path,
        users: int = 4,
        profile: LoadProfile | None = None,
    ) -> None:
        self.users = [user_name(i + 1) for i in range(users)]
        # A spare, empty user for restore checks.
        self.restore_user = user_name(99)
        self.dovecot = DovecotInstance(workdir, mail_root, [*self.users, self.restore_user])
        self.log = EventLog()
        self.models: dict[str, MailboxModel] = {}
        self.profile = profile or LoadProfile()
        self.seeded = 0
        self._generators = 0

    def __enter__(self) -> LiveMail:
        self.dovecot.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.dovecot.stop()

    @property
    def mail_root(self) -> Path:
        return self.dovecot.mail_root

    def seed(self, spec: SeedSpec) -> float:
        """Seed every user; return the seconds it took (writing plus force-resync)."""
        began = time.monotonic()
        self.seeded += seed_store(self.dovecot, self.users, spec, self.log)
        return time.monotonic() - began

    def load(self, duration: float = 120.0, **kwargs: Any) -> LoadGenerator:
        self._generators += 1
        return LoadGenerator(
            self.dovecot, self.users, self.log, self.models, profile=self.profile,
            duration=duration, seed=self._generators, **kwargs,
        )

    def copy_under_load(
        self,
        method: str,
        copy: Callable[[], tuple[Path, dict[str, Any]]],
        warmup: float = 1.0,
        max_seconds: float = 300.0,
    ) -> RunReport:
        """Start load, let it run ``warmup`` seconds, run ``copy`` (which returns the root of
        the Maildir tree it produced plus free-form details), keep the load going until the
        copy returned, then check the copy against the window [start, end]."""
        with self.load(duration=max_seconds) as load:
            load.wait_until_busy(settle=warmup)
            start = time.monotonic()
            root, detail = copy()
            end = time.monotonic()
            if not load.running or load.errors:
                raise RuntimeError(
                    f"load stopped before the copy ended: {load.errors or 'duration too short'}"
                )
        if load.errors:
            raise RuntimeError(f"load generator failed: {load.errors}")
        result = check_backup(root, self.log, start, end)
        return RunReport(method, root, result, result.changes_in_window / (end - start),
                         end - start, detail)


# -- copy methods ------------------------------------------------------------------------------


def rsync_copy(source: Path, dest: Path) -> tuple[Path, dict[str, Any]]:
    """Plain ``rsync -a`` of the live tree: the baseline that loses mail."""
    dest.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["rsync", "-a", f"{source}/", f"{dest}/"], capture_output=True, text=True, check=False
    )
    if done.returncode not in RSYNC_OK:
        raise RuntimeError(f"rsync exited {done.returncode}: {done.stderr[-2000:]}")
    return dest, {"rsync_exit": done.returncode}


def btrfs_snapshot_copy(top: Path, subvolume: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """Reference method, independent of mailsnap: read-only snapshot of ``top/subvolume``, rsync
    it, delete the snapshot. The checker must find nothing wrong with it (a control)."""
    snapshot = top / f".livemail-snap-{secrets.token_hex(4)}"
    subprocess.run(
        ["btrfs", "subvolume", "snapshot", "-r", str(top / subvolume), str(snapshot)],
        check=True, capture_output=True,
    )
    try:
        dest.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["rsync", "-a", "--exclude=tmp/*", "--exclude=dovecot-uidlist.lock",
             f"{snapshot}/", f"{dest}/"],
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rsync of the snapshot exited {done.returncode}: {done.stderr}")
    finally:
        subprocess.run(["btrfs", "subvolume", "delete", str(snapshot)], check=True,
                       capture_output=True)
    return dest, {"rsync_exit": done.returncode}


def mailsnap_backup(
    source: Path,
    target: Path,
    backend: str,
    run_dir: Path,
    job: str = "livemail",
    extra: Sequence[str] = (),
) -> tuple[Path, dict[str, Any]]:
    """``mailsnap backup … --json`` as a subprocess; returns (backup's ``mail/`` tree, details).

    ``extra`` are more CLI arguments (e.g. a live-copier option to measure). Details hold the
    CLI's JSON, the backup's ``mailsnap.json``, the exit code and the end of stderr.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "mailsnap", "backup", "--source", str(source),
        "--target", str(target), "--backend", backend, "--job", job, "--json", *extra,
    ]
    env = {**os.environ, "MAILSNAP_RUN_DIR": str(run_dir)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}\nstdout: {done.stdout[-3000:]}\n"
            f"stderr: {done.stderr[-3000:]}"
        )
    out = json.loads(done.stdout)
    if out.get("status") != "ok":
        raise RuntimeError(f"mailsnap reported {out}")
    # The contract said a top-level "backup"; the CLI reports per job under "jobs".
    if "backup" not in out and len(out.get("jobs", [])) == 1:
        out = {**out, "backup": out["jobs"][0]["backup"]}
    backup = Path(out["backup"])
    meta_path = backup / "mailsnap.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return backup / "mail", {"cli": out, "meta": meta, "exit": done.returncode,
                             "stderr": done.stderr[-2000:]}
