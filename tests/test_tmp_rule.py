"""Issue #7: only the tmp/ *of a Maildir* is left out of a backup, by one rule for every copier.

The old built-in exclude ``tmp/*`` dropped every directory called ``tmp``: a user called ``tmp``
lost the whole mailbox with exit 0, and a LAYOUT=fs folder ``Projects/tmp`` was dropped by the
rsync copier but kept by the live one. These tests pin the rule (``mailsnap.maildirs``), the
survey built on it, the anchored rsync rules, and the parity of both copiers on one tree.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import stat
import subprocess
import sys
import tempfile

import pytest

from mailsnap.config import DEFAULT_EXCLUDES, one_off_job
from mailsnap.copiers.maildir import MaildirCopier
from mailsnap.copiers.rsync import RsyncCopier, tmp_rule
from mailsnap.errors import CopyFailed
from mailsnap.maildirs import count_messages, is_maildir, survey
from mailsnap.pipeline import run_backup
from mailsnap.runner import Runner
from tests.helpers.fake_runner import FakeRunner
from tests.helpers.loopfs import BtrfsVolume

MESSAGE = "1.M1P1.h,S=3:2,S"
HALF_WRITTEN = "2.M2P1.h"  # a delivery still being written in tmp/
ODD = ("Café & Co", 'say "hi"', "a*b", "[x]", "back\\slash", "q?", "line\nbreak", "sp ace")
NOT_UTF8 = os.fsdecode(b"caf\xe9-latin1")  # a surrogate-escaped str, as os.scandir gives it


def maildir(path: Path, *, messages: int = 1, half_written: bool = True) -> Path:
    """A Maildir with ``messages`` in cur/, one in new/, a half-written delivery in tmp/ and
    Dovecot's lock file."""
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for n in range(messages):
        (path / "cur" / f"{n}.M{n}P1.h,S=3:2,S").write_bytes(os.fsencode(f"cur {path.name} {n}"))
    (path / "new" / "9.M9P1.h").write_bytes(b"new")
    if half_written:
        (path / "tmp" / HALF_WRITTEN).write_bytes(b"half")
    (path / "dovecot-uidlist").write_text("3 V1 N1\n")
    (path / "dovecot-uidlist.lock").write_text("")
    return path


def rels(root: Path, paths: list[Path]) -> list[str]:
    return sorted(str(p.relative_to(root)) if p != root else "" for p in paths)


# -- is_maildir ------------------------------------------------------------------------------


def test_maildir_root(tmp_path: Path) -> None:
    assert is_maildir(maildir(tmp_path / "M"))


def test_cur_and_new_without_tmp_is_a_maildir(tmp_path: Path) -> None:
    (tmp_path / "cur").mkdir()
    (tmp_path / "new").mkdir()
    assert is_maildir(tmp_path)


@pytest.mark.parametrize("missing", ["cur", "new"])
def test_cur_or_new_missing_is_not_a_maildir(tmp_path: Path, missing: str) -> None:
    maildir(tmp_path / "M")
    for entry in (tmp_path / "M" / missing).iterdir():
        entry.unlink()
    (tmp_path / "M" / missing).rmdir()
    assert not is_maildir(tmp_path / "M")


def test_cur_as_a_file_is_not_a_maildir(tmp_path: Path) -> None:
    (tmp_path / "cur").write_text("")
    (tmp_path / "new").mkdir()
    assert not is_maildir(tmp_path)


def test_domain_with_users_cur_and_new_is_not_a_maildir(tmp_path: Path) -> None:
    domain = tmp_path / "example.com"
    for user in ("cur", "new", "tmp"):
        maildir(domain / user / "Maildir")
    assert not is_maildir(domain)
    assert is_maildir(domain / "cur" / "Maildir")


def test_symlinked_cur_and_new_are_not_followed(tmp_path: Path) -> None:
    real = maildir(tmp_path / "real")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "cur").symlink_to(real / "cur")
    (fake / "new").symlink_to(real / "new")
    assert not is_maildir(fake)


# -- survey ----------------------------------------------------------------------------------


def test_survey_of_a_maildir_root_with_folders(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir", messages=2)
    maildir(root / ".Work")  # Maildir++
    maildir(root / ".tmp")  # a Maildir++ folder called "tmp"
    maildir(root / "Projects" / "tmp")  # LAYOUT=fs: Projects is no Maildir, Projects/tmp is
    found = survey(root, DEFAULT_EXCLUDES)
    assert found.maildirs == ("", ".Work", ".tmp", "Projects/tmp")
    assert found.messages == 3 + 2 + 2 + 2
    # Per Maildir: messages + dovecot-uidlist; the lock file is excluded, tmp/ left out.
    assert found.files == found.messages + 4
    assert count_messages(root) == found.messages


def test_survey_of_a_domain_with_users_named_like_maildir_dirs(tmp_path: Path) -> None:
    domain = tmp_path / "S" / "example.com"
    users = ("alice", "tmp", "new", "cur", "courierimapkeywords")
    for user in users:
        maildir(domain / user / "Maildir")
    (domain / "tmp" / ".forward").write_text("tmp@example.org\n")  # a home's own file
    found = survey(tmp_path / "S", DEFAULT_EXCLUDES)
    assert found.maildirs == tuple(sorted(f"example.com/{u}/Maildir" for u in users))
    assert found.messages == 2 * len(users)
    assert found.files == 3 * len(users) + 1


def test_survey_counts_the_content_of_a_tmp_that_is_not_a_maildirs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    maildir(home / "Maildir")
    (home / "tmp").mkdir()
    (home / "tmp" / "draft.txt").write_bytes(b"12345")
    found = survey(home, ())
    assert found.maildirs == ("Maildir",)
    # 2 messages, dovecot-uidlist, the lock file (no excludes), and tmp/draft.txt.
    assert found.files == 5
    assert found.bytes == sum(
        p.stat().st_size for p in home.rglob("*") if p.is_file() and "Maildir/tmp" not in str(p))


def test_survey_of_odd_names(tmp_path: Path) -> None:
    root = tmp_path / "S"
    for name in (*ODD, NOT_UTF8):
        maildir(root / name / "Maildir")
    found = survey(root, DEFAULT_EXCLUDES)
    assert found.maildirs == tuple(sorted(f"{n}/Maildir" for n in (*ODD, NOT_UTF8)))
    assert found.messages == 2 * (len(ODD) + 1)


def test_survey_of_an_empty_tree(tmp_path: Path) -> None:
    found = survey(tmp_path, DEFAULT_EXCLUDES)
    assert (found.maildirs, found.messages, found.files, found.bytes) == ((), 0, 0, 0)


def test_survey_does_not_follow_symlinked_directories(tmp_path: Path) -> None:
    elsewhere = maildir(tmp_path / "elsewhere", messages=5)
    root = tmp_path / "S"
    maildir(root / "alice")
    (root / "bob").symlink_to(elsewhere)
    found = survey(root, DEFAULT_EXCLUDES)
    assert found.maildirs == ("alice",)
    assert found.messages == 2


def test_survey_applies_user_excludes(tmp_path: Path) -> None:
    root = maildir(tmp_path / "Maildir")
    maildir(root / ".Trash", messages=7)
    found = survey(root, (*DEFAULT_EXCLUDES, "/.Trash/"))
    assert found.maildirs == ("",)
    assert found.messages == 2


def test_survey_of_an_unreadable_directory_fails_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "S"
    maildir(root / "alice")
    locked = root / "bob"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path: str) -> object:  # root reads everything: refuse like a 0700 dir would
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(CopyFailed, match=r"cannot read .*/bob: Permission denied"):
        survey(root, ())


def test_survey_of_a_missing_root_fails(tmp_path: Path) -> None:
    with pytest.raises(CopyFailed, match="No such file"):
        survey(tmp_path / "nowhere", ())


# -- rsync rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maildir_rel", "rule"),
    [
        ("", "/tmp/*"),
        ("example.com/tmp/Maildir", "/example.com/tmp/Maildir/tmp/*"),
        ("a*b/[x]", "/a\\*b/\\[x]/tmp/*"),
        ("back\\slash/q?", "/back\\\\slash/q\\?/tmp/*"),
        ("line\nbreak/Café & Co", "/line\nbreak/Café & Co/tmp/*"),
    ],
)
def test_tmp_rule(maildir_rel: str, rule: str) -> None:
    assert tmp_rule(maildir_rel) == rule


def test_rsync_argv_with_rules_file() -> None:
    argv = RsyncCopier(Runner()).argv(
        Path("/run/mailsnap/mail/snap/Maildir"), Path("/backup/mail/2026.partial/mail"),
        Path("/backup/mail/2026-01/mail"), DEFAULT_EXCLUDES,
        exclude_from=Path("/tmp/mailsnap-rsync-x.exclude"),
    )
    assert argv == [
        "rsync", "-aHAX", "--numeric-ids", "--stats",
        "--link-dest=/backup/mail/2026-01/mail",
        "--from0", "--exclude-from=/tmp/mailsnap-rsync-x.exclude",
        "--exclude=dovecot-uidlist.lock", "--exclude=dovecot-keywords.lock",
        "/run/mailsnap/mail/snap/Maildir/", "/backup/mail/2026.partial/mail/",
    ]


def test_rsync_argv_without_rules_file() -> None:
    argv = RsyncCopier(Runner()).argv(Path("/src"), Path("/dst"), None, ("*.bak",))
    assert argv == ["rsync", "-aHAX", "--numeric-ids", "--stats", "--exclude=*.bak",
                    "/src/", "/dst/"]


def test_rsync_copy_hands_rsync_one_rule_per_maildir(tmp_path: Path) -> None:
    root = tmp_path / "S"
    for user in ("alice", "tmp"):
        maildir(root / "example.com" / user / "Maildir")
    runner = FakeRunner()
    rules: list[bytes] = []

    def read_rules() -> None:
        (argv,) = runner.ran()
        path = next(a for a in argv.split(" ") if a.startswith("--exclude-from="))
        rules.append(Path(path.split("=", 1)[1]).read_bytes())

    runner.on("rsync", effect=read_rules)
    RsyncCopier(runner).copy(root, tmp_path / "dest", previous=None, excludes=DEFAULT_EXCLUDES)
    rules_path = Path(runner.calls[0].argv[5].split("=", 1)[1])
    assert runner.calls[0].argv[:6] == (
        "rsync", "-aHAX", "--numeric-ids", "--stats", "--from0", f"--exclude-from={rules_path}")
    assert rules_path.parent == Path(tempfile.gettempdir())
    assert rules == [b"/example.com/alice/Maildir/tmp/*\0/example.com/tmp/Maildir/tmp/*\0"]
    assert not rules_path.exists()


def test_rsync_copy_removes_the_rules_file_when_rsync_fails(tmp_path: Path) -> None:
    maildir(tmp_path / "Maildir")
    runner = FakeRunner()
    runner.on("rsync", exit_code=23, stderr="rsync: some files could not be transferred")
    with pytest.raises(CopyFailed, match="some files could not be read or written"):
        RsyncCopier(runner).copy(tmp_path / "Maildir", tmp_path / "dest", previous=None,
                                 excludes=())
    rules_path = Path(runner.calls[0].argv[5].split("=", 1)[1])
    assert runner.calls[0].argv[4] == "--from0" and not rules_path.exists()


def test_rsync_copy_of_a_tree_without_maildirs_needs_no_rules_file(tmp_path: Path) -> None:
    runner = FakeRunner()
    RsyncCopier(runner).copy(tmp_path, tmp_path / "dest", previous=None, excludes=())
    assert runner.ran() == [f"rsync -aHAX --numeric-ids --stats {tmp_path}/ {tmp_path}/dest/"]


@pytest.mark.parametrize("mounted", [True, False])
def test_rsync_dry_run_writes_no_rules_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mounted: bool
) -> None:
    # A dry run of a snapshot backend never mounts the snapshot: its mount point may be
    # missing. The survey is read-only and runs where it can; nothing is written either way.
    source = tmp_path / "mnt"
    if mounted:
        maildir(source)
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: pytest.fail("wrote a rules file"))
    runner = FakeRunner(dry_run=True)
    RsyncCopier(runner).copy(source, tmp_path / "dest", previous=None, excludes=())
    assert [c.skipped for c in runner.calls] == [True]
    assert runner.calls[0].argv == (
        "rsync", "-aHAX", "--numeric-ids", "--stats", f"{source}/", f"{tmp_path}/dest/")


# -- both copiers on one tree ----------------------------------------------------------------


def build_tree(root: Path) -> dict[str, list[Path]]:
    """Everything issue #7 is about, in one tree: a root Maildir with Maildir++ and LAYOUT=fs
    folders, a domain with users called tmp/new/cur/courierimapkeywords, odd names (with decoys
    that an unescaped rsync rule would match instead), a non-UTF-8 name, a symlink."""
    maildirs = [maildir(root)]
    maildirs.append(maildir(root / ".Work"))
    maildirs.append(maildir(root / ".tmp"))
    maildirs.append(maildir(root / "Projects" / "tmp"))
    domain = root / "example.com"
    for user in ("alice", "tmp", "new", "cur", "courierimapkeywords"):
        maildirs.append(maildir(domain / user / "Maildir"))
    for name in (*ODD, NOT_UTF8):
        maildirs.append(maildir(root / "odd" / name))
    plain_tmps = [domain / "tmp" / "tmp", domain / "alice" / "tmp"]
    # Decoys: what "/odd/a*b/tmp/*", "/odd/[x]/tmp/*", "/odd/back\slash/tmp/*" and
    # "/odd/q?/tmp/*" would match if rsync read them unescaped.
    plain_tmps += [root / "odd" / d / "tmp" for d in ("aZb", "x", "backslash", "qz")]
    for tmp in plain_tmps:
        tmp.mkdir(parents=True)
        (tmp / "keep-me.txt").write_text(f"not a Maildir's tmp: {tmp}")
    (domain / "alice" / ".forward").write_text("alice@example.org\n")
    (root / "link-to-alice").symlink_to(domain / "alice")
    return {"maildirs": maildirs, "plain_tmps": plain_tmps}


def snapshot_of(root: Path) -> dict[str, tuple[str, bytes]]:
    """relative path → (kind, content) for everything below ``root``, symlinks not followed."""
    out: dict[str, tuple[str, bytes]] = {}
    pending = [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                rel = os.path.relpath(entry.path, root)
                if entry.is_symlink():
                    out[rel] = ("link", os.fsencode(os.readlink(entry.path)))
                elif entry.is_dir():
                    out[rel] = ("dir", b"")
                    pending.append(Path(entry.path))
                else:
                    out[rel] = ("file", Path(entry.path).read_bytes())
    return out


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, dict[str, list[Path]]]]:
    root = tmp_path / "src"
    yield root, build_tree(root)


def test_survey_of_the_whole_tree(tree: tuple[Path, dict[str, list[Path]]]) -> None:
    root, made = tree
    found = survey(root, DEFAULT_EXCLUDES)
    assert found.maildirs == tuple(rels(root, made["maildirs"]))


@pytest.mark.usefixtures("need_rsync")
def test_both_copiers_copy_the_same_tree(
    tree: tuple[Path, dict[str, list[Path]]], tmp_path: Path
) -> None:
    root, made = tree
    live, frozen = tmp_path / "live", tmp_path / "rsync"
    live.mkdir()
    frozen.mkdir()
    live_stats = MaildirCopier(Runner()).copy(
        root, live, previous=None, excludes=DEFAULT_EXCLUDES)
    rsync_stats = RsyncCopier(Runner()).copy(
        root, frozen, previous=None, excludes=DEFAULT_EXCLUDES)

    copied = snapshot_of(live)
    assert copied == snapshot_of(frozen)
    found = survey(root, DEFAULT_EXCLUDES)
    regular = [rel for rel, (kind, _) in copied.items() if kind == "file"]
    assert live_stats.files == rsync_stats.files == found.files == len(regular)
    assert live_stats.bytes == found.bytes == sum(
        len(content) for kind, content in copied.values() if kind == "file")
    # rsync's "Total file size" also counts a symlink's length (its target's name).
    links = sum(len(content) for kind, content in copied.values() if kind == "link")
    assert rsync_stats.bytes == found.bytes + links
    for directory in made["maildirs"]:
        rel = directory.relative_to(root)
        assert (live / rel / "tmp").is_dir(), rel
        assert not any((live / rel / "tmp").iterdir()), rel
        assert (live / rel / "cur" / "0.M0P1.h,S=3:2,S").is_file(), rel
    for tmp in made["plain_tmps"]:
        assert (live / tmp.relative_to(root) / "keep-me.txt").is_file(), tmp
    assert not [rel for rel in copied if rel.endswith(".lock")]
    # Everything else in the source is there, byte for byte.
    source = snapshot_of(root)
    dropped = {rel for rel in source if rel not in copied}
    assert all(rel.endswith(".lock") or rel.endswith(f"/tmp/{HALF_WRITTEN}")
               or rel == f"tmp/{HALF_WRITTEN}" for rel in dropped), dropped
    assert all(source[rel] == copied[rel] for rel in copied)


@pytest.mark.usefixtures("need_rsync")
def test_rsync_rules_file_is_private_and_removed(
    tree: tuple[Path, dict[str, list[Path]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _made = tree
    seen: list[tuple[int, bytes]] = []
    seen_path: list[Path] = []
    runner = Runner()
    real_run = runner.run

    def run(argv: list[str], **kwargs: object) -> object:
        rules = Path(next(a for a in argv if a.startswith("--exclude-from=")).split("=", 1)[1])
        seen.append((stat.S_IMODE(rules.stat().st_mode), rules.read_bytes()))
        assert root not in rules.parents and tmp_path / "dest" not in rules.parents
        seen_path.append(rules)
        return real_run(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "run", run)
    (tmp_path / "dest").mkdir()
    RsyncCopier(runner).copy(root, tmp_path / "dest", previous=None, excludes=DEFAULT_EXCLUDES)
    ((mode, content),) = seen
    assert mode == 0o600
    assert content.endswith(b"\0") and b"/odd/line\nbreak/tmp/*\0" in content
    assert b"/odd/caf\xe9-latin1/tmp/*\0" in content  # the original bytes, not UTF-8
    assert not seen_path[0].exists()


# -- issue #7 end to end, as reported ----------------------------------------------------------


def _reported_store(btrfs: BtrfsVolume) -> Path:
    """``mkdir -p S/example.com/{alice,tmp}/Maildir/{cur,new,tmp}``, one message each."""
    source = btrfs.mail / "S"
    for user in ("alice", "tmp"):
        home = source / "example.com" / user / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (home / sub).mkdir(parents=True)
        (home / "cur" / MESSAGE).write_text(f"Subject: for {user}\n\nhi\n")
        (home / "tmp" / HALF_WRITTEN).write_text("half-writ")
    return source


@pytest.mark.privileged
@pytest.mark.usefixtures("need_rsync")
@pytest.mark.parametrize("backend", ["btrfs", "live"])
def test_issue_7_user_called_tmp_is_backed_up(
    btrfs: BtrfsVolume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path / "run"))
    source = _reported_store(btrfs)
    job = one_off_job(name="mail", source=source, target=tmp_path / "T", backend=backend)
    report = run_backup(job, Runner())
    mail = Path(report.backup or "") / "mail" / "example.com"
    for user in ("alice", "tmp"):
        assert (mail / user / "Maildir" / "cur" / MESSAGE).read_text().startswith("Subject")
        assert (mail / user / "Maildir" / "tmp").is_dir()
        assert not (mail / user / "Maildir" / "tmp" / HALF_WRITTEN).exists()
    assert report.messages == 2


@pytest.mark.privileged
def test_issue_7_through_the_cli(
    btrfs: BtrfsVolume, tmp_path: Path
) -> None:
    source = _reported_store(btrfs)
    target = tmp_path / "T"
    env = {**os.environ, "MAILSNAP_RUN_DIR": str(tmp_path / "run")}
    done = subprocess.run(
        [sys.executable, "-m", "mailsnap", "backup", "--source", str(source),
         "--target", str(target), "--backend", "live"],
        capture_output=True, text=True, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr
    # TARGET/<job>/<run id>/mail/…, also reached through TARGET/<job>/latest.
    found = target.glob(f"*/*/mail/example.com/*/Maildir/cur/{MESSAGE}")
    assert {p.parents[2].name for p in found} == {"alice", "tmp"}, done.stderr
    assert not list(target.glob(f"*/*/mail/example.com/*/Maildir/tmp/{HALF_WRITTEN}"))
