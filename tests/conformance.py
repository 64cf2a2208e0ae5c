"""The contract every SnapshotBackend keeps, as one test suite.

A test module subclasses ``BackendContract`` and provides a ``case`` fixture returning a
``ContractCase`` (a backend on a real volume whose source holds a few files). The host runs it for
btrfs and live (tests/test_backend_conformance.py); the LVM/ZFS guest runs it for lvm and zfs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from mailsnap.backends import BACKENDS
from mailsnap.backends.base import Snapshot, SnapshotBackend, snapshot_name
from mailsnap.config import one_off_job
from mailsnap.errors import MailsnapError
from mailsnap.runner import Result, Runner

RUN_ID = "20261128T020000Z"


@dataclass
class ContractCase:
    backend: SnapshotBackend
    source: Path
    job: str
    mountpoint: Path  # an existing empty directory
    dry_run_backend: SnapshotBackend  # the same backend with a dry-run runner
    mutations: list[tuple[str, ...]]  # what dry_run_backend's runner ran that mutates


class RecordingRunner(Runner):
    """A real runner that also notes every mutating command it actually ran."""

    def __init__(self, *, dry_run: bool) -> None:
        super().__init__(dry_run=dry_run)
        self.mutations: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str | os.PathLike[str]], *, mutates: bool,
            **kwargs: Any) -> Result:
        result = super().run(argv, mutates=mutates, **kwargs)
        if mutates and not result.skipped:
            self.mutations.append(result.argv)
        return result


def make_case(backend: str, source: Path, tmp_path: Path) -> ContractCase:
    """A case for the registered backend ``backend`` reading ``source`` (job "mail")."""
    job = one_off_job(name="mail", source=source, target=tmp_path / "backups", backend=backend)
    job = job.model_copy(update={"run_dir": tmp_path / "run"})
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    dry = RecordingRunner(dry_run=True)
    return ContractCase(
        backend=BACKENDS[backend](Runner(), job),
        source=source,
        job="mail",
        mountpoint=mountpoint,
        dry_run_backend=BACKENDS[backend](dry, job),
        mutations=dry.mutations,
    )


def _listing(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


class BackendContract:
    def test_satisfies_the_protocol(self, case: ContractCase) -> None:
        assert isinstance(case.backend, SnapshotBackend)
        assert case.backend.name and isinstance(case.backend.tools, tuple)

    def test_full_cycle_shows_the_source_and_leaves_nothing(self, case: ContractCase) -> None:
        b = case.backend
        volume = b.discover(case.source)
        assert volume.backend == b.name
        snap = b.create(volume, snapshot_name(case.job, RUN_ID))
        try:
            path = b.mount(snap, case.mountpoint)
            try:
                assert _listing(path) == _listing(case.source)
            finally:
                b.unmount(snap, case.mountpoint)
        finally:
            b.destroy(snap)
        assert b.list_owned(volume, case.job) == []

    def test_point_in_time_view_is_frozen_and_read_only(self, case: ContractCase) -> None:
        b = case.backend
        if not b.point_in_time:
            pytest.skip("the live backend reads the live tree by design")
        volume = b.discover(case.source)
        snap = b.create(volume, snapshot_name(case.job, RUN_ID))
        try:
            before = _listing(case.source)
            (case.source / "written-after-the-snapshot").write_text("late")
            path = b.mount(snap, case.mountpoint)
            try:
                assert _listing(path) == before
                with pytest.raises(OSError) as info:
                    (path / "x").write_text("must fail")
                assert info.value.errno in (errno.EROFS, errno.EACCES)
            finally:
                b.unmount(snap, case.mountpoint)
        finally:
            b.destroy(snap)
            (case.source / "written-after-the-snapshot").unlink()

    def test_list_owned_sees_only_this_jobs_snapshots(self, case: ContractCase) -> None:
        b = case.backend
        volume = b.discover(case.source)
        mine = b.create(volume, snapshot_name(case.job, RUN_ID))
        other = b.create(volume, snapshot_name(case.job + "-other", RUN_ID))
        try:
            owned = [s.name for s in b.list_owned(volume, case.job)]
            if b.point_in_time:
                assert owned == [mine.name]
            else:
                assert owned == []
        finally:
            b.destroy(mine)
            b.destroy(other)

    def test_unmount_and_destroy_are_idempotent(self, case: ContractCase) -> None:
        b = case.backend
        volume = b.discover(case.source)
        snap = b.create(volume, snapshot_name(case.job, RUN_ID))
        b.mount(snap, case.mountpoint)
        for _ in range(2):
            b.unmount(snap, case.mountpoint)
        for _ in range(2):
            b.destroy(snap)
        assert b.list_owned(volume, case.job) == []

    def test_destroy_refuses_names_without_the_marker(self, case: ContractCase) -> None:
        b = case.backend
        if not b.point_in_time:
            pytest.skip("the live backend destroys nothing")
        volume = b.discover(case.source)
        with pytest.raises(MailsnapError):
            b.destroy(Snapshot(b.name, "nightly-2026-11-28", volume))

    def test_dry_run_changes_nothing(self, case: ContractCase) -> None:
        b = case.dry_run_backend
        volume = b.discover(case.source)
        snap = b.create(volume, snapshot_name(case.job, RUN_ID))
        b.mount(snap, case.mountpoint)
        b.unmount(snap, case.mountpoint)
        b.destroy(snap)
        assert case.mutations == []
        assert case.backend.list_owned(case.backend.discover(case.source), case.job) == []
