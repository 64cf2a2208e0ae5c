"""Issue #3, part c: a backup taken from a btrfs snapshot under load restores into Dovecot.

``mailsnap backup --backend btrfs`` runs while the load generator changes the store. One user's
backed-up home is copied into a fresh user's empty home (ownership fixed to vmail, Dovecot's index
files left out: they may be caught mid-change, see ``restore.INDEX_FILES``) and opened by the same
Dovecot: every message file of the backup must show up, in its mailbox, with the flags of its
``:2,`` suffix, and nothing else may show up.

Since Dovecot then takes its flags from the backup's file names, those names are checked on their
own against the live store once the load has stopped: every message that nothing touched from the
start of the backup on must be in the backup in the same mailbox with the same flags as in the
store. A backup that loses or garbles a flag in a file name fails there.

The ``raw-snapshot`` case makes the backup without mailsnap (``btrfs subvolume snapshot -r`` plus
``rsync``): it is the control for the harness itself. If it fails, the checker or the restore
comparison is wrong, not mailsnap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.loopfs import BtrfsVolume
from tests.livemail.harness import (
    LiveMail,
    RunReport,
    btrfs_snapshot_copy,
    mailsnap_backup,
    scale,
)
from tests.livemail.restore import backup_view, dovecot_view, restore_home, settled

pytestmark = [pytest.mark.dovecot, pytest.mark.privileged, pytest.mark.slow]


@pytest.mark.parametrize("method", ["mailsnap", "raw-snapshot"])
def test_btrfs_backup_restores_with_flags(
    method: str, live: LiveMail, btrfs: BtrfsVolume, tmp_path: Path, report: list[RunReport]
) -> None:
    # "raw-snapshot" is the control: the same restore check on a copy made without mailsnap.
    def copy() -> tuple[Path, dict[str, Any]]:
        if method == "mailsnap":
            return mailsnap_backup(btrfs.mail, tmp_path / "target", "btrfs", tmp_path / "run")
        return btrfs_snapshot_copy(btrfs.top, "mail", tmp_path / "snapshot-copy")

    run = live.copy_under_load(f"{method} (for restore)", copy, warmup=scale().warmup)
    report.append(run)
    assert run.result.changes_in_window > 0, run.result.summary()
    assert run.result.ok, run.result.summary()
    assert run.result.files >= live.seeded // 2, run.result.summary()

    source_user = live.users[0]
    backup_home = run.root / live.dovecot.home(source_user).name
    expected = backup_view(backup_home)

    # The file names in the backup are the reference below: they must match the store's for
    # every message left alone since the backup began (the load has stopped, the store is at
    # rest). Messages delivered, copied, moved, flagged or expunged meanwhile may differ.
    # 2 s of margin before the backup began: Dovecot may rename a message file a moment after
    # its reply to the STORE (when it syncs the index to the Maildir), and events are logged
    # at the reply.
    unsettled = live.log.unsettled(run.result.window[0] - 2.0)
    kept = settled(expected, unsettled)
    store = settled(backup_view(live.dovecot.home(source_user)), unsettled)
    assert sum(kept.values()) > 100, "too few messages left alone to compare with the store"
    assert kept == store, (
        f"backup differs from the store for untouched messages: backup only "
        f"{list(kept - store)[:5]}; store only {list(store - kept)[:5]}"
    )

    restore_home(live.dovecot, backup_home, live.restore_user)
    shown = dovecot_view(live.dovecot, live.restore_user)
    assert sum(expected.values()) > 100, "the backup of one user holds suspiciously few messages"
    flagged = {flags for (_, _, flags) in expected}
    assert len(flagged) > 3, f"too little flag variety to prove anything: {flagged}"
    missing = expected - shown
    extra = shown - expected
    assert not missing and not extra, (
        f"{sum(missing.values())} backup files not shown as such by Dovecot, e.g. "
        f"{list(missing)[:5]}; {sum(extra.values())} shown but not in the backup, e.g. "
        f"{list(extra)[:5]}"
    )
    mailboxes = {mailbox for (mailbox, _, _) in shown}
    assert "Projekt & Überblick" in mailboxes, mailboxes
