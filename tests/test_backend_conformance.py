"""The backend contract (tests/conformance.py) on this machine: btrfs on a real loop device and
the live backend on a plain directory. The LVM/ZFS guest runs the same suite for lvm and zfs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import os
from pathlib import Path
import shutil
from typing import Any

import pytest

from mailsnap.backends import BACKENDS
from mailsnap.config import one_off_job
from mailsnap.runner import Result, Runner
from tests.conformance import BackendContract, ContractCase
from tests.helpers.loopfs import btrfs_volume, mounts_under, privileged_skip_reason, subvolumes

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"


class RecordingRunner(Runner):
    """A real runner that also notes every mutating command it was asked to run."""

    def __init__(self, *, dry_run: bool) -> None:
        super().__init__(dry_run=dry_run)
        self.mutations: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str | os.PathLike[str]], *, mutates: bool,
            **kwargs: Any) -> Result:
        result = super().run(argv, mutates=mutates, **kwargs)
        if mutates and not result.skipped:
            self.mutations.append(result.argv)
        return result


def _case(name: str, source: Path, tmp_path: Path) -> ContractCase:
    job = one_off_job(name="mail", source=source, target=tmp_path / "backups", backend=name)
    job = job.model_copy(update={"run_dir": tmp_path / "run"})
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    dry = RecordingRunner(dry_run=True)
    return ContractCase(
        backend=BACKENDS[name](Runner(), job),
        source=source,
        job="mail",
        mountpoint=mountpoint,
        dry_run_backend=BACKENDS[name](dry, job),
        mutations=dry.mutations,
    )


class TestLive(BackendContract):
    @pytest.fixture
    def case(self, tmp_path: Path) -> ContractCase:
        shutil.copytree(EXAMPLE, tmp_path / "Maildir")
        return _case("live", tmp_path / "Maildir", tmp_path)


@pytest.mark.privileged
class TestBtrfs(BackendContract):
    @pytest.fixture
    def case(self, tmp_path: Path) -> Iterator[ContractCase]:
        reason = privileged_skip_reason()
        if reason:
            pytest.skip(reason)
        with btrfs_volume(tmp_path) as volume:
            shutil.copytree(EXAMPLE, volume.mail / "Maildir")
            yield _case("btrfs", volume.mail / "Maildir", tmp_path)
            assert mounts_under(tmp_path / "run") == []
            assert mounts_under(tmp_path / "mnt") == []
            assert [s for s in subvolumes(volume.top) if "mailsnap-" in s] == []
