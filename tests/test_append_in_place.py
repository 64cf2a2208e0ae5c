"""``append_open_file``: a file of the previous backup grown by what the source appended, and
only when its old part is proven to be the previous backup's (issue #12). Unprivileged: plain
files in a temporary directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mailsnap.copiers.files import append_open_file


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def grow(tmp_path: Path, old: bytes, new: bytes, *, recorded: bytes | None = None,
         links: int = 1) -> tuple[str | None, Path]:
    """The backup holds ``old`` (its record says ``recorded``, by default ``old``); the source
    now holds ``new``."""
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(new)
    target.write_bytes(old)
    for n in range(1, links):
        os.link(target, tmp_path / f"link{n}")
    record = old if recorded is None else recorded
    fd = os.open(source, os.O_RDONLY)
    try:
        got = append_open_file(fd, os.fstat(fd), str(target), len(record), sha(record))
    finally:
        os.close(fd)
    return got, target


def test_appends_the_new_bytes_and_hashes_the_whole(tmp_path: Path) -> None:
    old = b"log record\n" * 1000
    new = old + b"appended\n" * 3
    got, target = grow(tmp_path, old, new)
    assert got == sha(new)
    assert target.read_bytes() == new
    assert target.stat().st_mtime_ns == (tmp_path / "source").stat().st_mtime_ns


def test_a_rewritten_start_is_refused_and_nothing_written(tmp_path: Path) -> None:
    old = b"log record\n" * 10
    got, target = grow(tmp_path, old, b"X" + old[1:] + b"more")
    assert got is None
    assert target.read_bytes() == old


def test_a_backup_copy_unlike_its_record_is_refused(tmp_path: Path) -> None:
    old = b"log record\n" * 10
    # The file in the backup is not the size its record says: not the recorded file.
    got, target = grow(tmp_path, old + b"x", old + b"new", recorded=old)
    assert got is None
    assert target.read_bytes() == old + b"x"


def test_a_file_with_other_names_is_not_grown(tmp_path: Path) -> None:
    old = b"log record\n" * 10
    got, _target = grow(tmp_path, old, old + b"new", links=2)
    assert got is None  # growing it would change the other name too
    assert (tmp_path / "link1").read_bytes() == old


def test_a_file_that_did_not_grow_is_left_to_the_copy(tmp_path: Path) -> None:
    old = b"log record\n" * 10
    got, target = grow(tmp_path, old, old[:-1] + b"X")
    assert got is None
    assert target.read_bytes() == old


def test_a_name_claimed_for_a_change_waits_for_the_links_begun_from_it() -> None:
    """The rule that replaced the section lock around link() and appends: a link begun
    before the claim is made first; one begun after is refused; other names never wait."""
    import threading

    from mailsnap.copiers.frozen import _Section

    section = _Section("alice/Maildir", None)
    assert section.begin_link("cur/a")
    claimed = threading.Event()

    def change_a() -> None:
        section.claim("cur/a")
        claimed.set()

    changer = threading.Thread(target=change_a)
    changer.start()
    assert not claimed.wait(0.2)  # the link from cur/a is still being made
    assert section.begin_link("cur/b")  # another name: no waiting
    section.end_link("cur/b")
    section.end_link("cur/a")
    assert claimed.wait(5)
    changer.join()
    assert not section.begin_link("cur/a")  # replaced: no new link from it
    assert section.linking == {}
