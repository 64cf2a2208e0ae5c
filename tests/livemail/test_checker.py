"""Unit tests of the harness's own logic (no Dovecot, no root): the checker must be right before
its verdicts on mailsnap mean anything."""

from __future__ import annotations

from pathlib import Path
import random

from tests.livemail.checker import check_backup, read_message_id, scan_backup
from tests.livemail.events import EventLog
from tests.livemail.load import uid_set
from tests.livemail.restore import mailbox_of
from tests.livemail.seed import build_message, folder_dir, message_id, mutf7_decode, mutf7_encode


def test_modified_utf7_matches_dovecot_names() -> None:
    assert mutf7_encode("Projekt & Überblick") == "Projekt &- &ANw-berblick"
    assert mutf7_encode("日本語") == "&ZeVnLIqe-"
    for name in ("Projekt & Überblick", "日本語", "a&b", "Sent", "ü/ö"):
        assert mutf7_decode(mutf7_encode(name)) == name
    assert folder_dir(Path("/m"), "") == Path("/m")
    assert folder_dir(Path("/m"), "Projekt & Überblick") == Path("/m/.Projekt &- &ANw-berblick")
    assert mailbox_of("u/Maildir/.Projekt &- &ANw-berblick") == "Projekt & Überblick"
    assert mailbox_of("u/Maildir") == "INBOX"


def _log(*spans: tuple[str, float, float | None]) -> EventLog:
    log = EventLog(tag="t")
    for mid, created, destroyed in spans:
        inst = log.created(mid, "seed", at=created)
        if destroyed is not None:
            log.destroyed(inst, destroyed)
    return log


def test_required_means_existed_for_the_whole_window() -> None:
    log = _log(
        ("<before-and-after>", 0, None),
        ("<expunged-inside>", 0, 15),
        ("<created-inside>", 12, None),
        ("<expunged-before>", 0, 5),
        ("<created-just-before>", 9.99, 20.01),
    )
    assert log.required(10, 20) == {"<before-and-after>", "<created-just-before>"}


def test_a_moved_message_is_still_required() -> None:
    log = _log(("<m>", 0, None))
    log.changed("move", 0, at=15, folder="", to="Archive")
    assert log.required(10, 20) == {"<m>"}


def test_copies_that_together_cover_the_window_make_a_message_required() -> None:
    log = EventLog(tag="t")
    first = log.created("<c>", "seed", at=0)
    log.created("<c>", "copy", at=12)
    log.destroyed(first, 15)
    assert log.required(10, 20) == {"<c>"}
    gap = EventLog(tag="t")
    first = gap.created("<g>", "seed", at=0)
    gap.destroyed(first, 12)
    gap.created("<g>", "copy", at=15)
    assert gap.required(10, 20) == set()
    assert log.copied() == {"<c>"}


def test_event_log_round_trips_through_json_lines(tmp_path: Path) -> None:
    log = EventLog(tag="t")
    a = log.created("<a>", "deliver", at=1, user="u", folder="")
    log.changed("flag", a, at=2, user="u", folder="")
    log.created("<a>", "copy", at=3, user="u", folder="Sent")
    log.destroyed(a, 4, user="u", folder="")
    log.dump(tmp_path / "log.jsonl")
    back = EventLog.load(tmp_path / "log.jsonl")
    assert back.tag == "t"
    assert [(i.message_id, i.created, i.destroyed) for i in back.instances] == [
        ("<a>", 1, 4), ("<a>", 3, None)
    ]
    assert back.changes() == log.changes()


def _put(root: Path, rel: str, token: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_message(token, "u@example.test", random.Random(1), 2000))


def test_check_backup_reports_each_kind_of_damage(tmp_path: Path) -> None:
    log = EventLog(tag="t")
    for token in ("kept", "moved", "lost", "dup", "copied"):
        log.created(message_id(token), "seed", at=0)
    log.created(message_id("copied"), "copy", at=1)
    log.changed("move", 1, at=15)
    root = tmp_path / "backup"
    _put(root, "u/Maildir/cur/1.A.h:2,S", "kept")
    _put(root, "u/Maildir/.Archive/cur/2.B.h:2,", "moved")
    _put(root, "u/Maildir/new/2.B2.h", "moved")  # a MOVE caught mid-way: not a loss
    _put(root, "u/Maildir/cur/3.C.h:2,", "dup")
    _put(root, "u/Maildir/new/3.C.h", "dup")  # same base name twice in one folder
    _put(root, "u/Maildir/cur/4.D.h:2,", "copied")
    _put(root, "u/Maildir/.Sent/cur/5.E.h:2,", "copied")  # a COPY: expected, not reported
    _put(root, "u/Maildir/tmp/6.F.h", "half-written")
    (root / "u/Maildir/new/7.G.h,S=8125").write_bytes(b"")  # renamed, data never written
    (root / "u/Maildir/dovecot-uidlist.lock").write_text("")
    for sub in ("cur", "new", "tmp"):
        (root / "u/Maildir/.Empty" / sub).mkdir(parents=True)

    result = check_backup(root, log, 10, 20)

    assert result.missing == [message_id("lost")]
    assert result.duplicated == [("u/Maildir", "3.C.h")]
    assert result.cross_folder_duplicates == [message_id("moved")]
    assert result.tmp_files == ["u/Maildir/tmp/6.F.h"]
    assert result.lock_files == ["u/Maildir/dovecot-uidlist.lock"]
    assert result.unidentified == ["u/Maildir/new/7.G.h,S=8125"]
    assert result.wrong_size == ["u/Maildir/new/7.G.h,S=8125"]
    assert result.files == 8
    assert result.required == 5
    assert not result.ok
    assert result.summary().startswith("FAIL: 8 files, 5 required, missing 1, duplicated 1")
    assert result.changes_in_window == 1


def test_a_clean_backup_is_ok_and_flags_are_parsed(tmp_path: Path) -> None:
    log = EventLog(tag="t")
    log.created(message_id("a"), "seed", at=0)
    root = tmp_path / "b"
    size = len(build_message("a", "u@example.test", random.Random(1), 2000))
    name = f"1.A.h,S={size}:2,FRST"
    _put(root, f"u/Maildir/cur/{name}", "a")
    result = check_backup(root, log, 1, 2)
    assert result.ok, result.summary()
    (msg,) = scan_backup(root).messages
    assert msg.base == f"1.A.h,S={size}"
    assert msg.size_ok
    assert msg.flags == {"\\Flagged", "\\Answered", "\\Seen", "\\Deleted"}
    assert read_message_id(root / f"u/Maildir/cur/{name}") == message_id("a")


def test_uid_sets_from_copyuid_expand_in_order() -> None:
    assert uid_set("7") == [7]
    assert uid_set("3:5,9") == [3, 4, 5, 9]
    assert uid_set("12:10") == [12, 11, 10]
