"""The per-backup manifest: round trip of hostile names, sections read in step with a walk,
and damage (truncated, corrupt, foreign, no end line) detected before anything is trusted."""

from __future__ import annotations

import hashlib
from pathlib import Path
import threading
import time

import pytest
import zstandard

from mailsnap import manifest as manifest_module
from mailsnap.manifest import (
    MAGIC,
    ManifestDamaged,
    ManifestWriter,
    MessageFrame,
    PreviousManifest,
    Section,
    escape,
    file_tail,
    read_records,
    section_key,
    unescape,
)

NAMES = [
    "plain",
    "with space/and & quotes \"'",
    "tab\there",
    "new\nline",
    "back\\slash",
    "caf\udce9 (not UTF-8)",
    "Caf&AOk-/cur/1700000000.M1P2.host,S=12:2,RS",
]


@pytest.mark.parametrize("name", NAMES)
def test_escape_round_trips(name: str) -> None:
    escaped = escape(name)
    assert "\t" not in escaped and "\n" not in escaped
    assert unescape(escaped) == name


def write(path: Path, sections: dict[str, list[str]]) -> None:
    writer = ManifestWriter(path)
    for key, names in sections.items():
        writer.section(key, [f"F\t{escape(n)}\tcopied\t{file_tail(len(n), 1, 0o600, 0, 0, 'ab')}\n"
                             for n in names])
    writer.close()


SECTIONS = {
    "": ["top-file"],
    "a": ["a/x"],
    "a/b": ["a/b/cur/1.M1,S=5:2,S", "a/b/.Sent/cur/2.M2,S=7:2,"],
    "a.b": ["a.b/y"],
    "new\nuser": ["new\nuser/cur/3.M3,S=1:2,S"],
}


def test_sections_are_read_in_walk_order_one_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "m.zst"
    write(path, SECTIONS)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    previous = PreviousManifest(path)
    assert previous.damaged is None
    # A walk asks in its own order, skipping sections that no longer exist ("a") and asking
    # for ones that are new ("a/a"); "a/b" sorts before "a.b" by path components.
    assert sorted(SECTIONS, key=section_key) == ["", "a", "a/b", "a.b", "new\nuser"]
    top = previous.section("")
    assert top is not None and list(top.files) == ["top-file"]
    assert previous.section("a/a") is None
    ab = previous.section("a/b")
    assert ab is not None and ab.by_base("2.M2,S=7") == ["a/b/.Sent/cur/2.M2,S=7:2,"]
    assert previous.section("a.b") is not None
    user = previous.section("new\nuser")
    assert user is not None and "new\nuser/cur/3.M3,S=1:2,S" in user.files
    assert previous.section("zzz") is None
    assert previous.damaged is None


def test_keep_serves_sections_again_in_any_order(tmp_path: Path) -> None:
    path = tmp_path / "m.zst"
    write(path, SECTIONS)
    previous = PreviousManifest(path, keep=True)
    assert previous.section("a.b") is not None
    assert previous.section("") is not None
    assert previous.section("a/b") is not None
    assert previous.section("nope") is None


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif how == "foreign":
        path.write_bytes(b"not a manifest\n")
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "flipped", "foreign", "empty"])
def test_damage_is_found_before_any_section_is_used(tmp_path: Path, how: str) -> None:
    path = tmp_path / "m.zst"
    write(path, {f"user{i:03}": [f"user{i:03}/cur/{n}.M{n},S=9:2,S" for n in range(50)]
                 for i in range(40)})
    damage(path, how)
    previous = PreviousManifest(path)
    assert previous.damaged, how
    assert previous.section("user000") is None
    with pytest.raises(ManifestDamaged):
        read_records(path)


def test_an_interrupted_writer_leaves_no_end_line(tmp_path: Path) -> None:
    path = tmp_path / "m.zst"
    writer = ManifestWriter(path)
    writer.section("a", ["F\ta/x\tcopied\t1\t1\t600\t0\t0\tab\n"])
    writer.abort()
    assert PreviousManifest(path).damaged
    with pytest.raises(ManifestDamaged):
        read_records(path)


def test_records_of_a_whole_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.zst"
    write(path, {"a": ["a/x"]})
    records = read_records(path)
    assert records[0] == [MAGIC, "2"]
    assert records[1] == ["S", "a"]
    assert records[2][:3] == ["F", "a/x", "copied"]
    assert records[-1] == ["E", "1"]


def record(name: str) -> str:
    return f"F\t{escape(name)}\tcopied\t{file_tail(len(name), 1, 0o600, 0, 0, 'ab')}\n"


def test_messages_have_a_frame_of_their_own_read_only_when_needed(tmp_path: Path) -> None:
    path = tmp_path / "m.zst"
    writer = ManifestWriter(path)
    head = ["D\tu/Maildir\t700\t0\t0\t1\t1\t1\n", record("u/Maildir/dovecot-uidlist")]
    messages = [record(f"u/Maildir/cur/{n}.M1,S=5:2,S") for n in range(3)]
    writer.section("u/Maildir", head, (4, 100, 3),
                   [MessageFrame("u/Maildir/cur", len(messages), 15, 3, messages)])
    writer.close()
    earlier = PreviousManifest(path)
    section = earlier.section("u/Maildir")
    assert section is not None and earlier.damaged is None
    assert section.counts == (4, 100, 3) and section.records == 2 + 2 + 3  # D, F, C, M + 3
    assert section.tail("u/Maildir/dovecot-uidlist") is not None
    assert not section.messages_frame_read  # a file that is not a message: no decompression
    assert len(section.files) == 4 and section.messages_frame_read
    assert read_records(path)[-1] == ["E", str(section.records)]


def test_a_section_is_reused_frame_for_frame(tmp_path: Path) -> None:
    first, second = tmp_path / "1.zst", tmp_path / "2.zst"
    writer = ManifestWriter(first)
    messages = [record(f"u/cur/{n}.M1,S=5:2,S") for n in range(5)]
    writer.section("u", ["D\tu\t700\t0\t0\t1\t1\t1\n"], (5, 50, 5),
                   [MessageFrame("u/cur", 5, 25, 5, messages)])
    writer.close()
    earlier = PreviousManifest(first)
    section = earlier.section("u")
    assert section is not None
    writer = ManifestWriter(second)
    writer.reuse(section)
    writer.close()
    earlier.close()
    assert first.read_bytes() == second.read_bytes()
    again = PreviousManifest(second).section("u")
    assert again is not None and len(again.files) == 5


def test_a_sections_records_are_parsed_once_for_all_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The copier's workers take chunks of one mailbox at once: the first to need its records
    parses them, the others wait and get the same index (each used to parse its own)."""
    lines = [f"F\tcur/{n}.M1P1.host,S=10:2,S\tcopied\t10\t1\t600\t8\t8\t{'0' * 64}"
             for n in range(50)]
    section = Section("u/Maildir", _lines=list(lines))
    parse = Section._parse_files
    calls: list[int] = []

    def slow_parse(self: Section) -> dict[str, str]:
        calls.append(1)
        time.sleep(0.05)  # wide open for a second thread, were there no lock
        return parse(self)

    monkeypatch.setattr(Section, "_parse_files", slow_parse)
    seen: list[dict[str, str]] = []
    bases: list[list[str]] = []

    def use() -> None:
        seen.append(section.files)
        bases.append(section.by_base("7.M1P1.host,S=10"))

    threads = [threading.Thread(target=use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert all(files is seen[0] for files in seen) and len(seen[0]) == 50
    assert bases == [["cur/7.M1P1.host,S=10:2,S"]] * 4


def written(path: Path, end_fields: dict[str, int] | None = None) -> str:
    """``SECTIONS`` written to ``path``; returns the digest the writer recorded."""
    writer = ManifestWriter(path)
    writer.end_fields = end_fields or {}
    for key, names in SECTIONS.items():
        writer.section(key, [f"F\t{escape(n)}\tcopied\t{file_tail(len(n), 1, 0o600, 0, 0, 'ab')}"
                             "\n" for n in names])
    writer.close()
    return writer.sha256


def test_the_writer_s_digest_is_the_file_s(tmp_path: Path) -> None:
    path = tmp_path / "m.zst"
    assert written(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_manifest_trusted_by_its_digest_is_not_decompressed_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.zst"
    digest = written(path, {"listed_before": 17, "full_check": 1})
    by_reading = PreviousManifest(path)
    assert by_reading.damaged is None
    monkeypatch.setattr(manifest_module, "_check_whole", lambda path: pytest.fail("read whole"))
    by_digest = PreviousManifest(path, sha256=digest)
    assert by_digest.damaged is None
    assert by_digest.end_fields == by_reading.end_fields == {"listed_before": 17,
                                                             "full_check": 1}
    for key in SECTIONS:
        theirs, ours = by_reading.section(key), by_digest.section(key)
        assert theirs is not None and ours is not None and ours.files == theirs.files


@pytest.mark.parametrize("change", ["digest", "a byte", "the end", "appended"])
def test_a_manifest_unlike_its_recorded_digest_is_damaged(tmp_path: Path, change: str) -> None:
    """Any difference from the file that was published: nothing of it is used (the copy
    is then a full one), even where every zstd frame would still check out."""
    path = tmp_path / "m.zst"
    digest = written(path)
    data = bytearray(path.read_bytes())
    if change == "digest":
        digest = hashlib.sha256(b"another").hexdigest()
    elif change == "a byte":
        data[len(data) // 2] ^= 1
    elif change == "the end":
        del data[-12:]
    else:
        data += zstandard.ZstdCompressor(write_checksum=True).compress(b"S\tintruder\n")
    path.write_bytes(bytes(data))
    earlier = PreviousManifest(path, sha256=digest)
    assert earlier.damaged is not None
    assert earlier.section("a") is None
    if change in ("digest", "appended"):  # every frame intact: only the digest tells
        assert "sha256" in earlier.damaged


def test_each_message_directory_has_a_frame_read_only_for_its_records(tmp_path: Path) -> None:
    """A night that lists one folder reads that folder's records, not its mailbox's; and a
    moved message is looked for everywhere but in the folders it cannot have left."""
    path = tmp_path / "m.zst"
    writer = ManifestWriter(path)
    folders = {d: [record(f"u/{d}/{n}.M{d[1]},S=5:2,S") for n in range(3)]
               for d in (".A/cur", ".B/cur", ".B/new")}
    writer.section("u", ["D\tu\t700\t0\t0\t1\t1\t1\n", record("u/dovecot-uidlist")], (10, 50, 9),
                   [MessageFrame(f"u/{d}", 3, 15, 3, lines) for d, lines in folders.items()])
    writer.close()
    section = PreviousManifest(path).section("u")
    assert section is not None and section.records == 2 + 1 + 3 + 9  # D, F, C, 3 M, 9
    assert [f.directory for f in section.frames] == ["u/.A/cur", "u/.B/cur", "u/.B/new"]
    assert section.frame_of("u/.B/cur") is not None and section.frame_of("u/.C/cur") is None
    assert section.tail("u/dovecot-uidlist") is not None and section.frames_read == 0
    assert list(section.records_in("u/.B/cur")) == [f"u/.B/cur/{n}.MB,S=5:2,S"
                                                    for n in range(3)]
    assert section.frames_read == 1
    assert section.tail("u/.B/cur/1.MB,S=5:2,S") is not None and section.frames_read == 1
    assert section.records_in("u/.C/cur") == {}
    section.settled = frozenset({"u/.A/cur"})
    assert section.by_base("0.MA,S=5") == []  # .A/cur did not change: nothing left it
    assert section.by_base("2.MB,S=5") == ["u/.B/cur/2.MB,S=5:2,S", "u/.B/new/2.MB,S=5:2,S"]
    assert section.frames_read == 2  # .B/new; .A/cur never
    assert len(section.files) == 10


def test_a_version_1_manifest_is_still_read(tmp_path: Path) -> None:
    """Backups made before the frame per directory: one frame for a section's messages."""
    compress = zstandard.ZstdCompressor(write_checksum=True).compress
    messages = [record(f"u/cur/{n}.M1,S=5:2,S") for n in range(3)]
    path = tmp_path / "m.zst"
    path.write_bytes(b"".join(compress(text.encode()) for text in (
        f"{MAGIC}\t1\n",
        "S\tu\nD\tu/cur\t700\t0\t0\t1\t1\t1\n" + record("u/dovecot-uidlist") + "C\t4\t20\t3\n"
        "M\t3\n",
        "".join(messages),
        "E\t8\n")))
    earlier = PreviousManifest(path)
    section = earlier.section("u")
    assert earlier.damaged is None and section is not None
    assert section.frames[0].directory is None and section.counts == (4, 20, 3)
    assert sorted(section.records_in("u/cur")) == [f"u/cur/{n}.M1,S=5:2,S" for n in range(3)]
    assert section.in_directory("u") == ["u/dovecot-uidlist"]
    assert section.by_base("1.M1,S=5") == ["u/cur/1.M1,S=5:2,S"]
    assert section.tail("u/cur/2.M1,S=5:2,S") == messages[2].split("\t", 3)[3].rstrip("\n")
