#!/usr/bin/env python3
"""Benchmark: mailsnap's copiers against rsync and cp on one synthetic Maildir store, in one run.

    .venv/bin/python scripts/bench_copy.py [--messages 20000] [--repeat 3] [--cold] [--json]

Every method copies the same store into a fresh directory; seconds are the median of --repeat
runs, peak RSS is the child's own (wait4). The machine is shared and noisy: compare the ratio to
`rsync -a`, not the seconds. With root and btrfs-progs, end-to-end `mailsnap backup --backend
btrfs` runs too, on a loop device. --cold drops the page cache before each run (root only).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import contextlib
import json
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

from tests.helpers.loopfs import btrfs_volume  # noqa: E402

MAILSNAP = [sys.executable, "-m", "mailsnap"]
FOLDERS = ("", ".Sent", ".Archive", ".Drafts", ".Junk", ".Lists.debian", ".Caf&AOk-")


def make_store(root: Path, messages: int, users: int = 4, seed: int = 7) -> int:
    """users × folders of messages with a log-normal size (median ~6 KiB, a few large)."""
    rng = random.Random(seed)
    total = 0
    for n in range(messages):
        user = root / f"user{n % users}" / "Maildir"
        folder = rng.choice(FOLDERS)
        base = user / folder if folder else user
        if not (base / "cur").exists():
            for sub in ("cur", "new", "tmp"):
                (base / sub).mkdir(parents=True, exist_ok=True)
        size = min(int(rng.lognormvariate(8.7, 1.0)), 5 << 20)
        flags = rng.choice(("S", "RS", "", "FS"))
        name = f"{1700000000 + n}.M{n}P{n % 97}.bench,S={size}:2,{flags}"
        (base / "cur" / name).write_bytes(os.urandom(size // 2).hex().encode()[:size])
        total += size
    return total


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(seconds, peak RSS in KiB) of one command."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{argv[0]} failed: {err[-2000:]}")
    return seconds, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.cold and os.geteuid() != 0:
        raise SystemExit("--cold needs root (it drops the page cache)")

    work = Path(tempfile.mkdtemp(prefix="mailsnap-bench-"))
    results: list[dict[str, object]] = []
    try:
        store = work / "store"
        size = make_store(store, args.messages)
        print(f"store: {args.messages} messages, {size / 2**20:.0f} MiB in {store}",
              file=sys.stderr)
        env = dict(os.environ, MAILSNAP_RUN_DIR=str(work / "run"))

        # Methods run round-robin (all of round 1, then round 2 …) so that a burst of noise
        # from other work on the machine is spread over every method, not one.
        methods: list[tuple[str, Callable[[int], list[str]], Callable[[int], None]]] = []

        def method(name: str, make_argv: Callable[[int], list[str]],
                   prepare: Callable[[int], None] = lambda i: None) -> None:
            methods.append((name, make_argv, prepare))

        def wipe(target: Path) -> Callable[[int], None]:
            return lambda i: shutil.rmtree(target, ignore_errors=True)

        out = work / "out"
        out.mkdir()
        method("rsync -a (full)", lambda i: ["rsync", "-a", f"{store}/", f"{out}/rsync/"],
               wipe(out / "rsync"))
        method("cp -a (full)", lambda i: ["cp", "-a", str(store), str(out / "cp")],
               wipe(out / "cp"))
        method("rsync -a --link-dest (no change)",
               lambda i: ["rsync", "-a", f"--link-dest={out}/rsync", f"{store}/",
                          f"{out}/linkdest/"], wipe(out / "linkdest"))
        live = out / "live"
        method("mailsnap backup --backend live (full)",
               lambda i: [*MAILSNAP, "backup", "--source", str(store), "--target", str(live),
                          "--backend", "live"], wipe(live))
        method("mailsnap backup --backend live (no change)",
               lambda i: [*MAILSNAP, "backup", "--source", str(store), "--target", str(live),
                          "--backend", "live"])

        with contextlib.ExitStack() as stack:
            if os.geteuid() == 0 and shutil.which("mkfs.btrfs"):
                volume = stack.enter_context(btrfs_volume(work, size=str(max(size * 3, 1 << 30))))
                mail = volume.mail
                subprocess.run(["cp", "-a", f"{store}/.", str(mail)], check=True)
                snap = out / "btrfs"
                method("mailsnap backup --backend btrfs (full)",
                       lambda i: [*MAILSNAP, "backup", "--source", str(mail), "--target",
                                  str(snap), "--backend", "btrfs"], wipe(snap))
                method("mailsnap backup --backend btrfs (no change)",
                       lambda i: [*MAILSNAP, "backup", "--source", str(mail), "--target",
                                  str(snap), "--backend", "btrfs"])
            times: dict[str, list[float]] = {name: [] for name, _, _ in methods}
            peaks: dict[str, list[int]] = {name: [] for name, _, _ in methods}
            for i in range(args.repeat):
                for name, make_argv, prepare in methods:
                    prepare(i)
                    if args.cold:
                        drop_caches()
                    seconds, peak = run_child(make_argv(i), env)
                    times[name].append(seconds)
                    peaks[name].append(peak)
                    print(f"  round {i + 1}: {name}: {seconds:.2f}s", file=sys.stderr)
            for name, _, _ in methods:
                results.append({"method": name, "seconds": statistics.median(times[name]),
                                "peak_rss_mib": max(peaks[name]) / 1024})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = next(r["seconds"] for r in results if r["method"] == "rsync -a (full)")
    for r in results:
        r["ratio_to_rsync"] = float(r["seconds"]) / float(base)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps({"messages": args.messages, "bytes": size, "cold": args.cold,
                          "results": results}, indent=2))
        return
    print(f"\n{args.messages} messages, {size / 2**20:.0f} MiB, "
          f"{'cold' if args.cold else 'warm'} cache, median of {args.repeat}")
    print(f"{'method':48} {'seconds':>8} {'× rsync':>8} {'peak RSS':>9}")
    for r in results:
        print(f"{r['method']:48} {r['seconds']:8.2f} {r['ratio_to_rsync']:8.2f} "
              f"{r['peak_rss_mib']:7.0f} MiB")


if __name__ == "__main__":
    main()
