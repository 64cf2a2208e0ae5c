"""The explicit registry of snapshot backends, and ``backend = "auto"`` detection.

Adding a backend: write a class that satisfies ``SnapshotBackend`` (see ``base.py``), add it to
``BACKENDS`` and give it a config model in ``config.py``. The pipeline never changes.
"""

from __future__ import annotations

from collections.abc import Callable
import logging
import os

from mailsnap.backends.base import SnapshotBackend
from mailsnap.backends.btrfs import BtrfsBackend
from mailsnap.backends.live import LiveBackend
from mailsnap.backends.lvm import LvmBackend, is_logical_volume
from mailsnap.backends.zfs import ZfsBackend
from mailsnap.config import AutoJob, BtrfsJob, Job, JobBase, job_as
from mailsnap.mounts import find_mount
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

BackendFactory = Callable[[Runner, JobBase], SnapshotBackend]

BACKENDS: dict[str, BackendFactory] = {
    "btrfs": BtrfsBackend,
    "live": LiveBackend,
    "lvm": LvmBackend,
    "zfs": ZfsBackend,
}


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
        return LiveBackend(runner, job)  # discover() explains what is wrong with the path
    mount = find_mount(runner, job.source)
    fstype = mount.fstype
    if fstype == "btrfs":
        if os.geteuid() == 0:
            log.info("auto: %s is on btrfs; using a read-only btrfs snapshot", job.source)
            return BtrfsBackend(runner, job_as(BtrfsJob, job))
        log.warning("auto: %s is on btrfs, but snapshots need root; using the live copier",
                    job.source)
    elif os.geteuid() == 0 and (fstype == "zfs" or is_logical_volume(runner, mount.source)):
        backend = ZfsBackend(runner, job) if fstype == "zfs" else LvmBackend(runner, job)
        log.info("auto: %s is on %s (%s); using a %s snapshot", job.source, mount.source,
                 fstype, backend.name)
        return backend
    else:
        log.info("auto: %s is on %s; no snapshot backend for it, using the live copier",
                 job.source, fstype or "an unknown file system")
    return LiveBackend(runner, job)
