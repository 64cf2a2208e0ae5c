"""The live copier on real files, with Dovecot's renames, moves, deliveries and expunges
injected at the worst moment: between listing a folder and opening the message."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
import logging
import os
from pathlib import Path
import shutil
import stat
import threading

import pytest

from mailsnap.config import DEFAULT_EXCLUDES
from mailsnap.copiers import live as maildir_module
from mailsnap.copiers.base import Previous
from mailsnap.copiers.maildir import MaildirCopier, base_name
from mailsnap.runner import Runner

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"


def messages(root: Path) -> dict[str, set[str]]:
    """folder → base names of its messages (cur/ and new/)."""
    out: dict[str, set[str]] = {}
    for dirpath, _dirs, files in os.walk(root):
        path = Path(dirpath)
        if path.name in ("cur", "new"):
            folder = str(path.parent.relative_to(root))
            out.setdefault(folder, set()).update(base_name(f) for f in files)
    return out


def all_files(root: Path) -> set[str]:
    return {str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    src = tmp_path / "Maildir"
    shutil.copytree(EXAMPLE, src, symlinks=True)
    return src


def manifest_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".manifest.zst")


def copy(src: Path, dest: Path, previous: Path | None = None, **kw: int | bool | timedelta
         ) -> MaildirCopier:
    dest.mkdir()
    copier = MaildirCopier(Runner(), **kw)
    copier.stats = copier.copy(
        src, dest, excludes=DEFAULT_EXCLUDES, manifest=manifest_of(dest),
        previous=Previous(previous, manifest_of(previous)) if previous else None)
    return copier


def expected_files(src: Path) -> set[str]:
    """The example store's files minus its Maildirs' tmp/ content (every tmp/ in it belongs to
    a Maildir) and Dovecot's lock files."""
    return {f for f in all_files(src) if "/tmp/" not in f"/{f}" and not f.endswith(".lock")}


def test_quiet_store_copies_exactly_minus_tmp_and_locks(store: Path, tmp_path: Path) -> None:
    dest = tmp_path / "backup"
    copy(store, dest)
    assert all_files(dest) == expected_files(store)
    for tmp in [store / "tmp", store / ".Sent" / "tmp"]:
        assert (dest / tmp.relative_to(store)).is_dir()
        assert not any((dest / tmp.relative_to(store)).iterdir())
    for rel in expected_files(store):
        a, b = os.stat(store / rel), os.stat(dest / rel)
        assert (a.st_size, a.st_mtime_ns, stat.S_IMODE(a.st_mode), a.st_uid) == (
            b.st_size, b.st_mtime_ns, stat.S_IMODE(b.st_mode), b.st_uid)
        assert (store / rel).read_bytes() == (dest / rel).read_bytes()


def _inject(
    monkeypatch: pytest.MonkeyPatch, target: str, action: Callable[[], None]
) -> list[str]:
    """Run ``action`` (Dovecot's change) right before the copier opens a file whose name
    contains ``target``, once."""
    real_open = os.open
    fired: list[str] = []

    def patched(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if target in str(path) and not fired and not flags & os.O_WRONLY:
            fired.append(str(path))
            action()
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir_module.os, "open", patched)
    return fired


def test_flag_rename_between_listing_and_open(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = next((store / "cur").glob("*:2,S"))
    new = old.with_name(base_name(old.name) + ":2,RS")
    fired = _inject(monkeypatch, old.name, lambda: os.rename(old, new))
    copy(store, tmp_path / "backup")
    assert fired
    assert (tmp_path / "backup" / "cur" / new.name).exists()
    assert messages(tmp_path / "backup") == messages(store)


def test_new_to_cur_between_listing_and_open(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = next((store / "new").iterdir())
    moved = store / "cur" / (old.name + ":2,")
    fired = _inject(monkeypatch, old.name, lambda: os.rename(old, moved))
    copy(store, tmp_path / "backup")
    assert fired
    assert (tmp_path / "backup" / "cur" / moved.name).exists()
    assert messages(tmp_path / "backup") == messages(store)


def test_move_into_an_already_copied_folder_is_caught_by_the_rescan(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # INBOX messages are copied after the subfolders (.Archive …), so a message that moves
    # from INBOX to .Archive at the moment we open it was not there when .Archive was copied.
    old = next((store / "cur").glob("*:2,FS"))
    moved = store / ".Archive" / "cur" / old.name
    fired = _inject(monkeypatch, old.name, lambda: os.rename(old, moved))
    copier = copy(store, tmp_path / "backup")
    assert fired
    assert (tmp_path / "backup" / ".Archive" / "cur" / old.name).exists()
    assert copier.stats.passes >= 2
    assert messages(tmp_path / "backup") == messages(store)


def test_expunge_during_copy_is_not_an_error(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = next((store / ".Sent" / "cur").iterdir())
    fired = _inject(monkeypatch, victim.name, victim.unlink)
    copier = copy(store, tmp_path / "backup")
    assert fired and copier.stats.vanished == 1
    assert messages(tmp_path / "backup") == messages(store)


def test_delivery_during_copy_is_taken_by_a_later_pass(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = next((store / "cur").iterdir())
    delivered = store / ".Sent" / "new" / "1732790000.M99P1.mail.example"
    fired = _inject(monkeypatch, first.name, lambda: delivered.write_text("Subject: late\n\n"))
    copy(store, tmp_path / "backup")
    assert fired
    assert (tmp_path / "backup" / ".Sent" / "new" / delivered.name).exists()


@pytest.mark.parametrize("frozen", [False, True], ids=["live", "frozen"])
def test_second_backup_hard_links_unchanged_messages_by_base_name(
    store: Path, tmp_path: Path, frozen: bool
) -> None:
    copy(store, tmp_path / "one", frozen=frozen)
    flagged = next((store / "cur").glob("*:2,S"))
    renamed = flagged.with_name(base_name(flagged.name) + ":2,FS")
    os.rename(flagged, renamed)  # a flag change since the last backup: same message
    copier = copy(store, tmp_path / "two", previous=tmp_path / "one", frozen=frozen)
    # Every file is unchanged: messages by base name and size, the rest by size and mtime.
    assert copier.stats.linked == len(expected_files(store))
    assert copier.stats.summary.renames == 1
    assert copier.stats.summary.bytes_written == 0
    assert os.stat(tmp_path / "two" / "cur" / renamed.name).st_ino == os.stat(
        tmp_path / "one" / "cur" / flagged.name).st_ino
    assert all_files(tmp_path / "two") == expected_files(store)


def test_changed_size_is_copied_not_linked(store: Path, tmp_path: Path) -> None:
    """The live copy stats every message of a folder it lists. (A snapshot copy takes the size
    from Dovecot's ``S=`` in the name: Dovecot never rewrites a delivered message; see the
    next test.) A rewrite in place does not change the folder, which a nightly copy then takes
    over unlisted: the full check (``full_check_every``, here every copy) lists it; see
    tests/test_folder_changes.py."""
    copy(store, tmp_path / "one")
    victim = next((store / "cur").iterdir())
    victim.write_text(victim.read_text() + "tampered\n")
    copy(store, tmp_path / "two", previous=tmp_path / "one", full_check_every=timedelta(0))
    assert os.stat(tmp_path / "two" / "cur" / victim.name).st_ino != os.stat(
        tmp_path / "one" / "cur" / victim.name).st_ino


def test_frozen_copy_takes_the_size_from_the_name(store: Path, tmp_path: Path) -> None:
    """Same name, same ``S=``: linked without a stat. A message renamed to a name whose size
    disagrees with the previous record, or with no ``S=``, is stat'ed and copied if changed."""
    copy(store, tmp_path / "one", frozen=True)
    victims = sorted((store / "cur").iterdir())[:2]
    for victim in victims:
        victim.write_text(victim.read_text() + "tampered\n")
    resized = victims[0].with_name(victims[0].name.replace(",S=", ",S=9"))
    os.rename(victims[0], resized)
    unsized = victims[1].with_name(victims[1].name.replace(",S=", ",X="))
    os.rename(victims[1], unsized)
    copy(store, tmp_path / "two", previous=tmp_path / "one", frozen=True)
    for now in (resized, unsized):
        assert os.stat(tmp_path / "two" / "cur" / now.name).st_nlink == 1
        assert (tmp_path / "two" / "cur" / now.name).read_text().endswith("tampered\n")


def test_frozen_copy_walks_the_next_mailboxes_while_the_pool_copies_an_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot copy lists the next mailboxes (and grows their Dovecot files) while the pool
    still copies the messages of one before: a mailbox with many renames does not stop the
    walk. The sections are still written in walk order, and an LMTP delivery hard-linked into
    several users stays one file, on the first backup and the next."""
    from mailsnap.copiers.frozen import FrozenCopy
    from mailsnap.manifest import read_records, section_key

    root = tmp_path / "vmail"
    users = ("alice", "bob", "carol")
    for user in users:
        shutil.copytree(EXAMPLE, root / user / "Maildir", symlinks=True)
    delivered = root / "alice" / "Maildir" / "new" / "1800000000.M1P1.mx,S=5"
    delivered.write_bytes(b"hello")
    for user in users[1:]:
        os.link(delivered, root / user / "Maildir" / "new" / delivered.name)
    walked_on = threading.Event()
    overlapped: list[bool] = []
    real_task, real_open = FrozenCopy._message_task, FrozenCopy._open

    def task(self: FrozenCopy, rel: str, *args: object) -> object:
        if rel.startswith("alice/"):
            overlapped.append(walked_on.wait(5))  # alice's messages wait for carol's walk
        return real_task(self, rel, *args)  # type: ignore[arg-type]

    def open_section(self: FrozenCopy, rel: str) -> object:
        if rel.startswith("carol"):
            walked_on.set()
        return real_open(self, rel)

    monkeypatch.setattr(FrozenCopy, "_message_task", task)
    monkeypatch.setattr(FrozenCopy, "_open", open_section)
    copy(root, tmp_path / "one", frozen=True)
    assert overlapped and all(overlapped), overlapped
    expected = {"one": expected_files(root)}
    delivered.with_name("1800000001.M2P2.mx,S=5").write_bytes(b"later")
    copy(root, tmp_path / "two", previous=tmp_path / "one", frozen=True)
    expected["two"] = expected_files(root)
    for dest in (tmp_path / "one", tmp_path / "two"):
        assert all_files(dest) == expected[dest.name]
        inodes = {os.stat(dest / user / "Maildir" / "new" / delivered.name).st_ino
                  for user in users}
        assert len(inodes) == 1
        keys = [fields[1] for fields in read_records(manifest_of(dest)) if fields[0] == "S"]
        assert keys == sorted(keys, key=section_key)
        assert {"alice/Maildir", "bob/Maildir", "carol/Maildir"} <= set(keys)


def test_hard_links_in_the_source_stay_one_file(store: Path, tmp_path: Path) -> None:
    # Dovecot's COPY hard-links a message into the target folder.
    original = next((store / "cur").iterdir())
    os.link(original, store / ".Archive" / "cur" / original.name)
    copy(store, tmp_path / "backup")
    a = os.stat(tmp_path / "backup" / "cur" / original.name)
    b = os.stat(tmp_path / "backup" / ".Archive" / "cur" / original.name)
    assert a.st_ino == b.st_ino


def test_dry_run_writes_nothing_and_counts(store: Path, tmp_path: Path) -> None:
    dest = tmp_path / "backup"
    dest.mkdir()
    stats = MaildirCopier(Runner(dry_run=True)).copy(
        store, dest, previous=None, excludes=DEFAULT_EXCLUDES)
    assert not any(dest.iterdir())
    assert stats.files == len(expected_files(store))


def test_max_passes_bounds_a_store_that_never_goes_quiet(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = iter(range(10**6))
    real_listdir = os.listdir

    def busy_listdir(path: object) -> list[str]:
        if str(path).endswith("/.Sent/new"):
            (store / ".Sent" / "new" / f"17330000{next(counter):02d}.M1P1.x").write_text("x")
        return real_listdir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir_module.os, "listdir", busy_listdir)
    copier = copy(store, tmp_path / "backup", max_passes=4)
    assert copier.stats.passes == 4


def test_move_out_of_an_already_copied_folder_is_kept_once(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # .Archive is copied before INBOX. While INBOX is being copied, Dovecot MOVEs an .Archive
    # message to INBOX: it hard-links it under a new name, then unlinks the old one. The rescan
    # finds it in INBOX; the copy taken from .Archive must go, or a restore shows it twice.
    archived = next((store / ".Archive" / "cur").iterdir())
    moved = store / "cur" / "1732799999.M77P1.mail.example,S=171:2,S"

    def dovecot_move() -> None:
        os.link(archived, moved)
        os.unlink(archived)

    first_inbox = next((store / "cur").iterdir())
    fired = _inject(monkeypatch, first_inbox.name, dovecot_move)
    copier = copy(store, tmp_path / "backup")
    assert fired and copier.stats.moved == 1
    assert not (tmp_path / "backup" / ".Archive" / "cur" / archived.name).exists()
    assert (tmp_path / "backup" / "cur" / moved.name).exists()
    assert messages(tmp_path / "backup") == messages(store)
    assert copier.stats.files == len(expected_files(store))


def _maildir(path: Path, label: str) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True)
    (path / "cur" / f"1.M1P1.{label},S=1:2,S").write_text(label)
    (path / "tmp" / "2.M2P1.half").write_text("half-written")


def test_tmp_new_and_cur_that_are_not_a_maildirs_are_copied(tmp_path: Path) -> None:
    # Issue #7: a user called "tmp" lost the whole mailbox; a LAYOUT=fs folder "Projects/tmp"
    # and a domain with users called "cur" and "new" are ordinary directories too.
    src = tmp_path / "S"
    for user in ("alice", "tmp", "cur", "new"):
        _maildir(src / "example.com" / user / "Maildir", user)
    _maildir(src / "example.com" / "alice" / "Maildir" / "Projects" / "tmp", "projects-tmp")
    (src / "example.com" / "alice" / "tmp").mkdir()
    (src / "example.com" / "alice" / "tmp" / "draft.txt").write_text("a home's own tmp/")
    copy(src, tmp_path / "backup")
    got = all_files(tmp_path / "backup")
    assert got == {f for f in all_files(src) if not f.endswith("/tmp/2.M2P1.half")}
    assert "example.com/tmp/Maildir/cur/1.M1P1.tmp,S=1:2,S" in got
    assert "example.com/alice/Maildir/Projects/tmp/cur/1.M1P1.projects-tmp,S=1:2,S" in got
    assert "example.com/alice/tmp/draft.txt" in got
    homes = [f"example.com/{user}/Maildir" for user in ("alice", "tmp", "cur", "new")]
    for home in [*homes, "example.com/alice/Maildir/Projects/tmp"]:
        tmp = tmp_path / "backup" / home / "tmp"
        assert tmp.is_dir() and not any(tmp.iterdir()), home


def _vanish_every_message(monkeypatch: pytest.MonkeyPatch, store: Path, limit: int) -> None:
    """Unlink up to ``limit`` messages right before the copier opens them (as if the volume
    went away under it)."""
    real_open = os.open
    gone: list[str] = []

    def patched(path: object, flags: int, *args: object, **kwargs: object) -> int:
        name = str(path)
        if (not flags & os.O_WRONLY and "/cur/" in name and len(gone) < limit
                and os.path.exists(name)):
            gone.append(name)
            os.unlink(name)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir_module.os, "open", patched)


def test_many_vanished_messages_are_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (src / sub).mkdir(parents=True)
    for n in range(40):
        (src / "cur" / f"{n}.M{n}P1.h,S=1:2,S").write_text("x")
    _vanish_every_message(monkeypatch, src, limit=30)
    with caplog.at_level(logging.INFO, logger="mailsnap.copiers"):
        copier = copy(src, tmp_path / "backup")
    assert copier.stats.vanished == 30 and copier.stats.files == 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not normal expunging" in warnings[0].getMessage()
    assert "unmounted" in warnings[0].getMessage()


def test_a_few_vanished_messages_are_info(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _vanish_every_message(monkeypatch, store, limit=1)
    with caplog.at_level(logging.INFO, logger="mailsnap.copiers"):
        copier = copy(store, tmp_path / "backup")
    assert copier.stats.vanished == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("1 vanished before they could be read (expunged)" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize(
    ("vanished", "files", "abnormal"),
    [(0, 0, False), (20, 0, False), (21, 0, True), (21, 210, False), (21, 209, True),
     (500, 100_000, False), (10_001, 100_000, True)],
)
def test_vanished_threshold(vanished: int, files: int, abnormal: bool) -> None:
    assert maildir_module.vanished_is_abnormal(vanished, files) is abnormal


@pytest.mark.parametrize("digits", ["20", "2"])
def test_a_name_whose_size_the_previous_copy_lacks_is_copied_again(
    store: Path, tmp_path: Path, digits: str
) -> None:
    """A delivery caught with its data not yet written (``mail_fsync = never``): the name says
    S=20, the first backup got 0 bytes. The next one must copy it, not link the empty file;
    and S=2 must not pass for S=20 (the sizes are compared whole, not as prefixes)."""
    name = f"1800000000.M1P1.host,S={digits}:2,S"
    (store / "cur" / name).write_bytes(b"" if digits == "20" else b"12345678901234567890")
    copy(store, tmp_path / "one", frozen=True)
    (store / "cur" / name).write_bytes(b"x" * int(digits))
    copy(store, tmp_path / "two", previous=tmp_path / "one", frozen=True)
    assert (tmp_path / "two" / "cur" / name).read_bytes() == b"x" * int(digits)


@pytest.mark.parametrize("max_passes", [10, 3])
def test_a_hard_linked_message_that_arrives_late_is_never_left_behind(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_passes: int
) -> None:
    """A message seen with two links (the instant of a Dovecot MOVE, an LMTP delivery to
    several users) is put off one pass, so its other name can be linked first. Arriving in
    what would have been the last quiet pass, or in the last pass allowed, it must still be
    copied: putting it off makes the pass not quiet, and the last pass puts nothing off."""
    late = store / ".Sent" / "new" / "1733999999.M9P9.late,S=6"
    listed = {"n": 0}
    real_listdir = os.listdir

    def delivering_listdir(path: object) -> list[str]:
        if str(path).endswith("/.Sent/new"):
            listed["n"] += 1
            # Each pass lists .Sent/new twice (dot files, then messages): call 6 is pass 3,
            # after a quiet pass 2: the pass that would end the copy.
            if listed["n"] == 6 and not late.exists():
                late.write_text("late!\n")
                os.link(late, tmp_path / "other-link")  # its other name: never copied
        return real_listdir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir_module.os, "listdir", delivering_listdir)
    copier = copy(store, tmp_path / "backup", max_passes=max_passes)
    assert late.exists()
    assert (tmp_path / "backup" / ".Sent" / "new" / late.name).read_text() == "late!\n"
    assert copier.stats.passes <= max_passes
