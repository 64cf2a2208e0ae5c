"""rsync from a frozen (snapshot) tree into a new dated backup.

``-aHAX --numeric-ids``: permissions, times, hard links (Dovecot's COPY hard-links messages
between folders), ACLs and xattrs, with numeric ids so a restore on another host keeps the vmail
owner. ``--link-dest`` to the previous backup turns every unchanged message into a hard link, so a
nightly backup costs only what changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import logging
from pathlib import Path
import re
from typing import ClassVar

from mailsnap.copiers.base import CopyStats
from mailsnap.errors import CommandFailed, CopyFailed
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

# rsync exit codes worth explaining; 24 ("vanished") cannot happen on a snapshot, so it is an
# error here too: it would mean the source was not frozen.
EXIT_HINTS = {
    11: "the target is full or not writable",
    23: "some files could not be read or written",
    24: "files vanished while copying: the source is not a frozen snapshot",
}


class RsyncCopier:
    name: ClassVar[str] = "rsync"

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def argv(
        self, source: Path, dest: Path, previous: Path | None, excludes: Sequence[str]
    ) -> list[str]:
        argv = ["rsync", "-aHAX", "--numeric-ids", "--stats"]
        if previous is not None:
            argv.append(f"--link-dest={previous}")
        argv += [f"--exclude={pattern}" for pattern in excludes]
        # Trailing slashes: copy the *contents* of source into dest.
        argv += [f"{source}/", f"{dest}/"]
        return argv

    def copy(
        self,
        source: Path,
        dest: Path,
        *,
        previous: Path | None,
        excludes: Sequence[str],
        watch: Callable[[], None] | None = None,
    ) -> CopyStats:
        """Run rsync; dry run prints the command and copies nothing."""
        argv = self.argv(source, dest, previous, excludes)
        try:
            result = self.runner.run(argv, mutates=True, timeout=None, on_wait=watch)
        except CommandFailed as exc:
            hint = EXIT_HINTS.get(exc.exit_code_of_command or 0, "")
            raise CopyFailed(f"copy failed: {exc}" + (f" ({hint})" if hint else "")) from None
        return parse_stats(result.stdout)


def _number(text: str, label: str) -> int:
    match = re.search(rf"^{re.escape(label)}:\s*([\d,]+)", text, re.MULTILINE)
    return int(match.group(1).replace(",", "")) if match else 0


def parse_stats(stdout: str) -> CopyStats:
    """Read ``rsync --stats``: regular files seen, their total size, and how many were not
    transferred (hard-linked to the previous backup or unchanged)."""
    files_match = re.search(r"^Number of files:.*?reg:\s*([\d,]+)", stdout, re.MULTILINE)
    files = int(files_match.group(1).replace(",", "")) if files_match else 0
    transferred = _number(stdout, "Number of regular files transferred")
    return CopyStats(
        files=files,
        bytes=_number(stdout, "Total file size"),
        linked=max(files - transferred, 0),
    )
