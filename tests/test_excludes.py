"""The live copier's exclude matcher must skip exactly what rsync skips for the same patterns.

A Maildir's tmp/ content is not a pattern (see mailsnap.maildirs): the defaults hold only
Dovecot's lock files, and the last tests check that patterns and the Maildir rule together give
the same copy through rsync, the live copier and the survey."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess

import pytest

from mailsnap.config import DEFAULT_EXCLUDES
from mailsnap.copiers.excludes import ExcludeMatcher
from mailsnap.copiers.maildir import MaildirCopier
from mailsnap.copiers.rsync import RsyncCopier
from mailsnap.maildirs import survey
from mailsnap.runner import Runner

TREE = [
    "cur/1.M1:2,S", "new/2.M2", "tmp/3.M3", "dovecot-uidlist", "dovecot-uidlist.lock",
    ".Sent/cur/4.M4:2,S", ".Sent/tmp/5.M5", ".Sent/dovecot-uidlist.lock",
    ".Sent/dovecot.index.cache", "dovecot.index.cache", ".tmp/cur/6.M6:2,", "a/tmp/c/d",
    ".Trash/cur/7.M7:2,T", "x/.Trash/cur/8", "notes.bak", "sub/old.bak", "spam/cur/9",
    "deep/er/spam/new/10", "a.log", "b.log", "c.log", "Café & Co/cur/11:2,S",
]
PATTERNS = [
    *DEFAULT_EXCLUDES, "dovecot.index.cache", "/.Trash/", "*.bak", "**/spam/*", "[ab].log",
]


def _files(root: Path) -> set[str]:
    return {
        str(Path(d, f).relative_to(root)) for d, _dirs, files in os.walk(root) for f in files
    }


def _filtered(root: Path, matcher: ExcludeMatcher) -> set[str]:
    kept = set()
    for d, dirs, files in os.walk(root):
        rel = Path(d).relative_to(root)
        dirs[:] = [x for x in dirs
                   if not matcher.excluded(str(rel / x).removeprefix("./"), is_dir=True)]
        kept |= {str(rel / f).removeprefix("./") for f in files
                 if not matcher.excluded(str(rel / f).removeprefix("./"), is_dir=False)}
    return kept


@pytest.mark.usefixtures("need_rsync")
def test_same_files_as_rsync(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for rel in TREE:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    subprocess.run(["rsync", "-a", *(f"--exclude={p}" for p in PATTERNS), f"{src}/", f"{dst}/"],
                   check=True)
    assert _filtered(src, ExcludeMatcher(PATTERNS)) == _files(dst)


@pytest.mark.parametrize(
    ("path", "is_dir", "excluded"),
    [
        # tmp/ content is not a pattern's business: only a Maildir's tmp/ is left out, by the
        # Maildir rule, and "tmp/*" also matched a user or a folder called "tmp" (issue #7).
        ("tmp/1.M1", False, False),
        (".Sent/tmp/1.M1", False, False),
        ("example.com/tmp/Maildir/cur/1.M1:2,S", False, False),
        ("Projects/tmp/cur/1.M1:2,S", False, False),
        ("tmp", True, False),
        (".tmp", True, False),
        ("dovecot-uidlist.lock", False, True),
        (".Sent/dovecot-keywords.lock", False, True),
        ("dovecot-uidlist", False, False),
    ],
)
def test_defaults(path: str, is_dir: bool, excluded: bool) -> None:
    assert ExcludeMatcher(DEFAULT_EXCLUDES).excluded(path, is_dir=is_dir) is excluded


def test_defaults_hold_no_tmp_pattern() -> None:
    assert not [p for p in DEFAULT_EXCLUDES if "tmp" in p]


@pytest.mark.usefixtures("need_rsync")
def test_patterns_and_the_maildir_rule_agree_in_every_copier(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel in TREE:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    # The top is the one Maildir in TREE (cur/ and new/); .Sent has no new/, so its tmp/ is
    # ordinary content.
    expected = {f for f in _filtered(src, ExcludeMatcher(PATTERNS)) if not f.startswith("tmp/")}
    copied = {}
    for copier in (RsyncCopier(Runner()), MaildirCopier(Runner())):
        dest = tmp_path / copier.name
        dest.mkdir()
        stats = copier.copy(src, dest, previous=None, excludes=PATTERNS)
        copied[copier.name] = _files(dest)
        assert stats.files == len(expected), copier.name
    assert copied["rsync"] == copied["maildir"] == expected
    assert ".Sent/tmp/5.M5" in expected and "tmp/3.M3" not in expected
    assert survey(src, PATTERNS).files == len(expected)
