"""Backups as btrfs subvolumes on a btrfs target (``target_snapshots = "auto"``, issue #12),
with folder-level change detection, on real file systems (privileged tier): the source is a
btrfs subvolume on one loop device (backend btrfs), the target the top level of a second btrfs
file system, as a backup disk would be.

Each backup must be exactly its snapshot (names, content, modes, owners, times, hard-link
structure: tests/helpers/trees.py), a read-only subvolume, and the previous backup must be
left as it was. The night's changes come from tests/test_incremental_btrfs.py's day of
Dovecot, plus a folder renamed, a folder deleted, and a file that became a directory.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import errno
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest

from mailsnap.manifest import read_records
from tests.helpers.loopfs import BtrfsVolume, btrfs_volume, subvolumes
from tests.helpers.maildir_writer import seed
from tests.helpers.sshd import Sshd
from tests.helpers.trees import diff_trees, snapshot_tree
from tests.test_incremental_btrfs import (
    ALICE,
    BOB,
    JOERG,
    PLANS,
    build_store,
    change_store,
    deliver,
    flagged,
    maildir,
    names,
    own,
)

pytestmark = [pytest.mark.privileged]

JOB = "mail"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[BtrfsVolume]:
    """A second btrfs file system: the backup disk."""
    work = tmp_path / "disk"
    work.mkdir()
    with btrfs_volume(work) as volume:
        yield volume


@pytest.fixture
def source(btrfs: BtrfsVolume) -> Path:
    return btrfs.mail / "S"


def age(root: Path, seconds: float = 3600) -> None:
    """Every directory last changed an hour ago (its ctime stays now)."""
    then = time.time() - seconds
    for dirpath, _dirs, _files in os.walk(root):
        os.utime(dirpath, (then, then), follow_symlinks=False)


def configure(tmp_path: Path, source: Path, target: Path, **extra: Any) -> Path:
    lines = [f"name = {json.dumps(JOB)}", f"source = {json.dumps(str(source))}",
             f"target = {json.dumps(str(target))}", 'backend = "btrfs"',
             f"run_dir = {json.dumps(str(tmp_path / 'run'))}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    path = tmp_path / "mailsnap.toml"
    path.write_text("[[job]]\n" + "\n".join(lines) + "\n")
    return path


def run(config: Path, *args: str, env: dict[str, str] | None = None,
        ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "mailsnap", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, **(env or {})},
    )
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def backup(config: Path, **kw: Any) -> tuple[dict[str, Any], str]:
    done = run(config, "backup", "--json", **kw)
    (entry,) = json.loads(done.stdout)["jobs"]
    assert entry["status"] == "ok", done.stderr
    return entry, done.stderr


def exact(source: Path, backup_dir: Path) -> None:
    differences = diff_trees(source, backup_dir / "mail")
    assert not differences, "\n".join(differences)  # every line, not pytest's first


def read_only(path: Path) -> bool:
    out = subprocess.run(["btrfs", "property", "get", "-ts", str(path), "ro"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip() == "ro=true"


def is_subvolume(path: Path) -> bool:
    return os.lstat(path).st_ino == 256 and os.lstat(path).st_dev != os.lstat(path.parent).st_dev


def image(path: Path) -> dict[str, Any]:
    """Everything about a backup that must not change once it is published."""
    tree = snapshot_tree(path / "mail", excludes=())
    return {rel: (e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.sha256, e.target)
            for rel, e in tree.entries.items()}


def test_each_backup_is_a_read_only_subvolume_holding_exactly_its_snapshot(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    copies = build_store(source)
    age(source)
    config = configure(tmp_path, source, disk.top / "backups")
    first, _ = backup(config)
    b1 = Path(first["backup"])
    assert is_subvolume(b1) and read_only(b1)
    exact(source, b1)
    before = image(b1)
    grown = [source / maildir(ALICE) / name for name in ("dovecot.index.log", "dovecot-uidlist")]
    old_sizes = sum(path.stat().st_size for path in grown)

    changes = change_store(source, copies)
    # Dovecot appended to the INBOX's index log and uidlist: only what is new is written.
    written = changes.written(source) - old_sizes
    # A folder renamed (Dovecot's RENAME), one deleted, a file that became a directory.
    os.rename(source / maildir(BOB, ".Sent"), source / maildir(BOB, ".Sent Items"))
    shutil.rmtree(source / maildir(JOERG, PLANS))
    sieve = source / ALICE / "sieve" / "main.sieve"
    sieve.unlink()
    sieve.mkdir()
    own(sieve, 0o700)
    second, err = backup(config)
    b2 = Path(second["backup"])
    assert is_subvolume(b2) and read_only(b2)
    assert f"btrfs subvolume snapshot {b1} {b2.parent / (b2.name + '.partial')}" in err
    exact(source, b2)
    assert image(b1) == before  # the previous backup is untouched

    copy = second["copy"]
    # Untouched users' folders were taken over unlisted; the changed ones listed.
    assert copy["folders_unchanged"] > 0 and copy["folders_listed"] > 0
    assert copy["bytes_written"] == written
    assert copy["appended"] == 2
    assert copy["renames"] >= len(changes.renamed)
    assert copy["removed"] > 0  # expunged messages, the deleted folder, the old .Sent
    # A renamed message is the same file as before: a snapshot keeps inode numbers.
    for old, now in changes.renamed:
        if (source / now).exists():
            assert os.lstat(b2 / "mail" / now).st_ino == os.lstat(b1 / "mail" / old).st_ino

    # The backup proves itself against its manifest, deep.
    done = run(config, "verify", "--all", "--deep", "--json")
    report = json.loads(done.stdout)
    assert len(report["backups"]) == 2
    assert [p for b in report["backups"] for p in b["problems"]] == [], done.stdout


def test_appended_index_files_write_only_what_was_appended(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    """Dovecot appends to dovecot.index.log and dovecot.index.cache: the backup grows its
    copy (a snapshot of the previous one) by the new bytes, after proving the old part by the
    previous record's sha256. A file rewritten under a longer content is copied whole, and the
    previous backup keeps its own version of both."""
    build_store(source)
    age(source)
    config = configure(tmp_path, source, disk.top / "backups")
    first, _ = backup(config)
    b1 = Path(first["backup"])
    before = image(b1)
    appended = source / maildir(ALICE) / "dovecot.index.log"
    with appended.open("ab") as handle:
        handle.write(b"\x04flag change record\n" * 50)  # 1,000 bytes
    rewritten = source / maildir(BOB) / "dovecot.index.log"
    old = rewritten.read_bytes()
    rewritten.write_bytes(b"\x09" + old[1:] + b"more")  # longer, but its start changed too
    second, _ = backup(config)
    b2 = Path(second["backup"])
    copy = second["copy"]
    assert (copy["appended"], copy["copied"]) == (1, 1)
    assert copy["bytes_written"] == 1000 + len(old) + 4
    exact(source, b2)
    assert image(b1) == before  # the previous backup keeps the log as it was
    hows = {r[1]: r[2] for r in read_records(b2 / "manifest.zst") if r[0] == "F"}
    assert hows[f"{maildir(ALICE)}/dovecot.index.log"] == "appended"
    assert hows[f"{maildir(BOB)}/dovecot.index.log"] == "copied"
    third, _ = backup(config)  # nothing changed: linked, not appended again
    assert (third["copy"]["appended"], third["copy"]["bytes_written"]) == (0, 0)
    exact(source, Path(third["backup"]))
    done = run(config, "verify", "--all", "--deep", "--json")
    assert [p for b in json.loads(done.stdout)["backups"] for p in b["problems"]] == []


def test_a_quiet_night_lists_no_folder_and_writes_nothing(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    build_store(source)
    age(source)
    config = configure(tmp_path, source, disk.top / "backups")
    checks = json.loads(run(config, "check", "--json").stdout)["checks"]
    (kind,) = [c["detail"] for c in checks if c["check"] == "backups"]
    assert kind.startswith("btrfs subvolumes") and "listed every 7d" in kind
    first, _ = backup(config)
    second, _ = backup(config)
    copy = second["copy"]
    assert copy["folders_listed"] == 0 and copy["folders_unchanged"] > 0
    assert (copy["copied"], copy["bytes_written"], copy["removed"]) == (0, 0, 0)
    assert (second["messages"], second["files"], second["bytes"]) == (
        first["messages"], first["files"], first["bytes"])
    exact(source, Path(second["backup"]))
    # Every mailbox was as it was: each manifest section is the previous one, whole.
    b1, b2 = Path(first["backup"]), Path(second["backup"])
    assert read_records(b2 / "manifest.zst")[:-1] == read_records(b1 / "manifest.zst")[:-1]
    done = run(config, "verify", "--deep", "--json")
    assert [p for b in json.loads(done.stdout)["backups"] for p in b["problems"]] == []


def test_prune_deletes_whole_subvolumes(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    build_store(source)
    config = configure(tmp_path, source, disk.top / "backups", keep_last=1)
    first, _ = backup(config)
    deliver(source, maildir(ALICE), 40, 1200)
    second, err = backup(config)
    b1, b2 = Path(first["backup"]), Path(second["backup"])
    assert second["pruned"] == [b1.name]
    assert f"btrfs subvolume delete {b1}  " in err  # at once: atomic, no rename first
    assert not b1.exists() and not b1.with_name(b1.name + ".deleting").exists()
    assert [p for p in subvolumes(disk.top) if p.startswith("backups/")] == [
        f"backups/{JOB}/{b2.name}"]
    exact(source, b2)


def test_a_hard_link_store_turns_into_subvolumes_without_writing_its_data(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    build_store(source)
    target = disk.top / "backups"
    first, _ = backup(configure(tmp_path, source, target, target_snapshots="never"))
    b1 = Path(first["backup"])
    assert not is_subvolume(b1)
    deliver(source, maildir(ALICE), 41, 3000)
    second, err = backup(configure(tmp_path, source, target))
    b2 = Path(second["backup"])
    assert is_subvolume(b2) and "become btrfs subvolumes" in err
    assert second["copy"]["bytes_written"] == 3000  # the rest is cloned from the old tree
    exact(source, b2)
    third, _ = backup(configure(tmp_path, source, target))
    assert third["copy"]["bytes_written"] == 0
    exact(source, Path(third["backup"]))


def test_a_run_killed_mid_copy_leaves_the_previous_backup_as_it_was(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    build_store(source)
    config = configure(tmp_path, source, disk.top / "backups")
    first, _ = backup(config)
    b1 = Path(first["backup"])
    before = image(b1)
    # Changes the killed run has started to apply: 40 MiB of new mail keep it copying
    # until the fault fires, an expunged folder.
    for number in range(50, 90):
        deliver(source, maildir(BOB), number, 1 << 20)
    shutil.rmtree(source / maildir(ALICE, ".Archive"))
    killed = run(config, "backup", env={"MAILSNAP_FAULT": "mid-copy:SIGKILL"}, ok=False)
    assert killed.returncode == -9
    partials = list(b1.parent.glob("*.partial"))
    assert partials and all(is_subvolume(p) for p in partials)
    assert image(b1) == before
    second, err = backup(config)
    assert "left by an interrupted run" in err
    assert not list(b1.parent.glob("*.partial"))
    assert [p for p in subvolumes(disk.top) if p.endswith(".partial")] == []
    exact(source, Path(second["backup"]))
    assert image(b1) == before


def test_a_damaged_manifest_in_the_previous_subvolume_means_a_full_copy(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    build_store(source)
    config = configure(tmp_path, source, disk.top / "backups")
    first, _ = backup(config)
    b1 = Path(first["backup"])
    subprocess.run(["btrfs", "property", "set", "-ts", str(b1), "ro", "false"], check=True)
    manifest = b1 / "manifest.zst"
    os.truncate(manifest, manifest.stat().st_size // 2)
    (b1 / "mail" / maildir(ALICE) / "cur" / "stray-file").write_text("not in the manifest")
    deliver(source, maildir(BOB), 60, 2500)
    second, err = backup(config)
    assert "full copy" in err
    assert second["copy"]["linked"] == 0
    exact(source, Path(second["backup"]))


def test_a_delivery_right_after_the_snapshot_is_in_the_next_backup(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    """The after_snapshot hook delivers a message the instant the snapshot is taken, in the
    same second: the first backup must not have it, the next one must (its folder's mtime
    is within the clock slack of the first copy, so it is listed however it looks)."""
    build_store(source)
    age(source)
    inbox = source / maildir(ALICE)
    name = "1800000001.M1P1.late,S=11"
    script = ("import os, sys; d = sys.argv[1]; "
              f"open(os.path.join(d, 'tmp', {name!r}), 'w').write('late mail\\n\\n'[:11]); "
              f"os.rename(os.path.join(d, 'tmp', {name!r}), os.path.join(d, 'new', {name!r}))")
    config = configure(tmp_path, source, disk.top / "backups",
                       after_snapshot=[sys.executable, "-c", script, str(inbox)])
    first, _ = backup(config)
    assert (inbox / "new" / name).exists()
    assert not (Path(first["backup"]) / "mail" / maildir(ALICE) / "new" / name).exists()
    (inbox / "new" / name).unlink()  # the hook must not deliver it again: keep it out
    second_config = configure(tmp_path, source, disk.top / "backups")
    deliver_again = inbox / "tmp" / name
    deliver_again.write_text("late mail\n\n"[:11])
    os.rename(deliver_again, inbox / "new" / name)
    second, _ = backup(second_config)
    assert (Path(second["backup"]) / "mail" / maildir(ALICE) / "new" / name).exists()
    exact(source, Path(second["backup"]))


def test_a_message_rewritten_in_place_is_found_by_the_full_check(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    """A foreign tool rewrites a message in place (same name and size, new mtime): its folder
    does not change, so a nightly backup keeps the old copy; the full check lists every
    folder and compares every message, and copies it."""
    build_store(source)
    age(source)
    target = disk.top / "backups"
    backup(configure(tmp_path, source, target))
    victim = next((source / maildir(BOB) / "cur").iterdir())
    victim.write_bytes(victim.read_bytes()[::-1])
    nightly, _ = backup(configure(tmp_path, source, target))
    assert nightly["copy"]["folders_listed"] == 0
    full, _ = backup(configure(tmp_path, source, target, full_check_every="0s"))
    assert full["copy"]["folders_unchanged"] == 0
    assert full["copy"]["copied"] == 1
    exact(source, Path(full["backup"]))


@pytest.mark.offsite
def test_an_ssh_destination_links_renamed_messages_from_subvolume_backups(
    btrfs: BtrfsVolume, disk: BtrfsVolume, sshd: Sshd, tmp_path: Path
) -> None:
    """Subvolume backups share no hard links, so the SSH destination finds renamed and moved
    messages by their manifest records instead: they are linked on the remote host, not
    sent again."""
    from datetime import timedelta

    from tests.test_destination_ssh import START, backup_at, job_of, ssh_dest

    source = btrfs.mail / "Maildir"
    seed(source, per_folder=20, size=50_000)
    remote = tmp_path / "remote"
    job = job_of(source, disk.top / "backups", [ssh_dest(sshd, remote)], backend="btrfs")
    first, _ = backup_at(job, START)
    assert is_subvolume(disk.top / "backups" / JOB / first)
    cur = sorted((source / "cur").iterdir())
    for path in cur[:5]:  # flag changes
        path.rename(path.with_name(path.name + "RS" if ":2," in path.name else path.name))
    folder = next(p for p in source.iterdir() if p.name.startswith(".") and p.is_dir())
    cur[5].rename(folder / "cur" / cur[5].name)  # a folder move
    second, results = backup_at(job, START + timedelta(days=1))
    assert results[0]["status"] == "ok"
    local = disk.top / "backups" / JOB / second
    assert is_subvolume(local)
    new = remote / JOB / second / "mail"
    assert diff_trees(local / "mail", new) == []
    assert results[0]["bytes_sent"] < 50_000, results[0]  # no message sent again
    renamed = next(p for p in (new / "cur").iterdir() if p.name.endswith("RS"))
    assert renamed.stat().st_nlink >= 2  # the previous remote backup's file
    assert (new / folder.name / "cur" / cur[5].name).stat().st_nlink >= 2


# -- the worst nights: inputs that vanished or moved whole ----------------------------------


@pytest.mark.parametrize("gone", ["every mailbox", "all but one user"])
def test_a_store_that_vanished_is_refused_and_leaves_the_history_as_it_was(
    source: Path, btrfs: BtrfsVolume, disk: BtrfsVolume, tmp_path: Path, gone: str
) -> None:
    """A mail volume mounted empty, a wrong rm -rf. Empty: refused before any snapshot.
    Most mailboxes gone: the copy has already removed them from the writable snapshot of the
    previous backup when the shrink guard refuses; that .partial goes, the previous
    subvolume is untouched, no snapshot or mount is left."""
    build_store(source)
    config = configure(tmp_path, source, disk.top / "backups")
    first, _ = backup(config)
    b1 = Path(first["backup"])
    before = image(b1)
    for child in list(source.iterdir()):
        if gone == "every mailbox":
            shutil.rmtree(child)
    if gone == "all but one user":
        for user in (ALICE, BOB, JOERG):
            shutil.rmtree(source / user)
    done = run(config, "backup", ok=False)
    assert done.returncode != 0
    said = done.stderr.strip().splitlines()[-1]
    if gone == "every mailbox":
        assert str(source) in said and "it is empty" in said, said
        assert "earlier backups are untouched" in said and "snapshot" not in done.stderr
    else:
        assert "not published" in said and "--allow-shrink" in said, said
        assert "btrfs subvolume snapshot " + str(b1) in done.stderr  # it did start in place
    assert image(b1) == before
    kept = sorted(p.name for p in b1.parent.iterdir() if p.name != ".lock")
    assert kept == [b1.name, "latest"]
    assert [p for p in subvolumes(disk.top) if p.endswith(".partial")] == []
    assert [p for p in subvolumes(btrfs.top) if ".mailsnap" in p] == []
    assert str(tmp_path / "run") not in Path("/proc/self/mounts").read_text()


def test_a_user_renamed_whole_is_backed_up_exactly_and_the_old_name_goes(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    """The admin renamed a user (``alice`` → ``alice.smith``): a mailbox the previous
    manifest does not know. It is copied whole, the old one leaves the new backup only."""
    build_store(source)
    config = configure(tmp_path, source, disk.top / "backups")
    first, _ = backup(config)
    b1 = Path(first["backup"])
    before = image(b1)
    os.rename(source / ALICE, source / (ALICE + ".smith"))
    second, _ = backup(config)
    b2 = Path(second["backup"])
    exact(source, b2)
    assert not (b2 / "mail" / ALICE).exists()
    assert second["copy"]["bytes_written"] > 0 and second["copy"]["removed"] > 0
    assert image(b1) == before
    done = run(config, "verify", "--all", "--deep", "--json")
    assert [p for b in json.loads(done.stdout)["backups"] for p in b["problems"]] == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[BtrfsVolume]:
    """A backup disk that fills up, metadata included, in a second (mixed block groups)."""
    work = tmp_path / "small"
    work.mkdir()
    with btrfs_volume(work, size="160M", mixed=True) as volume:
        yield volume


def fill(path: Path) -> None:
    """Write into ``path`` until the file system has no room left, for data or metadata."""
    path.mkdir()
    with contextlib.suppress(OSError), open(path / "big", "wb") as out:
        while True:
            out.write(bytes(1 << 20))
            out.flush()
            os.fsync(out.fileno())
    number = 0
    try:
        while True:
            (path / str(number)).write_bytes(os.urandom(2000))
            number += 1
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc


def test_a_full_backup_disk_fails_the_night_cleanly_and_prune_still_makes_room(
    source: Path, btrfs: BtrfsVolume, small_disk: BtrfsVolume, tmp_path: Path
) -> None:
    """The backup disk is full, metadata too. The night fails with one line that says so,
    leaving no .partial and the previous backups as they were; ``prune``, what the admin runs
    to make room, still removes a backup (a rename needs metadata space; a subvolume delete
    does not)."""
    build_store(source)
    config = configure(tmp_path, source, small_disk.top / "backups")
    b1 = Path(backup(config)[0]["backup"])
    deliver(source, maildir(ALICE), 40, 1200)
    b2 = Path(backup(config)[0]["backup"])
    before = image(b2)
    fill(small_disk.top / "filler")
    deliver(source, maildir(BOB), 41, 50_000)
    failed = run(config, "backup", ok=False)
    assert failed.returncode != 0
    said = failed.stderr.strip().splitlines()[-1]
    assert "No space left on device" in said, failed.stderr
    assert [p for p in subvolumes(small_disk.top) if p.endswith(".partial")] == []
    assert not list(b2.parent.glob("*.partial")) and image(b2) == before
    assert [p for p in subvolumes(btrfs.top) if ".mailsnap" in p] == []
    assert str(tmp_path / "run") not in Path("/proc/self/mounts").read_text()

    config = configure(tmp_path, source, small_disk.top / "backups", keep_last=1)
    pruned = run(config, "prune", "--json")
    assert json.loads(pruned.stdout)["jobs"][0]["removed"] == [b1.name], pruned.stderr
    assert not b1.exists() and image(b2) == before
    assert [p for p in subvolumes(small_disk.top) if p.startswith("backups/")] == [
        f"backups/{JOB}/{b2.name}"]


def test_users_and_folders_named_tmp_new_and_cur_are_backed_up_exactly(
    source: Path, disk: BtrfsVolume, tmp_path: Path
) -> None:
    """Only a Maildir's own tmp/ is left out: users called tmp, new and cur, and a folder
    named tmp (``.tmp``), are mail like any other, on the first backup and in place after a
    night of renames and deliveries."""
    users = [f"example.com/{name}" for name in ("tmp", "new", "cur")]
    for user in users:
        seed(source / maildir(user), per_folder=4)
    seed(source / maildir(users[0], ".tmp"), per_folder=4)
    for path in [source, *source.rglob("*")]:
        own(path, 0o700 if path.is_dir() else 0o600)
    config = configure(tmp_path, source, disk.top / "backups")
    b1 = Path(backup(config)[0]["backup"])
    exact(source, b1)
    assert list((b1 / "mail" / maildir(users[0], ".tmp") / "cur").iterdir())

    inbox = maildir(users[0])
    for name in names(source, inbox)[:2]:
        os.rename(source / inbox / "cur" / name, source / inbox / "cur" / flagged(name))
    deliver(source, maildir(users[1]), 70, 3000)
    deliver(source, maildir(users[0], ".tmp"), 71, 2000)
    (source / maildir(users[2]) / "tmp" / "half-written").write_bytes(b"x" * 100)
    second, _ = backup(config)
    b2 = Path(second["backup"])
    exact(source, b2)
    assert second["copy"]["renames"] >= 2
    assert not (b2 / "mail" / maildir(users[2]) / "tmp" / "half-written").exists()
    done = run(config, "verify", "--all", "--deep", "--json")
    assert [p for b in json.loads(done.stdout)["backups"] for p in b["problems"]] == []
