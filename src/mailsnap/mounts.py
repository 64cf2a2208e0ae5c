"""Mount facts from ``findmnt --json``, and unmounting that survives a busy mount point."""

from __future__ import annotations

from dataclasses import dataclass
import json
import logging
from pathlib import Path
import shlex
import time

from mailsnap.errors import CommandFailed, MailsnapError, parsing
from mailsnap.procs import holders
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

COLUMNS = "TARGET,SOURCE,FSTYPE,FSROOT,OPTIONS"
# Options every snapshot mount gets: a backup source never needs set-uid, devices or programs.
SAFE_OPTIONS = ("nosuid", "nodev", "noexec")
UMOUNT_TIMEOUT = 60.0
UMOUNT_FAILED = 32  # umount(8): "mount failure": busy, or nothing mounted there


@dataclass(frozen=True)
class Mount:
    target: Path
    source: str  # the device, without findmnt's ``[/subvol]`` suffix
    fstype: str
    fsroot: str  # the mounted directory's path inside the file system ("/" for its root)
    options: tuple[str, ...]


@parsing("findmnt")
def _parse(stdout: str) -> list[Mount]:
    data = json.loads(stdout or '{"filesystems": []}')
    out: list[Mount] = []

    def walk(nodes: list[dict[str, object]]) -> None:
        for node in nodes:
            out.append(
                Mount(
                    target=Path(str(node["target"])),
                    source=str(node.get("source") or ""),
                    fstype=str(node.get("fstype") or ""),
                    fsroot=str(node.get("fsroot") or "/"),
                    options=tuple(str(node.get("options") or "").split(",")),
                )
            )
            children = node.get("children")
            if isinstance(children, list):
                walk(children)

    walk(data.get("filesystems", []))
    return out


def find_mount(runner: Runner, path: Path) -> Mount:
    """The mount that holds ``path`` (read-only, runs in dry run)."""
    try:
        result = runner.run(
            ["findmnt", "--json", "--nofsroot", "--target", str(path), "--output", COLUMNS],
            mutates=False,
        )
    except CommandFailed as exc:
        raise MailsnapError(
            f"{path}: cannot find the mount that holds it ({exc}); check that the path exists"
        ) from None
    mounts = _parse(result.stdout)
    if not mounts:
        raise MailsnapError(f"{path}: findmnt reports no mount for it")
    return mounts[0]


def mounts_under(runner: Runner, path: Path) -> list[Mount]:
    """Every mount at or below ``path``, deepest first (read-only, runs in dry run)."""
    result = runner.run(
        ["findmnt", "--json", "--list", "--nofsroot", "--output", COLUMNS],
        mutates=False,
        ok_codes=(0, 1),
    )
    base = str(path).rstrip("/")
    found = [
        m
        for m in _parse(result.stdout)
        if str(m.target) == base or str(m.target).startswith(base + "/")
    ]
    return sorted(found, key=lambda m: len(m.target.parts), reverse=True)


def is_mounted(runner: Runner, mountpoint: Path) -> bool:
    """True when something is mounted exactly at ``mountpoint`` (read-only)."""
    result = runner.run(
        ["findmnt", "--json", "--mountpoint", str(mountpoint), "--output", "TARGET"],
        mutates=False,
        ok_codes=(0, 1),
    )
    return result.exit_code == 0 and bool(_parse(result.stdout))


def _users(mountpoint: Path) -> str:
    """Who keeps ``mountpoint`` busy, for the error that gives up on it (read-only)."""
    found = holders(mountpoint)
    if not found:
        return (f"find the user with `fuser -vm {mountpoint}` and unmount it by hand")
    return ("in use by " + ", ".join(h.describe() for h in found) +
            "; stop them, and the next run unmounts it")


def unmount(runner: Runner, mountpoint: Path, *, attempts: int = 5, delay: float = 1.0) -> None:
    """Unmount ``mountpoint``; nothing mounted is success. A busy mount (a process still
    has a file open, e.g. an indexer) is retried ``attempts`` times before giving up, because a
    lazy unmount would hide the snapshot while it still pins the volume. Dry run: prints only.

    ``umount`` runs first and ``findmnt`` only when it fails: a teardown nearly always has
    something to unmount, and asking first cost a command (15 ms) every time.
    """
    for attempt in range(1, attempts + 1):
        try:
            result = runner.run(["umount", str(mountpoint)], mutates=True,
                                timeout=UMOUNT_TIMEOUT, ok_codes=(0, UMOUNT_FAILED))
        except CommandFailed as exc:
            raise CommandFailed(exc.argv, exc.exit_code_of_command, exc.stderr,
                                hint=f"still mounted at {mountpoint}; {_users(mountpoint)}",
                                ) from None
        if result.exit_code == 0:
            return
        if not is_mounted(runner, mountpoint):
            log.info("%s: nothing mounted there", mountpoint)
            return
        if "busy" not in result.stderr or attempt == attempts:
            log.error("%s  (exit %d)", shlex.join(result.argv), result.exit_code)
            raise CommandFailed(
                result.argv,
                result.exit_code,
                result.stderr,
                hint=f"still mounted at {mountpoint}; {_users(mountpoint)}",
            )
        log.warning("%s is busy; retrying umount (%d/%d)", mountpoint, attempt, attempts)
        time.sleep(delay * attempt)
