"""Is a backup still what it was when it was made?

``verify_backup`` checks a published backup against its own manifest: every file the
manifest lists is there, a regular file of the recorded size (and, ``deep``, the recorded
sha256; each inode is hashed once, so hard links cost nothing); nothing is there that the
manifest does not list; and the backup is a sound Maildir store: every Maildir has ``cur/``,
``new/`` and ``tmp/``, no ``tmp/`` holds anything, no Dovecot lock file was kept, the backup
directory is mode 0700. A backup without a manifest (made by ``copier = "rsync"``) gets the
structural checks only, and says so.

``compare_with_source`` is the per-job ``verify = "snapshot"`` option: before the snapshot is
torn down, the finished copy is compared with it (names, types, sizes; content with ``deep``).

Every problem is one line; no line means intact. Read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
import hashlib
import os
from pathlib import Path
import stat

from mailsnap.config import DEFAULT_EXCLUDES
from mailsnap.copiers.excludes import ExcludeMatcher
from mailsnap.maildirs import MESSAGE_DIRS, TMP_DIR, is_maildir
from mailsnap.manifest import MANIFEST_FILE, ManifestDamaged, read_records, unescape
from mailsnap.store import Backup

LOCK_FILES = frozenset(DEFAULT_EXCLUDES)


@dataclass
class VerifyResult:
    backup: str
    problems: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    hashed: int = 0
    manifest: bool = True
    deep: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {"backup": self.backup, "ok": self.ok, "problems": self.problems,
                "files": self.files, "bytes": self.bytes, "hashed": self.hashed,
                "manifest": self.manifest, "deep": self.deep}


def _show(rel: str) -> str:
    return repr(rel) if rel else "'.' (the top)"


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _walk(root: str) -> Iterator[tuple[str, list[os.DirEntry[str]]]]:
    """Every directory below ``root`` (relative name, its entries), symlinks not followed."""
    pending = [""]
    while pending:
        rel = pending.pop()
        path = os.path.join(root, rel) if rel else root
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        yield rel, entries
        pending.extend(reversed([f"{rel}/{e.name}" if rel else e.name for e in entries
                                 if e.is_dir(follow_symlinks=False)]))


def structure_problems(content: Path, reported: set[str] | None = None) -> list[str]:
    """The Maildir-level checks, on the tree alone. Names found wrong are added to
    ``reported`` (so the manifest check does not report them a second time)."""
    problems: list[str] = []
    reported = reported if reported is not None else set()
    root = os.fspath(content)
    for rel, entries in _walk(root):
        path = os.path.join(root, rel) if rel else root
        names = {e.name: e for e in entries}
        for entry in entries:
            if entry.name in LOCK_FILES:
                child = f"{rel}/{entry.name}" if rel else entry.name
                problems.append(f"{_show(child)}: a Dovecot lock file in the backup")
                reported.add(child)
        if all(sub in names and names[sub].is_dir(follow_symlinks=False)
               for sub in MESSAGE_DIRS) and is_maildir(path):
            tmp = names.get(TMP_DIR)
            if tmp is None or not tmp.is_dir(follow_symlinks=False):
                problems.append(f"{_show(rel)}: a Maildir without tmp/")
            else:
                with os.scandir(tmp.path) as it:
                    inside = [f"{rel}/{TMP_DIR}/{e.name}" if rel else f"{TMP_DIR}/{e.name}"
                              for e in it]
                if inside:
                    problems.append(f"{_show(rel)}: tmp/ is not empty (half-written "
                                    "deliveries must not be in a backup)")
                    reported.update(inside)
    return problems


def verify_backup(backup: Backup, *, deep: bool = False,
                  progress: Callable[[int], None] | None = None) -> VerifyResult:
    result = VerifyResult(backup.run_id, deep=deep)
    # stat, not lstat: a backup on a ZFS target is a symlink to its snapshot (the store lists
    # no other symlink), whose mode is the snapshot's.
    mode = stat.S_IMODE(os.stat(backup.path).st_mode)
    if mode != 0o700:
        result.problems.append(f"{backup.path}: mode {mode:04o}, not 0700 (backups are private)")
    content = backup.content
    if not content.is_dir():
        result.problems.append(f"{content}: missing")
        return result
    reported: set[str] = set()
    result.problems += structure_problems(content, reported)
    manifest = backup.path / MANIFEST_FILE
    if not manifest.exists():
        result.manifest = False
        return result
    try:
        records = read_records(manifest)
    except ManifestDamaged as exc:
        result.problems.append(str(exc))
        return result
    recorded = backup.manifest_sha256
    if recorded is not None:
        with manifest.open("rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != recorded:
                # Whole and readable, but not the one published: the next backup does not
                # link against it (it copies in full).
                result.problems.append(f"{MANIFEST_FILE}: not the manifest published with this "
                                       "backup (its sha256 differs from mailsnap.json's)")
    listed: set[str] = set()
    digests: dict[tuple[int, int], str] = {}
    root = os.fspath(content)
    for fields in records:
        kind = fields[0]
        if kind == "D":
            rel = unescape(fields[1])
            path = os.path.join(root, rel) if rel else root
            if not os.path.isdir(path) or os.path.islink(path):
                result.problems.append(f"{_show(rel)}: directory missing")
            listed.add(rel)
        elif kind == "L":
            rel = unescape(fields[1])
            listed.add(rel)
            if not os.path.islink(os.path.join(root, rel)):
                result.problems.append(f"{_show(rel)}: symlink missing")
        elif kind == "F":
            rel = unescape(fields[1])
            listed.add(rel)
            size, sha = int(fields[3]), fields[8]
            path = os.path.join(root, rel)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                result.problems.append(f"{_show(rel)}: missing")
                continue
            if not stat.S_ISREG(info.st_mode):
                result.problems.append(f"{_show(rel)}: not a regular file")
                continue
            result.files += 1
            result.bytes += info.st_size
            if info.st_size != size:
                result.problems.append(f"{_show(rel)}: {info.st_size} bytes, the manifest says "
                                       f"{size}")
                continue
            if deep:
                key = (info.st_dev, info.st_ino)
                if key not in digests:
                    digests[key] = _sha256(path)
                    result.hashed += 1
                if digests[key] != sha:
                    result.problems.append(f"{_show(rel)}: content differs from the manifest "
                                           "(sha256)")
            if progress is not None and result.files % 1000 == 0:
                progress(result.files)
    for rel, entries in _walk(root):
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            if child not in listed and child not in reported:
                result.problems.append(f"{_show(child)}: in the backup but not in its manifest")
    return result


def compare_with_source(source: Path, content: Path, excludes: Sequence[str], *,
                        deep: bool = False) -> list[str]:
    """The copy at ``content`` against the (still mounted) snapshot ``source``: the same
    names of the same types and sizes (and content, ``deep``), leaving out what a backup
    leaves out (a Maildir's tmp/ content, the excludes)."""
    matcher = ExcludeMatcher(excludes)
    problems: list[str] = []
    src_root, dst_root = os.fspath(source), os.fspath(content)
    pending = [""]
    while pending:
        rel = pending.pop()
        src = os.path.join(src_root, rel) if rel else src_root
        dst = os.path.join(dst_root, rel) if rel else dst_root
        maildir = is_maildir(src)
        with os.scandir(src) as it:
            want = {e.name: e for e in it}
        try:
            with os.scandir(dst) as it:
                have = {e.name: e for e in it}
        except FileNotFoundError:
            problems.append(f"{_show(rel)}: directory missing from the backup")
            continue
        for name in sorted(want.keys() | have.keys()):
            child = f"{rel}/{name}" if rel else name
            entry = want.get(name)
            is_dir = entry.is_dir(follow_symlinks=False) if entry is not None else False
            if entry is not None and matcher.excluded(child, is_dir=is_dir):
                entry = None  # left out on purpose: must not be in the backup
            copy = have.get(name)
            if entry is None and copy is None:
                continue
            if entry is None:
                problems.append(f"{_show(child)}: in the backup, not in the snapshot")
                continue
            if copy is None:
                problems.append(f"{_show(child)}: in the snapshot, missing from the backup")
                continue
            a, b = entry.stat(follow_symlinks=False), copy.stat(follow_symlinks=False)
            if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
                problems.append(f"{_show(child)}: a different kind of file in the backup")
            elif stat.S_ISDIR(a.st_mode):
                if maildir and name == TMP_DIR:
                    if any(os.scandir(copy.path)):
                        problems.append(f"{_show(child)}: tmp/ content in the backup")
                    continue
                pending.append(child)
            elif stat.S_ISREG(a.st_mode):
                if a.st_size != b.st_size:
                    problems.append(f"{_show(child)}: {b.st_size} bytes in the backup, "
                                    f"{a.st_size} in the snapshot")
                elif deep and _sha256(entry.path) != _sha256(copy.path):
                    problems.append(f"{_show(child)}: content differs from the snapshot")
    return problems


def listing_problems(records: Iterable[list[str]], listing: Mapping[str, tuple[str, int]],
                     digests: Mapping[str, str] | None = None) -> list[str]:
    """A backup held elsewhere (an SSH store, a restic snapshot) against its manifest.
    ``listing``: relative path → (kind, size), kind ``f``/``d``/``l`` as ``find -printf %y``
    prints it; ``digests``: relative path → sha256, for the files hashed (``--deep``)."""
    problems: list[str] = []
    listed: set[str] = set()
    kinds = {"D": "d", "F": "f", "L": "l"}
    names = {"d": "directory", "f": "file", "l": "symlink"}
    for fields in records:
        kind = kinds.get(fields[0])
        if kind is None:
            continue
        rel = unescape(fields[1])
        listed.add(rel)
        if not rel:
            continue  # the top directory itself
        found = listing.get(rel)
        if found is None:
            problems.append(f"{_show(rel)}: {names[kind]} missing")
        elif found[0] != kind:
            problems.append(f"{_show(rel)}: not a {names[kind]}")
        elif kind == "f":
            if found[1] != int(fields[3]):
                problems.append(f"{_show(rel)}: {found[1]} bytes, the manifest says {fields[3]}")
            elif digests is not None and digests.get(rel) != fields[8]:
                problems.append(f"{_show(rel)}: content differs from the manifest (sha256)")
    for rel in sorted(set(listing) - listed):
        problems.append(f"{_show(rel)}: in the backup but not in its manifest")
    return problems
