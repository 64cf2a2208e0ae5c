"""The ``ssh`` and second ``local`` destinations, against a real sshd on 127.0.0.1.

The "remote" store is a directory of this machine reached through ssh and rsync over ssh, so
every byte crosses a real SSH connection and the result can still be compared with the local
backup file by file.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
import json
import os
from pathlib import Path
import re
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from mailsnap.config import Job, parse_config
from mailsnap.errors import ConfigError, DestinationFailed
from mailsnap.pipeline import run_backup
from mailsnap.recorder import recording
from mailsnap.runner import Runner
from mailsnap.store import BackupStore
from tests.helpers.loopfs import BtrfsVolume
from tests.helpers.maildir_writer import seed
from tests.helpers.sshd import Sshd, free_port
from tests.helpers.trees import diff_trees

START = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)
HOSTILE = ["Sent Items", "Tom & Jerry", "it's \"quoted\"", "Café", "a*b"]


def job_of(source: Path, target: Path, destinations: list[dict[str, Any]],
           backend: str = "live", **keys: object) -> Job:
    data = {"name": "mail", "source": str(source), "target": str(target), "backend": backend,
            "destination": destinations, "run_dir": str(target.parent / "run"), **keys}
    return parse_config({"job": [data]}, origin="test").job[0]


def ssh_dest(sshd: Sshd, path: Path, **keys: object) -> dict[str, Any]:
    return {"name": "offsite", "type": "ssh", "target": sshd.url(path),
            "ssh_key": str(sshd.key), "known_hosts": str(sshd.known_hosts),
            "ssh_options": ["-F", "/dev/null"], **keys}


def hostile_source(root: Path) -> Path:
    seed(root, per_folder=6)
    for name in HOSTILE:
        folder = root / f".{name}"
        for sub in ("cur", "new", "tmp"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "cur" / "1700000000.M1P1.host,S=5:2,S").write_bytes(b"hello")
    (root / "tmp" / "half-written").write_bytes(b"partial")
    (root / "dovecot-uidlist.lock").write_bytes(b"")
    return settled(root)


def settled(root: Path) -> Path:
    """Every directory last changed an hour ago, as the night finds a store. rsync 3.5.0
    (Debian's bookworm-security build) leaves a directory's time unset when the source's is
    within about a second of now: a tree made a moment ago came out with the copy's own
    directory times in about half the runs (39 of 39 directories, 5 runs in 8)."""
    then = time.time() - 3600
    for directory, _dirs, _files in os.walk(root):
        os.utime(directory, (then, then))
    return root


def backup_at(job: Job, when: datetime) -> tuple[str, list[dict[str, Any]]]:
    with recording() as recorder:
        report = run_backup(job, Runner(), clock=lambda: when)
    assert report.backup is not None
    return Path(report.backup).name, list(recorder.destinations)


def a_message(root: Path) -> Path:
    return sorted((root / "cur").iterdir())[0]


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ssh://backup@host:/srv/mailsnap", "ssh://host:2222/srv/m",
                                 "ssh://b@[::1]:22/srv/x y", "ssh://b@host/srv/m"])
def test_ssh_targets_that_parse(url: str, tmp_path: Path) -> None:
    from mailsnap.destinations.ssh import Remote

    job = job_of(tmp_path / "m", tmp_path / "b", [{"name": "o", "type": "ssh", "target": url}])
    remote = Remote.parse(job.destination[0].target)  # type: ignore[union-attr]
    assert remote.path.startswith("/srv/")


@pytest.mark.parametrize("url,why", [
    ("backup@host:/srv", "not an SSH target"),
    ("ssh://host/", "directory below /"),
    ("ssh://host/srv/../etc", "without '..'"),
    ("ssh://host:99999/srv", "port must be"),
    ("ssh://host/srv/it's", "quote"),
])
def test_bad_ssh_targets_get_one_line_naming_the_field(url: str, why: str,
                                                       tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        job_of(tmp_path / "m", tmp_path / "b", [{"name": "o", "type": "ssh", "target": url}])
    assert caught.value.lines == [caught.value.lines[0]]
    assert "job[0].destination[0].target" in caught.value.lines[0]
    assert why in caught.value.lines[0]


def test_destination_names_are_unique_and_local_is_reserved(tmp_path: Path) -> None:
    two = [{"name": "o", "type": "local", "target": str(tmp_path / "x")},
           {"name": "o", "type": "local", "target": str(tmp_path / "y")}]
    with pytest.raises(ConfigError, match="used twice"):
        job_of(tmp_path / "m", tmp_path / "b", two)
    with pytest.raises(ConfigError, match="names the job's own target"):
        job_of(tmp_path / "m", tmp_path / "b",
               [{"name": "local", "type": "local", "target": str(tmp_path / "x")}])
    with pytest.raises(ConfigError, match="type must be one of ssh, restic, local"):
        job_of(tmp_path / "m", tmp_path / "b", [{"name": "o", "type": "ftp"}])


def test_ssh_commands_are_argv_lists_and_host_keys_are_checked(tmp_path: Path) -> None:
    from mailsnap.destinations.ssh import SshStore

    job = job_of(tmp_path / "m", tmp_path / "b", [{
        "name": "o", "type": "ssh", "target": "ssh://backup@host:2222/srv/mail snap",
        "ssh_key": "/etc/mailsnap/id ed25519"}])
    store = SshStore(job, job.destination[0], Runner())  # type: ignore[arg-type]
    assert store.ssh_argv() == ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                                "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=4",
                                "-p", "2222", "-i", "/etc/mailsnap/id ed25519",
                                "-o", "IdentitiesOnly=yes"]  # no work dir yet: no master
    job.work_dir.mkdir(parents=True)
    options = store.ssh_argv()[15:]
    assert options[:2] == ["-o", "ControlMaster=auto"]
    assert re.fullmatch(rf"ControlPath={re.escape(str(job.work_dir))}/ssh-[0-9a-f]{{12}}",
                        options[3])
    assert options[4:] == ["-o", "ControlPersist=30"]
    rsync = store.rsync_argv()
    assert rsync[:6] == ["rsync", "-aHAX", "--numeric-ids", "-s", "--stats", "--timeout=600"]
    assert "-i '/etc/mailsnap/id ed25519' -o IdentitiesOnly=yes" in rsync[7]
    assert store.where() == "backup@host:/srv/mail snap/mail"


# -- against the real sshd ----------------------------------------------------------------------


@pytest.mark.offsite
def test_ssh_and_second_disk_get_every_backup_and_keep_their_own_history(
        sshd: Sshd, tmp_path: Path) -> None:
    source = hostile_source(tmp_path / "Maildir")
    remote, disk = tmp_path / "remote", tmp_path / "usb"
    job = job_of(source, tmp_path / "backups", [
        ssh_dest(sshd, remote, keep_last=2),
        {"name": "usb", "type": "local", "target": str(disk)},
    ])
    first, results = backup_at(job, START)
    assert [(r["name"], r["status"], r["from"]) for r in results] == [
        ("offsite", "ok", "local"), ("usb", "ok", "local")]  # live job: from the backup
    local = tmp_path / "backups/mail" / first
    remote_first = remote / "mail" / first
    assert diff_trees(local / "mail", remote_first / "mail") == []
    assert diff_trees(local / "mail", disk / "mail" / first / "mail") == []
    assert (remote_first / "manifest.zst").read_bytes() == (local / "manifest.zst").read_bytes()
    assert os.readlink(remote / "mail/latest") == first
    assert oct(os.stat(remote_first).st_mode & 0o777) == "0o700"
    assert not list((remote_first / "mail/tmp").iterdir())
    assert not (remote_first / "mail/dovecot-uidlist.lock").exists()

    a_message(source).rename(a_message(source).with_name(a_message(source).name + "R"))
    settled(source)
    second, _ = backup_at(job, START + timedelta(days=1))
    third, results = backup_at(job, START + timedelta(days=2))
    assert results[0]["pruned"] == [first]
    assert sorted(p.name for p in (remote / "mail").iterdir()) == sorted(
        [second, third, "latest", ".owner"])
    # No keep_* keys there: the second disk keeps all three.
    assert [b.run_id for b in BackupStore(disk / "mail").backups()] == [first, second, third]
    # Unchanged messages are hard links to the previous remote backup.
    unchanged = next((remote / "mail" / second / "mail/.Sent Items/cur").iterdir())
    assert unchanged.stat().st_nlink >= 2
    assert diff_trees(source, remote / "mail" / third / "mail",
                      excludes=job.excludes) == []


@pytest.mark.offsite
@pytest.mark.privileged
def test_ssh_from_the_snapshot_leaves_out_tmp_and_locks(sshd: Sshd, btrfs: BtrfsVolume,
                                                        tmp_path: Path) -> None:
    hostile_source(btrfs.mail)
    remote = tmp_path / "remote"
    job = job_of(btrfs.mail, tmp_path / "backups", [ssh_dest(sshd, remote)], backend="btrfs",
                 run_dir=str(tmp_path / "run"))
    run_id, results = backup_at(job, START)
    assert results[0]["from"] == "snapshot" and results[0]["status"] == "ok"
    copy = remote / "mail" / run_id / "mail"
    assert diff_trees(btrfs.mail, copy, excludes=job.excludes) == []
    assert not list((copy / "tmp").iterdir())
    assert not (copy / "dovecot-uidlist.lock").exists()


@pytest.mark.offsite
def test_an_unreachable_destination_fails_alone(sshd: Sshd, tmp_path: Path) -> None:
    source = hostile_source(tmp_path / "Maildir")
    closed = {"name": "offsite", "type": "ssh",
              "target": f"ssh://root@127.0.0.1:{free_port()}{tmp_path / 'remote'}",
              "ssh_options": ["-o", "ConnectTimeout=5"]}
    job = job_of(source, tmp_path / "backups", [
        closed, {"name": "usb", "type": "local", "target": str(tmp_path / "usb")}])
    with recording() as recorder, pytest.raises(DestinationFailed) as caught:
        run_backup(job, Runner(), clock=lambda: START)
    message = str(caught.value)
    assert "was published" in message and "1 of 2 destinations failed" in message
    assert "destination offsite" in message and "done: usb" in message
    assert [b.run_id for b in BackupStore(tmp_path / "backups/mail").backups()] == [
        "20261101T020000Z"]
    assert [(r["name"], r["status"]) for r in recorder.destinations] == [
        ("offsite", "failed"), ("usb", "ok")]


@pytest.mark.offsite
def test_remote_verify_finds_damage_and_restore_fetches_over_ssh(sshd: Sshd,
                                                                 tmp_path: Path) -> None:
    source = hostile_source(tmp_path / "Maildir")
    remote = tmp_path / "remote"
    job = job_of(source, tmp_path / "backups", [ssh_dest(sshd, remote)], users="")
    run_id, _ = backup_at(job, START)
    config = tmp_path / "mailsnap.toml"
    config.write_text(_toml(job, sshd, remote))

    ok = mailsnap("verify", "--config", config, "--destination", "offsite", "--deep")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "intact" in ok.stdout

    victim = next((remote / "mail" / run_id / "mail/.Café/cur").iterdir())
    victim.write_bytes(b"HELLO")  # same size, other content
    (remote / "mail" / run_id / "mail/stray").write_bytes(b"x")
    shallow = mailsnap("verify", "--config", config, "--destination", "offsite")
    assert shallow.returncode == 1
    assert "'stray': in the backup but not in its manifest" in shallow.stdout
    assert "content differs" not in shallow.stdout
    deep = mailsnap("verify", "--config", config, "--destination", "offsite", "--deep")
    assert "content differs from the manifest (sha256)" in deep.stdout

    listed = mailsnap("list", "--config", config, "--destination", "offsite", "--json")
    assert [b["id"] for b in json.loads(listed.stdout)["backups"]] == [run_id]

    out = tmp_path / "restored"
    restored = mailsnap("restore", "--config", config, "--user", "anyone", "--destination",
                        "offsite", "--folder", "Sent Items", "--into", str(out))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    got = list((out / ".Sent Items/cur").iterdir())
    assert [p.read_bytes() for p in got] == [b"hello"]


def _toml(job: Job, sshd: Sshd, remote: Path) -> str:
    return "\n".join([
        "[[job]]", f'name = "{job.name}"', f'source = "{job.source}"',
        f'target = "{job.target}"', f'backend = "{job.backend}"', 'users = ""',
        f'run_dir = "{job.work_dir.parent}"',
        "[[job.destination]]", 'name = "offsite"', 'type = "ssh"',
        f'target = "{sshd.url(remote)}"', f'ssh_key = "{sshd.key}"',
        f'known_hosts = "{sshd.known_hosts}"', ""])


def mailsnap(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailsnap", *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.offsite
def test_sigterm_during_an_upload_stops_it_and_keeps_the_published_backup(
        sshd: Sshd, tmp_path: Path) -> None:
    source = hostile_source(tmp_path / "Maildir")
    remote = tmp_path / "remote"
    job = job_of(source, tmp_path / "backups", [])
    config = tmp_path / "mailsnap.toml"
    # The remote rsync starts only after a minute: the upload is "slow".
    config.write_text(_toml(job, sshd, remote) + 'rsync_path = "sleep 60; rsync"\n')
    process = subprocess.Popen([sys.executable, "-m", "mailsnap", "backup", "--config",
                                str(config), "--quiet"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = datetime.now() + timedelta(seconds=60)
        while not list((remote / "mail").glob("*.partial")) and datetime.now() < deadline:
            assert process.poll() is None, process.communicate()
            subprocess.run(["sleep", "0.05"], check=True)
        assert list((remote / "mail").glob("*.partial")), "the upload never started"
        process.terminate()
        _out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted by SIGTERM" in err and "was published" in err
    assert "destinations not done: offsite" in err
    assert len(BackupStore(tmp_path / "backups/mail").backups()) == 1
    assert not list((remote / "mail").glob("*.partial"))  # the unpublished copy was removed


@pytest.mark.offsite
def test_every_sends_only_when_the_copy_there_is_old_enough(sshd: Sshd,
                                                            tmp_path: Path) -> None:
    source = hostile_source(tmp_path / "Maildir")
    remote = tmp_path / "remote"
    job = job_of(source, tmp_path / "backups", [ssh_dest(sshd, remote, every="7d")])
    statuses = []
    for day in range(8):
        _, results = backup_at(job, START + timedelta(days=day, minutes=-day))
        statuses.append(results[0]["status"])
    # Day 7 fires 7 minutes early and still counts (10% slack).
    assert statuses == ["ok"] + ["skipped"] * 6 + ["ok"]
    assert len([p for p in (remote / "mail").iterdir() if p.name[0].isdigit()]) == 2


@pytest.mark.offsite
def test_check_says_whether_each_destination_answers(sshd: Sshd, tmp_path: Path) -> None:
    source = hostile_source(tmp_path / "Maildir")
    job = job_of(source, tmp_path / "backups", [])
    config = tmp_path / "mailsnap.toml"
    config.write_text(_toml(job, sshd, tmp_path / "remote") + "keep_daily = 14\n"
                      "[[job.destination]]\nname = \"gone\"\ntype = \"ssh\"\n"
                      f"target = \"ssh://root@127.0.0.1:{free_port()}/srv\"\n"
                      "ssh_options = [\"-o\", \"ConnectTimeout=5\"]\n")
    result = mailsnap("check", "--config", config, "--json")
    rows = {r["check"]: r for r in json.loads(result.stdout)["checks"]}
    assert rows["destination offsite"]["ok"], rows["destination offsite"]
    assert "0 backups, from snapshot, retention: keep_daily=14" in rows[
        "destination offsite"]["detail"]
    assert not rows["destination gone"]["ok"]
    assert "destination gone" in rows["destination gone"]["detail"]
    assert result.returncode == 1


@pytest.mark.offsite
@pytest.mark.privileged
def test_a_full_remote_disk_fails_that_destination_and_leaves_nothing_half_made(
        sshd: Sshd, tmp_path: Path) -> None:
    source = hostile_source(tmp_path / "Maildir")
    big = source / ".Big/cur"
    big.mkdir(parents=True)
    for sub in ("new", "tmp"):
        (source / ".Big" / sub).mkdir()
    for n in range(4):
        (big / f"170000000{n}.M{n}P1.host,S=400000:2,S").write_bytes(os.urandom(400_000))
    remote = tmp_path / "remote"
    remote.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(remote)], check=True)
    try:
        job = job_of(source, tmp_path / "backups", [ssh_dest(sshd, remote)])
        with pytest.raises(DestinationFailed) as caught:
            run_backup(job, Runner(), clock=lambda: START)
        assert "the remote file system is full" in str(caught.value)
        assert "was published" in str(caught.value)
        assert [p.name for p in (remote / "mail").iterdir()] == [".owner"]  # no partial
    finally:
        subprocess.run(["umount", str(remote)], check=True)


def test_the_example_config_has_typed_destinations() -> None:
    from mailsnap.config import load_config

    job = load_config(Path(__file__).parent.parent / "examples/mailsnap.toml").job[0]
    kinds = [(d.name, d.type, d.read_from) for d in job.destination]
    assert kinds == [("offsite", "ssh", "local"), ("s3", "restic", "snapshot")]


@pytest.mark.offsite
def test_renamed_and_moved_messages_are_linked_on_the_remote_host_not_sent_again(
        sshd: Sshd, tmp_path: Path) -> None:
    source = tmp_path / "Maildir"
    seed(source, per_folder=20, size=50_000)
    settled(source)
    remote = tmp_path / "remote"
    job = job_of(source, tmp_path / "backups", [ssh_dest(sshd, remote)])
    backup_at(job, START)
    cur = sorted((source / "cur").iterdir())
    for path in cur[:5]:  # flag changes
        path.rename(path.with_name(path.name + "RS" if ":2," in path.name else path.name))
    moved = cur[5]
    folder = next(p for p in source.iterdir() if p.name.startswith(".") and p.is_dir())
    moved.rename(folder / "cur" / moved.name)  # a folder move
    settled(source)
    second, results = backup_at(job, START + timedelta(days=1))
    assert results[0]["status"] == "ok"
    new = remote / "mail" / second / "mail"
    assert diff_trees(tmp_path / "backups/mail" / second / "mail", new) == []
    # Nothing but metadata crossed: no message was sent again.
    assert results[0]["bytes_sent"] < 50_000, results[0]
    renamed = next(p for p in (new / "cur").iterdir() if p.name.endswith("RS"))
    assert renamed.stat().st_nlink >= 2  # the previous remote backup's file
    assert (new / folder.name / "cur" / moved.name).stat().st_nlink >= 2


@pytest.mark.offsite
def test_a_failed_destination_shows_in_exit_code_report_and_metrics(tmp_path: Path) -> None:
    source = hostile_source(tmp_path / "Maildir")
    metrics = tmp_path / "mailsnap.prom"
    config = tmp_path / "mailsnap.toml"
    config.write_text("\n".join([
        "[[job]]", 'name = "mail"', f'source = "{source}"', f'target = "{tmp_path / "b"}"',
        'backend = "live"', f'metrics_file = "{metrics}"', f'run_dir = "{tmp_path / "run"}"',
        "[[job.destination]]", 'name = "offsite"', 'type = "ssh"',
        f'target = "ssh://root@127.0.0.1:{free_port()}/srv/mailsnap"',
        "[[job.destination]]", 'name = "usb"', 'type = "local"',
        f'target = "{tmp_path / "usb"}"', ""]))
    result = mailsnap("backup", "--config", config, "--json")
    assert result.returncode == 1
    job = json.loads(result.stdout)["jobs"][0]
    assert job["status"] == "failed" and "destination offsite" in job["error"]
    assert [(d["name"], d["status"]) for d in job["destinations"]] == [
        ("offsite", "failed"), ("usb", "ok")]
    text = metrics.read_text()
    assert 'mailsnap_destination_last_run_success{destination="offsite",job="mail"} 0.0' in text
    assert 'mailsnap_destination_last_run_success{destination="usb",job="mail"} 1.0' in text
    assert 'mailsnap_destination_last_success_timestamp_seconds{destination="usb"' in text
    assert ('mailsnap_destination_last_success_timestamp_seconds{destination="offsite"'
            not in text)
    printed = mailsnap("backup", "--config", config)
    assert "✗ offsite (ssh root@127.0.0.1:/srv/mailsnap/mail, from local): failed" in \
        printed.stdout, printed.stdout
    status = mailsnap("status", "--config", config)
    assert status.returncode == 1
    assert "destination offsite: no copy stored in the recorded runs" in status.stdout
    assert "destination usb" not in status.stdout


@pytest.mark.offsite
def test_a_store_belongs_to_the_host_that_made_it(sshd: Sshd, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    source = hostile_source(tmp_path / "Maildir")
    remote = tmp_path / "remote"
    job = job_of(source, tmp_path / "backups", [ssh_dest(sshd, remote)])
    backup_at(job, START)
    assert (remote / "mail/.owner").read_text().strip() == socket.gethostname()
    monkeypatch.setattr(socket, "gethostname", lambda: "mx2.example.org")
    with recording() as recorder, pytest.raises(DestinationFailed):
        run_backup(job, Runner(), clock=lambda: START + timedelta(days=1))
    error = recorder.destinations[0]["error"]
    assert "belongs to host" in error and "not 'mx2.example.org'" in error
    assert len([p for p in (remote / "mail").iterdir() if p.name[0].isdigit()]) == 1


@pytest.mark.offsite
def test_what_a_killed_send_left_on_the_remote_host_is_swept_by_the_next(
        sshd: Sshd, tmp_path: Path) -> None:
    source = hostile_source(tmp_path / "Maildir")
    remote = tmp_path / "remote"
    job = job_of(source, tmp_path / "backups", [ssh_dest(sshd, remote)])
    first, _ = backup_at(job, START)
    # As kill -9 leaves them: a half-sent backup and a half-removed one.
    half = remote / "mail" / "20261101T030000Z.partial" / "mail" / "cur"
    half.mkdir(parents=True)
    (half / "x").write_bytes(b"half")
    (remote / "mail" / "20261031T020000Z.deleting" / "mail").mkdir(parents=True)
    stranger = remote / "mail" / "not-ours.partial"
    stranger.mkdir()
    second, results = backup_at(job, START + timedelta(days=1))
    assert results[0]["status"] == "ok"
    names = sorted(p.name for p in (remote / "mail").iterdir())
    assert names == sorted([".owner", first, second, "latest", "not-ours.partial"])


@pytest.mark.offsite
def test_destination_commands_wait_for_nobody_while_the_job_runs(sshd: Sshd,
                                                                 tmp_path: Path) -> None:
    from mailsnap.session import job_lock

    source = hostile_source(tmp_path / "Maildir")
    remote = tmp_path / "remote"
    job = job_of(source, tmp_path / "backups", [])
    config = tmp_path / "mailsnap.toml"
    config.write_text(_toml(job, sshd, remote) + "keep_last = 1\n")
    with job_lock(job, "backup", dry_run=False):
        for command in (["prune", "-d", "offsite"], ["verify", "-d", "offsite"],
                        ["restore", "-d", "offsite", "--user", "x", "--into",
                         str(tmp_path / "out")]):
            result = mailsnap(*command, "--config", config)
            assert result.returncode == 3, (command, result.stdout, result.stderr)
            assert "already running" in result.stderr
    assert not (tmp_path / "out").exists()
