"""A stand-in for Dovecot's file operations on a Maildir, as fast as Python allows: deliveries
through tmp/, new/→cur/ moves, flag renames, moves between folders, expunges. (The real Dovecot
under IMAP/LMTP load lives in tests/livemail; this one needs no server and runs everywhere.)"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
import random
import threading

FOLDERS = ("", ".Sent", ".Archive", ".Caf&AOk- Ideen", '.Work "Q4" &- Plans')
FLAGS = ("", "S", "RS", "FS", "S", "ST")


def seed(root: Path, per_folder: int, size: int = 2048) -> int:
    """Create a Maildir++ tree with ``per_folder`` messages in each folder's cur/."""
    counter = itertools.count()
    for folder in FOLDERS:
        base = root / folder if folder else root
        for sub in ("cur", "new", "tmp"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for _ in range(per_folder):
            n = next(counter)
            name = f"1700000000.M{n}P1.seed,S={size}:2,{FLAGS[n % len(FLAGS)]}"
            (base / "cur" / name).write_bytes(b"x" * size)
    (root / "dovecot-uidlist").write_text("3 V1 N1\n")
    return per_folder * len(FOLDERS)


class MaildirWriter(threading.Thread):
    def __init__(self, root: Path, rng_seed: int = 1) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.rng = random.Random(rng_seed)
        self.stop_event = threading.Event()
        self.ops = 0
        self.counter = itertools.count()

    def _folder(self) -> Path:
        folder = self.rng.choice(FOLDERS)
        return self.root / folder if folder else self.root

    def _pick(self, directory: Path) -> str | None:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return None
        return self.rng.choice(names) if names else None

    def step(self) -> None:
        folder = self._folder()
        op = self.rng.random()
        try:
            if op < 0.25:  # delivery: written in tmp/, then renamed into new/
                name = f"1800000000.M{next(self.counter)}P2.writer"
                tmp = folder / "tmp" / name
                tmp.write_bytes(b"delivered\n" * 50)
                os.rename(tmp, folder / "new" / name)
            elif op < 0.40:  # first SELECT: new/ → cur/
                name = self._pick(folder / "new")
                if name:
                    os.rename(folder / "new" / name, folder / "cur" / f"{name}:2,")
            elif op < 0.80:  # flag change: a rename within cur/
                name = self._pick(folder / "cur")
                if name:
                    base = name.split(":", 1)[0]
                    flags = self.rng.choice(FLAGS)
                    os.rename(folder / "cur" / name, folder / "cur" / f"{base}:2,{flags}")
            elif op < 0.95:  # MOVE to another folder
                name = self._pick(folder / "cur")
                other = self._folder()
                if name and other != folder:
                    os.rename(folder / "cur" / name, other / "cur" / name)
            else:  # EXPUNGE
                name = self._pick(folder / "cur")
                if name:
                    os.unlink(folder / "cur" / name)
            self.ops += 1
        except FileNotFoundError:
            pass  # raced with ourselves (picked a name another op just changed)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.step()

    def stop(self) -> int:
        self.stop_event.set()
        self.join(timeout=10)
        return self.ops
