"""A restic repository as a destination: local, ``sftp:``, ``s3:``, ``rest:``, ``b2:`` …

Every call is ``restic [-r REPO] (--password-file F | --password-command CMD) [options…]
SUBCOMMAND …`` through the runner, as an argv list. What this module decides, and why:

- **The same path every night.** restic finds the parent snapshot (whose unchanged files it
  does not read again) by host and identical paths. A snapshot mount is already stable; the
  dated local backup (``TARGET/<job>/<run id>/mail``) is not, so it is bind-mounted read-only
  at ``<work_dir>/restic/<destination>`` for the backup and unmounted afterwards, always. Its
  files are hard links whose link count (so ctime) changes every night: ``--ignore-ctime``.
- **Each Maildir's tmp/ content is left out** by one anchored pattern per Maildir, from the
  same ``maildirs.survey`` every copier uses (a pattern like ``tmp/*`` would drop a user called
  ``tmp``), in a private exclude file.
- **The cache stays where restic keeps it** (``$XDG_CACHE_HOME/restic``, else
  ``~/.cache/restic``): it holds the index and tree blobs every backup needs for its parent
  snapshot. ``work_dir`` is under ``/run`` (tmpfs, emptied at boot, swept by mailsnap), so a
  cache there would be lost and each night would download the whole index again (slow, and
  paid for on S3/B2). ``--cache-dir`` in ``options`` moves it.
- **Secrets never reach a log line.** The runner logs argv, never the environment; so a
  password inside the repository URL (``rest:https://user:secret@host/``) travels as
  ``RESTIC_REPOSITORY`` instead of ``-r``, and stderr quoted in an error has the URL and every
  configured environment value blanked.
- **Snapshots are named by their full id** (kept in ``Stored.info["full_id"]``) for forget,
  ls and restore: an 8-digit short id can become ambiguous as a repository grows.
- Retention is decided outside (``retention.decide``, as for every destination); keep_* is
  never handed to ``restic forget``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
from datetime import datetime
import json
import logging
import os
from pathlib import Path
import re
import shlex
import socket
import stat
import tempfile
from typing import Any, ClassVar

from mailsnap import maildirs
from mailsnap.backends.base import RUN_ID_RE
from mailsnap.config import JobBase, ResticDestination
from mailsnap.destinations.base import Sent, Source, Stored
from mailsnap.destinations.restic_text import (
    MISSING,
    job_exclude,
    kind_of,
    literal,
    read_env_file,
    redact,
    restic_time,
    run_time,
    telling_line,
    tmp_exclude,
)
from mailsnap.errors import CommandFailed, DestinationFailed, MailsnapError, ToolMissing
from mailsnap.manifest import MANIFEST_FILE, ManifestDamaged, read_records, unescape
from mailsnap.mounts import is_mounted, unmount
from mailsnap.runner import Result, Runner

# (``mailsnap.mounts`` is imported by its names, not as ``from mailsnap import mounts``: that
# would import it before mailsnap.backends, which it needs to have finished first.)

log = logging.getLogger(__name__)

RESTIC = "restic"
TAG = "mailsnap"
# Inherited from our own environment these would fight the configured repository and password
# (restic refuses a password file and a password command at once); the destination's own
# ``env``/``env_file`` may still set them.
_INHERITED_OUT = frozenset({
    "RESTIC_REPOSITORY", "RESTIC_REPOSITORY_FILE", "RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE",
    "RESTIC_PASSWORD_COMMAND",
})
# A configured value shorter than this is not blanked out of quoted stderr ("1", "us-east-1"
# would blank half a message and are no secrets).
_SECRET_MIN = 6
# At most this many differences from the local manifest are listed one by one.
MAX_DIFFERENCES = 200
# restic backup: 3 = a snapshot was saved, but some source files could not be read.
EXIT_INCOMPLETE = 3


@contextlib.contextmanager
def _exclude_file(lines: Sequence[str]) -> Iterator[Path]:
    """A private (0600, ``mkstemp``) exclude file in the system temp directory, removed after:
    it lists every folder name. Not in the source (read-only) nor in the backup."""
    fd, name = tempfile.mkstemp(prefix="mailsnap-restic-", suffix=".exclude")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            for line in lines:
                handle.write(os.fsencode(line) + b"\n")  # a non-UTF-8 name's own bytes
        yield path
    finally:
        path.unlink(missing_ok=True)


# -- the destination -----------------------------------------------------------------------

class ResticRepository:
    """One ``[[job.destination]]`` table of type ``restic``."""

    kind: ClassVar[str] = "restic"

    def __init__(self, job: JobBase, settings: ResticDestination, runner: Runner) -> None:
        self.job = job
        self.settings = settings
        self.runner = runner
        self.name = settings.name
        self._environment: dict[str, str] | None = None
        self._secrets: list[str] = []

    def close(self) -> None:
        pass  # nothing held between calls

    def where(self) -> str:
        return f"{RESTIC} {redact(self.settings.repository)}"

    # -- running restic ------------------------------------------------------------------

    def _hides_repository(self) -> bool:
        return redact(self.settings.repository) != self.settings.repository

    def argv(self, *args: str) -> list[str]:
        """The full restic command for ``args`` (a subcommand and its flags)."""
        argv = [RESTIC]
        if not self._hides_repository():
            argv += ["-r", self.settings.repository]
        if self.settings.password_file is not None:
            argv += ["--password-file", str(self.settings.password_file)]
        elif self.settings.password_command is not None:
            # restic splits the command itself, as a shell would.
            argv += ["--password-command", shlex.join(self.settings.password_command)]
        return [*argv, *self.settings.options, *args]

    def environment(self) -> dict[str, str]:
        """Our environment (less restic's repository and password variables) + ``env`` +
        ``env_file``; read once. Raises ``DestinationFailed`` for an unreadable file or a bad
        line (named by number: the line itself may hold a secret)."""
        if self._environment is not None:
            return self._environment
        env = {k: v for k, v in os.environ.items() if k not in _INHERITED_OUT}
        added = dict(self.settings.env)
        path = self.settings.env_file
        if path is not None:
            try:
                from_file, bad = read_env_file(path)
                mode = stat.S_IMODE(path.stat().st_mode)
            except OSError as exc:
                raise self._failed(f"cannot read env_file {path}", exc.strerror or str(exc),
                                   "check the path and that mailsnap may read it") from None
            except UnicodeDecodeError:
                raise self._failed(f"cannot read env_file {path}", "not UTF-8 text",
                                   "save it as UTF-8") from None
            if bad is not None:
                raise self._failed(f"env_file {path} line {bad} is not KEY=VALUE",
                                   "the line is not shown, it may hold a secret",
                                   "write KEY=VALUE, or start a comment with #")
            if mode & 0o077:
                log.warning("destination %s: env_file %s is mode %04o; make it 0600 (it holds "
                            "secrets)", self.name, path, mode)
            added.update(from_file)
        env.update(added)
        if self._hides_repository():
            env["RESTIC_REPOSITORY"] = self.settings.repository
        self._secrets = sorted((v for v in added.values() if len(v) >= _SECRET_MIN),
                               key=len, reverse=True)
        self._environment = env
        return env

    def _scrub(self, text: str) -> str:
        text = text.replace(self.settings.repository, redact(self.settings.repository))
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _failed(self, what: str, detail: str, todo: str) -> DestinationFailed:
        """``destination NAME (restic REPO): what — detail; todo`` on one line."""
        line = f"destination {self.name} ({self.where()}): {what} — {detail}; {todo}"
        return DestinationFailed(self._scrub(re.sub(r"\s*[\r\n]+\s*", " ", line)))

    def _failure(self, what: str, exc: CommandFailed) -> DestinationFailed:
        """The ``DestinationFailed`` for a failed restic command."""
        if exc.exit_code_of_command is None:
            return self._failed(f"{what} timed out", f"no answer after {self.settings.timeout}s",
                                "raise timeout, or check the network and the repository")
        detail = telling_line(exc.stderr, self.settings.repository)
        kind = kind_of(exc.stderr)
        if kind is not None:
            return self._failed(f"{what}: {kind.what}", detail, kind.todo)
        return self._failed(f"{what} failed (restic exited {exc.exit_code_of_command})", detail,
                            "run the restic command from the log by hand to see more")

    def _call(self, args: Sequence[str], *, mutates: bool,
              ok_codes: Sequence[int] = (0,)) -> Result:
        """Run restic with ``args``; raises ``CommandFailed`` as the runner does."""
        env = self.environment()
        try:
            return self.runner.run(self.argv(*args), mutates=mutates,
                                   timeout=self.settings.timeout, env=env, ok_codes=ok_codes)
        except ToolMissing:
            raise self._failed("restic is not installed", "`restic` is not on PATH",
                               "install restic 0.14 or newer (apt install restic)") from None

    def _restic(self, what: str, args: Sequence[str], *, mutates: bool,
                ok_codes: Sequence[int] = (0,)) -> Result:
        """Run restic with ``args``; a failure is a ``DestinationFailed`` saying ``what``."""
        try:
            return self._call(args, mutates=mutates, ok_codes=ok_codes)
        except CommandFailed as exc:
            raise self._failure(what, exc) from None

    def _json(self, what: str, text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError as exc:
            raise self._failed(f"cannot read the output of restic {what}", str(exc),
                               "is restic 0.14 or newer installed? Run with --debug and "
                               "report it") from None

    # -- send ----------------------------------------------------------------------------

    def ensure_repository(self) -> None:
        """With ``init = true``: create the repository when there is none yet. Reads the
        repository's config first (read-only, runs in dry run); ``restic init`` is skipped in
        dry run."""
        # Exit 1 is an answer here, not an error for the runner to log: "no repository".
        result = self._restic("open the repository", ["cat", "config"], mutates=False,
                              ok_codes=(0, 1))
        if result.exit_code == 0:
            return
        if kind_of(result.stderr) is not MISSING:
            raise self._failure("open the repository",
                                CommandFailed(result.argv, result.exit_code, result.stderr))
        log.info("destination %s: no repository at %s yet; creating it", self.name,
                 redact(self.settings.repository))
        self._restic("create the repository (restic init)", ["init"], mutates=True)

    @property
    def stable_path(self) -> Path:
        """Where a non-stable source is bind-mounted for restic: ``<work_dir>/restic/NAME``."""
        return self.job.work_dir / RESTIC / self.name

    @contextlib.contextmanager
    def _stable_view(self, tree: Path) -> Iterator[Path]:
        """Bind-mount ``tree`` read-only (nosuid, nodev, noexec) at ``stable_path`` and
        unmount it when the block ends, however it ends. A leftover mount there (a killed run)
        is unmounted first. Dry run: the mount commands are printed, not run."""
        mountpoint = self.stable_path
        if not self.runner.dry_run:
            mountpoint.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            if is_mounted(self.runner, mountpoint):
                log.warning("destination %s: %s is still mounted (an interrupted run); "
                            "unmounting it", self.name, mountpoint)
                unmount(self.runner, mountpoint)
        except MailsnapError as exc:
            raise self._failed(f"cannot unmount the leftover {mountpoint}", str(exc),
                               "unmount it by hand") from None
        try:
            self.runner.run(["mount", "--bind", str(tree), str(mountpoint)], mutates=True)
            # A bind mount takes "ro" only on a remount; until then it is the tree's own.
            self.runner.run(["mount", "-o", "remount,bind,ro,nosuid,nodev,noexec",
                             str(mountpoint)], mutates=True)
        except BaseException as exc:
            self._unmount_after_error(mountpoint)  # nothing mounted: nothing done
            if isinstance(exc, MailsnapError):
                raise self._failed(f"cannot bind-mount {tree} read-only at {mountpoint}",
                                   str(exc), "check that mailsnap runs as root") from None
            raise
        try:
            yield mountpoint
        except BaseException:
            self._unmount_after_error(mountpoint)
            raise
        try:
            unmount(self.runner, mountpoint)
        except MailsnapError as exc:
            raise self._failed(f"cannot unmount {mountpoint}", str(exc),
                               "unmount it by hand; the next run also tries") from None

    def _unmount_after_error(self, mountpoint: Path) -> None:
        """Unmount while another error is on its way: a failure here is logged, never raised
        over it (the first error is the one to report)."""
        try:
            unmount(self.runner, mountpoint)
        except MailsnapError as exc:
            log.error("destination %s: cannot unmount %s: %s", self.name, mountpoint, exc)

    def _excludes(self, source: Source, root: Path) -> list[str]:
        """The exclude-file lines for an unclean source: one per Maildir's tmp/. Dry run: a
        snapshot is not mounted, so there may be nothing to survey."""
        if self.runner.dry_run and not source.tree.is_dir():
            return []
        try:
            found = maildirs.survey(source.tree, source.excludes).maildirs
        except MailsnapError as exc:
            raise self._failed(f"cannot list the Maildirs of {source.tree}", str(exc),
                               "check that the source is mounted and readable") from None
        log.info("destination %s: leaving out the tmp/ content of %d Maildirs", self.name,
                 len(found))
        return [tmp_exclude(str(root), rel) for rel in found]

    def send(self, source: Source) -> Sent:
        """``restic backup`` of ``source`` tagged with the job and run id. Dry run: the
        repository is looked at, the mount and backup commands are printed, not run."""
        if self.settings.init:
            self.ensure_repository()
        with contextlib.ExitStack() as stack:
            root = source.tree if source.stable else stack.enter_context(
                self._stable_view(source.tree))
            args = ["backup", str(root), "--json", "--host", source.host, "--tag", TAG,
                    "--tag", f"job={self.job.name}", "--tag", f"run={source.run_id}"]
            if not source.stable:
                # Every nightly hard link to a message changes its link count, so its ctime:
                # without this restic would read every message again.
                args.append("--ignore-ctime")
            if not source.clean:
                lines = self._excludes(source, root)
                if lines and not self.runner.dry_run:
                    args += ["--exclude-file", str(stack.enter_context(_exclude_file(lines)))]
                args += [f"--exclude={job_exclude(p, str(root))}" for p in source.excludes]
            result = self._restic("backup", args, mutates=True, ok_codes=(0, EXIT_INCOMPLETE))
        if result.skipped:
            return Sent(id="", details={"dry_run": True})
        summary = self._summary(result.stdout)
        snapshot = str(summary.get("snapshot_id") or "")
        if result.exit_code == EXIT_INCOMPLETE:
            # Saved, but without the files restic could not read: it must not pass for a
            # complete backup, so it goes again at once (the data is pruned with the next).
            if snapshot:
                self._restic("forget the incomplete snapshot", ["forget", snapshot],
                             mutates=True)
            raise self._failed("backup is incomplete (some files could not be read)",
                               telling_line(result.stderr, self.settings.repository),
                               "check the source's permissions; the snapshot was forgotten")
        if not snapshot:
            raise self._failed("backup printed no snapshot id", "no summary line",
                               "is restic 0.14 or newer installed?")
        keys = ("files_new", "files_changed", "files_unmodified", "dirs_new", "dirs_changed",
                "data_added", "total_files_processed", "total_bytes_processed",
                "total_duration")
        details: dict[str, Any] = {k: summary[k] for k in keys if k in summary}
        details["path"] = str(root)
        return Sent(id=snapshot, files=_int(summary.get("total_files_processed")),
                    bytes_sent=_int(summary.get("data_added")), details=details)

    def _summary(self, stdout: str) -> dict[str, Any]:
        """The ``"message_type": "summary"`` line of ``restic backup --json``."""
        for line in reversed(stdout.splitlines()):
            if '"summary"' not in line:
                continue
            data = self._json("backup --json", line)
            if isinstance(data, dict) and data.get("message_type") == "summary":
                return data
        return {}

    # -- list, remove ----------------------------------------------------------------------

    def backups(self) -> list[Stored]:
        """This job's snapshots from this host, oldest first (read-only, runs in dry run).
        ``time`` is when the run started (from its run id), restic's own time otherwise."""
        result = self._restic("list snapshots", [
            "snapshots", "--json", "--host", socket.gethostname(),
            "--tag", f"{TAG},job={self.job.name}"], mutates=False)
        data = self._json("snapshots --json", result.stdout or "[]")
        found: list[tuple[datetime, Stored]] = []
        try:
            for item in data or []:
                tags = [str(t) for t in item.get("tags") or []]
                run_id = next((t.removeprefix("run=") for t in tags if t.startswith("run=")),
                              None)
                taken = restic_time(str(item["time"]))
                started = (run_time(run_id) if run_id else None) or taken
                found.append((taken, Stored(
                    id=str(item["short_id"]), time=started, run_id=run_id,
                    info={"full_id": str(item["id"]), "paths": list(item.get("paths") or []),
                          "tags": tags, "hostname": str(item.get("hostname") or "")})))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._failed("cannot read the output of restic snapshots --json",
                               f"{type(exc).__name__}: {exc}",
                               "is restic 0.14 or newer installed?") from None
        found.sort(key=lambda pair: (pair[1].time, pair[0]))
        return [stored for _taken, stored in found]

    def remove(self, stored: list[Stored]) -> None:
        """``restic forget ID… --prune`` in one call; an ID already gone is only a warning of
        restic's, so a repeat after a crash is fine. Dry run: printed, not run."""
        if not stored:
            return
        # prune = false: forget only, no exclusive lock on a repository other hosts share.
        prune = ["--prune"] if self.settings.prune else []
        self._restic("forget and prune" if prune else "forget",
                     ["forget", *(_full_id(s) for s in stored), *prune], mutates=True)

    # -- verify ----------------------------------------------------------------------------

    def verify(self, stored: Stored, *, deep: bool) -> list[str]:
        """``restic check`` of the whole repository (``deep``: also read
        ``read_data_subset`` of its data, or all of it), then, when the job's own store still
        holds the same run with a manifest, the snapshot's files against it. Read-only."""
        args = ["check"]
        if deep:
            subset = self.settings.read_data_subset
            args.append(f"--read-data-subset={subset}" if subset else "--read-data")
        problems: list[str] = []
        try:
            self._call(args, mutates=False)
        except CommandFailed as exc:
            if exc.exit_code_of_command is None or (
                    kind_of(exc.stderr) is not None
                    and "repository contains errors" not in exc.stderr):
                raise self._failure("check", exc) from None
            problems += [f"restic check: {self._scrub(line.strip())}"
                         for line in exc.stderr.splitlines() if line.strip()]
        problems += self.compare_with_local(stored)
        return problems

    def local_manifest(self, stored: Stored) -> Path | None:
        """The manifest of the same run in the job's own store, if it is still there."""
        if not stored.run_id or not re.fullmatch(RUN_ID_RE, stored.run_id):
            return None
        path = self.job.target / self.job.name / stored.run_id / MANIFEST_FILE
        return path if path.is_file() else None

    def compare_with_local(self, stored: Stored) -> list[str]:
        """The snapshot's entries (``restic ls --json``) against the local manifest's F/D/L
        records: every file with its size, every directory and symlink, nothing extra."""
        manifest = self.local_manifest(stored)
        if manifest is None:
            return []
        try:
            records = read_records(manifest)
        except ManifestDamaged as exc:
            log.warning("destination %s: not compared with the local backup: %s", self.name, exc)
            return []
        result = self._restic("list the snapshot", ["ls", "--json", _full_id(stored)],
                              mutates=False)
        have = self._listing(result.stdout)
        want: dict[str, tuple[str, int | None]] = {}
        for fields in records:
            if fields[0] == "F":
                want[unescape(fields[1])] = ("file", int(fields[3]))
            elif fields[0] == "D" and fields[1]:
                want[unescape(fields[1])] = ("dir", None)
            elif fields[0] == "L":
                want[unescape(fields[1])] = ("symlink", None)
        differences: list[str] = []
        for rel in sorted(want.keys() | have.keys()):
            mine, theirs = want.get(rel), have.get(rel)
            if theirs is None:
                differences.append(f"{rel}: missing from the restic snapshot")
            elif mine is None:
                differences.append(f"{rel}: in the restic snapshot but not in the local backup")
            elif mine[0] != theirs[0]:
                differences.append(f"{rel}: a {theirs[0]} in the restic snapshot, a {mine[0]} "
                                   "in the local backup")
            elif mine[1] != theirs[1]:
                differences.append(f"{rel}: {theirs[1]} bytes in the restic snapshot, "
                                   f"{mine[1]} in the local backup")
        if len(differences) > MAX_DIFFERENCES:
            more = len(differences) - MAX_DIFFERENCES
            differences = [*differences[:MAX_DIFFERENCES], f"… and {more} more differences"]
        log.info("destination %s: snapshot %s has %d entries; %d differ from %s", self.name,
                 stored.id, len(have), len(differences), manifest)
        return differences

    def _listing(self, stdout: str) -> dict[str, tuple[str, int | None]]:
        """``restic ls --json``: the snapshot's entries below its root, relative to it."""
        root = ""
        entries: dict[str, tuple[str, int | None]] = {}
        try:
            for line in stdout.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item.get("struct_type") == "snapshot":
                    root = str(item["paths"][0]).rstrip("/")
                    continue
                path = str(item["path"])
                if not root or not path.startswith(root + "/"):
                    continue  # the root itself and the directories above it
                kind = str(item["type"])
                entries[path[len(root) + 1:]] = (
                    kind, int(item.get("size") or 0) if kind == "file" else None)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise self._failed("cannot read the output of restic ls --json",
                               f"{type(exc).__name__}: {exc}",
                               "is restic 0.14 or newer installed?") from None
        return entries

    # -- fetch -----------------------------------------------------------------------------

    def fetch(self, stored: Stored, subdir: str, into: Path) -> Path:
        """``restic restore`` of ``subdir`` of the backup (all of it for "") into ``into``;
        restic re-creates the backed-up path below it, with the permissions and owners it
        stored. Returns that path. Dry run: printed, not run (nothing is fetched)."""
        paths = stored.info.get("paths") or []
        if not paths:
            raise self._failed(f"snapshot {stored.id} names no path", "nothing to restore",
                               "list the backups again (mailsnap list)")
        root = str(paths[0]).rstrip("/") or "/"
        rel = subdir.strip("/")
        if ".." in rel.split("/"):
            raise self._failed(f"cannot fetch {subdir!r}", "'..' is not allowed",
                               "give a directory relative to the backup's mail tree")
        args = ["restore", _full_id(stored), "--target", str(into)]
        if rel:
            args.append(f"--include={literal(root.rstrip('/') + '/' + rel)}")
        self._restic("restore", args, mutates=True)
        return into / root.lstrip("/")


def _full_id(stored: Stored) -> str:
    return str(stored.info.get("full_id") or stored.id)


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None
