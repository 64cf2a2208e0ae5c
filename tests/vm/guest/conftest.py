"""Fixtures for the tests that run inside the LVM/ZFS guest (scripts/vm/run-tests).

The guest has three blank virtio disks, ``/dev/disk/by-id/virtio-mailsnap{1,2,3}``: the first two
become the volume group ``vgmail``, the third the pool ``mailpool``. Each test gets a fresh LV or
dataset with a small Maildir tree on it, and everything is torn down (and checked to be gone)
afterwards. Fixtures use plain subprocess on purpose: they must not depend on the code under test.

Outputs of ``lvs``/``vgs``/``findmnt``/``zfs list`` seen here are also saved to
``$MAILSNAP_GUEST_RESULTS/captured/`` so the host-side unit tests can be fed real output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
import os
from pathlib import Path
import subprocess
import time

import pytest

DISKS = [Path(f"/dev/disk/by-id/virtio-mailsnap{i}") for i in (1, 2, 3)]
VG = "vgmail"
POOL = "mailpool"
RESULTS = Path(os.environ.get("MAILSNAP_GUEST_RESULTS", "/tmp/mailsnap-results"))



def sh(*argv: str | Path, check: bool = True, timeout: float = 300) -> str:
    """Run a command, return stdout; on failure show stderr in the assertion."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout


def capture(name: str, *argv: str | Path) -> str:
    """Run a read-only command and keep its output as a fixture for the unit tests."""
    out = sh(*argv)
    target = RESULTS / "captured" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(out)
    return out


def settle() -> None:
    sh("udevadm", "settle", "--timeout=30", check=False)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/")
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].encode().decode("unicode_escape")
        if target == prefix or target.startswith(prefix + "/"):
            out.append(target)
    return out


def mailsnap_lvs() -> list[str]:
    out = sh("lvs", "--noheadings", "-o", "lv_name", VG, check=False)
    return [n.strip() for n in out.split() if "mailsnap-" in n]


def mailsnap_zfs_snapshots() -> list[str]:
    out = sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", POOL, check=False)
    return [n for n in out.split() if "mailsnap-" in n]


def make_maildir(root: Path, users: int = 3, messages: int = 40, size: int = 2000) -> int:
    """A small Dovecot-like Maildir tree; returns the number of message files."""
    count = 0
    for u in range(users):
        for folder in ("", ".Sent", ".Archive"):
            base = root / f"user{u}" / "Maildir" / folder if folder else root / f"user{u}/Maildir"
            for sub in ("cur", "new", "tmp"):
                (base / sub).mkdir(parents=True, exist_ok=True)
            for m in range(messages):
                name = f"{1700000000 + m}.M{m}P{u}.guest,S={size}:2,S"
                body = f"Message-ID: <{u}.{folder}.{m}@guest>\n\n".encode()
                (base / "cur" / name).write_bytes(body.ljust(size, b"x"))
                count += 1
            (base / "dovecot-uidlist").write_text(f"3 V1 N{messages + 1}\n")
    return count


def tree(root: Path) -> dict[str, bytes]:
    """Relative path → content of every regular file below ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


@pytest.fixture(scope="session", autouse=True)
def _guest_only() -> None:
    if os.environ.get("MAILSNAP_IN_GUEST") != "1" or os.geteuid() != 0:
        pytest.skip("guest-only tests: run them with scripts/vm/run-tests")


def _wipe(disk: Path) -> None:
    sh("wipefs", "-a", "-q", disk, check=False)
    sh("dd", "if=/dev/zero", f"of={disk}", "bs=1M", "count=4", "conv=fsync", check=False)


@pytest.fixture(scope="session")
def vg() -> Iterator[str]:
    """The volume group ``vgmail`` on the first two disks (4 MiB extents)."""
    for disk in DISKS[:2]:
        assert disk.exists(), f"{disk} missing: was the guest started by scripts/vm/run-tests?"
        sh("pvcreate", "-q", "-y", "-ff", disk)
    sh("vgcreate", "-q", VG, *DISKS[:2])
    capture("vgs.json", "vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
            "-o", "vg_name,vg_size,vg_free,vg_extent_size", VG)
    yield VG
    sh("vgremove", "-q", "-f", VG, check=False)
    for disk in DISKS[:2]:
        sh("pvremove", "-q", "-y", disk, check=False)


@dataclass
class LvSource:
    vg: str
    lv: str
    fstype: str
    device: str
    mountpoint: Path
    source: Path  # the mail tree inside the mounted LV
    messages: int


@pytest.fixture
def lv_source(vg: str, tmp_path: Path) -> Iterator[Callable[..., LvSource]]:
    """Factory: an LV (classic or thin) with ``fstype`` mounted under tmp_path and a Maildir
    tree at ``<mount>/vmail``. Everything (snapshots of it too) is removed afterwards."""
    made: list[LvSource] = []
    pools: list[str] = []

    def make(fstype: str = "ext4", size: str = "320M", thin: bool = False,
             name: str = "mail") -> LvSource:
        if thin:
            sh("lvcreate", "-q", "-y", "--type", "thin-pool", "-L", "600M", "-n", "pool", vg)
            pools.append("pool")
            sh("lvcreate", "-q", "-y", "--type", "thin", "-V", size, "--thinpool", "pool",
               "-n", name, vg)
        else:
            sh("lvcreate", "-q", "-y", "-L", size, "-n", name, vg)
        settle()
        device = f"/dev/{vg}/{name}"
        if fstype == "xfs":
            sh("mkfs.xfs", "-q", "-f", device)
        else:
            # No lazy init: ext4lazyinit would otherwise zero inode tables in the background
            # for minutes after mkfs, writing into the origin and so into the snapshot's COW
            # space, overflowing small test snapshots at random.
            sh(f"mkfs.{fstype}", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
               device)
        mountpoint = tmp_path / f"live-{name}"
        mountpoint.mkdir()
        sh("mount", device, mountpoint)
        source = mountpoint / "vmail"
        messages = make_maildir(source)
        sh("sync")
        src = LvSource(vg, name, fstype, device, mountpoint, source, messages)
        made.append(src)
        return src

    yield make
    for src in made:
        for target in reversed(mounts_under(Path("/"))):
            if "mailsnap" in target:
                sh("umount", target, check=False)
        sh("umount", src.mountpoint, check=False)
    settle()
    for lv in mailsnap_lvs():
        sh("lvremove", "-q", "-y", f"{vg}/{lv}", check=False)
    for src in made:
        sh("lvremove", "-q", "-y", f"{vg}/{src.lv}", check=False)
    for pool in pools:
        sh("lvremove", "-q", "-y", f"{vg}/{pool}", check=False)


@pytest.fixture(scope="session")
def pool() -> Iterator[str]:
    """The ZFS pool ``mailpool`` on the third disk, mounted nowhere by itself."""
    assert DISKS[2].exists(), f"{DISKS[2]} missing"
    if "zfs" not in Path("/proc/modules").read_text():
        pytest.fail("the zfs module is not loaded in the guest (see guest-run.log)")
    _wipe(DISKS[2])
    sh("zpool", "create", "-f", "-m", "none", "-O", "compression=off", POOL, DISKS[2])
    yield POOL
    sh("zpool", "destroy", "-f", POOL, check=False)


@dataclass
class ZfsSource:
    root: str  # mailpool/mail, mounted at ``mountpoint``
    dataset: str  # mailpool/mail/vmail, the dataset that holds ``source``
    mountpoint: Path
    source: Path
    children: list[str]


@pytest.fixture
def zfs_source(pool: str, tmp_path: Path) -> Iterator[Callable[..., ZfsSource]]:
    """Factory: ``mailpool/mail`` mounted at tmp_path/zmail, the source ``vmail/`` its child
    dataset ``mailpool/mail/vmail`` holding a Maildir tree; with ``children``, user
    directories are child datasets of their own."""
    made: list[ZfsSource] = []

    def make(children: int = 0) -> ZfsSource:
        dataset = f"{pool}/mail"
        mountpoint = tmp_path / "zmail"
        sh("zfs", "create", "-o", f"mountpoint={mountpoint}", dataset)
        sh("zfs", "create", f"{dataset}/vmail")
        names = []
        for u in range(children):
            child = f"{dataset}/vmail/user{u}"
            sh("zfs", "create", child)
            names.append(child)
        source = mountpoint / "vmail"
        make_maildir(source)
        sh("sync")
        src = ZfsSource(dataset, f"{dataset}/vmail", mountpoint, source, names)
        made.append(src)
        return src

    yield make
    for target in sorted(mounts_under(Path("/")), key=len, reverse=True):
        if "mailsnap" in target:
            sh("umount", target, check=False)
    for src in made:
        for attempt in range(5):
            if not sh("zfs", "list", "-H", "-o", "name", src.root, check=False):
                break
            proc = subprocess.run(["zfs", "destroy", "-r", "-f", src.root],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                break
            time.sleep(0.5 * (attempt + 1))
