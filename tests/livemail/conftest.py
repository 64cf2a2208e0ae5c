"""Fixtures for the live-mail tests: a seeded Dovecot on the btrfs fixture's ``mail`` subvolume.

``--livemail-soak`` (declared in tests/conftest.py) or ``MAILSNAP_SOAK=1`` switches to the long
run.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import shutil

import pytest

from tests.helpers.loopfs import BtrfsVolume
from tests.livemail.dovecot import bind_mount, private_dir
from tests.livemail.harness import (
    LiveMail,
    LoadProfile,
    RunReport,
    SeedSpec,
    dovecot_skip_reason,
    scale,
)

_REPORTS: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORTS:
        terminalreporter.section("live-mail runs")
        for line in _REPORTS:
            terminalreporter.write_line(line)


@pytest.fixture
def report() -> Iterator[list[RunReport]]:
    """Collects a test's runs; their one-line results are printed at the end of the session
    (and appended to ``$MAILSNAP_LIVEMAIL_REPORT`` if set)."""
    runs: list[RunReport] = []
    yield runs
    lines = [run.line() for run in runs]
    _REPORTS.extend(lines)
    out = os.environ.get("MAILSNAP_LIVEMAIL_REPORT")
    if out and lines:
        with open(out, "a") as handle:
            handle.write("".join(line + "\n" for line in lines))


@pytest.fixture
def live(btrfs: BtrfsVolume, tmp_path: Path) -> Iterator[LiveMail]:
    """A running Dovecot whose users' Maildirs live on the btrfs ``mail`` subvolume, seeded per
    ``scale()``. Dovecot reaches the subvolume through a bind mount in a private directory (the
    pytest tmp tree is closed to its ``vmail`` processes); ``btrfs.mail`` shows the same files.

    Dovecot is stopped (every process of the instance) before the btrfs volume goes away. The
    event log is left in ``tmp_path/events.jsonl`` and Dovecot's log in ``tmp_path/dovecot.log``
    for a post-mortem (``EventLog.load``).
    """
    reason = dovecot_skip_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (scripts/test installs it when run as root)")
    size = scale()
    with (
        private_dir() as private,
        bind_mount(btrfs.mail, private / "mail") as mail_root,
        LiveMail(
            private / "dovecot", mail_root, users=size.users,
            profile=LoadProfile(lmtp_workers=size.lmtp_workers),
        ) as mail,
    ):
        try:
            mail.seed(SeedSpec(messages_per_user=size.messages_per_user))
            yield mail
        finally:
            mail.log.dump(tmp_path / "events.jsonl")
            if mail.dovecot.log_path.exists():
                shutil.copy(mail.dovecot.log_path, tmp_path / "dovecot.log")
