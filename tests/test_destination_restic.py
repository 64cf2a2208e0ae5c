"""The restic destination: exact restic command lines against a fake runner (fed restic 0.14's
real output), then real restic against a local directory, SFTP through a real sshd, and S3
against moto_server, all on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
import hashlib
import json
import logging
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from mailsnap.config import DEFAULT_EXCLUDES, Job, ResticDestination, parse_config
from mailsnap.destinations.base import Source, Stored
from mailsnap.destinations.restic import ResticRepository
from mailsnap.destinations.restic_text import (
    file_literal,
    job_exclude,
    literal,
    redact,
    tmp_exclude,
)
from mailsnap.errors import DestinationFailed
from mailsnap.manifest import MANIFEST_FILE, ManifestWriter, escape
from mailsnap.runner import Runner
from tests.helpers.fake_runner import FakeRunner
from tests.helpers.sshd import Sshd, free_port, wait_for_port

RUN1, RUN2 = "20261201T023000Z", "20261202T023000Z"
HOST = "mx1"
REPO = "/srv/restic/mail"
PW = "/etc/mailsnap/restic.pw"

# restic 0.14.0's own output, captured.
SUMMARY = (
    '{"message_type":"status","percent_done":0,"total_files":1,"total_bytes":3}\n'
    '{"message_type":"summary","files_new":2,"files_changed":1,"files_unmodified":997,'
    '"dirs_new":6,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":2,"tree_blobs":7,'
    '"data_added":2803,"total_files_processed":1000,"total_bytes_processed":2048000,'
    '"total_duration":0.221488034,"snapshot_id":"c4e7acb2"}\n'
)
SNAPSHOTS = json.dumps([
    {"time": "2026-12-02T03:30:05.123456789+01:00", "tree": "d9a9", "paths": ["/b/mail"],
     "hostname": HOST, "username": "root", "tags": ["mailsnap", "job=mail", f"run={RUN2}"],
     "id": "bbbbbbbb" + "1" * 56, "short_id": "bbbbbbbb"},
    {"time": "2026-12-01T02:30:04.984326746Z", "tree": "d9a8", "paths": ["/b/mail"],
     "hostname": HOST, "username": "root", "tags": ["mailsnap", "job=mail", f"run={RUN1}"],
     "id": "aaaaaaaa" + "0" * 56, "short_id": "aaaaaaaa"},
])
MISSING = ("Fatal: unable to open config file: stat /srv/restic/mail/config: no such file or "
           "directory\nIs there a repository at the following location?\n/srv/restic/mail\n")
WRONG_PASSWORD = "Fatal: wrong password or no key found\n"
S3_REFUSED = ('Fatal: unable to open config file: Stat: Get "http://127.0.0.1:1/bucket/?location='
              '": dial tcp 127.0.0.1:1: connect: connection refused\nIs there a repository at '
              'the following location?\ns3:http://127.0.0.1:1/bucket\n')
SFTP_REFUSED = ("subprocess ssh: ssh: connect to host 127.0.0.1 port 1: Connection refused\n"
                "Fatal: unable to open repository at sftp:root@127.0.0.1:/x: unable to start "
                "the sftp session, error: EOF\n")
CHECK_DAMAGED = ("Pack ID does not match, want 89b422f564703cc5, got f8982c7fa9b7b88f\n"
                 "Fatal: repository contains errors\n")


def job_of(tmp_path: Path) -> Job:
    return parse_config({"job": [{
        "name": "mail", "backend": "live", "source": str(tmp_path / "live"),
        "target": str(tmp_path / "target"), "run_dir": str(tmp_path / "run")}]}).job[0]


def settings_of(**keys: Any) -> ResticDestination:
    data: dict[str, Any] = {"type": "restic", "name": "offsite", "repository": REPO}
    if "password_command" not in keys and "RESTIC_PASSWORD" not in keys.get("env", {}):
        data["password_file"] = PW
    data.update(keys)
    return ResticDestination.model_validate(data)


def source_of(tree: Path, *, clean: bool, stable: bool, run_id: str = RUN1,
              host: str = HOST) -> Source:
    return Source(tree=tree, clean=clean, stable=stable, local=None, run_id=run_id,
                  excludes=DEFAULT_EXCLUDES, host=host)


def argvs(runner: FakeRunner) -> list[list[str]]:
    return [list(call.argv) for call in runner.calls]


def stored(short: str = "aaaaaaaa", run_id: str | None = RUN1,
           paths: tuple[str, ...] = ("/b/mail",)) -> Stored:
    return Stored(id=short, time=datetime(2026, 12, 1, 2, 30, tzinfo=UTC), run_id=run_id,
                  info={"full_id": short + "0" * 56, "paths": list(paths)})


BASE = ["restic", "-r", REPO, "--password-file", PW]


# -- command level ------------------------------------------------------------------------

def test_backup_of_a_stable_clean_tree(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.on("restic", stdout=SUMMARY)
    repo = ResticRepository(job_of(tmp_path), settings_of(), runner)
    sent = repo.send(source_of(Path("/run/mailsnap/mail/snapshot"), clean=True, stable=True))
    assert argvs(runner) == [[*BASE, "backup", "/run/mailsnap/mail/snapshot", "--json",
                              "--host", HOST, "--tag", "mailsnap", "--tag", "job=mail",
                              "--tag", f"run={RUN1}"]]
    assert (sent.id, sent.files, sent.bytes_sent) == ("c4e7acb2", 1000, 2803)
    assert sent.details["files_new"] == 2
    assert sent.details["files_changed"] == 1
    assert sent.details["files_unmodified"] == 997
    assert sent.details["total_bytes_processed"] == 2048000


def make_tree(root: Path) -> None:
    for folder in ("", ".Sent", ".A $HOME [x]*?"):
        for sub in ("cur", "new", "tmp"):
            (root / folder / sub).mkdir(parents=True)
        (root / folder / "tmp" / "half").write_text("half-written")
    (root / "notes" / "tmp").mkdir(parents=True)  # not a Maildir: its tmp/ is content


def mounted_rules(runner: FakeRunner, mountpoint: Path) -> None:
    """findmnt: nothing at ``mountpoint`` before the bind mount, the bind mount after it."""
    runner.on("findmnt", stdout=json.dumps({"filesystems": [{"target": str(mountpoint)}]}))
    runner.on("findmnt", exit_code=1, times=1)


def test_backup_through_a_read_only_bind_mount_without_tmp_and_locks(tmp_path: Path) -> None:
    tree = tmp_path / "target" / "mail" / RUN1 / "mail"
    make_tree(tree)
    job = job_of(tmp_path)
    mountpoint = job.work_dir / "restic" / "offsite"
    runner = FakeRunner()
    mounted_rules(runner, mountpoint)
    seen: dict[str, Any] = {}

    def capture() -> None:
        argv = runner.calls[-1].argv
        path = Path(argv[argv.index("--exclude-file") + 1])
        seen["path"], seen["mode"] = path, path.stat().st_mode & 0o777
        seen["lines"] = path.read_bytes().decode().splitlines()

    runner.on("restic", stdout=SUMMARY, effect=capture)
    command = ("sh", "-c", "pass show 'mail backup'")
    repo = ResticRepository(job, settings_of(password_command=command), runner)
    repo.send(source_of(tree, clean=False, stable=False))
    m = str(mountpoint)
    expected_backup = [
        "restic", "-r", REPO, "--password-command", "sh -c 'pass show '\"'\"'mail backup'\"'\"''",
        "backup", m, "--json", "--host", HOST, "--tag", "mailsnap", "--tag", "job=mail",
        "--tag", f"run={RUN1}", "--ignore-ctime", "--exclude-file", str(seen["path"]),
        "--exclude=dovecot-uidlist.lock", "--exclude=dovecot-keywords.lock"]
    assert argvs(runner) == [
        ["findmnt", "--json", "--mountpoint", m, "--output", "TARGET"],
        ["mount", "--bind", str(tree), m],
        ["mount", "-o", "remount,bind,ro,nosuid,nodev,noexec", m],
        expected_backup,
        ["umount", m],
    ]
    assert seen["mode"] == 0o600
    assert seen["lines"] == [f"{m}/tmp/*", f"{m}/.A ?HOME \\[x]\\*\\?/tmp/*",
                             f"{m}/.Sent/tmp/*"]
    assert not seen["path"].exists()


def test_a_failed_backup_still_unmounts_and_names_the_destination(tmp_path: Path) -> None:
    tree = tmp_path / "b" / "mail"
    make_tree(tree)
    job = job_of(tmp_path)
    mountpoint = job.work_dir / "restic" / "offsite"
    runner = FakeRunner()
    mounted_rules(runner, mountpoint)
    runner.on("restic", exit_code=1, stderr=WRONG_PASSWORD)
    repo = ResticRepository(job, settings_of(), runner)
    with pytest.raises(DestinationFailed) as caught:
        repo.send(source_of(tree, clean=True, stable=False))
    assert str(caught.value) == (
        f"destination offsite (restic {REPO}): backup: wrong password — wrong password or no "
        "key found; check password_file / password_command (or RESTIC_PASSWORD)")
    assert argvs(runner)[-1] == ["umount", str(mountpoint)]


def test_a_bind_mount_that_cannot_be_made_read_only_is_undone(tmp_path: Path) -> None:
    job = job_of(tmp_path)
    mountpoint = job.work_dir / "restic" / "offsite"
    runner = FakeRunner()
    mounted_rules(runner, mountpoint)
    runner.on("mount", "-o", exit_code=32, stderr="mount: permission denied\n")
    repo = ResticRepository(job, settings_of(), runner)
    with pytest.raises(DestinationFailed, match=r"cannot bind-mount .* read-only"):
        repo.send(source_of(tmp_path, clean=True, stable=False))
    assert [argv[0] for argv in argvs(runner)] == ["findmnt", "mount", "mount", "umount"]


def test_an_incomplete_snapshot_is_forgotten_and_fails(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.on("restic", "-r", REPO, "--password-file", PW, "backup", stdout=SUMMARY,
              exit_code=3, stderr="Warning: at least one source file could not be read\n")
    repo = ResticRepository(job_of(tmp_path), settings_of(), runner)
    with pytest.raises(DestinationFailed, match=r"incomplete.*could not be read"):
        repo.send(source_of(Path("/snap"), clean=True, stable=True))
    assert argvs(runner)[-1] == [*BASE, "forget", "c4e7acb2"]


@pytest.mark.parametrize("exists", [True, False])
def test_init_only_when_there_is_no_repository(tmp_path: Path, exists: bool) -> None:
    runner = FakeRunner()
    runner.on("restic", stdout=SUMMARY)
    if not exists:
        runner.on(*BASE, "cat", "config", exit_code=1, stderr=MISSING)
    repo = ResticRepository(job_of(tmp_path), settings_of(init=True), runner)
    repo.send(source_of(Path("/snap"), clean=True, stable=True))
    subcommands = [argv[len(BASE)] for argv in argvs(runner)]
    assert subcommands == (["cat", "backup"] if exists else ["cat", "init", "backup"])


def test_a_missing_repository_without_init_says_what_to_do(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.on("restic", exit_code=1, stderr=MISSING)
    repo = ResticRepository(job_of(tmp_path), settings_of(), runner)
    with pytest.raises(DestinationFailed) as caught:
        repo.send(source_of(Path("/snap"), clean=True, stable=True))
    assert str(caught.value) == (
        f"destination offsite (restic {REPO}): backup: no repository there — unable to open "
        f"config file: stat {REPO}/config: no such file or directory; set init = true or run "
        "restic init")


@pytest.mark.parametrize("stderr,what", [
    (S3_REFUSED, "cannot reach the repository"), (SFTP_REFUSED, "cannot reach the repository"),
    (WRONG_PASSWORD, "wrong password"),
    ("Fatal: unable to create lock in backend: repository is already locked by PID 7\n",
     "the repository is locked"),
])
def test_failures_are_one_line_with_what_and_what_to_do(tmp_path: Path, stderr: str,
                                                         what: str) -> None:
    runner = FakeRunner()
    runner.on("restic", exit_code=1, stderr=stderr)
    repo = ResticRepository(job_of(tmp_path), settings_of(), runner)
    with pytest.raises(DestinationFailed) as caught:
        repo.backups()
    message = str(caught.value)
    assert message.startswith(f"destination offsite (restic {REPO}): list snapshots: {what} — ")
    assert "\n" not in message and "; " in message


def test_dry_run_reads_the_repository_and_changes_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "b" / "mail"
    make_tree(tree)
    runner = FakeRunner(dry_run=True)
    runner.on("restic", "-r", REPO, "--password-file", PW, "cat", stdout="{}")
    runner.on("findmnt", exit_code=1)
    repo = ResticRepository(job_of(tmp_path), settings_of(init=True), runner)
    sent = repo.send(source_of(tree, clean=False, stable=False))
    assert sent.details == {"dry_run": True}
    assert runner.ran(mutating=True, executed=True) == []
    assert [c.argv[0] for c in runner.calls if c.skipped] == ["mount", "mount", "restic",
                                                              "umount"]
    assert not (repo.stable_path).exists()


def test_snapshots_are_parsed_oldest_first_with_run_ids(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.on("restic", stdout=SNAPSHOTS)
    repo = ResticRepository(job_of(tmp_path), settings_of(), runner)
    found = repo.backups()
    assert argvs(runner) == [[*BASE, "snapshots", "--json", "--host", socket.gethostname(),
                              "--tag", "mailsnap,job=mail"]]
    assert [(s.id, s.run_id, s.time) for s in found] == [
        ("aaaaaaaa", RUN1, datetime(2026, 12, 1, 2, 30, tzinfo=UTC)),
        ("bbbbbbbb", RUN2, datetime(2026, 12, 2, 2, 30, tzinfo=UTC)),
    ]
    assert found[1].info == {"full_id": "bbbbbbbb" + "1" * 56, "paths": ["/b/mail"],
                             "tags": ["mailsnap", "job=mail", f"run={RUN2}"], "hostname": HOST}


def test_a_snapshot_without_a_run_tag_keeps_restics_time(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.on("restic", stdout=json.dumps([{
        "time": "2026-12-02T03:30:05.5+01:00", "paths": ["/x"], "hostname": HOST,
        "tags": ["mailsnap", "job=mail"], "id": "c" * 64, "short_id": "cccccccc"}]))
    (only,) = ResticRepository(job_of(tmp_path), settings_of(), runner).backups()
    assert only.run_id is None
    assert only.time == datetime(2026, 12, 2, 2, 30, 5, 500000, tzinfo=UTC)


def test_unreadable_snapshots_output_is_a_destination_failure(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.on("restic", stdout='[{"time": "x"}]')
    with pytest.raises(DestinationFailed, match="cannot read the output of restic snapshots"):
        ResticRepository(job_of(tmp_path), settings_of(), runner).backups()


def test_remove_is_one_forget_with_prune(tmp_path: Path) -> None:
    runner = FakeRunner()
    repo = ResticRepository(job_of(tmp_path), settings_of(), runner)
    repo.remove([])
    assert runner.calls == []
    repo.remove([stored("aaaaaaaa"), stored("bbbbbbbb")])
    assert argvs(runner) == [[*BASE, "forget", "aaaaaaaa" + "0" * 56, "bbbbbbbb" + "0" * 56,
                              "--prune"]]
    assert runner.calls[0].mutates


def test_a_shared_repository_forgets_without_pruning(tmp_path: Path) -> None:
    runner = FakeRunner()
    repo = ResticRepository(job_of(tmp_path), settings_of(prune=False), runner)
    repo.remove([stored("aaaaaaaa")])
    assert argvs(runner) == [[*BASE, "forget", "aaaaaaaa" + "0" * 56]]


@pytest.mark.parametrize("deep,subset,flag", [
    (False, None, []), (True, None, ["--read-data"]),
    (True, "5%", ["--read-data-subset=5%"]), (False, "5%", []),
])
def test_check(tmp_path: Path, deep: bool, subset: str | None, flag: list[str]) -> None:
    runner = FakeRunner()
    runner.on("restic", stdout="no errors were found\n")
    repo = ResticRepository(job_of(tmp_path), settings_of(read_data_subset=subset), runner)
    assert repo.verify(stored(), deep=deep) == []
    assert argvs(runner) == [[*BASE, "check", *flag]]
    assert not runner.calls[0].mutates


def test_check_problems_are_one_line_each(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.on("restic", exit_code=1, stderr=CHECK_DAMAGED)
    repo = ResticRepository(job_of(tmp_path), settings_of(), runner)
    assert repo.verify(stored(), deep=True) == [
        "restic check: Pack ID does not match, want 89b422f564703cc5, got f8982c7fa9b7b88f",
        "restic check: Fatal: repository contains errors"]


def test_check_that_cannot_reach_the_repository_fails(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.on("restic", exit_code=1, stderr=SFTP_REFUSED)
    repo = ResticRepository(job_of(tmp_path), settings_of(), runner)
    with pytest.raises(DestinationFailed, match="check: cannot reach the repository"):
        repo.verify(stored(), deep=False)


def write_manifest(path: Path, root: Path) -> None:
    """A manifest of ``root`` (D/F/L records, one section) as the Maildir copier writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        info = os.lstat(directory)
        lines.append(f"D\t{escape(rel_dir)}\t{info.st_mode & 0o7777:o}\t0\t0\t0\t0\t0\n")
        for name in sorted(dirs + files):
            full = os.path.join(directory, name)
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if os.path.islink(full):
                lines.append(f"L\t{escape(rel)}\t{os.readlink(full)}\t0\t0\t0\n")
            elif os.path.isfile(full):
                data = Path(full).read_bytes()
                lines.append(f"F\t{escape(rel)}\tcopied\t{len(data)}\t0\t644\t0\t0\t"
                             f"{hashlib.sha256(data).hexdigest()}\n")
    writer = ManifestWriter(path)
    writer.section("", lines)
    writer.close()


LS = "\n".join(json.dumps(item) for item in [
    {"time": "2026-12-01T02:30:04Z", "paths": ["/b/mail"], "id": "a" * 64,
     "short_id": "aaaaaaaa", "struct_type": "snapshot"},
    {"name": "b", "type": "dir", "path": "/b", "struct_type": "node"},
    {"name": "mail", "type": "dir", "path": "/b/mail", "struct_type": "node"},
    {"name": "cur", "type": "dir", "path": "/b/mail/cur", "struct_type": "node"},
    {"name": "m1", "type": "file", "path": "/b/mail/cur/m1", "size": 5, "struct_type": "node"},
    {"name": "m2", "type": "file", "path": "/b/mail/cur/m2", "size": 9, "struct_type": "node"},
    {"name": "x", "type": "file", "path": "/b/mail/cur/x", "size": 1, "struct_type": "node"},
]) + "\n"


def test_verify_compares_the_snapshot_with_the_local_manifest(tmp_path: Path) -> None:
    job = job_of(tmp_path)
    mail = tmp_path / "b" / "mail"
    (mail / "cur").mkdir(parents=True)
    (mail / "cur" / "m1").write_text("12345")
    (mail / "cur" / "m2").write_text("1234567")   # 7 bytes here, 9 in restic
    (mail / "cur" / "m3").write_text("123")       # not in restic
    write_manifest(job.target / job.name / RUN1 / MANIFEST_FILE, mail)
    runner = FakeRunner()
    runner.on("restic", *BASE[1:], "check", stdout="no errors were found\n")
    runner.on("restic", *BASE[1:], "ls", stdout=LS)
    repo = ResticRepository(job, settings_of(), runner)
    assert repo.verify(stored(), deep=False) == [
        "cur/m2: 9 bytes in the restic snapshot, 7 in the local backup",
        "cur/m3: missing from the restic snapshot",
        "cur/x: in the restic snapshot but not in the local backup",
    ]
    assert argvs(runner)[1] == [*BASE, "ls", "--json", "a" * 8 + "0" * 56]
    # Another run's snapshot has no local manifest: only the check runs.
    runner.calls.clear()
    assert repo.verify(stored(run_id=RUN2), deep=False) == []
    assert [argv[len(BASE)] for argv in argvs(runner)] == ["check"]


@pytest.mark.parametrize("subdir,include", [
    ("", []), (".Sent/cur", ["--include=/b/mail/.Sent/cur"]),
    (".A [x]*?/", ["--include=/b/mail/.A \\[x]\\*\\?"]),
])
def test_restore(tmp_path: Path, subdir: str, include: list[str]) -> None:
    runner = FakeRunner()
    repo = ResticRepository(job_of(tmp_path), settings_of(), runner)
    into = tmp_path / "into"
    assert repo.fetch(stored(), subdir, into) == into / "b" / "mail"
    assert argvs(runner) == [[*BASE, "restore", "a" * 8 + "0" * 56, "--target", str(into),
                              *include]]


def test_patterns_escape_what_restic_would_read_as_a_wildcard() -> None:
    assert literal("/a*b/[c]?/d\\e") == "/a\\*b/\\[c]\\?/d\\\\e"
    assert file_literal("/a$HOME/b\nc") == "/a?HOME/b?c"
    assert tmp_exclude("/m/", "") == "/m/tmp/*"
    assert tmp_exclude("/m", "x y/.Caf&AOk-") == "/m/x y/.Caf&AOk-/tmp/*"
    assert job_exclude("dovecot.index.log", "/m") == "dovecot.index.log"
    assert job_exclude("/spam*/", "/r[1]") == "/r\\[1]/spam*"


def test_where_hides_a_password_in_the_url() -> None:
    assert redact("rest:https://u:s3cret@host:8000/repo") == "rest:https://host:8000/repo"
    assert redact("sftp:backup@host:/srv/restic") == "sftp:backup@host:/srv/restic"
    assert redact("s3:https://s3.example.com/bucket") == "s3:https://s3.example.com/bucket"


def test_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "restic.env"
    env_file.write_text("# S3\nexport AWS_ACCESS_KEY_ID=AKIA\n\nAWS_SECRET_ACCESS_KEY = "
                        "'s3cr3t value'\nRESTIC_PASSWORD=\"pw\"\n")
    env_file.chmod(0o600)
    repo = ResticRepository(job_of(tmp_path), settings_of(env={"A": "1", "AWS_ACCESS_KEY_ID": "x"},
                                                          env_file=str(env_file)), FakeRunner())
    env = repo.environment()
    assert (env["A"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
            env["RESTIC_PASSWORD"]) == ("1", "AKIA", "s3cr3t value", "pw")
    assert env["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize("text,line", [("A=1\nthe password is hunter22\n", 2),
                                       ("=x\n", 1), ("# ok\n\nA B=1\n", 3)])
def test_a_bad_env_file_line_is_named_not_shown(tmp_path: Path, text: str, line: int) -> None:
    env_file = tmp_path / "restic.env"
    env_file.write_text(text)
    repo = ResticRepository(job_of(tmp_path), settings_of(env_file=str(env_file)), FakeRunner())
    with pytest.raises(DestinationFailed) as caught:
        repo.backups()
    message = str(caught.value)
    assert message.startswith(f"destination offsite (restic {REPO}): env_file {env_file} line "
                              f"{line} is not KEY=VALUE — ")
    assert "hunter22" not in message


def test_a_missing_env_file_fails(tmp_path: Path) -> None:
    repo = ResticRepository(job_of(tmp_path), settings_of(env_file=str(tmp_path / "nope")),
                            FakeRunner())
    with pytest.raises(DestinationFailed, match=r"cannot read env_file .*nope — No such file"):
        repo.backups()


def test_secrets_reach_neither_logs_nor_errors(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A password in the URL goes through the environment; stderr quoting the URL or an
    environment value is blanked. The runner logs argv, so a real Runner is used."""
    caplog.set_level(logging.DEBUG)
    env_file = tmp_path / "env"
    env_file.write_text("AWS_SECRET_ACCESS_KEY=verysecretkey\n")
    env_file.chmod(0o600)
    fake = tmp_path / "bin" / "restic"
    fake.parent.mkdir()
    # Stands in for restic: prints what a real one says for an unreachable rest server,
    # quoting the URL, plus the secret key it got from the environment.
    fake.write_text("#!/bin/sh\necho \"Fatal: unable to open config file: Get \\\""
                    "$RESTIC_REPOSITORY/config\\\": dial tcp: connection refused "
                    "$AWS_SECRET_ACCESS_KEY\" >&2\nexit 1\n")
    fake.chmod(0o755)
    url = "rest:http://user:hunter2pw@127.0.0.1:1/"
    settings = settings_of(repository=url, env={"RESTIC_PASSWORD": "envpassword1",
                                                "PATH": f"{fake.parent}:{os.environ['PATH']}"},
                           env_file=str(env_file))
    repo = ResticRepository(job_of(tmp_path), settings, Runner())
    assert repo.where() == "restic rest:http://127.0.0.1:1/"
    assert "-r" not in repo.argv("snapshots")
    assert repo.environment()["RESTIC_REPOSITORY"] == url
    with pytest.raises(DestinationFailed) as caught:
        repo.backups()
    message = str(caught.value)
    assert "cannot reach the repository" in message and "127.0.0.1:1" in message
    everything = message + "\n" + caplog.text
    for secret in ("hunter2pw", "envpassword1", "verysecretkey"):
        assert secret not in everything


# -- real restic -----------------------------------------------------------------------------

def restic_skip_reason() -> str | None:
    if shutil.which("restic") is None:
        return "restic is not installed (apt install restic)"
    if os.geteuid() != 0:
        return "needs root (bind mounts, sshd as root)"
    return None


@pytest.fixture
def need_restic() -> None:
    reason = restic_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3 server (moto, from the dev extra) on a free 127.0.0.1 port: its endpoint URL."""
    reason = restic_skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=out)
        try:
            wait_for_port(port, process, log, "moto_server")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)


FOLDERS = ("", ".Sent", ".Caf&AOk- Ideen", '.Work "Q4" &- Plans', ".Ünïcödé Ordner",
           ".it's a \\ & b", ".Price $HOME [x]*?")
PER_FOLDER = 170


def make_mail(root: Path) -> list[Path]:
    """Maildirs with unique messages, a tmp/ file in each and Dovecot's lock files. Returns
    the messages."""
    messages = []
    for i, folder in enumerate(FOLDERS):
        base = root / folder
        for sub in ("cur", "new", "tmp"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for n in range(PER_FOLDER):
            path = base / "cur" / f"17000{i:02d}{n:03d}.M{n}P1.mx1,S=4000:2,S"
            path.write_bytes(f"Subject: {folder} {n}\n\n".encode() + os.urandom(4000))
            messages.append(path)
        (base / "tmp" / "1800000000.M1P9.mx1").write_text("half-written delivery")
        (base / "dovecot-uidlist").write_text(f"3 V1 N{PER_FOLDER}\n")
    (root / "dovecot-uidlist.lock").write_text("locked")
    (root / ".Sent" / "dovecot-keywords.lock").write_text("locked")
    return messages


def contents(root: Path) -> dict[str, bytes | None]:
    """rel path → bytes (None for a directory) of everything below ``root``."""
    found: dict[str, bytes | None] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), root)] = None
        for name in files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = Path(path).read_bytes()
    return found


def expected(root: Path) -> dict[str, bytes | None]:
    """What a backup of ``root`` holds: no Maildir tmp/ content, no lock files."""
    return {rel: data for rel, data in contents(root).items()
            if not rel.endswith(".lock")
            and not (os.path.basename(os.path.dirname(rel)) == "tmp" and data is not None)}


def change_mail(messages: list[Path], new_in: Path) -> int:
    """Dovecot's night: 1% of the messages get a flag (a rename), five arrive. Returns how
    many files restic must read again."""
    renamed = messages[::100]
    for path in renamed:
        path.rename(path.with_name(path.name + "F"))
    for n in range(5):
        (new_in / f"1900000000.M{n}P2.mx1").write_bytes(os.urandom(500))
    return len(renamed) + 5


def damage_a_pack(files: list[Path]) -> None:
    path = files[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o600)
    path.write_bytes(bytes(data))


@dataclass(frozen=True)
class Repository:
    """A repository for the real tests: its settings and how to damage one of its packs."""

    keys: dict[str, Any]
    damage: Callable[[], None]


def _local_files(path: Path) -> Callable[[], None]:
    return lambda: damage_a_pack(sorted(p for p in (path / "data").rglob("*") if p.is_file()))


def _s3_damage(endpoint: str, bucket: str, env: dict[str, str]) -> Callable[[], None]:
    def damage() -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        key = sorted(o["Key"] for o in client.list_objects_v2(
            Bucket=bucket, Prefix="data/")["Contents"])[0]
        data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    return damage


@pytest.fixture(params=["local", "sftp", "s3"])
def repository(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    reason = restic_skip_reason()
    if reason:
        pytest.skip(reason)
    password = tmp_path / "restic.pw"
    password.write_text("correct horse battery staple\n")
    password.chmod(0o600)
    # restic's cache in the test's own directory, through ``env``.
    keys: dict[str, Any] = {"password_file": str(password), "init": True,
                            "env": {"XDG_CACHE_HOME": str(tmp_path / "cache")}}
    path = tmp_path / "repo"
    if request.param == "local":
        return Repository({**keys, "repository": str(path)}, _local_files(path))
    if request.param == "sftp":
        sshd: Sshd = request.getfixturevalue("sshd")
        return Repository({**keys, "repository": f"sftp:{sshd.user}@127.0.0.1:{path}",
                           "options": ["-o", f"sftp.command={sshd.sftp_command()}"]},
                          _local_files(path))
    endpoint: str = request.getfixturevalue("moto_server")
    bucket = f"mailsnap-{tmp_path.name.lower().replace('_', '-')}"[:60]
    secrets = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
    keys["env"].update(secrets)
    return Repository({**keys, "repository": f"s3:{endpoint}/{bucket}"},
                      _s3_damage(endpoint, bucket, secrets))


@pytest.mark.offsite
def test_real_restic_round_trip(tmp_path: Path, repository: Repository,
                                capsys: pytest.CaptureFixture[str]) -> None:
    job = job_of(tmp_path)
    live = tmp_path / "live"
    messages = make_mail(live)
    repo = ResticRepository(job, settings_of(**repository.keys), Runner())
    host = socket.gethostname()

    first = repo.send(source_of(live, clean=False, stable=True, run_id=RUN1, host=host))
    want = expected(live)
    files = sum(1 for data in want.values() if data is not None)
    assert (first.files, first.details["files_new"]) == (files, files)

    # Everything restored is byte for byte the tree, without tmp/ content and lock files.
    (one,) = repo.backups()
    assert (one.id, one.run_id) == (first.id, RUN1)
    whole = repo.fetch(one, "", tmp_path / "all")
    assert whole == tmp_path / "all" / str(live).lstrip("/")
    assert contents(whole) == want

    changed = change_mail(messages, live / ".Sent" / "new")
    second = repo.send(source_of(live, clean=False, stable=True, run_id=RUN2, host=host))
    files = sum(1 for data in expected(live).values() if data is not None)
    numbers = {k: second.details[k] for k in ("files_new", "files_changed", "files_unmodified",
                                              "data_added", "total_bytes_processed")}
    with capsys.disabled():
        print(f"\n[{repo.where()}] first: {first.details}\n  second after {changed} changes "
              f"of {files} files: {numbers}")
    assert second.details["files_new"] + second.details["files_changed"] == changed
    assert second.details["files_unmodified"] == files - changed
    # What crossed: the five new messages and the changed directories' trees, not the rest.
    assert first.bytes_sent and second.bytes_sent and second.bytes_sent < first.bytes_sent / 4

    old, new = repo.backups()
    assert [(s.id, s.run_id) for s in (old, new)] == [(first.id, RUN1), (second.id, RUN2)]
    assert old.time < new.time and new.time.tzinfo is not None
    assert repo.verify(new, deep=True) == []

    sub = repo.fetch(new, ".Ünïcödé Ordner", tmp_path / "sub")
    assert contents(sub / ".Ünïcödé Ordner") == expected(live / ".Ünïcödé Ordner")
    assert sorted(os.listdir(sub)) == [".Ünïcödé Ordner"]

    repo.remove([old])
    assert [s.id for s in repo.backups()] == [second.id]
    repo.remove([old])  # again, as after a crash: restic only warns

    repository.damage()
    problems = repo.verify(new, deep=True)
    assert problems and all(p.startswith("restic check: ") for p in problems), problems


@pytest.mark.offsite
@pytest.mark.usefixtures("need_restic")
def test_a_dated_backup_goes_through_the_stable_bind_mount(tmp_path: Path) -> None:
    """The job's own dated backups (hard links of each other, new ctimes every night) are
    read at one stable path: the second run reads only what changed."""
    job = job_of(tmp_path)
    password = tmp_path / "pw"
    password.write_text("pw\n")
    repo = ResticRepository(job, settings_of(
        repository=str(tmp_path / "repo"), password_file=str(password), init=True,
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")}), Runner())
    store = job.target / job.name
    first_tree = store / RUN1 / "mail"
    messages = make_mail(first_tree)
    keep = expected(first_tree)
    for rel, data in contents(first_tree).items():  # a published backup is clean
        if data is not None and rel not in keep:
            (first_tree / rel).unlink()
    host = socket.gethostname()
    repo.send(source_of(first_tree, clean=True, stable=False, run_id=RUN1, host=host))
    # The next night: hard links to the first backup (every message's ctime changes).
    second_tree = store / RUN2 / "mail"
    shutil.copytree(first_tree, second_tree, copy_function=os.link)
    changed = change_mail([second_tree / m.relative_to(first_tree) for m in messages],
                          second_tree / "new")
    sent = repo.send(source_of(second_tree, clean=True, stable=False, run_id=RUN2, host=host))
    files = sum(1 for data in contents(second_tree).values() if data is not None)
    assert sent.details["files_unmodified"] == files - changed
    assert sent.details["files_new"] + sent.details["files_changed"] == changed
    assert sent.details["path"] == str(repo.stable_path)
    findmnt = subprocess.run(["findmnt", "--mountpoint", str(repo.stable_path)], check=False)
    assert findmnt.returncode == 1, "the bind mount is still there"

    old, new = repo.backups()
    assert old.info["paths"] == new.info["paths"] == [str(repo.stable_path)]
    # The job's own backup of the same run is still there: restic's listing must match it.
    write_manifest(store / RUN2 / MANIFEST_FILE, second_tree)
    assert repo.verify(new, deep=False) == []
    (second_tree / "cur" / "extra").write_text("x")
    (store / RUN2 / MANIFEST_FILE).unlink()
    write_manifest(store / RUN2 / MANIFEST_FILE, second_tree)
    assert repo.verify(new, deep=False) == ["cur/extra: missing from the restic snapshot"]


@pytest.mark.offsite
@pytest.mark.usefixtures("need_restic")
def test_a_wrong_password_is_named(tmp_path: Path) -> None:
    keys = {"repository": str(tmp_path / "repo"), "init": True,
            "env": {"XDG_CACHE_HOME": str(tmp_path / "cache"), "RESTIC_PASSWORD": "right"}}
    ResticRepository(job_of(tmp_path), settings_of(**keys), Runner()).ensure_repository()
    keys["env"] = {**keys["env"], "RESTIC_PASSWORD": "wrong"}
    with pytest.raises(DestinationFailed, match=r"^destination offsite \(restic .*\): list "
                       r"snapshots: wrong password — wrong password or no key found; check"):
        ResticRepository(job_of(tmp_path), settings_of(**keys), Runner()).backups()


@pytest.mark.offsite
@pytest.mark.usefixtures("need_restic")
@pytest.mark.parametrize("kind", ["sftp", "s3"])
def test_an_unreachable_repository_fails_naming_the_destination(tmp_path: Path,
                                                                 kind: str) -> None:
    port = free_port()  # nothing listens there
    keys: dict[str, Any] = {"env": {"RESTIC_PASSWORD": "pw", "AWS_ACCESS_KEY_ID": "a",
                                    "AWS_SECRET_ACCESS_KEY": "b",
                                    "XDG_CACHE_HOME": str(tmp_path / "cache")}, "init": True}
    if kind == "sftp":
        keys["repository"] = "sftp:root@127.0.0.1:/srv/restic"
        keys["options"] = ["-o", "sftp.command=ssh -F /dev/null -o BatchMode=yes "
                           f"-p {port} root@127.0.0.1 -s sftp"]
    else:
        keys["repository"] = f"s3:http://127.0.0.1:{port}/bucket"
    repo = ResticRepository(job_of(tmp_path), settings_of(**keys), Runner())
    started = time.monotonic()
    with pytest.raises(DestinationFailed) as caught:
        repo.send(source_of(tmp_path, clean=True, stable=True))
    assert time.monotonic() - started < 30
    assert str(caught.value).startswith(
        f"destination offsite (restic {keys['repository']}): open the repository: cannot "
        "reach the repository — ")
    said = str(caught.value).lower()
    if kind == "sftp":
        # restic 0.14 copies ssh's stderr ("subprocess ssh: ... Connection refused") from a
        # goroutine and can exit before it has; about 1 run in 30 has only its own line.
        assert "connection refused" in said or "unable to start the sftp session" in said
    else:
        assert "connection refused" in said
