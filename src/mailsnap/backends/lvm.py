"""LVM: a snapshot of the logical volume that holds the source.

Two kinds, chosen by the origin LV:

* a classic (COW) snapshot of a linear/striped/raid LV. It gets its own COW space
  (``snapshot_size``) from the volume group's free extents; every block the live volume changes
  while the backup runs is copied there first. When that space runs out the kernel invalidates
  the snapshot (``lv_attr`` 5th character ``I``) and every read from it fails, so the COW fill is
  watched during the copy (``check_healthy``) and an invalid snapshot fails the run.
* a thin snapshot of a thin LV. It takes no size (it shares the thin pool), but LVM marks it
  "skip on activation", so it is created with ``--setactivationskip n`` to be usable at once.

The snapshot LV is named ``<origin>_mailsnap-<job>-<run id>`` and mounted read-only with the
file system's replay disabled (see ``_mount_options``).
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import logging
import math
import os
from pathlib import Path, PurePosixPath
import re
import time
from typing import ClassVar

from mailsnap.backends.base import OWNER_PREFIX, RUN_ID_RE, Snapshot, Volume, owned_by
from mailsnap.config import JOB_NAME_RE, JobBase, LvmJob, job_as
from mailsnap.errors import (
    BackendUnsuitable,
    CommandFailed,
    MailsnapError,
    SnapshotInvalid,
    TeardownIncomplete,
    parsing,
)
from mailsnap.mounts import SAFE_OPTIONS, find_mount, mounts_under, unmount
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

LV_FIELDS = (
    "lv_name,vg_name,lv_path,lv_dm_path,lv_attr,lv_size,origin,origin_size,"
    "data_percent,segtype,pool_lv,lv_active"
)
VG_FIELDS = "vg_name,vg_size,vg_free,vg_extent_size"
# lvs/vgs exit 5 when the named VG/LV does not exist.
LVM_NOT_FOUND = 5
REMOVE_ATTEMPTS = 4
REMOVE_DELAY = 1.0
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
# File systems whose read-only snapshot mount needs no journal replay (see _mount_options).
KNOWN_FS = ("xfs", "ext4", "ext3", "ext2")
JOB_NAME = JOB_NAME_RE.removeprefix("^").removesuffix("$")


@dataclass(frozen=True)
class LogicalVolume:
    """One row of ``lvs --reportformat json --units b --nosuffix``."""

    name: str
    vg: str
    path: str  # /dev/<vg>/<lv>
    dm_path: str  # /dev/mapper/<vg>-<lv>
    attr: str  # e.g. "owi-aos---"; "swi-I-s---" is an invalidated snapshot
    size: int
    origin: str
    origin_size: int
    data_percent: float | None  # COW fill of a snapshot, data fill of a thin LV or pool
    segtype: str
    pool: str
    active: bool

    @property
    def thin(self) -> bool:
        return self.segtype == "thin"

    @property
    def invalid(self) -> bool:
        # 5th attribute: (I)nvalid snapshot; 9th: (F)ailed or thin pool out of (D)ata space.
        return self.attr[4:5] == "I" or self.attr[8:9] in ("F", "D")


@dataclass(frozen=True)
class VolumeGroup:
    """One row of ``vgs --reportformat json --units b --nosuffix``."""

    name: str
    size: int
    free: int
    extent_size: int


@parsing("lvs")
def parse_lvs(stdout: str) -> list[LogicalVolume]:
    """Rows of ``lvs --reportformat json --units b --nosuffix -o LV_FIELDS``."""
    rows = _report_rows(stdout, "lv")
    return [
        LogicalVolume(
            name=row["lv_name"],
            vg=row["vg_name"],
            path=row.get("lv_path", ""),
            dm_path=row.get("lv_dm_path", ""),
            attr=row.get("lv_attr", ""),
            size=_int(row.get("lv_size")),
            origin=row.get("origin", ""),
            origin_size=_int(row.get("origin_size")),
            data_percent=float(row["data_percent"]) if row.get("data_percent") else None,
            segtype=row.get("segtype", ""),
            pool=row.get("pool_lv", ""),
            active=row.get("lv_active", "") == "active",
        )
        for row in rows
    ]


@parsing("vgs")
def parse_vgs(stdout: str) -> list[VolumeGroup]:
    """Rows of ``vgs --reportformat json --units b --nosuffix -o VG_FIELDS``."""
    return [
        VolumeGroup(
            name=row["vg_name"],
            size=_int(row.get("vg_size")),
            free=_int(row.get("vg_free")),
            extent_size=_int(row.get("vg_extent_size")),
        )
        for row in _report_rows(stdout, "vg")
    ]


def _report_rows(stdout: str, kind: str) -> list[dict[str, str]]:
    data = json.loads(stdout or '{"report": []}')
    rows: list[dict[str, str]] = []
    for report in data.get("report", []):
        rows.extend(report.get(kind, []))
    return rows


def _int(value: str | None) -> int:
    return int(float(value)) if value else 0


def snapshot_bytes(spec: str, origin_size: int, extent_size: int) -> int:
    """``snapshot_size`` (``2G``, ``512M``, ``1.5g``, ``10%ORIGIN``) in bytes, rounded up to
    whole extents as LVM would allocate them."""
    percent = re.fullmatch(r"(\d{1,3})%ORIGIN", spec)
    if percent:
        wanted = origin_size * int(percent.group(1)) / 100
    else:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", spec, re.IGNORECASE)
        if not match:
            raise MailsnapError(f"snapshot_size {spec!r} is not a size like '2G' or '10%ORIGIN'")
        wanted = float(match.group(1)) * UNITS[match.group(2).lower()]
    extent = max(extent_size, 512)
    return max(1, math.ceil(wanted / extent)) * extent


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def carries_marker(name: str) -> bool:
    """True when ``name`` ends in ``mailsnap-<job>-<run id>`` for some valid job name: the only
    names ``destroy`` touches."""
    return re.search(rf"{re.escape(OWNER_PREFIX)}{JOB_NAME}-{RUN_ID_RE}$", name) is not None


def _snapshot_lv(snapshot: Snapshot) -> tuple[str, str]:
    """(VG, LV name) of a snapshot; ``<origin>_<name>`` when the record does not say."""
    vg = snapshot.details.get("vg") or snapshot.volume.details["vg"]
    lv = snapshot.details.get("lv") or f"{snapshot.volume.details['lv']}_{snapshot.name}"
    return vg, lv


class LvmBackend:
    name: ClassVar[str] = "lvm"
    point_in_time: ClassVar[bool] = True
    needs_root: ClassVar[bool] = True
    tools: ClassVar[tuple[str, ...]] = (
        "lvs", "vgs", "lvcreate", "lvremove", "lvextend", "lvchange", "findmnt", "mount",
        "umount", "udevadm",
    )

    def __init__(self, runner: Runner, job: JobBase) -> None:
        self.runner = runner
        self.job = job_as(LvmJob, job)

    # -- discovery (read-only) -------------------------------------------------------------

    def discover(self, source: Path) -> Volume:
        """Find the LV mounted where ``source`` lives, its file system and the VG's free space.

        Read-only. Refuses a source that is not on an LV, that is on a snapshot LV already, or
        whose file system mailsnap does not know how to mount as a snapshot (unless the job sets
        ``mount_options``).
        """
        mount = find_mount(self.runner, source)
        lv = lv_for_device(self.runner, mount.source)
        if lv is None:
            raise BackendUnsuitable(
                f"{source} is on {mount.source or 'an unknown device'} ({mount.fstype}), which is "
                "not an LVM logical volume: use backend = \"auto\" or the backend for that volume"
            )
        if lv.origin and not lv.thin:
            raise BackendUnsuitable(
                f"{source} is on {lv.vg}/{lv.name}, itself a snapshot of {lv.origin}: back up "
                "the origin volume instead"
            )
        if mount.fstype not in KNOWN_FS and self.job.mount_options is None:
            raise BackendUnsuitable(
                f"{source} is on {mount.fstype}; mailsnap knows how to mount snapshots of "
                f"{', '.join(KNOWN_FS)}. Set mount_options for this job to mount it anyway"
            )
        vg = self._vg(lv.vg)
        in_mount = PurePosixPath(os.path.realpath(source)).relative_to(mount.target)
        relative = PurePosixPath(mount.fsroot.lstrip("/")) / in_mount
        return Volume(
            backend=self.name,
            source=source,
            device=lv.dm_path or mount.source,
            relative=Path(relative),
            fstype=mount.fstype,
            details={
                "vg": lv.vg,
                "lv": lv.name,
                "lv_size": str(lv.size),
                "segtype": lv.segtype,
                "thin_pool": lv.pool,
                "vg_free": str(vg.free),
                "vg_extent_size": str(vg.extent_size),
                "mounted_at": str(mount.target),
            },
        )

    def _lvs(self, select: list[str]) -> list[LogicalVolume]:
        return list_lvs(self.runner, select)

    def _lv(self, vg: str, lv: str) -> LogicalVolume | None:
        rows = [row for row in self._lvs([vg]) if row.name == lv]
        return rows[0] if rows else None

    def _vg(self, vg: str) -> VolumeGroup:
        result = self.runner.run(
            ["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", VG_FIELDS, vg],
            mutates=False,
        )
        groups = parse_vgs(result.stdout)
        if not groups:
            raise MailsnapError(f"vgs reports nothing for volume group {vg!r}")
        return groups[0]

    # -- the snapshot ----------------------------------------------------------------------

    def create(self, volume: Volume, name: str) -> Snapshot:
        """``lvcreate --snapshot`` of the source's LV, named ``<lv>_<name>``.

        Classic LV: the COW size comes from ``snapshot_size``; when the VG has less free space
        than that, refuses *before* creating anything. Thin LV: no size, activated at once.
        If ``lvcreate`` fails, a half-made LV is removed before the error is raised.
        Dry run: prints the command, creates nothing.
        """
        vg, origin = volume.details["vg"], volume.details["lv"]
        snap_lv = f"{origin}_{name}"
        thin = volume.details.get("segtype") == "thin"
        details = {"vg": vg, "lv": snap_lv, "origin": origin, "thin": "yes" if thin else "no"}
        if thin:
            # Thin snapshots are flagged "skip activation" by default; we need it active now.
            argv = ["lvcreate", "--snapshot", "--setactivationskip", "n", "--name", snap_lv,
                    f"{vg}/{origin}"]
        else:
            group = self._vg(vg)
            size = snapshot_bytes(
                self.job.snapshot_size, int(volume.details["lv_size"]), group.extent_size
            )
            if size > group.free:
                raise BackendUnsuitable(
                    f"volume group {vg} has {_human(group.free)} free, but the snapshot of "
                    f"{vg}/{origin} needs {_human(size)} (snapshot_size = "
                    f"{self.job.snapshot_size!r}): add space to the VG (vgextend) or lower "
                    "snapshot_size; nothing was created"
                )
            details["size"] = str(size)
            argv = ["lvcreate", "--snapshot", "--name", snap_lv, "--size", f"{size}b",
                    f"{vg}/{origin}"]
        try:
            self.runner.run(argv, mutates=True)
            if thin and not self.runner.dry_run:
                created = self._lv(vg, snap_lv)
                if created is not None and not created.active:
                    # -K: activate despite the skip flag (older LVM ignores -kn on creation).
                    self.runner.run(["lvchange", "-ay", "-K", f"{vg}/{snap_lv}"], mutates=True)
        except BaseException:
            if not self.runner.dry_run and self._lv(vg, snap_lv) is not None:
                log.warning("removing the half-made snapshot %s/%s", vg, snap_lv)
                self.runner.run(["lvremove", "-y", f"{vg}/{snap_lv}"], mutates=True)
            raise
        return Snapshot(backend=self.name, name=name, volume=volume, details=details)

    def _mount_options(self, fstype: str) -> list[str]:
        """Read-only options for a snapshot of ``fstype``.

        ``lvcreate`` suspends the origin for the instant of the snapshot, and the kernel freezes
        the file system for it, so the snapshot is consistent. It is still a copy of a file
        system that is mounted: ext4 keeps its ``needs_recovery`` flag set, and a plain ``ro``
        mount would replay the journal, i.e. write into the snapshot (spending COW space of a
        classic snapshot). Replay is therefore switched off: ext4 ``noload``, XFS
        ``norecovery``. XFS also needs ``nouuid``: the snapshot carries the origin's UUID, and
        XFS refuses to mount a second file system whose UUID is already mounted.
        """
        if self.job.mount_options is not None:
            fs_options = list(self.job.mount_options)
        elif fstype == "xfs":
            fs_options = ["nouuid", "norecovery"]
        elif fstype.startswith("ext"):
            fs_options = ["noload"]
        else:
            fs_options = []
        options = ["ro"]
        for option in [*fs_options, *SAFE_OPTIONS]:
            if option not in options and option != "rw":
                options.append(option)
        return options

    def mount(self, snapshot: Snapshot, mountpoint: Path) -> Path:
        """Mount the snapshot LV read-only (see ``_mount_options``) at ``mountpoint``; return the
        source's place inside it. Dry run: prints the mount, returns the path."""
        fstype = snapshot.volume.fstype
        vg, lv = _snapshot_lv(snapshot)
        device = f"/dev/{vg}/{lv}"
        options = ",".join(self._mount_options(fstype))
        try:
            self.runner.run(["mount", "-t", fstype, "-o", options, device, mountpoint],
                            mutates=True)
        except CommandFailed:
            # A snapshot that overflowed between lvcreate and mount cannot be mounted; say so
            # rather than leaving the admin with mount's "wrong fs type, bad superblock".
            self.check_healthy(snapshot)
            raise
        return mountpoint / snapshot.volume.relative

    def unmount(self, snapshot: Snapshot, mountpoint: Path) -> None:
        """Unmount (retrying while busy); nothing mounted is success. Then waits for udev, which
        briefly opens the device after an unmount and would make ``lvremove`` fail as "in use".
        """
        unmount(self.runner, mountpoint)
        self._settle()

    def _settle(self) -> None:
        try:
            self.runner.run(["udevadm", "settle", "--timeout=30"], mutates=False, timeout=40)
        except MailsnapError as exc:  # no udev (containers): nothing to wait for
            log.debug("udevadm settle: %s", exc)

    def destroy(self, snapshot: Snapshot) -> None:
        """``lvremove -y`` the snapshot LV; already gone is success. Refuses an LV whose name
        does not end in a ``mailsnap-<job>-<run id>`` marker (sweeps pick only this job's
        snapshots: see ``list_owned``). Unmounts it first wherever it is
        still mounted (a killed run's mount), retries while the device is in use, and raises
        ``TeardownIncomplete`` naming the LV when it keeps failing. Dry run: prints only.
        """
        vg, lv = _snapshot_lv(snapshot)
        if not carries_marker(lv):
            raise MailsnapError(
                f"refusing to remove LV {vg}/{lv}: its name does not end in the marker "
                f"{OWNER_PREFIX}<job>-<run id>, so mailsnap did not create it"
            )
        if self.runner.dry_run:
            self.runner.run(["lvremove", "-y", f"{vg}/{lv}"], mutates=True)
            return
        if self._lv(vg, lv) is None:
            log.info("snapshot %s/%s is already gone", vg, lv)
            return
        device = os.path.realpath(f"/dev/{vg}/{lv}")
        for mount in mounts_under(self.runner, Path("/")):
            if mount.source and os.path.realpath(mount.source) == device:
                log.warning("unmounting %s (snapshot %s/%s) before removing it", mount.target,
                            vg, lv)
                unmount(self.runner, mount.target)
        self._settle()
        last: CommandFailed | None = None
        for attempt in range(1, REMOVE_ATTEMPTS + 1):
            try:
                self.runner.run(["lvremove", "-y", f"{vg}/{lv}"], mutates=True)
                return
            except CommandFailed as exc:
                last = exc
                if self._lv(vg, lv) is None:
                    return
                log.warning("lvremove %s/%s failed (%d/%d): %s", vg, lv, attempt,
                            REMOVE_ATTEMPTS, exc)
                time.sleep(REMOVE_DELAY * attempt)
                self._settle()
        raise TeardownIncomplete(
            f"snapshot LV {vg}/{lv} still exists after {REMOVE_ATTEMPTS} attempts ({last}); "
            f"find its user with `dmsetup info -c {vg}-{lv.replace('-', '--')}` / `fuser -vm "
            f"/dev/{vg}/{lv}`, then run `lvremove -y {vg}/{lv}`"
        )

    def list_owned(self, volume: Volume, job: str) -> list[Snapshot]:
        """Snapshot LVs of the source's LV named ``<lv>_mailsnap-<job>-<run id>`` (read-only)."""
        vg, origin = volume.details["vg"], volume.details["lv"]
        marker = re.compile(rf"^{re.escape(origin)}_({re.escape(OWNER_PREFIX + job)}-{RUN_ID_RE})$")
        found = []
        for lv in self._lvs([vg]):
            match = marker.match(lv.name)
            if match and lv.origin == origin and owned_by(lv.name, job):
                found.append(
                    Snapshot(
                        backend=self.name,
                        name=match.group(1),
                        volume=volume,
                        details={"vg": vg, "lv": lv.name, "origin": origin,
                                 "thin": "yes" if lv.thin else "no"},
                    )
                )
        return found

    def check_healthy(self, snapshot: Snapshot) -> None:
        """Raise ``SnapshotInvalid`` when the snapshot overflowed (or its thin pool failed);
        warn when its COW space (thin: the pool) is ``cow_warn_percent`` full, and with
        ``auto_extend`` grow a classic snapshot while the VG has free space. Read-only except
        for that ``lvextend`` (skipped in dry run)."""
        if self.runner.dry_run:
            return
        vg, lv_name = _snapshot_lv(snapshot)
        rows = {row.name: row for row in self._lvs([vg])}
        lv = rows.get(lv_name)
        if lv is None:
            raise SnapshotInvalid(
                f"snapshot LV {vg}/{lv_name} disappeared during the backup; nothing was published"
            )
        if lv.invalid:
            raise SnapshotInvalid(
                f"snapshot LV {vg}/{lv_name} became invalid (lv_attr {lv.attr}): its COW space "
                f"({_human(lv.size)}) filled up while the source changed, so what was read from "
                "it cannot be trusted; nothing was published. Raise snapshot_size or set "
                "auto_extend = true"
            )
        watched, percent = lv, lv.data_percent
        if lv.thin:
            pool = rows.get(lv.pool)
            if pool is not None and pool.invalid:
                raise SnapshotInvalid(
                    f"thin pool {vg}/{pool.name} failed or ran out of space (lv_attr "
                    f"{pool.attr}) during the backup; nothing was published"
                )
            watched, percent = (pool, pool.data_percent) if pool else (lv, None)
        if percent is None or percent < self.job.cow_warn_percent:
            return
        what = f"thin pool {vg}/{watched.name}" if lv.thin else f"COW space of {vg}/{lv_name}"
        log.warning("%s is %.1f%% full (warning at %.0f%%)", what, percent,
                    self.job.cow_warn_percent)
        if self.job.auto_extend and not lv.thin:
            self._extend(lv, percent)

    def _extend(self, lv: LogicalVolume, percent: float) -> None:
        """Grow a classic snapshot by its own size, as far as the VG's free space goes."""
        group = self._vg(lv.vg)
        grow = min(lv.size, group.free - group.free % max(group.extent_size, 1))
        if grow <= 0:
            log.warning("auto_extend: volume group %s has no free space left to grow %s/%s",
                        lv.vg, lv.vg, lv.name)
            return
        log.warning("auto_extend: mailsnap grows snapshot %s/%s by %s (COW %.1f%% full, "
                    "%s free in %s)", lv.vg, lv.name, _human(grow), percent,
                    _human(group.free), lv.vg)
        self.runner.run(["lvextend", "--size", f"+{grow}b", f"{lv.vg}/{lv.name}"], mutates=True)



def list_lvs(runner: Runner, select: list[str]) -> list[LogicalVolume]:
    """``lvs`` rows for ``select`` (VG or VG/LV names; all LVs when empty). A VG or LV that
    does not exist yields no rows. Read-only (runs in dry run)."""
    result = runner.run(
        ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-a",
         "-o", LV_FIELDS, *select],
        mutates=False,
        ok_codes=(0, LVM_NOT_FOUND),
    )
    return parse_lvs(result.stdout) if result.exit_code == 0 else []


def lv_for_device(runner: Runner, device: str) -> LogicalVolume | None:
    """The LV whose device node is ``device`` (findmnt shows ``/dev/mapper/<vg>-<lv>``), or
    None. Read-only."""
    if not device.startswith("/dev/"):
        return None
    wanted = os.path.realpath(device)
    for lv in list_lvs(runner, []):
        for candidate in (lv.dm_path, lv.path):
            if candidate and (candidate == device or os.path.realpath(candidate) == wanted):
                return lv
    return None


def is_logical_volume(runner: Runner, device: str) -> bool:
    """True when ``device`` (a mount's source) is an LVM logical volume; for ``auto``.
    Read-only; false when LVM is not installed."""
    try:
        return lv_for_device(runner, device) is not None
    except MailsnapError:
        return False
