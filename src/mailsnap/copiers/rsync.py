"""rsync from a frozen (snapshot) tree into a new dated backup.

``-aHAX --numeric-ids``: permissions, times, hard links (Dovecot's COPY hard-links messages
between folders), ACLs and xattrs, with numeric ids so a restore on another host keeps the vmail
owner. ``--link-dest`` to the previous backup turns every unchanged message into a hard link, so a
nightly backup costs only what changed.

A Maildir's ``tmp/`` content (half-written deliveries) is left out by the Maildir rule in
``mailsnap.maildirs``, which no rsync pattern can express ("tmp/ beside cur/ and new/"; the old
``tmp/*`` also dropped a whole user called ``tmp``). So the frozen tree is surveyed first, and
rsync gets one anchored rule per Maildir, ``/<path>/tmp/*``, through a private
``--exclude-from`` file read with ``--from0`` (NUL-terminated: any byte but NUL may be in a
folder name, a newline included). The user's and the default patterns stay on the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import logging
import os
from pathlib import Path
import re
import tempfile
from typing import ClassVar

# The module, not its names: mailsnap.maildirs imports mailsnap.copiers.excludes, so importing
# it first runs this package's __init__, which imports this module before maildirs has finished.
from mailsnap import faults, maildirs
from mailsnap.copiers.base import CopyStats, Previous
from mailsnap.errors import CommandFailed, CopyFailed
from mailsnap.runner import Runner

log = logging.getLogger(__name__)

# How often ``watch`` runs while rsync copies (a fault matrix run makes it shorter).
WATCH_INTERVAL = 5.0

# rsync exit codes worth explaining; 24 ("vanished") cannot happen on a snapshot, so it is an
# error here too: it would mean the source was not frozen.
EXIT_HINTS = {
    11: "the target is full or not writable",
    23: "some files could not be read or written",
    24: "files vanished while copying: the source is not a frozen snapshot",
}


# rsync's wildcard characters. A backslash escapes them only in a pattern that has a wildcard;
# a tmp rule always ends in "*", so escaping is always honoured.
_WILDCARDS = re.compile(r"([*?\[\\])")


def tmp_rule(maildir: str) -> str:
    """The rsync exclude rule for the content of ``maildir``'s ``tmp/`` (relative, "/"
    separators, "" for the root): ``/<maildir>/tmp/*``, anchored at the top of the copy, with
    rsync's wildcard characters in the path escaped so a folder named ``a*b`` or ``[x]`` is
    matched literally."""
    prefix = "/" + _WILDCARDS.sub(r"\\\1", maildir) if maildir else ""
    return f"{prefix}/{maildirs.TMP_DIR}/*"


@contextlib.contextmanager
def _rules_file(rules: Sequence[str]) -> Iterator[Path]:
    """A private NUL-separated rules file for ``--exclude-from``, removed afterwards.

    In the system temp directory: not in the source (a read-only snapshot), not in the backup
    (it would be published with it), and not in TARGET/<job>/ (the store owns every name there
    and sweeps what it does not know). ``mkstemp`` creates it 0600: it lists every folder name.
    Not used in dry run (``copy`` writes no rules file then).
    """
    fd, name = tempfile.mkstemp(prefix="mailsnap-rsync-", suffix=".exclude")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            for rule in rules:
                # fsencode gives back the original bytes of a non-UTF-8 name.
                handle.write(os.fsencode(rule) + b"\0")
        yield path
    finally:
        path.unlink(missing_ok=True)


class RsyncCopier:
    name: ClassVar[str] = "rsync"

    def __init__(self, runner: Runner, *,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.runner = runner
        # Given (files checked, bytes) as rsync goes; only then is rsync asked for progress.
        self.progress = progress

    def argv(
        self,
        source: Path,
        dest: Path,
        previous: Path | None,
        excludes: Sequence[str],
        exclude_from: Path | None = None,
    ) -> list[str]:
        """The rsync command. ``exclude_from``: a NUL-separated rules file (the Maildir
        ``tmp/`` rules), read with ``--from0``."""
        argv = ["rsync", "-aHAX", "--numeric-ids", "--stats"]
        if self.progress is not None:
            argv.append("--info=progress2")  # one overall line, redrawn; read by _Progress2
        if previous is not None:
            argv.append(f"--link-dest={previous}")
        if exclude_from is not None:
            argv += ["--from0", f"--exclude-from={exclude_from}"]
        argv += [f"--exclude={pattern}" for pattern in excludes]
        # Trailing slashes: copy the *contents* of source into dest.
        argv += [f"{source}/", f"{dest}/"]
        return argv

    def tmp_rules(self, source: Path, excludes: Sequence[str]) -> list[str]:
        """One rule per Maildir in ``source``, from a read-only survey of the frozen tree.

        Dry run: a snapshot is not mounted, so its mount point may be missing or empty; then
        there is nothing to survey and no rule (rsync does not run anyway).
        """
        if self.runner.dry_run and not source.is_dir():
            log.info("[dry-run] %s is not mounted: Maildir tmp/ rules not computed", source)
            return []
        found = maildirs.survey(source, excludes).maildirs
        log.info("leaving out the tmp/ content of %d Maildirs", len(found))
        return [tmp_rule(rel) for rel in found]

    def copy(
        self,
        source: Path,
        dest: Path,
        *,
        previous: Previous | None,
        excludes: Sequence[str],
        watch: Callable[[], None] | None = None,
        manifest: Path | None = None,
    ) -> CopyStats:
        """Survey the frozen source for its Maildirs, then run rsync. No manifest: rsync does
        not say which files it linked (the next Maildir copy after it is a full one).

        Dry run: the survey runs (read-only) where the source is there, no rules file is
        written, and the rsync command is printed, not run.
        """
        rules = self.tmp_rules(source, excludes)
        with contextlib.ExitStack() as stack:
            rules_path = None
            if rules and not self.runner.dry_run:
                rules_path = stack.enter_context(_rules_file(rules))
            argv = self.argv(source, dest, previous.content if previous else None, excludes,
                             exclude_from=rules_path)
            try:
                result = self.runner.run(
                    argv, mutates=True, timeout=None, on_wait=watch,
                    poll_interval=faults.poll_interval(WATCH_INTERVAL),
                    on_output=_Progress2(self.progress) if self.progress else None)
            except CommandFailed as exc:
                hint = EXIT_HINTS.get(exc.exit_code_of_command or 0, "")
                raise CopyFailed(
                    f"copy failed: {exc}" + (f" ({hint})" if hint else "")
                ) from None
        return parse_stats(result.stdout)


# "  1,234,567  45%   12.34MB/s    0:00:10 (xfr#123, to-chk=456/789)"; to-chk counts down
# the entries (files, directories, links) still to check out of those listed so far.
PROGRESS2_RE = re.compile(r"^\s*([\d,]+)\s+\d+%.*?to-chk=(\d+)/(\d+)")


class _Progress2:
    """Reads ``rsync --info=progress2`` output as it arrives (chunks cut anywhere; lines end
    in ``\r``) and reports (entries checked, bytes) to ``report``."""

    def __init__(self, report: Callable[[int, int], None]) -> None:
        self.report = report
        self.pending = ""

    def __call__(self, chunk: str) -> None:
        *lines, self.pending = re.split(r"[\r\n]", self.pending + chunk)
        for line in reversed(lines):  # only the newest complete line matters
            match = PROGRESS2_RE.match(line)
            if match:
                left, listed = int(match.group(2)), int(match.group(3))
                self.report(listed - left, int(match.group(1).replace(",", "")))
                return


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
