"""The explicit registry of snapshot backends, and ``backend = "auto"`` detection.

Adding a backend: write a class that satisfies ``SnapshotBackend`` (see ``base.py``), add it to
``BACKENDS`` and give it a config model in ``config.py``. The pipeline never changes.

A backend's module is imported when a job uses it: a btrfs backup does not load the LVM and ZFS
code (start-up time, issue #9; tests/test_cli_imports.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import importlib
import logging
import os

from mailsnap.backends.base import SnapshotBackend
from mailsnap.config import AutoJob, BtrfsJob, Job, JobBase, job_as
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

BackendFactory = Callable[[Runner, JobBase], SnapshotBackend]


class _Registry(Mapping[str, BackendFactory]):
    """backend name → its class, whose module is imported on the first look-up."""

    def __init__(self, where: dict[str, tuple[str, str]]) -> None:
        self._where = where

    def __getitem__(self, name: str) -> BackendFactory:
        module, cls = self._where[name]
        factory: BackendFactory = getattr(importlib.import_module(module), cls)
        return factory

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


BACKENDS: Mapping[str, BackendFactory] = _Registry({
    "btrfs": ("mailsnap.backends.btrfs", "BtrfsBackend"),
    "live": ("mailsnap.backends.live", "LiveBackend"),
    "lvm": ("mailsnap.backends.lvm", "LvmBackend"),
    "zfs": ("mailsnap.backends.zfs", "ZfsBackend"),
})


def make_backend(job: Job, runner: Runner) -> SnapshotBackend:
    """The backend for ``job``; for ``auto``, the one the source's file system allows."""
    if isinstance(job, AutoJob):
        return _auto(job, runner)
    return BACKENDS[job.backend](runner, job)


def _auto(job: AutoJob, runner: Runner) -> SnapshotBackend:
    """btrfs when the source is on btrfs and we are root; the live copier otherwise.

    Read-only: runs ``findmnt`` even in dry run.
    """
    if not job.source.is_dir():
        return BACKENDS["live"](runner, job)  # discover() explains what is wrong with the path
    # Imported here: mounts -> procs -> backends.base would otherwise import this package
    # half-way through procs (``from mailsnap import procs`` first failed).
    from mailsnap.mounts import find_mount

    mount = find_mount(runner, job.source)
    fstype = mount.fstype
    if fstype == "btrfs":
        if os.geteuid() == 0:
            log.info("auto: %s is on btrfs; using a read-only btrfs snapshot", job.source)
            return BACKENDS["btrfs"](runner, job_as(BtrfsJob, job))
        log.warning("auto: %s is on btrfs, but snapshots need root; using the live copier",
                    job.source)
    elif os.geteuid() == 0 and (fstype == "zfs" or _is_logical_volume(runner, mount.source)):
        backend = BACKENDS["zfs" if fstype == "zfs" else "lvm"](runner, job)
        log.info("auto: %s is on %s (%s); using a %s snapshot", job.source, mount.source,
                 fstype, backend.name)
        return backend
    else:
        log.info("auto: %s is on %s; no snapshot backend for it, using the live copier",
                 job.source, fstype or "an unknown file system")
    return BACKENDS["live"](runner, job)


def _is_logical_volume(runner: Runner, device: str) -> bool:
    from mailsnap.backends.lvm import is_logical_volume

    return is_logical_volume(runner, device)
