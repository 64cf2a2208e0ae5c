"""ZFS: a snapshot of the dataset that holds the source, and by default of its children.

A mail store often spreads over child datasets (one per domain or user). ``zfs snapshot -r``
snapshots a dataset and all its descendants in one transaction, so every child shares the same
instant; mailsnap then mounts the parent's snapshot and, inside it, the snapshots of the children
that are mounted below the source, so one copy sees the whole tree as it was at that instant.

Snapshots are named ``<dataset>@mailsnap-<job>-<run id>``. They are mounted with ``mount -t zfs``
under the job's run directory, or read through ``<mountpoint>/.zfs/snapshot/<name>`` when the job
sets ``use_snapdir``. ZFS snapshots are read-only by nature and cannot overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import logging
import os
from pathlib import Path, PurePosixPath
import time
from typing import ClassVar

from mailsnap.backends.base import OWNER_PREFIX, Snapshot, Volume, owned_by
from mailsnap.backends.lvm import carries_marker
from mailsnap.config import JobBase, ZfsJob, job_as
from mailsnap.errors import (
    BackendUnsuitable,
    CommandFailed,
    MailsnapError,
    TeardownIncomplete,
    parsing,
)
from mailsnap.mounts import SAFE_OPTIONS, find_mount, mounts_under, unmount
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

DATASET_FIELDS = "name,mountpoint,mounted,canmount,type"
DESTROY_ATTEMPTS = 4
DESTROY_DELAY = 1.0


@dataclass(frozen=True)
class Dataset:
    """One row of ``zfs list -H -p -o name,mountpoint,mounted,canmount,type``."""

    name: str
    mountpoint: str  # a path, or "legacy" / "none" / "-"
    mounted: bool
    canmount: str
    type: str


@parsing("zfs list")
def parse_zfs_list(stdout: str) -> list[Dataset]:
    """Rows of ``zfs list -H -p -o DATASET_FIELDS`` (tab-separated, no header)."""
    rows = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        name, mountpoint, mounted, canmount, kind = line.split("\t")
        rows.append(Dataset(name, mountpoint, mounted == "yes", canmount, kind))
    return rows


class ZfsBackend:
    name: ClassVar[str] = "zfs"
    point_in_time: ClassVar[bool] = True
    needs_root: ClassVar[bool] = True
    tools: ClassVar[tuple[str, ...]] = ("zfs", "findmnt", "mount", "umount")

    def __init__(self, runner: Runner, job: JobBase) -> None:
        self.runner = runner
        self.job = job_as(ZfsJob, job)

    # -- discovery (read-only) -------------------------------------------------------------

    def discover(self, source: Path) -> Volume:
        """Find the dataset mounted where ``source`` lives and the child datasets mounted below
        the source (which ``recursive`` includes). Read-only.
        """
        mount = find_mount(self.runner, source)
        if mount.fstype != "zfs":
            raise BackendUnsuitable(
                f"{source} is on {mount.fstype or 'an unknown file system'}, not ZFS: use "
                "backend = \"auto\" or the backend for that volume"
            )
        dataset = mount.source
        rows = self._datasets(dataset)
        if not rows or rows[0].name != dataset:
            raise BackendUnsuitable(f"{source}: zfs list does not know dataset {dataset!r}")
        in_mount = PurePosixPath(os.path.realpath(source)).relative_to(mount.target)
        children = self._children_below(rows[1:], PurePosixPath(mount.target), in_mount)
        if children and not self.job.recursive:
            log.warning(
                "recursive = false: child datasets below %s are not in the backup: %s",
                source, ", ".join(name for name, _ in children),
            )
            children = []
        if children and self.job.use_snapdir:
            raise BackendUnsuitable(
                f"{source} has child datasets ({', '.join(n for n, _ in children[:3])}) that "
                ".zfs/snapshot does not show; set use_snapdir = false (mailsnap then mounts "
                "each child's snapshot in place) or recursive = false to leave them out"
            )
        return Volume(
            backend=self.name,
            source=source,
            device=dataset,
            relative=Path(in_mount),
            fstype="zfs",
            details={
                "dataset": dataset,
                "mountpoint": str(mount.target),
                "children": json.dumps(children),
            },
        )

    def _datasets(self, dataset: str) -> list[Dataset]:
        """``dataset`` and its descendant file systems, parent first. Read-only."""
        result = self.runner.run(
            ["zfs", "list", "-H", "-p", "-t", "filesystem", "-o", DATASET_FIELDS, "-r", dataset],
            mutates=False,
        )
        return parse_zfs_list(result.stdout)

    @staticmethod
    def _children_below(
        rows: list[Dataset], mounted_at: PurePosixPath, in_mount: PurePosixPath
    ) -> list[tuple[str, str]]:
        """(name, path relative to the parent's mountpoint) of mounted children inside the
        source, shallowest first: the order they must be mounted in."""
        out = []
        for row in rows:
            if not row.mounted or not row.mountpoint.startswith("/"):
                continue  # legacy/none mountpoints: not part of this tree
            mp = PurePosixPath(row.mountpoint)
            if mp == mounted_at or mounted_at not in mp.parents:
                continue
            relative = mp.relative_to(mounted_at)
            inside = in_mount in (PurePosixPath("."), relative) or in_mount in relative.parents
            if inside:
                out.append((row.name, str(relative)))
        return sorted(out, key=lambda item: (len(PurePosixPath(item[1]).parts), item[1]))

    # -- the snapshot ----------------------------------------------------------------------

    def create(self, volume: Volume, name: str) -> Snapshot:
        """``zfs snapshot [-r] <dataset>@<name>``: with ``recursive``, one atomic snapshot of
        the dataset and all its descendants. Dry run: prints the command, creates nothing.
        """
        dataset = volume.details["dataset"]
        argv = ["zfs", "snapshot", *(["-r"] if self.job.recursive else []), f"{dataset}@{name}"]
        self.runner.run(argv, mutates=True)
        return Snapshot(
            backend=self.name,
            name=name,
            volume=volume,
            details={"dataset": dataset, "snapshot": f"{dataset}@{name}"},
        )

    def mount(self, snapshot: Snapshot, mountpoint: Path) -> Path:
        """Mount the dataset's snapshot read-only at ``mountpoint`` and each child's snapshot at
        its place inside it, parents first; if one fails, unmounts the others and raises.
        With ``use_snapdir``, mounts nothing and returns the ``.zfs/snapshot/<name>`` path
        (ZFS automounts it on first access). Dry run: prints the mounts, returns the path.
        """
        volume = snapshot.volume
        if self.job.use_snapdir:
            snapdir = Path(volume.details["mountpoint"]) / ".zfs" / "snapshot" / snapshot.name
            return snapdir / volume.relative
        # `mount -t zfs` of a snapshot fails while its .zfs/snapshot automount is active.
        self._unmount_everywhere(snapshot)
        options = ",".join(["ro", *SAFE_OPTIONS])
        dataset = volume.details["dataset"]
        targets = [(dataset, mountpoint)]
        for child, relative in json.loads(volume.details.get("children", "[]")):
            targets.append((child, mountpoint / relative))
        done: list[Path] = []
        try:
            for name, target in targets:
                if not self.runner.dry_run and not target.is_dir():
                    raise MailsnapError(
                        f"cannot mount the snapshot of {name}: {target} does not exist in the "
                        "parent's snapshot (its mountpoint was created after the snapshot?)"
                    )
                self.runner.run(
                    ["mount", "-t", "zfs", "-o", options, f"{name}@{snapshot.name}", target],
                    mutates=True,
                )
                done.append(target)
        except BaseException:
            for target in reversed(done):
                try:
                    unmount(self.runner, target)
                except MailsnapError as exc:
                    log.error("could not unmount %s after a failed mount: %s", target, exc)
            raise
        return mountpoint / volume.relative

    def unmount(self, snapshot: Snapshot, mountpoint: Path) -> None:
        """Unmount everything at or below ``mountpoint`` (children first), and any
        ``.zfs/snapshot`` automount of this snapshot. Nothing mounted is success."""
        for mount in mounts_under(self.runner, mountpoint):
            unmount(self.runner, mount.target)
        self._unmount_everywhere(snapshot)

    def _unmount_everywhere(self, snapshot: Snapshot) -> None:
        """Unmount every mount of this snapshot or of its children's same-named snapshots
        (a killed run's mount, a ``.zfs/snapshot`` automount), deepest first."""
        dataset = snapshot.volume.details["dataset"]
        suffix = f"@{snapshot.name}"
        for mount in mounts_under(self.runner, Path("/")):
            base, _, snap = mount.source.partition("@")
            if (
                mount.fstype == "zfs"
                and f"@{snap}" == suffix
                and (base == dataset or base.startswith(dataset + "/"))
            ):
                unmount(self.runner, mount.target)

    def destroy(self, snapshot: Snapshot) -> None:
        """``zfs destroy -r <dataset>@<name>`` (the children's same-named snapshots go with it);
        already gone is success. Refuses a name that is not ``mailsnap-<job>-<run id>``.
        Unmounts the snapshot wherever it is mounted first, since ZFS refuses to destroy a
        mounted snapshot ("dataset is busy"), and retries while it stays busy. Dry run: prints
        only.
        """
        dataset = snapshot.volume.details["dataset"]
        full = f"{dataset}@{snapshot.name}"
        if not carries_marker(snapshot.name) or not snapshot.name.startswith(OWNER_PREFIX):
            raise MailsnapError(
                f"refusing to destroy {full}: its name is not {OWNER_PREFIX}<job>-<run id>, "
                "so mailsnap did not create it"
            )
        if self.runner.dry_run:
            self.runner.run(["zfs", "destroy", "-r", full], mutates=True)
            return
        if not self._snapshot_exists(full):
            log.info("snapshot %s is already gone", full)
            return
        self._unmount_everywhere(snapshot)
        last: CommandFailed | None = None
        for attempt in range(1, DESTROY_ATTEMPTS + 1):
            try:
                self.runner.run(["zfs", "destroy", "-r", full], mutates=True)
                return
            except CommandFailed as exc:
                last = exc
                if not self._snapshot_exists(full):
                    return
                log.warning("zfs destroy %s failed (%d/%d): %s", full, attempt,
                            DESTROY_ATTEMPTS, exc)
                time.sleep(DESTROY_DELAY * attempt)
                self._unmount_everywhere(snapshot)
        raise TeardownIncomplete(
            f"ZFS snapshot {full} still exists after {DESTROY_ATTEMPTS} attempts ({last}); "
            f"unmount it (findmnt -S {full}) and run `zfs destroy -r {full}`"
        )

    def _snapshot_exists(self, full: str) -> bool:
        result = self.runner.run(
            ["zfs", "list", "-H", "-p", "-t", "snapshot", "-o", "name", full],
            mutates=False,
            ok_codes=(0, 1),
        )
        if result.exit_code == 0:
            return True
        if "does not exist" in result.stderr:
            return False
        raise CommandFailed(result.argv, result.exit_code, result.stderr)

    def list_owned(self, volume: Volume, job: str) -> list[Snapshot]:
        """Snapshots of the source's dataset named ``mailsnap-<job>-<run id>`` (read-only)."""
        dataset = volume.details["dataset"]
        result = self.runner.run(
            ["zfs", "list", "-H", "-p", "-t", "snapshot", "-o", "name", "-d", "1", dataset],
            mutates=False,
        )
        found = []
        for line in result.stdout.splitlines():
            base, _, snap = line.strip().partition("@")
            if base == dataset and owned_by(snap, job):
                found.append(
                    Snapshot(
                        backend=self.name,
                        name=snap,
                        volume=volume,
                        details={"dataset": dataset, "snapshot": line.strip()},
                    )
                )
        return found

    def check_healthy(self, snapshot: Snapshot) -> None:
        """A ZFS snapshot cannot overflow or go invalid while it exists: nothing to check."""
