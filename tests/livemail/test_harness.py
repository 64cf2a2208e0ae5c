"""The harness's own promises against a real Dovecot: seeding is what Dovecot sees, the load
generator's model agrees with Dovecot, and stopping leaves no process behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
import socket

import pytest

from tests.livemail.checker import check_backup
from tests.livemail.dovecot import LOOPBACK, bind_mount, dovecot_skip_reason, private_dir
from tests.livemail.harness import LiveMail, SeedSpec
from tests.livemail.restore import backup_view, dovecot_view
from tests.livemail.seed import FOLDERS, imap_mailbox

pytestmark = [pytest.mark.dovecot, pytest.mark.privileged]


@pytest.fixture
def small(tmp_path: Path) -> Iterator[LiveMail]:
    reason = dovecot_skip_reason()
    if reason:
        pytest.skip(reason)
    source = tmp_path / "mail"
    source.mkdir()
    with (
        private_dir() as private,
        bind_mount(source, private / "mail") as mail_root,
        LiveMail(private / "dovecot", mail_root, users=2) as live,
    ):
        live.seed(SeedSpec(messages_per_user=300))
        yield live


def test_seeded_store_is_what_dovecot_shows(small: LiveMail) -> None:
    for user in small.users:
        home = small.dovecot.home(user)
        shown = dovecot_view(small.dovecot, user)
        assert shown == backup_view(home)
        assert sum(shown.values()) == 300
        assert {mailbox for (mailbox, _, _) in shown} == {f or "INBOX" for f in FOLDERS}


def test_load_generator_model_matches_dovecot(small: LiveMail) -> None:
    with small.load(duration=10) as load:
        load.wait_until_busy(settle=2)
    assert not load.errors
    changes = small.log.changes()
    assert {"flag", "move", "deliver"} <= set(changes), changes
    for user in small.users:
        conn = small.dovecot.imap(user)
        try:
            model = small.models[user]
            for folder, uids in model.folders.items():
                if model.discover_from[folder] == 1:
                    continue  # never SELECTed by the worker: its seeds are not in the model yet
                conn.select(imap_mailbox(folder), readonly=True)
                typ, data = conn.uid("SEARCH", "ALL")
                assert typ == "OK"
                on_server = {int(u) for u in data[0].split()}
                # Deliveries not discovered yet may be on the server; nothing else may differ.
                assert set(uids) <= on_server, folder
                assert len(on_server - set(uids)) <= changes["deliver"], folder
        finally:
            conn.logout()
    # Quiet store, window after the load: everything alive is required and present.
    result = check_backup(small.mail_root, small.log, load.stopped + 0.1, load.stopped + 0.2)
    assert result.ok, result.summary()
    alive = {i.message_id for i in small.log.instances if i.destroyed is None}
    assert result.required == len(alive)
    assert result.files >= len(alive)


def test_stop_leaves_no_process_and_no_listener(tmp_path: Path) -> None:
    reason = dovecot_skip_reason()
    if reason:
        pytest.skip(reason)
    with private_dir() as private:
        live = LiveMail(private / "dovecot", private / "mail", users=1)
        with live:
            conn = live.dovecot.imap(live.users[0])  # left open on purpose
            conn.select()
            port = live.dovecot.imap_port
            assert live.dovecot.pids()
        assert live.dovecot.pids() == []
        with pytest.raises(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
            pass
