"""Exact comparison of a source tree with a backup's ``mail/``, for tests that must prove a backup
is the source and nothing else.

``snapshot_tree`` records every entry below a root (symlinks not followed): type, permission
bits, owner, mtime, a file's size and sha256, a symlink's target, and the inode, so hard-link
structure can be compared within a tree. ``diff_trees`` compares a source (a read-only snapshot,
or a source nothing changes while the test checks) with a backup, and says every difference in
one line each. ``linked_to`` says which files of a backup share their inode with a file of the
previous backup (hard-linked to it instead of copied).

What a backup leaves out, by the rules of ``mailsnap.maildirs``: the *content* of a Maildir's
``tmp/`` (the ``tmp/`` directory itself is kept, empty) and what the exclude patterns match
(Dovecot's lock files by default). Those are ignored in the source and are differences when the
backup holds them.

Names are ``str`` as ``os.scandir`` gives them: bytes that are not UTF-8 are surrogate escapes;
difference lines show names with ``repr``, so a newline in a name cannot split a line.
Independent of the copiers under test on purpose: only the Maildir rule (``is_maildir``) and the
exclude-pattern matcher come from mailsnap.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
import hashlib
import os
import stat

from mailsnap.config import DEFAULT_EXCLUDES
from mailsnap.copiers.excludes import ExcludeMatcher
from mailsnap.maildirs import TMP_DIR, is_maildir

CHUNK = 1 << 20
ROOT = ""  # the root's own relative name


@dataclass(frozen=True)
class Entry:
    """One name in a tree, as ``lstat`` sees it."""

    kind: str  # "file", "dir", "symlink" or "other"
    mode: int  # permission bits (stat.S_IMODE)
    uid: int
    gid: int
    mtime_ns: int
    size: int
    inode: tuple[int, int]  # (st_dev, st_ino)
    sha256: str | None = None  # a file's content (None when not read)
    target: str | None = None  # a symlink's target


@dataclass(frozen=True)
class TreeImage:
    """Everything below ``root``. ``entries`` maps relative names ("/" separators, ``""`` for
    the root itself) to entries; a Maildir's ``tmp/`` is an entry, its content is listed in
    ``tmp_content`` only (not read, not walked); names the excludes match are listed in
    ``excluded`` only."""

    root: str
    entries: dict[str, Entry]
    maildirs: tuple[str, ...]
    tmp_content: tuple[str, ...]
    excluded: tuple[str, ...]

    def files(self) -> set[str]:
        return {rel for rel, entry in self.entries.items() if entry.kind == "file"}

    def link_groups(self, among: set[str] | None = None) -> set[frozenset[str]]:
        """Sets of two or more file names (of ``among``, default all) that share an inode."""
        by_inode: dict[tuple[int, int], set[str]] = defaultdict(set)
        for rel in self.files() if among is None else among:
            by_inode[self.entries[rel].inode].add(rel)
        return {frozenset(names) for names in by_inode.values() if len(names) > 1}


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(path: str, info: os.stat_result, *, content: bool) -> Entry:
    mode = info.st_mode
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(mode),
        uid=info.st_uid,
        gid=info.st_gid,
        mtime_ns=info.st_mtime_ns,
        size=info.st_size,
        inode=(info.st_dev, info.st_ino),
        sha256=_sha256(path) if kind == "file" and content else None,
        target=os.readlink(path) if kind == "symlink" else None,
    )


def snapshot_tree(
    root: str | os.PathLike[str], *, excludes: Sequence[str] = DEFAULT_EXCLUDES,
    content: bool = True,
) -> TreeImage:
    """Record the tree at ``root`` (the root itself followed if it is a symlink, nothing below
    it). ``content``: read every file for its sha256 (False: only ``lstat``)."""
    top = os.fspath(root)
    matcher = ExcludeMatcher(excludes)
    entries = {ROOT: _entry(top, os.stat(top), content=False)}
    maildirs: list[str] = []
    tmp_content: list[str] = []
    excluded: list[str] = []
    pending = [ROOT]
    while pending:
        rel = pending.pop()
        path = os.path.join(top, rel) if rel else top
        maildir = is_maildir(path)
        if maildir:
            maildirs.append(rel)
        with os.scandir(path) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            child_rel = _join(rel, child.name)
            is_dir = child.is_dir(follow_symlinks=False)
            if maildir and is_dir and child.name == TMP_DIR:
                entries[child_rel] = _entry(child.path, child.stat(follow_symlinks=False),
                                            content=False)
                with os.scandir(child.path) as tmp:
                    tmp_content.extend(_join(child_rel, e.name) for e in tmp)
                continue
            if matcher.excluded(child_rel, is_dir=is_dir):
                excluded.append(child_rel)
                continue
            entries[child_rel] = _entry(child.path, child.stat(follow_symlinks=False),
                                        content=content)
            if is_dir:
                pending.append(child_rel)
    return TreeImage(
        root=top,
        entries=entries,
        maildirs=tuple(sorted(maildirs)),
        tmp_content=tuple(sorted(tmp_content)),
        excluded=tuple(sorted(excluded)),
    )


def show(rel: str) -> str:
    """A relative name for a difference line: quoted, with newlines and undecodable bytes
    escaped; the root is ``'.'``."""
    return repr(rel or ".")


def _compare(rel: str, src: Entry, dst: Entry, *, dir_mtimes: bool) -> list[str]:
    name = show(rel)
    if src.kind != dst.kind:
        return [f"{name}: {src.kind} in source, {dst.kind} in backup"]
    out = []
    if (src.uid, src.gid) != (dst.uid, dst.gid):
        out.append(f"{name}: owner {src.uid}:{src.gid} in source, {dst.uid}:{dst.gid} in backup")
    if src.kind == "symlink":  # a symlink's mode is always 0777 on Linux, its time not kept
        if src.target != dst.target:
            out.append(f"{name}: symlink to {src.target!r} in source, to {dst.target!r} in "
                       "backup")
        return out
    if src.mode != dst.mode:
        out.append(f"{name}: mode {src.mode:04o} in source, {dst.mode:04o} in backup")
    if src.kind == "file":
        if src.size != dst.size:
            out.append(f"{name}: {src.size} bytes in source, {dst.size} in backup")
        elif src.sha256 != dst.sha256:
            out.append(f"{name}: content differs (sha256 {str(src.sha256)[:12]}… in source, "
                       f"{str(dst.sha256)[:12]}… in backup)")
    check_time = src.kind == "file" or (src.kind == "dir" and dir_mtimes and rel != ROOT)
    if check_time and src.mtime_ns != dst.mtime_ns:
        out.append(f"{name}: mtime {src.mtime_ns} ns in source, {dst.mtime_ns} ns in backup")
    return out


def _group(names: frozenset[str]) -> str:
    return "{" + ", ".join(show(n) for n in sorted(names)) + "}"


def diff_trees(
    source_root: str | os.PathLike[str], backup_root: str | os.PathLike[str], *,
    excludes: Sequence[str] = DEFAULT_EXCLUDES, dir_mtimes: bool = True,
) -> list[str]:
    """Every difference between the source tree and a backup's ``mail/``, one line each
    (empty: the backup is exact).

    Compared for each name: type, owner (uid, gid), permission bits (not a symlink's), a file's
    size, content and mtime, a symlink's target, a directory's mtime (``dir_mtimes``; never the
    root's: the top of a backup is its own ``mail/`` directory, made by the run). Hard links:
    names that share an inode in the source share one in the backup, and no others do. Left
    out of the source and reported when in the backup: a Maildir's ``tmp/`` content and what
    ``excludes`` match.
    """
    src = snapshot_tree(source_root, excludes=excludes)
    dst = snapshot_tree(backup_root, excludes=excludes)
    out: list[str] = []
    for rel in sorted(src.entries.keys() | dst.entries.keys()):
        if rel not in dst.entries:
            out.append(f"missing in backup: {show(rel)} ({src.entries[rel].kind})")
        elif rel not in src.entries:
            out.append(f"extra in backup: {show(rel)} ({dst.entries[rel].kind})")
        else:
            out += _compare(rel, src.entries[rel], dst.entries[rel], dir_mtimes=dir_mtimes)
    out += [f"backup holds content of a Maildir's tmp/: {show(rel)}" for rel in dst.tmp_content]
    out += [f"backup holds an excluded name: {show(rel)}" for rel in dst.excluded]
    common = src.files() & dst.files()
    in_source, in_backup = src.link_groups(common), dst.link_groups(common)
    for names in sorted(in_source - in_backup, key=sorted):
        out.append(f"hard links: {_group(names)} are one file in the source, not in the backup")
    for names in sorted(in_backup - in_source, key=sorted):
        out.append(f"hard links: {_group(names)} are one file in the backup, not in the source")
    return out


def linked_to(
    prev_backup_root: str | os.PathLike[str], new_backup_root: str | os.PathLike[str]
) -> dict[str, str]:
    """New backup's file → a file of the previous backup with the same inode (the smallest
    such name when several share it), for every file of the new backup hard-linked to the
    previous one. Nothing is read but ``lstat``; nothing is excluded."""
    prev = snapshot_tree(prev_backup_root, excludes=(), content=False)
    new = snapshot_tree(new_backup_root, excludes=(), content=False)
    by_inode: dict[tuple[int, int], str] = {}
    for rel in sorted(prev.files(), reverse=True):
        by_inode[prev.entries[rel].inode] = rel
    return {rel: by_inode[new.entries[rel].inode]
            for rel in sorted(new.files()) if new.entries[rel].inode in by_inode}
