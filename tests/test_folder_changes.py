"""Folder-level change detection (issue #12): a ``cur/`` or ``new/`` whose mtime, ctime, inode,
mode and owner are what the previous manifest recorded is taken over from the previous backup
without being listed; everything else is listed. On real files, any file system (the btrfs
target and real snapshots are in tests/test_target_snapshots.py)."""

from __future__ import annotations

from datetime import timedelta
import os
from pathlib import Path
import shutil
import time
from typing import Any

import pytest

from mailsnap import manifest as manifest_module
from mailsnap.config import DEFAULT_EXCLUDES
from mailsnap.copiers import frozen as frozen_module
from mailsnap.copiers import live as live_module
from mailsnap.copiers.base import CopyStats, Previous
from mailsnap.copiers.changes import CLOCK_SLACK_NS, FolderTimes, directory_fields, plan_folders
from mailsnap.copiers.maildir import MaildirCopier, base_name
from mailsnap.manifest import PreviousManifest, read_records
from mailsnap.runner import Runner
from tests.helpers.trees import diff_trees, linked_to

EXAMPLE = Path(__file__).parent.parent / "examples" / "Maildir"
MESSAGE_DIRS = 10  # cur/ and new/ of the INBOX and its four folders


@pytest.fixture
def store(tmp_path: Path) -> Path:
    src = tmp_path / "Maildir"
    shutil.copytree(EXAMPLE, src, symlinks=True)
    age(src)
    return src


def age(root: Path, seconds: float = 3600) -> None:
    """Every directory last changed an hour ago: the night's store before the night's mail."""
    then = time.time() - seconds
    for dirpath, _dirs, _files in os.walk(root):
        os.utime(dirpath, (then, then))


def backup(src: Path, dest: Path, previous: Path | None = None,
           every: timedelta = timedelta(days=7),
           excludes: tuple[str, ...] = DEFAULT_EXCLUDES) -> MaildirCopier:
    dest.mkdir()
    copier = MaildirCopier(Runner(), frozen=True, full_check_every=every)
    copier.stats = copier.copy(  # type: ignore[attr-defined]
        src, dest, excludes=excludes, manifest=manifest_of(dest),
        previous=Previous(previous, manifest_of(previous)) if previous else None)
    return copier


def manifest_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".manifest.zst")


def file_records(dest: Path) -> set[tuple[str, ...]]:
    """The F records of a backup's manifest, all fields but "how" (which says how a file
    came into the backup, not what it is)."""
    return {(r[1], *r[3:]) for r in read_records(manifest_of(dest)) if r[0] == "F"}


def copy_in_place(src: Path, dest: Path, previous: Path) -> CopyStats:
    """The copy into ``dest``, which holds a copy of ``previous`` (times kept), as a backup
    that starts as a snapshot of the previous one does."""
    copier = MaildirCopier(Runner(), frozen=True, full_check_every=timedelta(days=7))
    return copier.copy(src, dest, excludes=DEFAULT_EXCLUDES, manifest=manifest_of(dest),
                       previous=Previous(previous, manifest_of(previous), in_place=True))


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every directory the copy lists."""
    seen: list[str] = []
    real = frozen_module.FullListing.scan

    def scan(self: frozen_module.FullListing, path: str) -> list[os.DirEntry[str]]:
        seen.append(path)
        return real(self, path)

    monkeypatch.setattr(frozen_module.FullListing, "scan", scan)
    return seen


def message_dirs(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.basename(p) in ("cur", "new")]


def test_unchanged_folders_are_taken_over_without_listing(
    store: Path, tmp_path: Path, listed: list[str]
) -> None:
    backup(store, tmp_path / "one")
    assert len(message_dirs(listed)) == MESSAGE_DIRS
    listed.clear()
    copier = backup(store, tmp_path / "two", tmp_path / "one")
    summary = copier.stats.summary  # type: ignore[attr-defined]
    assert message_dirs(listed) == []
    assert (summary.folders_unchanged, summary.folders_listed) == (MESSAGE_DIRS, 0)
    assert summary.bytes_written == 0
    assert diff_trees(store, tmp_path / "two") == []
    # Hard links to the first backup, and the same manifest records.
    assert len(linked_to(tmp_path / "one", tmp_path / "two")) == summary.files
    def files(dest: Path) -> set[tuple[str, ...]]:  # path and tail: all but "how"
        return {(r[1], *r[3:]) for r in read_records(manifest_of(dest)) if r[0] == "F"}

    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_a_changed_folder_is_listed_and_the_others_are_not(
    store: Path, tmp_path: Path, listed: list[str]
) -> None:
    backup(store, tmp_path / "one")
    flagged = next((store / ".Sent" / "cur").glob("*:2,S"))
    renamed = flagged.with_name(base_name(flagged.name) + ":2,RS")
    os.rename(flagged, renamed)  # Dovecot's flag change: .Sent/cur's mtime moves
    (store / ".Archive" / "new" / "1800000000.M1P1.host,S=5").write_bytes(b"hello")
    listed.clear()
    copier = backup(store, tmp_path / "two", tmp_path / "one")
    summary = copier.stats.summary  # type: ignore[attr-defined]
    assert sorted(message_dirs(listed)) == sorted(
        [str(store / ".Sent" / "cur"), str(store / ".Archive" / "new")])
    assert (summary.folders_unchanged, summary.folders_listed) == (MESSAGE_DIRS - 2, 2)
    assert (summary.renames, summary.copied, summary.bytes_written) == (1, 1, 5)
    assert diff_trees(store, tmp_path / "two") == []


def test_a_folder_changed_close_to_the_previous_copy_is_listed(
    store: Path, tmp_path: Path, listed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two changes in one tick of the file system's clock leave a directory's mtime and
    ctime as they were. A folder whose recorded mtime is within CLOCK_SLACK_NS of the moment
    the previous copy started may have changed so, and is listed however it looks now."""
    age(store, 7200)
    sent = store / ".Sent" / "cur"
    hour_ago = time.time() - 3600
    os.utime(sent, (hour_ago, hour_ago))
    mtime = os.lstat(sent).st_mtime_ns
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: mtime + CLOCK_SLACK_NS - 1)
    backup(store, tmp_path / "one")  # "started" 2 s after .Sent/cur last changed
    monkeypatch.setattr(time, "time_ns", real)
    listed.clear()
    copier = backup(store, tmp_path / "two", tmp_path / "one")
    assert str(sent) in listed
    assert copier.stats.summary.folders_unchanged == MESSAGE_DIRS - 1  # type: ignore[attr-defined]


def test_a_store_fresh_from_delivery_is_listed_whole(tmp_path: Path, listed: list[str]) -> None:
    src = tmp_path / "Maildir"
    shutil.copytree(EXAMPLE, src, symlinks=True)
    age(src, 0)  # every directory changed just now
    backup(src, tmp_path / "one")
    listed.clear()
    copier = backup(src, tmp_path / "two", tmp_path / "one")
    assert len(message_dirs(listed)) == MESSAGE_DIRS
    assert copier.stats.summary.folders_unchanged == 0  # type: ignore[attr-defined]


def test_a_file_rewritten_in_place_waits_for_the_full_check(
    store: Path, tmp_path: Path, listed: list[str]
) -> None:
    """A foreign tool that rewrites a message in place (same name and size, new mtime) does
    not touch its folder: the nightly backup keeps the old copy; the full check (every
    ``full_check_every``) lists the folder and stats every message, and copies it."""
    backup(store, tmp_path / "one")
    victim = next((store / "cur").glob("*:2,S"))
    victim.write_bytes(victim.read_bytes().upper())  # O_TRUNC: the folder does not change
    nightly = backup(store, tmp_path / "two", tmp_path / "one")
    assert (tmp_path / "two" / "cur" / victim.name).read_bytes() != victim.read_bytes()
    assert nightly.stats.summary.folders_unchanged == MESSAGE_DIRS  # type: ignore[attr-defined]
    full = backup(store, tmp_path / "three", tmp_path / "two", every=timedelta(0))
    assert full.stats.summary.folders_listed == MESSAGE_DIRS  # type: ignore[attr-defined]
    assert full.stats.summary.copied == 1  # type: ignore[attr-defined]
    assert diff_trees(store, tmp_path / "three") == []


def test_the_full_check_is_due_after_full_check_every(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backup(store, tmp_path / "one")
    real = time.time_ns
    day = 86400 * 10**9
    monkeypatch.setattr(time, "time_ns", lambda: real() + 6 * day)
    six = backup(store, tmp_path / "two", tmp_path / "one")
    assert six.stats.summary.folders_unchanged == MESSAGE_DIRS  # type: ignore[attr-defined]
    # 10 % slack: a weekly check from a nightly job runs on the 7th night, a bit early or not.
    monkeypatch.setattr(time, "time_ns", lambda: real() + 7 * day - 3600 * 10**9)
    seven = backup(store, tmp_path / "three", tmp_path / "two")
    assert seven.stats.summary.folders_listed == MESSAGE_DIRS  # type: ignore[attr-defined]
    # ... and the week starts again from that check.
    eight = backup(store, tmp_path / "four", tmp_path / "three")
    assert eight.stats.summary.folders_unchanged == MESSAGE_DIRS  # type: ignore[attr-defined]


def test_a_previous_manifest_without_folder_times_means_a_full_check() -> None:
    now = time.time_ns()
    assert plan_folders(None, timedelta(days=7), now).times is None
    assert plan_folders({}, timedelta(days=7), now).times is None  # an older mailsnap's
    fields = {"listed_before": now, "full_check": now}
    assert plan_folders(fields, timedelta(0), now).times is None
    assert plan_folders(fields, timedelta(days=7), now).times == FolderTimes(now)
    # A clock set back behind the last full check: check, rather than trust a future time.
    assert plan_folders(fields, timedelta(days=7), now - 10**12).times is None
    # Other exclude patterns than the previous backup's: its unlisted folders may hold what
    # is excluded now, or lack what no longer is.
    assert plan_folders({**fields, "excludes": 1}, timedelta(days=7), now, 1).times is not None
    assert plan_folders({**fields, "excludes": 1}, timedelta(days=7), now, 2).times is None


def test_owner_mode_inode_and_ctime_all_count(tmp_path: Path) -> None:
    folder = tmp_path / "cur"
    folder.mkdir()
    old = time.time() - 3600
    os.utime(folder, (old, old))
    info = os.lstat(folder)
    times = FolderTimes(time.time_ns())
    assert times.unchanged(directory_fields(info), info)
    os.chmod(folder, 0o700)  # ctime and mode move, mtime does not
    assert not times.unchanged(directory_fields(info), os.lstat(folder))
    assert not times.unchanged(None, info)
    renamed = tmp_path / "other"
    folder.rename(renamed)
    (tmp_path / "cur").mkdir()  # another directory under the same name: another inode
    os.utime(tmp_path / "cur", (old, old))
    assert not times.unchanged(directory_fields(os.lstat(renamed)), os.lstat(tmp_path / "cur"))


def test_a_folder_holding_a_symlink_is_always_listed(
    store: Path, tmp_path: Path, listed: list[str]
) -> None:
    os.symlink("elsewhere", store / ".Archive" / "cur" / "odd-link")
    age(store)
    backup(store, tmp_path / "one")
    listed.clear()
    backup(store, tmp_path / "two", tmp_path / "one")
    assert message_dirs(listed) == [str(store / ".Archive" / "cur")]
    assert diff_trees(store, tmp_path / "two") == []


def test_a_damaged_previous_manifest_lists_everything(
    store: Path, tmp_path: Path, listed: list[str]
) -> None:
    backup(store, tmp_path / "one")
    manifest_of(tmp_path / "one").write_bytes(b"garbage")
    listed.clear()
    copier = backup(store, tmp_path / "two", tmp_path / "one")
    assert len(message_dirs(listed)) == MESSAGE_DIRS
    assert copier.stats.summary.bytes_written > 0  # type: ignore[attr-defined]
    assert diff_trees(store, tmp_path / "two") == []


def test_a_copy_out_of_an_unlisted_folder_stays_a_hard_link(
    store: Path, tmp_path: Path, listed: list[str]
) -> None:
    """Dovecot's COPY hard-links a message under a new base name into another folder; the
    folder it came from did not change and is not listed, yet the two names must stay one
    file in the backup."""
    backup(store, tmp_path / "one")
    original = next((store / ".Sent" / "cur").iterdir())
    os.link(original, store / ".Archive" / "cur" / "1800000002.M2P2.copy,S=168:2,S")
    listed.clear()
    copier = backup(store, tmp_path / "two", tmp_path / "one")
    assert str(store / ".Sent" / "cur") not in listed
    assert copier.stats.summary.hardlinked == 1  # type: ignore[attr-defined]
    assert diff_trees(store, tmp_path / "two") == []


# -- the live copier (no snapshot): the same, and a folder that moves during the run --------


def live_backup(src: Path, dest: Path, previous: Path | None = None) -> MaildirCopier:
    dest.mkdir()
    copier = MaildirCopier(Runner(), frozen=False)
    copier.stats = copier.copy(  # type: ignore[attr-defined]
        src, dest, excludes=DEFAULT_EXCLUDES, manifest=manifest_of(dest),
        previous=Previous(previous, manifest_of(previous)) if previous else None)
    return copier


@pytest.fixture
def live_listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every cur/ or new/ the live copier lists."""
    seen: list[str] = []
    real = os.listdir

    def listdir(path: str | Path = ".") -> list[str]:
        if os.path.basename(os.fspath(path)) in ("cur", "new"):
            seen.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(live_module.os, "listdir", listdir)
    return seen


def test_live_copy_takes_unchanged_folders_over(
    store: Path, tmp_path: Path, live_listed: list[str]
) -> None:
    live_backup(store, tmp_path / "one")
    assert live_listed
    live_listed.clear()
    copier = live_backup(store, tmp_path / "two", tmp_path / "one")
    summary = copier.stats.summary  # type: ignore[attr-defined]
    assert live_listed == []
    assert (summary.folders_unchanged, summary.folders_listed) == (MESSAGE_DIRS, 0)
    assert summary.bytes_written == 0
    assert diff_trees(store, tmp_path / "two") == []


def test_live_copy_lists_a_folder_that_moves_during_the_run(
    store: Path, tmp_path: Path, live_listed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taken over unlisted in the first pass, a delivery into it before the second: the
    second pass sees its new/ move and lists it; the message is in the backup."""
    live_backup(store, tmp_path / "one")
    real = live_module.LiveCopy.one_pass
    passes = []
    late = store / ".Sent" / "new" / "1800000003.M3P3.late,S=4"

    def one_pass(self: live_module.LiveCopy) -> int:
        passes.append(1)
        if len(passes) == 2:
            late.write_bytes(b"late")
        return real(self)

    monkeypatch.setattr(live_module.LiveCopy, "one_pass", one_pass)
    live_listed.clear()
    copier = live_backup(store, tmp_path / "two", tmp_path / "one")
    assert live_listed and all(".Sent" in p for p in live_listed)
    assert (tmp_path / "two" / ".Sent" / "new" / late.name).read_bytes() == b"late"
    assert copier.stats.summary.folders_unchanged == MESSAGE_DIRS  # type: ignore[attr-defined]
    assert diff_trees(store, tmp_path / "two", dir_mtimes=False) == []


def test_live_copy_keeps_a_copy_out_of_an_unlisted_folder_a_hard_link(
    store: Path, tmp_path: Path
) -> None:
    live_backup(store, tmp_path / "one")
    original = next((store / ".Sent" / "cur").iterdir())
    os.link(original, store / ".Archive" / "cur" / "1800000002.M2P2.copy,S=168:2,S")
    copier = live_backup(store, tmp_path / "two", tmp_path / "one")
    assert copier.stats.summary.hardlinked == 1  # type: ignore[attr-defined]
    assert diff_trees(store, tmp_path / "two") == []


def test_new_exclude_patterns_list_every_folder(
    store: Path, tmp_path: Path, listed: list[str]
) -> None:
    backup(store, tmp_path / "one")
    victim = next((store / ".Sent" / "cur").iterdir())
    listed.clear()
    copier = backup(store, tmp_path / "two", tmp_path / "one",
                    excludes=(*DEFAULT_EXCLUDES, victim.name))
    assert len(message_dirs(listed)) == MESSAGE_DIRS
    assert not (tmp_path / "two" / ".Sent" / "cur" / victim.name).exists()
    assert copier.stats.summary.folders_unchanged == 0  # type: ignore[attr-defined]


def test_in_place_a_quiet_night_looks_at_nothing_in_the_backup(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backup starts as a snapshot of the previous one (here: a copy of it, times kept).
    A directory or file whose record is as before is there already, with that mode and
    owner, and a directory in a mailbox nothing changed in keeps its time: none is stat'ed
    or touched (at 200,000 messages that was 4,600 lstat calls on a night with no mail)."""
    backup(store, tmp_path / "one")
    dest = tmp_path / "two"
    shutil.copytree(tmp_path / "one", dest, symlinks=True)
    looked: list[str] = []

    def watched(real: Any) -> Any:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if os.fspath(path).startswith(os.fspath(dest)):
                looked.append(f"{real.__name__} {path}")
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "lstat", watched(os.lstat))
    monkeypatch.setattr(os, "utime", watched(os.utime))
    monkeypatch.setattr(os, "chmod", watched(os.chmod))
    stats = copy_in_place(store, dest, tmp_path / "one")
    assert looked == []
    assert stats.summary.folders_listed == 0
    monkeypatch.undo()
    assert diff_trees(store, dest) == []


def test_in_place_a_changed_folder_costs_its_own_records_only(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New mail in one folder of a mailbox: that folder's records are read and written; the
    frames of the mailbox's other folders are copied from the previous manifest as they are
    (at 200,000 messages a night of new mail read and wrote every touched mailbox's records,
    about 0.7 s of 2.2 s). The manifest still says exactly what the backup holds."""
    backup(store, tmp_path / "one")
    dest = tmp_path / "two"
    shutil.copytree(tmp_path / "one", dest, symlinks=True)
    (store / ".Archive" / "new" / "1800000000.M1P1.host,S=5").write_bytes(b"hello")
    read: list[str] = []
    real_records, real_split = (manifest_module.Section.records_in,
                                manifest_module.Section.directory_records)

    def records_in(self: manifest_module.Section, rel: str) -> dict[str, str]:
        read.append(rel)
        return real_records(self, rel)

    def directory_records(self: manifest_module.Section,
                          rel: str) -> manifest_module.DirectoryRecords | None:
        read.append(rel)
        return real_split(self, rel)

    monkeypatch.setattr(manifest_module.Section, "records_in", records_in)
    monkeypatch.setattr(manifest_module.Section, "directory_records", directory_records)
    stats = copy_in_place(store, dest, tmp_path / "one")
    monkeypatch.undo()
    assert read == [".Archive/new"]  # carried over by name: not even that one is parsed
    assert (stats.summary.folders_listed, stats.summary.copied) == (1, 1)
    assert diff_trees(store, dest) == []
    before = PreviousManifest(manifest_of(tmp_path / "one")).section("")
    after = PreviousManifest(manifest_of(dest)).section("")
    assert before is not None and after is not None
    old = {f.directory: f.frame for f in before.frames}
    new = {f.directory: f.frame for f in after.frames}
    assert old.keys() == new.keys() and len(new) == MESSAGE_DIRS
    assert [d for d in new if new[d] != old[d]] == [".Archive/new"]
    # The records are those a full copy makes (all but "how").
    backup(store, tmp_path / "three")
    assert file_records(dest) == file_records(tmp_path / "three")
    assert after.counts == PreviousManifest(manifest_of(tmp_path / "three")).section(
        "").counts  # type: ignore[union-attr]


def test_in_place_a_renamed_or_moved_message_is_renamed_in_the_backup(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In place, a flag change or a move to another folder is one ``rename`` in the backup:
    a link and the unlink after it were two changes to the snapshot's b-tree (at 200,000
    messages, 1 % renames and moves: 7.8 s against 9.0 s). A message the source holds
    under two new names (here: moved, and hard-linked into a third folder under the same
    base name) is renamed once and linked from its new place; the backup keeps the source's
    hard link."""
    backup(store, tmp_path / "one")
    dest = tmp_path / "two"
    shutil.copytree(tmp_path / "one", dest, symlinks=True)
    flagged = "cur/1732780801.M1P4242.mail.example,S=168:2,S"
    sent = ".Sent/cur/1732780806.M6P4242.mail.example,S=168:2,S"
    inode = {old: os.lstat(dest / old).st_ino for old in (flagged, sent)}
    os.rename(store / flagged, store / (flagged[:-1] + "RS"))
    os.rename(store / sent, store / ".Archive" / sent[6:])
    os.link(store / ".Archive" / sent[6:], store / ".Caf&AOk- Ideen" / sent[6:])
    calls: list[tuple[str, str, str]] = []

    def watched(real: Any) -> Any:
        def call(old: str, new: str) -> Any:
            calls.append((real.__name__, old[len(str(dest)) + 1:], new[len(str(dest)) + 1:]))
            return real(old, new)
        return call

    monkeypatch.setattr(os, "rename", watched(os.rename))
    monkeypatch.setattr(os, "link", watched(os.link))
    stats = copy_in_place(store, dest, tmp_path / "one")
    monkeypatch.undo()
    assert diff_trees(store, dest) == []
    assert sorted(kind for kind, _old, _new in calls) == ["link", "rename", "rename"], calls
    assert ("rename", flagged, flagged[:-1] + "RS") in calls
    (moved_to,) = [new for kind, old, new in calls if kind == "rename" and old == sent]
    assert ("link", moved_to, next(new for kind, _o, new in calls if kind == "link")) in calls
    assert os.lstat(dest / (flagged[:-1] + "RS")).st_ino == inode[flagged]
    for folder in (".Archive", ".Caf&AOk- Ideen"):
        assert os.lstat(dest / folder / sent[6:]).st_ino == inode[sent]
    assert (stats.summary.renames, stats.summary.copied) == (3, 0)


def records_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every message directory whose previous records are parsed, and every mailbox whose
    index of previous records by base name is built."""
    read: list[str] = []
    real_records, real_by_base = (manifest_module.Section.records_in,
                                  manifest_module.Section.by_base)

    def records_in(self: manifest_module.Section, rel: str) -> dict[str, str]:
        read.append(rel)
        return real_records(self, rel)

    def by_base(self: manifest_module.Section, base: str) -> list[str]:
        read.append(f"by base: {self.key}")
        return real_by_base(self, base)

    monkeypatch.setattr(manifest_module.Section, "records_in", records_in)
    monkeypatch.setattr(manifest_module.Section, "by_base", by_base)
    return read


def backed_up_then_rewritten(store: Path, tmp_path: Path, message: Path, data: bytes) -> Path:
    """Back ``store`` up to ``one``, copy that to ``two`` (the next backup, in place), then
    rewrite ``message`` under its name with ``data``, its mtime kept; returns ``two``."""
    backup(store, tmp_path / "one")
    dest = tmp_path / "two"
    shutil.copytree(tmp_path / "one", dest, symlinks=True)
    then = os.lstat(message).st_mtime_ns
    message.write_bytes(data)
    os.utime(message, ns=(then, then))
    return dest


def test_in_place_a_flag_change_carries_the_folders_other_records_unread(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flag change renames one file and its cur/ is listed, but the names it still holds
    are the previous backup's files, with their records: carried over as text, never parsed
    one by one (at 1,000,000 messages that parsing was most of a 1 % flag-change night).
    Only the other names are looked at: the renamed message is renamed in the backup, and a
    file whose previous copy is short of the size in its name (a delivery caught before its
    data was written, its mtime the same) is copied again, not carried."""
    short = store / "cur" / "1800000000.M1P1.host,S=20:2,S"
    short.write_bytes(b"")
    dest = backed_up_then_rewritten(store, tmp_path, short, b"x" * 20)
    flagged = "cur/1732780801.M1P4242.mail.example,S=168:2,S"
    inode = os.lstat(dest / flagged).st_ino
    os.rename(store / flagged, store / (flagged[:-1] + "RS"))
    read = records_read(monkeypatch)
    stats = copy_in_place(store, dest, tmp_path / "one")
    monkeypatch.undo()
    assert read == []
    assert diff_trees(store, dest) == []
    assert os.lstat(dest / (flagged[:-1] + "RS")).st_ino == inode
    assert (stats.summary.folders_listed, stats.summary.renames, stats.summary.copied) == (
        1, 1, 1)
    backup(store, tmp_path / "three")
    assert file_records(dest) == file_records(tmp_path / "three")


def test_in_place_names_without_a_size_are_looked_at_when_their_folder_is_listed(
    store: Path, tmp_path: Path
) -> None:
    """A message named by another delivery agent (no ",S=") has no size in its name to
    trust: when its folder is listed it is stat'ed, and one rewritten in place under its
    name, its mtime kept, is copied again, not carried over with the old record."""
    unsized = store / "cur" / "1700000000.123_4.otherhost:2,S"
    unsized.write_bytes(b"first\n")
    dest = backed_up_then_rewritten(store, tmp_path, unsized, b"rewritten, longer\n")
    flagged = "cur/1732780801.M1P4242.mail.example,S=168:2,S"
    os.rename(store / flagged, store / (flagged[:-1] + "RS"))
    stats = copy_in_place(store, dest, tmp_path / "one")
    assert diff_trees(store, dest) == []
    assert (dest / unsized.relative_to(store)).read_bytes() == b"rewritten, longer\n"
    assert (stats.summary.renames, stats.summary.copied) == (1, 1)
    backup(store, tmp_path / "three")
    assert file_records(dest) == file_records(tmp_path / "three")


def test_in_place_messages_moved_out_of_a_deleted_folder_are_found_again(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages moved to another folder, and the folder they left deleted: their old
    directory is walked no more, so its records are searched for them (else each would be
    copied again as new), and they are renamed in the backup."""
    backup(store, tmp_path / "one")
    dest = tmp_path / "two"
    shutil.copytree(tmp_path / "one", dest, symlinks=True)
    moved = sorted(os.listdir(store / ".Sent" / "cur"))
    for name in moved:
        os.rename(store / ".Sent" / "cur" / name, store / ".Archive" / "cur" / name)
    shutil.rmtree(store / ".Sent")
    stats = copy_in_place(store, dest, tmp_path / "one")
    assert diff_trees(store, dest) == []
    assert (stats.summary.renames, stats.summary.copied) == (len(moved), 0)
    backup(store, tmp_path / "three")
    assert file_records(dest) == file_records(tmp_path / "three")


def test_in_place_a_folder_with_escaped_names_is_compared_message_by_message(
    store: Path, tmp_path: Path
) -> None:
    """A name with a tab is escaped in the manifest ("\\t"), and that escaped form is the
    real name of another file here: records are carried by name only where no name is
    escaped, else the one expunged would be carried under the other's name."""
    tab, backslash = "1800000000.M1P1.x\ty,S=5:2,S", "1800000000.M1P1.x\\ty,S=5:2,S"
    for name in (tab, backslash):
        (store / "cur" / name).write_bytes(b"hello")
    backup(store, tmp_path / "one")
    dest = tmp_path / "two"
    shutil.copytree(tmp_path / "one", dest, symlinks=True)
    (store / "cur" / tab).unlink()
    stats = copy_in_place(store, dest, tmp_path / "one")
    assert diff_trees(store, dest) == []
    assert stats.summary.copied == 0
    backup(store, tmp_path / "three")
    assert file_records(dest) == file_records(tmp_path / "three")


def test_in_place_a_copy_of_a_carried_message_stays_a_hard_link(
    store: Path, tmp_path: Path
) -> None:
    """Dovecot's COPY hard-links a message into another folder under a new name; the one it
    links to was carried over unstat'ed (its folder listed for a flag change): its inode is
    looked up then, and the backup keeps the link (one copy, not two)."""
    backup(store, tmp_path / "one")
    dest = tmp_path / "two"
    shutil.copytree(tmp_path / "one", dest, symlinks=True)
    flagged = "cur/1732780801.M1P4242.mail.example,S=168:2,S"
    os.rename(store / flagged, store / (flagged[:-1] + "RS"))
    kept = "cur/1732780803.M3P4242.mail.example,S=168:2,"
    copied = ".Archive/cur/1800000001.M9P9.mail.example,S=168:2,"
    os.link(store / kept, store / copied)
    stats = copy_in_place(store, dest, tmp_path / "one")
    assert diff_trees(store, dest) == []
    assert os.lstat(dest / copied).st_ino == os.lstat(dest / kept).st_ino
    assert stats.summary.copied == 0
