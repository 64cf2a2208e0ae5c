"""The live copier's exclude matcher must skip exactly what rsync skips for the same patterns."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess

import pytest

from mailsnap.config import DEFAULT_EXCLUDES
from mailsnap.copiers.excludes import ExcludeMatcher

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
        ("tmp/1.M1", False, True),
        (".Sent/tmp/1.M1", False, True),
        ("tmp", True, False),  # the directory stays: a Maildir needs it
        (".tmp", True, False),  # a user's folder called "tmp"
        ("dovecot-uidlist.lock", False, True),
        ("dovecot-uidlist", False, False),
    ],
)
def test_defaults(path: str, is_dir: bool, excluded: bool) -> None:
    assert ExcludeMatcher(DEFAULT_EXCLUDES).excluded(path, is_dir=is_dir) is excluded
