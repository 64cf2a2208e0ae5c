#!/usr/bin/env python3
"""Issue #12, part 3: is a btrfs send stream a cheaper change list than folder times?

    sudo PYTHONPATH=src .venv/bin/python scripts/bench_change_lists.py [--messages 200000]
        [--work /var/tmp] [--repeat 3]

Seeds the store of ``bench_incremental.py`` on a btrfs loop volume, takes a read-only
snapshot (the parent), applies a night's changes, takes a second one, and times, for a night
with no change, one with 1 % new mail and one with 1 % flag changes + moves:

- ``folder times``: what mailsnap's copier does to learn which folders changed: walk every
  directory that is not a ``cur/``/``new/`` (``os.scandir``) and ``lstat`` each ``cur/`` and
  ``new/`` (the comparison with the manifest's records is a string compare per folder);
- ``send --no-data``: ``btrfs send --no-data -p PARENT SNAP`` into a pipe that is read to the
  end (the stream's bytes counted, not parsed: parsing only adds to it), the O(changes) list
  of renames, links, unlinks and new files that part 3 would use instead of a walk.

Both from a warm cache (the second of each pair is the one reported; the walk reads the
snapshot's directories, which the nightly snapshot has just made). Prints a Markdown table.
What it does not measure: mailsnap would still read the previous manifest and write the new
one (the same for both ways), and the send stream needs the parent snapshot kept on the
source (``keep_parent_snapshot``), which holds every expunged message's blocks until the next
night.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))
sys.path.insert(0, str(TOP / "scripts"))

from bench_incremental import apply_newmail, apply_renames, seed, vmail_owner  # noqa: E402
from tests.helpers.loopfs import btrfs_volume, privileged_skip_reason  # noqa: E402


def folder_walk(root: Path) -> tuple[float, int]:
    """The copier's change detection without the manifest: seconds, message dirs seen."""
    started = time.perf_counter()
    pending = [str(root)]
    folders = 0
    while pending:
        path = pending.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name in ("cur", "new"):
                        os.lstat(entry.path)
                        folders += 1
                    elif entry.name != "tmp":
                        pending.append(entry.path)
    return time.perf_counter() - started, folders


def send_stream(parent: Path, snap: Path) -> tuple[float, int]:
    """``btrfs send --no-data -p``: seconds and stream bytes."""
    started = time.perf_counter()
    proc = subprocess.Popen(["btrfs", "send", "-q", "--no-data", "-p", str(parent), str(snap)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    size = 0
    while chunk := proc.stdout.read(1 << 20):
        size += len(chunk)
    if proc.wait() != 0:
        raise RuntimeError("btrfs send failed")
    return time.perf_counter() - started, size


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=200000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    reason = privileged_skip_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    rng = random.Random(7)
    uid, gid = vmail_owner(False)
    rows: list[tuple[str, str, float, str]] = []
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="mailsnap-bench-cl-", dir=args.work))
        stack.callback(shutil.rmtree, work, True)
        vol = stack.enter_context(btrfs_volume(work, size=str(
            max(2 << 30, args.messages * 9000 * 2 + (1 << 30)))))
        store = seed(vol.mail, args.messages, rng, uid, gid)
        snaps = vol.top / "snaps"
        snaps.mkdir()
        made: list[Path] = []

        def snapshot(name: str) -> Path:
            path = snaps / name
            subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(vol.mail), str(path)],
                           check=True, capture_output=True)
            made.append(path)
            return path

        def cleanup() -> None:
            for path in made:
                subprocess.run(["btrfs", "subvolume", "delete", str(path)], check=False,
                               capture_output=True)

        stack.callback(cleanup)
        parent = snapshot("0")
        for number, (night, change) in enumerate((
                ("no change", None), ("1 % new mail", apply_newmail),
                ("1 % renames + 1 % moves", apply_renames))):
            walks, sends = [], []
            size = folders = 0
            for rep in range(args.repeat):
                if change is not None:
                    change(store, rng)
                snap = snapshot(f"{number}-{rep}")
                for _ in range(2):  # the second: warm
                    walk, folders = folder_walk(snap)
                    sent, size = send_stream(parent, snap)
                walks.append(walk)
                sends.append(sent)
                parent = snap
            rows.append((night, "folder times (walk + lstat)", statistics.median(walks),
                         f"{folders} message dirs"))
            rows.append((night, "btrfs send --no-data -p", statistics.median(sends),
                         f"{size / 1e3:.1f} kB stream"))
    print(f"\n{args.messages} messages, {len(store.folders())} folders, median of "
          f"{args.repeat}\n")
    print("| night | change list | seconds | |\n|---|---|---:|---|")
    for night, how, seconds, note in rows:
        print(f"| {night} | {how} | {seconds:.3f} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
