"""Real btrfs file systems on loop devices, for the privileged test tier.

Layout matches a real mail host: a btrfs file system whose top level holds a ``mail`` subvolume,
mounted with ``-o subvol=mail`` where Dovecot (and mailsnap's ``source``) sees it. Tests use plain
subprocess here on purpose: the fixture must not depend on the code under test.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
from dataclasses import dataclass
import os
from pathlib import Path
import shutil
import subprocess


@dataclass(frozen=True)
class BtrfsVolume:
    image: Path
    device: str
    top: Path  # the top level (subvolid=5), mounted for the test's own inspection
    mail: Path  # the ``mail`` subvolume, mounted with subvol=mail


def privileged_skip_reason() -> str | None:
    """Why btrfs-on-loop tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root for loop devices and mounts (CI runs as root)"
    for tool in ("losetup", "mkfs.btrfs", "btrfs", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test installs btrfs-progs as root)"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control: this machine has no loop devices"
    if "btrfs" not in Path("/proc/filesystems").read_text():
        return "the kernel has no btrfs support"
    return None


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (to assert a test left nothing mounted)."""
    prefix = str(path)
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].encode().decode("unicode_escape")
        if target == prefix or target.startswith(prefix.rstrip("/") + "/"):
            out.append(target)
    return out


def subvolumes(top: Path) -> list[str]:
    """Paths of all subvolumes on the file system mounted at ``top``."""
    out = _run("btrfs", "subvolume", "list", str(top))
    return [line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line]


@contextlib.contextmanager
def btrfs_volume(workdir: Path, size: str = "1G", *, mixed: bool = False
                 ) -> Iterator[BtrfsVolume]:
    """``mixed``: data and metadata share their block groups (``mkfs.btrfs --mixed``), so a
    small volume fills up, metadata included, in a second."""
    image = workdir / "btrfs.img"
    top = workdir / "top"
    mail = workdir / "mail"
    top.mkdir()
    mail.mkdir()
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    device = _run("losetup", "-f", "--show", str(image))
    try:
        _run("mkfs.btrfs", "-q", *(["--mixed"] if mixed else []), device)
        _run("mount", device, str(top))
        try:
            _run("btrfs", "subvolume", "create", str(top / "mail"))
            _run("mount", "-o", "subvol=mail", device, str(mail))
            try:
                yield BtrfsVolume(image=image, device=device, top=top, mail=mail)
            finally:
                subprocess.run(["umount", str(mail)], check=False)
        finally:
            # The code under test may have left mounts of this device; a test that cares asserts
            # that first. Here we only make sure the loop device can be detached.
            for target in sorted(mounts_under(workdir), key=len, reverse=True):
                subprocess.run(["umount", target], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
