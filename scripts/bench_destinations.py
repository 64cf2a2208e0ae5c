#!/usr/bin/env python3
"""Benchmark for issue #11 (off-site destinations): what a night costs at a restic repository
and at an SSH store, after no change, 1 % flag changes and moves, and 1 % new mail.

    sudo PYTHONPATH=src .venv/bin/python scripts/bench_destinations.py [--messages 20000]
        [--quick] [--work /var/tmp] [--json FILE]

Needs root, btrfs-progs, rsync, restic and openssh-server. The store is seeded on a btrfs loop
volume by ``bench_incremental.py``'s seeder (same users, folders, sizes, Dovecot files); one
``btrfs`` job backs it up with two destinations: a local restic repository (``from =
"snapshot"``) and an SSH store on 127.0.0.1 through a private sshd (``from = "local"``). In the
same run, a second restic repository fed from the published local backup (``from = "local"``,
whose device number stays the same from night to night, unlike a new snapshot's: restic 0.14
stores each file's device id in its directory's metadata). And on the same snapshots' content,
the baselines: a bare ``restic backup`` of a
fresh snapshot mounted at a stable path into its own repository, and a bare
``rsync -aHAX --link-dest`` over the same ssh into its own directory. Reported per night and
destination: seconds (mailsnap's figure is that destination's own stage, from the run report),
files restic found new / changed / unmodified, bytes sent (restic: data added; rsync: literal
data), and how much the repository or the remote directory grew on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))
sys.path.insert(0, str(TOP / "scripts"))

from bench_incremental import apply_newmail, apply_renames, seed  # noqa: E402
from tests.helpers.loopfs import btrfs_volume, privileged_skip_reason  # noqa: E402
from tests.helpers.sshd import running_sshd  # noqa: E402

NIGHTS = ("full", "nochange", "renames", "newmail")
PASSWORD = "bench-password"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def du(path: Path) -> int:
    """Bytes on disk under ``path``, each inode once (hard links between backups are free)."""
    out = subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def restic_env() -> dict[str, str]:
    return dict(os.environ, RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR="/var/tmp/restic-cache")


def bare_restic(repo: Path, snapshot: Path, stable: Path) -> dict[str, Any]:
    """``restic backup`` of ``snapshot`` bind-mounted at ``stable``, as an admin would script
    it (no Maildir rules: tmp/ and lock files go in too)."""
    subprocess.run(["mount", "--bind", "-o", "ro", str(snapshot), str(stable)], check=True)
    try:
        started = time.perf_counter()
        out = subprocess.run(["restic", "-r", str(repo), "backup", "--json", "--host", "bench",
                              str(stable)], capture_output=True, text=True, check=True,
                             env=restic_env())
        seconds = time.perf_counter() - started
    finally:
        subprocess.run(["umount", str(stable)], check=True)
    summary = next(json.loads(line) for line in out.stdout.splitlines()
                   if '"message_type":"summary"' in line.replace(" ", ""))
    return {"seconds": seconds, "files_new": summary["files_new"],
            "files_changed": summary["files_changed"],
            "files_unmodified": summary["files_unmodified"],
            "bytes_sent": summary["data_added"]}


def bare_rsync(ssh: list[str], snapshot: Path, remote: Path, previous: str | None,
               name: str) -> dict[str, Any]:
    argv = ["rsync", "-aHAX", "--numeric-ids", "-s", "--stats", "-e", " ".join(ssh)]
    if previous:
        argv.append(f"--link-dest=../{previous}")
    argv += [f"{snapshot}/", f"root@127.0.0.1:{remote}/{name}/"]
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    literal = re.search(r"^Literal data:\s*([\d,]+)", out.stdout, re.MULTILINE)
    return {"seconds": seconds,
            "bytes_sent": int(literal.group(1).replace(",", "")) if literal else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="1,000 messages")
    parser.add_argument("--work", default="/var/tmp")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    if args.quick:
        args.messages = 1000
    reason = privileged_skip_reason()
    missing = [t for t in ("rsync", "restic", "/usr/sbin/sshd") if shutil.which(t) is None]
    if reason or missing:
        raise SystemExit(f"cannot run: {reason or 'missing ' + ', '.join(missing)}")
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="mailsnap-bench-dest-", dir=args.work))
        stack.callback(shutil.rmtree, work, True)
        (work / "src").mkdir()
        size = max(2 << 30, args.messages * 9000 * 3)
        src = stack.enter_context(btrfs_volume(work / "src", size=str(size)))
        sshd = stack.enter_context(running_sshd(work / "sshd"))
        ssh = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
               "-i", str(sshd.key), "-o", f"UserKnownHostsFile={sshd.known_hosts}",
               "-p", str(sshd.port)]
        log(f"seeding {args.messages} messages …")
        store = seed(src.mail, args.messages, rng, 0, 0)
        os.sync()
        log(f"seeded: {store.messages()} messages, {store.bytes / 1e6:.1f} MB")
        repo, bare_repo = work / "restic", work / "restic-bare"
        repo_local = work / "restic-local"
        for r in (repo, bare_repo, repo_local):
            subprocess.run(["restic", "-r", str(r), "init"], check=True, capture_output=True,
                           env=restic_env())
        (work / "password").write_text(PASSWORD + "\n")
        remote, bare_remote = work / "remote", work / "remote-bare"
        bare_remote.mkdir()
        config = work / "mailsnap.toml"
        config.write_text("\n".join([
            "[[job]]", 'name = "mail"', 'backend = "btrfs"', f'source = "{src.mail}"',
            f'target = "{work / "local"}"', f'run_dir = "{work / "run"}"',
            f'state_dir = "{work / "state"}"',
            "[[job.destination]]", 'name = "restic"', 'type = "restic"',
            f'repository = "{repo}"', f'password_file = "{work / "password"}"',
            'from = "snapshot"',
            "[[job.destination]]", 'name = "restic-local"', 'type = "restic"',
            f'repository = "{repo_local}"', f'password_file = "{work / "password"}"',
            'from = "local"',
            "[[job.destination]]", 'name = "ssh"', 'type = "ssh"',
            f'target = "{sshd.url(remote)}"', f'ssh_key = "{sshd.key}"',
            f'known_hosts = "{sshd.known_hosts}"', 'ssh_options = ["-F", "/dev/null"]',
            'from = "local"', ""]))
        env = dict(os.environ, PYTHONPATH=str(TOP / "src"),
                   RESTIC_CACHE_DIR="/var/tmp/restic-cache")
        stable = work / "stable"
        stable.mkdir()
        snapdir = src.top / "bench-snaps"
        snapdir.mkdir()
        previous_bare: str | None = None
        for night in NIGHTS:
            change: dict[str, Any] = {}
            if night == "renames":
                change = apply_renames(store, rng)
            elif night == "newmail":
                change = apply_newmail(store, rng)
            os.sync()
            log(f"{night}: {change}")
            sizes = {"restic": du(repo), "restic-local": du(repo_local),
                     "ssh": du(remote) if remote.exists() else 0,
                     "bare-restic": du(bare_repo), "bare-rsync": du(bare_remote)}
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "mailsnap", "backup", "--config",
                                  str(config), "--json"], capture_output=True, text=True,
                                 env=env, check=False)
            whole = time.perf_counter() - started
            report = json.loads(out.stdout)["jobs"][0]
            if out.returncode != 0:
                raise SystemExit(f"mailsnap failed: {report.get('error')}")
            for d in report["destinations"]:
                details = d["details"]
                rows.append({"night": night, "method": f"mailsnap → {d['name']}",
                             "seconds": d["seconds"], "whole_run": whole,
                             "snapshot_held": report["snapshot_seconds"],
                             "files_new": details.get("files_new"),
                             "files_changed": details.get("files_changed"),
                             "files_unmodified": details.get("files_unmodified"),
                             "bytes_sent": d["bytes_sent"],
                             "grew": du({"restic": repo, "restic-local": repo_local}.get(
                                 d["name"], remote)) - sizes[d["name"]]})
            snap = snapdir / night
            subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(src.mail), str(snap)],
                           check=True, capture_output=True)
            try:
                bare = bare_restic(bare_repo, snap, stable)
                rows.append({"night": night, "method": "bare restic backup", **bare,
                             "grew": du(bare_repo) - sizes["bare-restic"]})
                rsync = bare_rsync(ssh, snap, bare_remote, previous_bare, night)
                rows.append({"night": night, "method": "bare rsync --link-dest over ssh",
                             **rsync, "grew": du(bare_remote) - sizes["bare-rsync"]})
                previous_bare = night
            finally:
                subprocess.run(["btrfs", "subvolume", "delete", str(snap)], check=True,
                               capture_output=True)
            for row in rows:
                if row["night"] == night:
                    log(f"  {row['method']}: {row['seconds']:.2f} s, sent "
                        f"{(row.get('bytes_sent') or 0) / 1e6:.2f} MB, grew "
                        f"{row['grew'] / 1e6:.2f} MB")
    print(f"\n{args.messages} messages, {store.bytes / 1e6:.0f} MB; one run, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| night | method | seconds | restic files new / changed / unmodified | sent MB "
          "| grew MB |")
    print("|---|---|---:|---|---:|---:|")
    for r in rows:
        files = ("" if r.get("files_new") is None else
                 f"{r['files_new']} / {r['files_changed']} / {r['files_unmodified']}")
        sent = "" if r.get("bytes_sent") is None else f"{r['bytes_sent'] / 1e6:.2f}"
        print(f"| {r['night']} | {r['method']} | {r['seconds']:.2f} | {files} | {sent} | "
              f"{r['grew'] / 1e6:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
