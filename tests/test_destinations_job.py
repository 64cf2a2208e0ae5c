"""A whole job with an SSH and a restic destination, through the CLI: back up (from a real
btrfs snapshot), prune, verify and restore from each, as the issue's "done when" asks.

The restic repository is a local directory, the SSH store a directory reached through a real
sshd on 127.0.0.1; the restic destination reads the snapshot, the SSH one the published
backup, so the run shows both kinds of source and the snapshot's hold time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from tests.helpers.loopfs import BtrfsVolume
from tests.helpers.maildir_writer import seed
from tests.helpers.sshd import Sshd
from tests.helpers.trees import diff_trees

pytestmark = [pytest.mark.offsite, pytest.mark.privileged, pytest.mark.slow]


def mailsnap(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailsnap", *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=300)


def config_for(tmp_path: Path, btrfs: BtrfsVolume, sshd: Sshd) -> Path:
    password = tmp_path / "restic.pw"
    password.write_text("correct horse battery staple\n")
    os.chmod(password, 0o600)
    config = tmp_path / "mailsnap.toml"
    config.write_text("\n".join([
        "[[job]]", 'name = "mail"', 'backend = "btrfs"', f'source = "{btrfs.mail}"',
        f'target = "{tmp_path / "backups"}"', f'run_dir = "{tmp_path / "run"}"', 'users = ""',
        "keep_last = 3",
        "[[job.destination]]", 'name = "offsite"', 'type = "ssh"',
        f'target = "{sshd.url(tmp_path / "remote")}"', f'ssh_key = "{sshd.key}"',
        f'known_hosts = "{sshd.known_hosts}"', 'ssh_options = ["-F", "/dev/null"]',
        'from = "local"', "keep_last = 2",
        "[[job.destination]]", 'name = "vault"', 'type = "restic"',
        f'repository = "{tmp_path / "restic"}"', f'password_file = "{password}"',
        "init = true", 'from = "snapshot"', "keep_last = 2",
        f'options = ["--cache-dir", "{tmp_path / "restic-cache"}"]', ""]))
    return config


def test_a_job_with_ssh_and_restic_destinations_backs_up_prunes_verifies_and_restores(
        btrfs: BtrfsVolume, sshd: Sshd, tmp_path: Path) -> None:
    seed(btrfs.mail, per_folder=60)
    (btrfs.mail / "tmp" / "half").write_bytes(b"half-written")
    config = config_for(tmp_path, btrfs, sshd)
    runs = []
    for night in range(3):
        if night:  # 1 % flag changes and a delivery between nights
            cur = sorted((btrfs.mail / "cur").iterdir())
            for path in cur[: max(1, len(cur) // 100)]:
                path.rename(path.with_name(path.name + "T"))
            (btrfs.mail / "new" / f"17000000{night}.M1P1.host,S=5").write_bytes(b"fresh")
        result = mailsnap("backup", "--config", config, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        runs.append(json.loads(result.stdout)["jobs"][0])
    for run in runs:
        assert [(d["name"], d["status"], d["from"]) for d in run["destinations"]] == [
            ("vault", "ok", "snapshot"), ("offsite", "ok", "local")]
        # The snapshot was released before the SSH upload (from = "local") started.
        offsite = run["destinations"][1]
        assert run["snapshot_seconds"] < run["seconds"] - offsite["seconds"] + 0.5
        assert offsite["snapshot_held_seconds"] == 0.0
        assert run["destinations"][0]["snapshot_held_seconds"] == run["destinations"][0][
            "seconds"] > 0
    # restic read only what changed: the renamed and the new message.
    second = runs[1]["destinations"][0]["details"]
    assert second["files_new"] + second["files_changed"] <= 3, second
    assert second["files_unmodified"] >= runs[0]["files"] - 3
    # Each destination pruned to its own keep_last = 2; the local store keeps 3.
    listed = {name: json.loads(mailsnap("list", "--config", config, "-d", name,
                                        "--json").stdout)["backups"]
              for name in ("offsite", "vault")}
    newest_two = [Path(r["backup"]).name for r in runs[1:]]
    assert [b["run_id"] for b in listed["offsite"]] == newest_two
    assert [b["run_id"] for b in listed["vault"]] == newest_two
    assert runs[2]["destinations"][0]["pruned"] and runs[2]["destinations"][1]["pruned"]
    # Both verify, deeply; the SSH copy equals the local backup.
    for name in ("offsite", "vault"):
        verified = mailsnap("verify", "--config", config, "-d", name, "--deep", "--all")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert verified.stdout.count("intact") == 2
    local = tmp_path / "backups/mail" / newest_two[-1] / "mail"
    assert diff_trees(local, tmp_path / "remote/mail" / newest_two[-1] / "mail") == []
    # Restore a folder from each into a new tree: the same messages as the local backup's.
    folder = next(p.name for p in local.iterdir() if p.name.startswith(".") and p.is_dir())
    for name in ("offsite", "vault"):
        out = tmp_path / f"restored-{name}"
        restored = mailsnap("restore", "--config", config, "-d", name, "--user", "x",
                            "--folder", folder, "--into", out)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        got = sorted(p.read_bytes() for p in (out / folder / "cur").iterdir())
        want = sorted(p.read_bytes() for p in (local / folder / "cur").iterdir())
        assert got == want and got
