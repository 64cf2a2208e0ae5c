"""Issue #10, restore: `mailsnap restore --into live` puts mail back while Dovecot runs.

A btrfs backup of the store is made with mailsnap. Then one user deletes a folder (with a space,
'&' and non-ASCII in its name) and expunges a handful of INBOX messages, through Dovecot. While
the load generator keeps the other users busy (deliveries, flag changes, MOVEs, COPYs,
EXPUNGEs on the same Dovecot and file system), the user's mail is restored into the live store.
Dovecot must then show that user exactly what the backup holds: every restored message once, in
its folder, with its flags. A second restore adds nothing, and the checker finds nothing lost
from the live store during the window.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys
import time

import pytest

from tests.helpers.loopfs import BtrfsVolume
from tests.livemail.checker import check_backup
from tests.livemail.harness import LiveMail
from tests.livemail.load import LoadGenerator
from tests.livemail.restore import backup_view, dovecot_view

pytestmark = [pytest.mark.dovecot, pytest.mark.privileged, pytest.mark.slow]

DELETED = "Projekt & Überblick"


def mailsnap(*args: str | Path, run_dir: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "mailsnap", *map(str, args), "--json"],
                          capture_output=True, text=True, check=False, timeout=600,
                          env={**os.environ, "MAILSNAP_RUN_DIR": str(run_dir)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_restore_into_the_live_store_under_load(live: LiveMail, btrfs: BtrfsVolume,
                                                tmp_path: Path) -> None:
    quiet, busy = live.users[0], live.users[1:]
    config = tmp_path / "mailsnap.toml"
    config.write_text(f'[[job]]\nname = "livemail"\nsource = "{btrfs.mail}"\n'
                      f'target = "{tmp_path / "target"}"\nbackend = "btrfs"\n'
                      'users = "{user}/Maildir"\n')
    run_dir = tmp_path / "run"
    made = mailsnap("backup", "--config", config, run_dir=run_dir)
    backup = Path(made["jobs"][0]["backup"])  # type: ignore[index]
    backup_home = backup / "mail" / quiet.split("@", 1)[0]
    expected = backup_view(backup_home)

    # The user loses a folder and five INBOX messages, through Dovecot.
    dovecot = live.dovecot
    dovecot.doveadm("mailbox", "delete", "-u", quiet, DELETED)
    uids = dovecot.doveadm("-f", "tab", "search", "-u", quiet, "mailbox", "INBOX", "ALL"
                           ).splitlines()[1:6]
    for line in uids:
        dovecot.doveadm("expunge", "-u", quiet, "mailbox", "INBOX", "uid",
                        line.split("\t")[1])
    lost = expected - dovecot_view(dovecot, quiet)
    assert sum(lost.values()) >= 5 + 1, "the test must lose a folder and messages"

    restore = ("restore", "--config", config, "--job", "livemail", "--user", quiet, "--into",
               "live")
    with LoadGenerator(dovecot, busy, live.log, live.models, duration=300, seed=99) as load:
        load.wait_until_busy(settle=1.0)
        start = time.monotonic()
        first = mailsnap(*restore, run_dir=run_dir)
        second = mailsnap(*restore, run_dir=run_dir)
        assert load.running and not load.errors, load.errors
    # The window ends once the load has stopped: a message the log says existed through all
    # of it must be in the store now (one expunged after an earlier "end" would not be).
    end = time.monotonic()
    assert first["restored"] == sum(lost.values()), first
    assert second["restored"] == 0, second

    # Dovecot shows the user exactly the backup: each message once, in its folder, flags kept.
    shown = dovecot_view(dovecot, quiet)
    assert shown == expected, (f"missing {expected - shown}; extra {shown - expected}")
    # Nothing was lost from the live store meanwhile (the other users kept working).
    result = check_backup(live.mail_root, live.log, start, end)
    assert not result.missing, result.summary()
    assert result.changes_in_window > 0, result.summary()
