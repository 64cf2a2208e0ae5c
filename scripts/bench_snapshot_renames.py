#!/usr/bin/env python3
"""Issue #12: what a renamed message costs inside a writable snapshot of the previous backup.

    sudo PYTHONPATH=src .venv/bin/python scripts/bench_snapshot_renames.py [--messages 200000]
        [--renames 3000] [--repeat 3] [--work /var/tmp]

On a btrfs target a backup starts as a writable snapshot of the previous one, and a flag
change (``cur/NAME:2,S`` → ``cur/NAME:2,RS``) becomes a rename there. This seeds the store of
``bench_incremental.py`` into a subvolume on a btrfs loop volume and times, ``--repeat``
times each, alternating:

- ``snapshot``: a fresh writable snapshot of it (what a night starts from), ``--renames``
  random messages renamed in place, then ``sync -f`` (the ``syncfs`` a backup ends with);
- ``own tree``: the same number of renames in the subvolume itself, whose b-tree leaves no
  snapshot shares, then ``sync -f``.

The difference is btrfs copying each b-tree leaf a change touches out of the tree the two
share (and the reference counts of what that leaf points to) on its first change. It is the
floor of a busy night on a btrfs target, whatever the copier does around it. Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
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

import bench_incremental  # noqa: E402
from tests.helpers.loopfs import btrfs_volume, privileged_skip_reason  # noqa: E402


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def messages_in(root: Path) -> list[str]:
    found: list[str] = []
    for directory, _dirs, files in os.walk(root):
        if directory.endswith("/cur"):
            found += [f"{directory}/{name}" for name in files]
    return found


def renames(paths: list[str], tree: Path, into: Path, suffix: str, *,
            back: bool = False) -> tuple[float, float]:
    """Rename ``paths`` (under ``tree``, taken as under ``into``) by adding ``suffix``
    (``back``: taking it away again); (seconds of the renames, seconds of the sync after)."""
    moved = [(f"{into}{p[len(str(tree)):]}") for p in paths]
    started = time.perf_counter()
    for path in moved:
        if back:
            os.rename(path + suffix, path)
        else:
            os.rename(path, path + suffix)
    ops = time.perf_counter() - started
    run("sync", "-f", str(into))
    return ops, time.perf_counter() - started - ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--renames", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    reason = privileged_skip_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    work = Path(tempfile.mkdtemp(prefix="mailsnap-bench-renames-", dir=args.work))
    try:
        size = str(args.messages * 9000 * 2 + (2 << 30))
        with btrfs_volume(work, size=size) as volume:
            store = volume.top / "previous"
            run("btrfs", "subvolume", "create", str(store))
            started = time.perf_counter()
            bench_incremental.seed(store, args.messages, random.Random(args.seed), 0, 0)
            run("sync", "-f", str(store))
            print(f"seeded {args.messages} messages in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
            rng = random.Random(args.seed)
            pool = messages_in(store)
            times: dict[str, list[tuple[float, float]]] = {"snapshot": [], "own tree": []}
            for rep in range(args.repeat):
                picked = rng.sample(pool, args.renames)
                night = volume.top / f"night{rep}"
                run("btrfs", "subvolume", "snapshot", str(store), str(night))
                run("sync", "-f", str(night))
                times["snapshot"].append(renames(picked, store, night, "X"))
                run("btrfs", "subvolume", "delete", str(night))
                run("btrfs", "subvolume", "sync", str(volume.top))
                times["own tree"].append(renames(picked, store, store, "X"))
                renames(picked, store, store, "X", back=True)  # for the next snapshot
                print(f"repeat {rep + 1}: {times['snapshot'][-1]} {times['own tree'][-1]}",
                      file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.messages} messages, {args.renames} renames in cur/, median of "
          f"{args.repeat}, btrfs on a loop device\n")
    print("| where | renames s | ms per rename | then sync s | total s |")
    print("|---|---:|---:|---:|---:|")
    for where, samples in times.items():
        ops = statistics.median(s[0] for s in samples)
        flush = statistics.median(s[1] for s in samples)
        print(f"| {where} | {ops:.2f} | {ops / args.renames * 1000:.3f} | {flush:.2f} | "
              f"{ops + flush:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
