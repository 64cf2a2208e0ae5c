"""The tree comparison the backup tests rely on (tests/helpers/trees.py) must itself catch every
kind of difference, or an "equal" backup proves nothing. Plain tmp_path trees, no root needed
(except for the owner check)."""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import subprocess

import pytest

from tests.helpers.trees import diff_trees, linked_to, show, snapshot_tree

MESSAGE = "1700000000.M1P1.host,S=5:2,S"
COPY = "1700000500.M9P1.host,S=5:2,S"  # Dovecot's COPY: a hard link under a new base name
HALF_WRITTEN = "1700000900.M3P1.host"
NEWLINE = "line\nbreak"
NOT_UTF8 = os.fsdecode(b"caf\xe9")


def maildir(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def build_source(root: Path) -> Path:
    """A Maildir++ store with a COPY pair, Maildir tmp/ content, a lock file, odd names, a
    symlink, and a ``tmp`` directory that is not a Maildir's (its content is backed up)."""
    maildir(root)
    maildir(root / ".Archive")
    maildir(root / f".{NOT_UTF8}")
    os.chmod(root / ".Archive", 0o755)
    (root / "cur" / MESSAGE).write_bytes(b"hello")
    os.link(root / "cur" / MESSAGE, root / ".Archive" / "cur" / COPY)
    (root / "new" / "1700000100.M2P1.host").write_bytes(b"new mail\n")
    (root / f".{NOT_UTF8}" / "cur" / f"{NEWLINE}:2,").write_bytes(b"odd\n")
    (root / "tmp" / HALF_WRITTEN).write_bytes(b"half-wri")
    (root / "dovecot-uidlist").write_text("3 V1 N3\n")
    (root / "dovecot-uidlist.lock").write_text("")
    (root / "subscriptions").write_text("Archive\n")
    os.chmod(root / "subscriptions", 0o644)
    (root / "notes" / "tmp").mkdir(parents=True)
    (root / "notes" / "tmp" / "keep.txt").write_text("not a Maildir's tmp\n")
    (root / "sieve").symlink_to("notes")
    return root


def make_backup(source: Path, backup: Path) -> Path:
    """What a correct copier makes: ``cp -a`` (owner, mode, times, hard links), then without
    the Maildir tmp/ content and the lock file, with the directories' times put back."""
    subprocess.run(["cp", "-a", str(source), str(backup)], check=True)
    (backup / "tmp" / HALF_WRITTEN).unlink()
    (backup / "dovecot-uidlist.lock").unlink()
    for rel in ("tmp", ""):
        info = os.stat(source / rel)
        os.utime(backup / rel, ns=(info.st_atime_ns, info.st_mtime_ns))
    return backup


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    source = build_source(tmp_path / "src")
    return source, make_backup(source, tmp_path / "backup")


def keep_dir_time(directory: Path) -> os.stat_result:
    return os.stat(directory)


def restore_dir_time(directory: Path, info: os.stat_result) -> None:
    os.utime(directory, ns=(info.st_atime_ns, info.st_mtime_ns))


def replace_keeping_stat(path: Path, data: bytes) -> None:
    """New content (or a new inode) under the same name, with the same mode, owner and times."""
    info, parent = os.lstat(path), os.stat(path.parent)
    path.unlink()
    path.write_bytes(data)
    os.chown(path, info.st_uid, info.st_gid)
    os.chmod(path, info.st_mode & 0o7777)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    restore_dir_time(path.parent, parent)


def test_an_exact_backup_is_equal(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    assert diff_trees(source, backup) == []
    assert diff_trees(source, backup, dir_mtimes=False) == []


def test_the_image_knows_maildirs_tmp_content_and_excluded_names(
    trees: tuple[Path, Path],
) -> None:
    source, _backup = trees
    image = snapshot_tree(source)
    assert image.maildirs == ("", ".Archive", f".{NOT_UTF8}")
    assert image.tmp_content == (f"tmp/{HALF_WRITTEN}",)
    assert image.excluded == ("dovecot-uidlist.lock",)
    assert image.entries["tmp"].kind == "dir"
    assert image.entries["notes/tmp/keep.txt"].kind == "file"
    assert image.entries["sieve"].target == "notes"
    assert image.entries[f".{NOT_UTF8}/cur/{NEWLINE}:2,"].kind == "file"
    assert image.link_groups() == {frozenset({f"cur/{MESSAGE}", f".Archive/cur/{COPY}"})}


def test_a_missing_file(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    directory = backup / ".Archive" / "cur"
    kept = keep_dir_time(directory)
    (directory / COPY).unlink()
    restore_dir_time(directory, kept)
    assert diff_trees(source, backup) == [f"missing in backup: {show(f'.Archive/cur/{COPY}')} "
                                          "(file)"]


def test_a_missing_odd_name_is_reported_on_one_line(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    directory = backup / f".{NOT_UTF8}" / "cur"
    kept = keep_dir_time(directory)
    (directory / f"{NEWLINE}:2,").unlink()
    restore_dir_time(directory, kept)
    (line,) = diff_trees(source, backup)
    assert "\n" not in line and "line\\nbreak" in line and "caf\\udce9" in line


def test_an_extra_file(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    directory = backup / "cur"
    kept = keep_dir_time(directory)
    (directory / "1700000200.M5P1.host:2,").write_bytes(b"never in the source")
    restore_dir_time(directory, kept)
    assert diff_trees(source, backup) == [
        f"extra in backup: {show('cur/1700000200.M5P1.host:2,')} (file)"]


def test_changed_content_of_the_same_size_and_time(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    replace_keeping_stat(backup / "dovecot-uidlist", b"3 V1 N4\n")
    (line,) = diff_trees(source, backup)
    assert line.startswith(f"{show('dovecot-uidlist')}: content differs")


def test_changed_size(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    replace_keeping_stat(backup / "subscriptions", b"Archive\nSent\n")
    assert diff_trees(source, backup) == [
        f"{show('subscriptions')}: 8 bytes in source, 13 in backup"]


def test_changed_mode(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    os.chmod(backup / "subscriptions", 0o600)
    os.chmod(backup / ".Archive", 0o700)
    assert diff_trees(source, backup) == [
        f"{show('.Archive')}: mode 0755 in source, 0700 in backup",
        f"{show('subscriptions')}: mode 0644 in source, 0600 in backup",
    ]


def test_changed_file_mtime(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    os.utime(backup / "new" / "1700000100.M2P1.host", ns=(0, 1_000_000_000))
    assert diff_trees(source, backup, dir_mtimes=False) == [
        f"{show('new/1700000100.M2P1.host')}: mtime "
        f"{os.stat(source / 'new' / '1700000100.M2P1.host').st_mtime_ns} ns in source, "
        "1000000000 ns in backup"]


def test_directory_mtime_is_compared_unless_skipped(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    os.utime(backup / ".Archive" / "cur", ns=(0, 1_000_000_000))
    (line,) = diff_trees(source, backup)
    assert line.startswith(f"{show('.Archive/cur')}: mtime ")
    assert diff_trees(source, backup, dir_mtimes=False) == []


def test_the_roots_own_mtime_is_not_compared(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    os.utime(backup, ns=(0, 1_000_000_000))
    assert diff_trees(source, backup) == []


def test_a_broken_hard_link_pair(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    replace_keeping_stat(backup / ".Archive" / "cur" / COPY, b"hello")  # same bytes, own inode
    assert diff_trees(source, backup) == [
        f"hard links: {{{show(f'.Archive/cur/{COPY}')}, {show(f'cur/{MESSAGE}')}}} are one "
        "file in the source, not in the backup"]


def test_a_hard_link_the_source_does_not_have(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    kept = keep_dir_time(backup)
    (backup / "subscriptions").unlink()
    os.link(backup / "dovecot-uidlist", backup / "subscriptions")
    restore_dir_time(backup, kept)
    lines = diff_trees(source, backup)
    assert lines[-1] == (f"hard links: {{{show('dovecot-uidlist')}, {show('subscriptions')}}} "
                         "are one file in the backup, not in the source")
    assert len(lines) == 3  # and subscriptions' content and mtime


def test_tmp_content_in_a_backup(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    kept = keep_dir_time(backup / "tmp")
    shutil.copy2(source / "tmp" / HALF_WRITTEN, backup / "tmp" / HALF_WRITTEN)
    restore_dir_time(backup / "tmp", kept)
    assert diff_trees(source, backup) == [
        f"backup holds content of a Maildir's tmp/: {show(f'tmp/{HALF_WRITTEN}')}"]


def test_a_missing_maildir_tmp_directory(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    kept = keep_dir_time(backup / ".Archive")
    (backup / ".Archive" / "tmp").rmdir()
    restore_dir_time(backup / ".Archive", kept)
    assert diff_trees(source, backup) == [f"missing in backup: {show('.Archive/tmp')} (dir)"]


def test_tmp_of_a_directory_that_is_no_maildir_is_content(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    kept = keep_dir_time(backup / "notes" / "tmp")
    (backup / "notes" / "tmp" / "keep.txt").unlink()
    restore_dir_time(backup / "notes" / "tmp", kept)
    assert diff_trees(source, backup) == [
        f"missing in backup: {show('notes/tmp/keep.txt')} (file)"]


def test_a_lock_file_in_a_backup(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    assert diff_trees(source, backup, excludes=()) == [
        f"missing in backup: {show('dovecot-uidlist.lock')} (file)"]
    kept = keep_dir_time(backup)
    (backup / "dovecot-uidlist.lock").write_text("")
    restore_dir_time(backup, kept)
    assert diff_trees(source, backup) == [
        f"backup holds an excluded name: {show('dovecot-uidlist.lock')}"]


def test_a_changed_symlink_and_a_changed_type(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    kept = keep_dir_time(backup)
    (backup / "sieve").unlink()
    (backup / "sieve").symlink_to("elsewhere")
    (backup / "subscriptions").unlink()
    (backup / "subscriptions").mkdir()
    restore_dir_time(backup, kept)
    assert diff_trees(source, backup) == [
        f"{show('sieve')}: symlink to 'notes' in source, to 'elsewhere' in backup",
        f"{show('subscriptions')}: file in source, dir in backup",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_changed_owner(trees: tuple[Path, Path]) -> None:
    source, backup = trees
    info = os.lstat(source / "cur" / MESSAGE)
    os.chown(backup / ".Archive" / "cur" / COPY, 5000, 5001)  # the same inode: both names
    os.lchown(backup / "sieve", 5000, 5000)
    assert diff_trees(source, backup) == [
        f"{show(f'.Archive/cur/{COPY}')}: owner {info.st_uid}:{info.st_gid} in source, "
        "5000:5001 in backup",
        f"{show(f'cur/{MESSAGE}')}: owner {info.st_uid}:{info.st_gid} in source, 5000:5001 in "
        "backup",
        f"{show('sieve')}: owner {info.st_uid}:{info.st_gid} in source, 5000:5000 in backup",
    ]


def test_linked_to_finds_files_hard_linked_to_the_previous_backup(
    trees: tuple[Path, Path], tmp_path: Path,
) -> None:
    _source, previous = trees
    new = tmp_path / "new"
    maildir(new)
    maildir(new / ".Archive")
    # A flag change, new/ → cur/, a move to another folder, and one new delivery.
    os.link(previous / "cur" / MESSAGE, new / "cur" / MESSAGE.replace(":2,S", ":2,RS"))
    os.link(previous / "new" / "1700000100.M2P1.host", new / "cur" / "1700000100.M2P1.host:2,")
    os.link(previous / "dovecot-uidlist", new / ".Archive" / "dovecot-uidlist")
    (new / "new" / "1700000300.M7P1.host").write_bytes(b"hello")  # same bytes, not linked
    assert linked_to(previous, new) == {
        # The COPY pair is one inode: the smaller name of the two stands for it.
        f"cur/{MESSAGE.replace(':2,S', ':2,RS')}": f".Archive/cur/{COPY}",
        "cur/1700000100.M2P1.host:2,": "new/1700000100.M2P1.host",
        ".Archive/dovecot-uidlist": "dovecot-uidlist",
    }
    assert linked_to(new, tmp_path / "src") == {}
