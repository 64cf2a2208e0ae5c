"""The contract every snapshot backend keeps, and the records backends exchange with the pipeline.

A backend is a small class behind ``SnapshotBackend``. The pipeline only ever calls these methods,
in this order: ``discover`` → ``create`` → ``mount`` → (copy) → ``unmount`` → ``destroy``;
and, at the start of a run, ``list_owned`` + ``unmount``/``destroy`` to sweep what a crashed
run left behind.
Adding a backend means writing one such class and registering it in ``backends/__init__.py``.

Ownership: every name a backend creates (snapshot, LV, dataset snapshot, mount directory) carries
``snapshot_name(job, run_id)`` = ``mailsnap-<job>-<run id>``, and a backend only ever destroys what
carries the ``mailsnap-<job>-`` marker. The pipeline calls these methods under the job's run lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import re
from typing import ClassVar, Protocol, runtime_checkable

OWNER_PREFIX = "mailsnap-"
# Run ids are UTC timestamps; the pattern lets a sweep recognise a mailsnap name strictly.
RUN_ID_RE = r"\d{8}T\d{6}Z(?:\.\d+)?"


def snapshot_name(job: str, run_id: str) -> str:
    """The name every object of one run carries: ``mailsnap-<job>-<run id>``."""
    return f"{OWNER_PREFIX}{job}-{run_id}"


def owned_by(name: str, job: str) -> bool:
    """True when ``name`` ends with a name this job's runs create (``…mailsnap-<job>-<run id>``).

    Checked strictly so that job ``mail`` never claims job ``mail-archive``'s snapshots.
    """
    return re.search(rf"{re.escape(OWNER_PREFIX + job)}-{RUN_ID_RE}$", name) is not None


@dataclass(frozen=True)
class Volume:
    """Where the source lives, as a backend discovered it (read-only facts).

    ``source`` is the configured path; ``relative`` is the source's path inside the snapshot,
    so the pipeline reads ``mount path / relative``. ``details`` holds backend-specific facts
    (device, subvolume id, LV path, dataset names …) as plain strings.
    """

    backend: str
    source: Path
    device: str
    relative: Path
    fstype: str
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """One snapshot a backend created (or found, when sweeping).

    ``name`` carries the ownership marker; ``point_in_time`` is false only for the ``live``
    fallback, whose "snapshot" is the live tree itself.
    """

    backend: str
    name: str
    volume: Volume
    point_in_time: bool = True
    details: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class SnapshotBackend(Protocol):
    """What a snapshot backend must do. Every method that changes the system goes through the
    runner with ``mutates=True``, so dry run prints it and skips it.

    Capability flags:
    ``name``             the ``backend =`` value in the config.
    ``point_in_time``    false for the ``live`` fallback (the pipeline then uses the Maildir-aware
                         copier, never plain rsync).
    ``needs_root``       ``mailsnap check`` warns when not root.
    ``tools``            executables the backend calls; ``mailsnap check`` looks for them.
    """

    name: ClassVar[str]
    point_in_time: ClassVar[bool]
    needs_root: ClassVar[bool]
    tools: ClassVar[tuple[str, ...]]

    def discover(self, source: Path) -> Volume:
        """Find the volume behind ``source``. Read-only; runs in dry run too.

        Raises ``BackendUnsuitable`` (with what to do) when this backend cannot snapshot it.
        """
        ...

    def create(self, volume: Volume, name: str) -> Snapshot:
        """Take one atomic snapshot named ``name`` of ``volume``.

        On failure nothing may remain (the backend cleans up its own partial work before
        raising). Dry run: returns the Snapshot that would exist, creates nothing.
        """
        ...

    def mount(self, snapshot: Snapshot, mountpoint: Path) -> Path:
        """Expose ``snapshot`` read-only (``ro,nosuid,nodev,noexec``) at ``mountpoint``, an
        existing empty directory the pipeline made. Returns the directory to copy from (the
        source's place inside the snapshot). Dry run: returns that path, mounts nothing.
        """
        ...

    def unmount(self, snapshot: Snapshot, mountpoint: Path) -> None:
        """Undo ``mount``. Idempotent: nothing mounted at ``mountpoint`` is success."""
        ...

    def destroy(self, snapshot: Snapshot) -> None:
        """Remove ``snapshot``. Idempotent: a snapshot that is already gone is success.
        Refuses (raises) for a name that does not carry the ``mailsnap-`` marker.
        """
        ...

    def list_owned(self, volume: Volume, job: str) -> list[Snapshot]:
        """Snapshots of ``volume`` whose names say they belong to ``job`` (see ``owned_by``),
        e.g. left by a run that was killed. Read-only.
        """
        ...

    def check_healthy(self, snapshot: Snapshot) -> None:
        """Raise ``SnapshotInvalid`` if the snapshot can no longer be trusted (LVM COW
        overflow). Called periodically while copying and once more before publishing.
        Backends whose snapshots cannot go bad do nothing.
        """
        ...

