"""The backend contract (tests/conformance.py) for lvm and zfs on real volumes in the guest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conformance import BackendContract, ContractCase, make_case
from tests.vm.guest.conftest import LvSource, ZfsSource, mailsnap_lvs, mailsnap_zfs_snapshots

pytestmark = pytest.mark.vm


class TestLvmClassicExt4(BackendContract):
    @pytest.fixture
    def case(self, lv_source: Callable[..., LvSource], tmp_path: Path) -> Iterator[ContractCase]:
        src = lv_source(fstype="ext4")
        yield make_case("lvm", src.source, tmp_path)
        assert mailsnap_lvs() == []  # before lv_source's own cleanup runs


class TestZfsRecursive(BackendContract):
    @pytest.fixture
    def case(self, zfs_source: Callable[..., ZfsSource], tmp_path: Path) -> Iterator[ContractCase]:
        src = zfs_source(children=2)
        yield make_case("zfs", src.source, tmp_path)
        assert mailsnap_zfs_snapshots() == []
