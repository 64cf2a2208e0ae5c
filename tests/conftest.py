"""Shared fixtures and the CI rule that privileged tests may not be skipped.

Tiers: unit tests (mocked runner, exact argv) run anywhere; tests marked ``privileged`` need root
and loop devices (real btrfs), ``dovecot`` ones a real Dovecot. They skip with a reason when the
machine cannot run them, but when ``MAILSNAP_REQUIRE_PRIVILEGED=1`` (set by ``.ci/run`` in CI, which
runs as root) a skip of such a test is reported as a failure, so a green CI means they ran.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import shutil

import pytest

from tests.helpers.loopfs import BtrfsVolume, btrfs_volume, privileged_skip_reason
from tests.helpers.sshd import Sshd, running_sshd, sshd_skip_reason

REQUIRE_PRIVILEGED = os.environ.get("MAILSNAP_REQUIRE_PRIVILEGED") == "1"
MUST_RUN_MARKERS = ("privileged", "dovecot", "offsite")

# The guest-side LVM/ZFS tests only make sense inside the VM that tests/vm boots.
if os.environ.get("MAILSNAP_IN_GUEST") != "1":
    collect_ignore_glob = ["vm/guest/*"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--livemail-soak", action="store_true", default=False,
        help="live-mail tests: more messages, longer load, more runs (same as MAILSNAP_SOAK=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--livemail-soak", default=False):
        os.environ["MAILSNAP_SOAK"] = "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if (
        REQUIRE_PRIVILEGED
        and report.skipped
        and any(item.get_closest_marker(m) for m in MUST_RUN_MARKERS)
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"privileged test was skipped in CI (MAILSNAP_REQUIRE_PRIVILEGED=1): {reason}"
        )


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[BtrfsVolume]:
    """A fresh btrfs file system on a loop device with a ``mail`` subvolume mounted at
    ``volume.mail``; everything is unmounted and detached afterwards."""
    reason = privileged_skip_reason()
    if reason:
        pytest.skip(reason)
    with btrfs_volume(tmp_path) as volume:
        yield volume


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """One real sshd on 127.0.0.1 for the whole test session (see tests/helpers/sshd.py)."""
    reason = sshd_skip_reason()
    if reason:
        pytest.skip(reason)
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def need_rsync() -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (scripts/test installs it when run as root)")


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run reports go to the test's own directory, never to /var/lib/mailsnap (the default as
    root); a subprocess inherits it through the environment."""
    if "MAILSNAP_STATE_DIR" not in os.environ:
        monkeypatch.setenv("MAILSNAP_STATE_DIR", str(tmp_path / "state"))
