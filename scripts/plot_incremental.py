#!/usr/bin/env python3
"""Plots for issue #12 from ``scripts/bench_incremental.py --json`` files: a night's whole-run
time against the store's size, and against the share of the store that changed.

    .venv/bin/pip install -e '.[bench]'       # matplotlib
    .venv/bin/python scripts/plot_incremental.py RUN.json [RUN.json ...] --out docs/

Each JSON file is one benchmark run (one store size, one target file system); where two runs
measured the same method at the same size, the one named later is drawn. Writes
``bench-size.png`` (the no-change night and the 1 % new-mail night against the number of
messages, log-log, one line per method and target) and ``bench-changes.png`` (time against the
change rate: no change 0 %, 1 % flag changes, 1 % new mail, 2 % renames and moves, 10 % flag
changes, for the largest store measured with more than one method, or ``--changes-at``). Lines
of a method measured at only one size are drawn as points.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
import json
from pathlib import Path
from typing import Any

CHANGE_RATE = {"nochange": 0.0, "flags1": 1.0, "newmail": 1.0, "renames": 2.0,
               "flags10": 10.0}
LABEL = {"mailsnap-maildir": "mailsnap", "mailsnap-rsync": "mailsnap copier=rsync",
         "rsync --link-dest": "rsync --link-dest", "doveadm backup": "doveadm backup"}
SKIP = {"rsync --link-dest +snapshot"}


def label(method: str, target: str) -> str:
    return f"{LABEL.get(method, method)}, {target} target"


def load(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in paths]


def plot_size(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, scenario, title in ((axes[0], "nochange", "no change"),
                                (axes[1], "newmail", "1 % new mail")):
        # label → size → seconds: of two runs at one size, the one named later wins.
        lines: dict[str, dict[int, float]] = defaultdict(dict)
        for run in runs:
            for row in run["summary"]:
                if row["scenario"] == scenario and row["method"] not in SKIP:
                    key = label(row["method"], run["target_fs"])
                    lines[key][run["messages"]] = row["median_seconds"]
        for key, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points.items()), strict=True)
            ax.plot(xs, ys, marker="o", label=key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("messages in the store")
        ax.set_title(f"whole run, {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "bench-size.png", dpi=110)


# The line of each method: nights of flag changes only; the other nights as points beside it.
FLAG_NIGHTS = ("nochange", "flags1", "flags10")
OTHER_NIGHTS = {"newmail": ("s", "1 % new mail"), "renames": ("^", "1 % renames + 1 % moves")}


def plot_changes(runs: list[dict[str, Any]], out: Path, at: int | None) -> None:
    import matplotlib.pyplot as plt

    # The largest store that has more than one method to compare, unless told.
    compared = [r["messages"] for r in runs if len({row["method"] for row in r["summary"]}) > 1]
    largest = at or max(compared or [run["messages"] for run in runs])
    # label → scenario → seconds: of two runs, the one named later wins.
    found: dict[str, dict[str, float]] = defaultdict(dict)
    for run in (r for r in runs if r["messages"] == largest):
        for row in run["summary"]:
            if row["scenario"] in CHANGE_RATE and row["method"] not in SKIP:
                found[label(row["method"], run["target_fs"])][row["scenario"]] = (
                    row["median_seconds"])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key, nights in sorted(found.items()):
        points = sorted((CHANGE_RATE[n], nights[n]) for n in FLAG_NIGHTS if n in nights)
        color = None
        if points:
            xs, ys = zip(*points, strict=True)
            (line,) = ax.plot(xs, ys, marker="o", label=key)
            color = line.get_color()
        for night, (marker, _what) in OTHER_NIGHTS.items():
            if night in nights:
                ax.plot([CHANGE_RATE[night]], [nights[night]], marker=marker, linestyle="",
                        color=color, markersize=8, label=None if points else key)
    for marker, what in OTHER_NIGHTS.values():
        ax.plot([], [], marker=marker, linestyle="", color="grey", label=what)
    ax.set_xlabel("share of the store changed since the last backup (%): "
                  "lines are flag changes")
    ax.set_ylabel("seconds (whole run)")
    ax.set_yscale("log")
    ax.set_title(f"{largest:,} messages: a night's cost against what changed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bench-changes.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench_incremental.py --json files")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--changes-at", type=int, metavar="MESSAGES",
                        help="store size of the change-rate plot (default: the largest with "
                        "more than one method)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = load(args.runs)
    plot_size(runs, args.out)
    plot_changes(runs, args.out, args.changes_at)
    print(f"wrote {args.out / 'bench-size.png'} and {args.out / 'bench-changes.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
