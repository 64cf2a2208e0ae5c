"""The backend contract (tests/conformance.py) on this machine: btrfs on a real loop device and
the live backend on a plain directory. The LVM/ZFS guest runs the same suite for lvm and zfs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
import shutil

import pytest

from tests.conformance import BackendContract, ContractCase, make_case
from tests.helpers.loopfs import btrfs_volume, mounts_under, privileged_skip_reason, subvolumes

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"


class TestLive(BackendContract):
    @pytest.fixture
    def case(self, tmp_path: Path) -> ContractCase:
        shutil.copytree(EXAMPLE, tmp_path / "Maildir")
        return make_case("live", tmp_path / "Maildir", tmp_path)


@pytest.mark.privileged
class TestBtrfs(BackendContract):
    @pytest.fixture
    def case(self, tmp_path: Path) -> Iterator[ContractCase]:
        reason = privileged_skip_reason()
        if reason:
            pytest.skip(reason)
        with btrfs_volume(tmp_path) as volume:
            shutil.copytree(EXAMPLE, volume.mail / "Maildir")
            yield make_case("btrfs", volume.mail / "Maildir", tmp_path)
            assert mounts_under(tmp_path / "run") == []
            assert mounts_under(tmp_path / "mnt") == []
            assert [s for s in subvolumes(volume.top) if "mailsnap-" in s] == []
