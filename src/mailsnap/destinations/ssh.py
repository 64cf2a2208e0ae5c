"""The job's dated hard-link store on another host, through rsync over SSH.

The layout there is the local one: ``PATH/<job>/<run id>/{mail/, mailsnap.json,
manifest.zst}`` and a ``latest`` link, so the remote copy is browsable, restorable with plain
rsync, and verifiable against its own manifest. A backup is built in ``<run id>.partial`` with
``--link-dest`` to the previous remote backup (unchanged messages cost one remote link each)
and published by one remote ``mv``, after a ``sync`` of the remote file system; removal renames
to ``<run id>.deleting`` first, as locally. Leftovers of a killed run are swept before the next
send.

Every remote command is an argv list quoted with ``shlex.join`` for the remote shell (ssh
takes one command string; nothing from a mailbox name is ever interpreted there). rsync gets
``-s`` (``--protect-args``) so paths with spaces, ``&`` or quotes cross unchanged. The remote
host needs rsync, GNU coreutils and findutils (``find -printf``, ``sha256sum -z``) and a
POSIX login shell.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
from dataclasses import dataclass
import hashlib
import logging
import os
from pathlib import Path
import re
import shlex
import socket
import tempfile
from typing import ClassVar

from mailsnap import datasets, subvolumes
from mailsnap.backends.base import RUN_ID_RE
from mailsnap.config import SSH_TARGET_RE, Job, SshDestination
from mailsnap.copiers.rsync import _rules_file, parse_stats, tmp_rule
from mailsnap.destinations.base import Sent, Source, Stored
from mailsnap.errors import CommandFailed, DestinationFailed, MailsnapError
from mailsnap.maildirs import survey
from mailsnap.manifest import MANIFEST_FILE, ManifestDamaged, PreviousManifest, read_records
from mailsnap.prune import backup_time
from mailsnap.runner import Runner
from mailsnap.store import CONTENT, DELETING_SUFFIX, LATEST, MANIFEST, PARTIAL_SUFFIX
from mailsnap.verify import listing_problems

log = logging.getLogger(__name__)

# Listing, renaming and deleting over SSH: a hung connection must not hang the night.
COMMAND_TIMEOUT = 600.0
# rsync's own idle limit: seconds with no data moving either way.
IO_TIMEOUT = 600

# Publish: make the copied files durable on the remote file system, then one rename (the
# commit point), then point ``latest`` at it. "$1" partial, "$2" final, "$3" run id,
# "$4" the latest link. ``sync -f`` is syncfs(2) (coreutils 8.24+); plain sync otherwise.
PUBLISH = ('sync -f "$1" 2>/dev/null || sync; [ ! -e "$2" ] || { echo "$2 exists" >&2; '
           'exit 17; }; mv -T -- "$1" "$2" && ln -sfn -- "$3" "$4.tmp" && '
           'mv -Tf -- "$4.tmp" "$4"')
# Remove backups: rename each to <id>.deleting (no longer published), then delete it.
REMOVE = ('for id; do if [ -d "$id" ]; then mv -T -- "$id" "$id.deleting" || exit 1; fi; '
          'rm -rf -- "$id.deleting" || exit 1; done')


@dataclass(frozen=True)
class Remote:
    user: str | None
    host: str
    port: int | None
    path: str

    @classmethod
    def parse(cls, url: str) -> Remote:
        match = SSH_TARGET_RE.fullmatch(url)
        if not match:  # the config validated it
            raise MailsnapError(f"{url!r} is not an ssh:// target")
        port = match.group("port")
        return cls(match.group("user"), match.group("host"), int(port) if port else None,
                   match.group("path").rstrip("/"))

    @property
    def login(self) -> str:
        """For ssh: ``user@host``, an IPv6 address without its brackets."""
        host = self.host.strip("[]")
        return f"{self.user}@{host}" if self.user else host

    @property
    def spec(self) -> str:
        """For rsync's ``HOST:PATH``: an IPv6 address keeps its brackets."""
        return f"{self.user}@{self.host}" if self.user else self.host


class SshStore:
    kind: ClassVar[str] = "ssh"

    def __init__(self, job: Job, settings: SshDestination, runner: Runner) -> None:
        self.job = job
        self.settings = settings
        self.name = settings.name
        self.runner = runner
        self.remote = Remote.parse(settings.target)
        self.root = f"{self.remote.path}/{job.name}"
        self.host = socket.gethostname()

    def close(self) -> None:
        """Stop the SSH master connection now rather than when it times out."""
        options = self._multiplexing()
        if options:
            with contextlib.suppress(MailsnapError):
                self.runner.run(["ssh", *options, "-O", "exit", self.remote.login],
                                mutates=False, timeout=30, ok_codes=(0, 255))

    def where(self) -> str:
        return f"{self.remote.login}:{self.root}"

    # -- commands --------------------------------------------------------------------------

    def ssh_argv(self) -> list[str]:
        """ssh and its options, without the host: host keys are always checked."""
        # A peer that vanished (a dropped VPN, a rebooted host) is noticed within 2 minutes
        # instead of hanging the night.
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=4"]
        if self.remote.port:
            argv += ["-p", str(self.remote.port)]
        if self.settings.ssh_key:
            argv += ["-i", str(self.settings.ssh_key), "-o", "IdentitiesOnly=yes"]
        if self.settings.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.settings.known_hosts}"]
        return argv + list(self.settings.ssh_options) + self._multiplexing()

    def _multiplexing(self) -> list[str]:
        """One SSH connection for the whole send: a send makes about ten (list, mkdir, rsync,
        manifest, publish, prune …), and a handshake each cost 3 s of a 4 s no-change night
        on loopback. The master stays 30 s after its last use and then exits by itself. Its
        socket is in the job's private work directory; an ssh_options ControlMaster or
        ControlPath given by the admin comes first and wins. Unix sockets have a short path
        limit: a work directory too deep for one goes without."""
        peer = f"{self.remote.login}:{self.remote.port or 22}".encode()
        path = self.job.work_dir / f"ssh-{hashlib.sha256(peer).hexdigest()[:12]}"
        # ssh binds "<path>.<16 random characters>" first; sun_path holds 107 bytes.
        if len(os.fsencode(path)) + 17 > 107 or not self.job.work_dir.is_dir():
            return []
        return ["-o", "ControlMaster=auto", "-o", f"ControlPath={path}",
                "-o", "ControlPersist=30"]

    def rsync_argv(self) -> list[str]:
        # --timeout: no data either way for 10 minutes (a hung remote rsync) ends the copy.
        argv = ["rsync", "-aHAX", "--numeric-ids", "-s", "--stats", f"--timeout={IO_TIMEOUT}",
                "-e", shlex.join(self.ssh_argv())]
        if self.settings.rsync_path:
            argv.append(f"--rsync-path={self.settings.rsync_path}")
        return argv

    def run_remote(self, argv: Sequence[str], *, mutates: bool, what: str,
                   ok_codes: Sequence[int] = (0,), stdin: bytes | None = None) -> bytes:
        """``argv`` on the remote host; its stdout as bytes (names from there are bytes)."""
        command = [*self.ssh_argv(), self.remote.login, "--", shlex.join(argv)]
        try:
            result = self.runner.run(command, mutates=mutates, timeout=COMMAND_TIMEOUT,
                                     ok_codes=ok_codes, stdin=stdin)
        except CommandFailed as exc:
            raise self.failed(what, exc) from None
        return result.stdout_bytes

    def failed(self, what: str, exc: CommandFailed) -> DestinationFailed:
        last = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else "no error output"
        hint = "check that the host is reachable and the key is authorized"
        if "Host key verification failed" in exc.stderr:
            hint = ("the host key is not in known_hosts: add it (ssh-keyscan, checked by hand) "
                    "or set known_hosts")
        elif "No space left" in exc.stderr or exc.exit_code_of_command == 11:
            hint = "the remote file system is full: free space there"
        elif exc.exit_code_of_command is None:
            hint = "it did not answer in time"
        return DestinationFailed(f"destination {self.name} ({self.where()}): {what} failed: "
                                 f"{last}; {hint}")

    # -- the store -------------------------------------------------------------------------

    def _names(self, *, create: bool = False) -> list[str]:
        """The directory names in the store (``create``: make the store first; one round
        trip either way). The store belongs to one host: the first send writes this host's
        name into ``.owner`` there, and every later call checks it, so two hosts given the
        same path by mistake never sweep or prune each other's backups."""
        make = ('mkdir -p -m 0700 -- "$1" || exit 1; [ -e "$1/.owner" ] || printf "%s\\n" '
                '"$2" > "$1/.owner"; ') if create else ""
        raw = self.run_remote(
            ["sh", "-c", make + 'if [ -d "$1" ]; then cat -- "$1/.owner" 2>/dev/null || '
             'echo; find "$1" -mindepth 1 -maxdepth 1 -type d -printf "%f\\0"; else echo; '
             'fi', "sh", self.root, self.host],
            mutates=create, what="listing the backups")
        owner, _, names = raw.partition(b"\n")
        if owner and os.fsdecode(owner) != self.host:
            raise DestinationFailed(
                f"destination {self.name} ({self.where()}) belongs to host "
                f"{os.fsdecode(owner)!r}, not {self.host!r}: give each host its own path (if "
                f"this host was renamed, put its new name into {self.root}/.owner there)")
        return sorted(os.fsdecode(n) for n in names.split(b"\0") if n)

    def backups(self) -> list[Stored]:
        return [Stored(name, backup_time(name), name) for name in self._names()
                if re.fullmatch(RUN_ID_RE, name)]

    def _sweep(self, names: list[str]) -> None:
        """Remove what a killed run left: unpublished ``.partial`` and unfinished
        ``.deleting`` directories (the job lock is held, so no run of ours owns them)."""
        left = [n for n in names
                if any(n.endswith(s) and re.fullmatch(RUN_ID_RE, n.removesuffix(s))
                       for s in (PARTIAL_SUFFIX, DELETING_SUFFIX))]
        if left:
            log.warning("destination %s: removing %s left by an interrupted run", self.name,
                        ", ".join(left))
            self.run_remote(["rm", "-rf", "--", *(f"{self.root}/{n}" for n in left)],
                            mutates=True, what="removing leftovers")

    def send(self, source: Source) -> Sent:
        names = self._names(create=True)
        self._sweep(names)
        published = [n for n in names if re.fullmatch(RUN_ID_RE, n)]
        if source.run_id in published:
            raise DestinationFailed(f"destination {self.name}: {self.root}/{source.run_id} "
                                    "already exists; refusing to overwrite a backup")
        partial = f"{self.root}/{source.run_id}{PARTIAL_SUFFIX}"
        try:  # from the mkdir on: interrupted while it runs, the directory may exist
            self.run_remote(["mkdir", "-m", "0700", "--", partial], mutates=True,
                            what="creating the backup directory")
            if published:
                self._link_renamed(source, partial, published[-1])
            stats = self._copy(source, partial, published[-1] if published else None)
            self.run_remote(["sh", "-c", PUBLISH, "sh", partial,
                             f"{self.root}/{source.run_id}", source.run_id,
                             f"{self.root}/{LATEST}"], mutates=True, what="publishing")
        except BaseException:
            with contextlib.suppress(MailsnapError):  # the next send sweeps it otherwise
                self.run_remote(["rm", "-rf", "--", partial], mutates=True,
                                what="removing the unpublished copy")
            raise
        return Sent(source.run_id, files=stats.files, bytes_sent=stats.bytes_sent,
                    details={"linked": stats.linked, "previous": published[-1]
                             if published else None})

    def _link_renamed(self, source: Source, partial: str, previous: str) -> int:
        """Renamed and moved messages cost no transfer: where this host still has the backup
        the remote one was made from (same run id), every file of the new backup that is a
        hard link to a file of it under another name (a flag change, new/ → cur/, a folder
        move: the Maildir copier linked it) is hard-linked on the remote host from the
        previous remote backup before rsync runs, which then finds it up to date. rsync's
        ``--link-dest`` alone matches by path and would send each again. Backups that are
        btrfs subvolumes or ZFS snapshots share no hard links: there the two manifests say
        which file is which (same record under another name in the same mailbox). A link that
        cannot be made
        there (the remote backup differs) just leaves that file to rsync."""
        if source.local is None:
            return 0
        before = source.local.parent / previous / CONTENT
        after = source.local / CONTENT
        if not before.is_dir() or not after.is_dir():
            return 0
        shares_no_links = (subvolumes.is_subvolume(after.parent)
                           or datasets.is_view(after.parent))
        pairs = (renamed_by_manifest(before.parent / MANIFEST_FILE, after.parent / MANIFEST_FILE)
                 if shares_no_links else None)
        if pairs is None:
            pairs = renamed_pairs(before, after)
        if not pairs:
            return 0
        dirs = sorted({f"{CONTENT}/{os.path.dirname(n)}".rstrip("/") for _, n in pairs})
        self.run_remote(["sh", "-c", 'cd -- "$1" && xargs -0 -r mkdir -p --', "sh", partial],
                        mutates=True, what="making folders for renamed messages",
                        stdin=b"".join(os.fsencode(d) + b"\0" for d in dirs))
        # One ln per pair: GNU xargs exits 123 when some failed (that file is sent instead).
        self.run_remote(
            ["sh", "-c", 'cd -- "$1" && xargs -0 -r -n 2 ln --', "sh", partial],
            mutates=True, what="linking renamed messages", ok_codes=(0, 123),
            stdin=b"".join(os.fsencode(f"../{previous}/{CONTENT}/{old}") + b"\0"
                           + os.fsencode(f"{CONTENT}/{new}") + b"\0" for old, new in pairs))
        log.info("destination %s: %d renamed or moved files linked on the remote host from "
                 "%s", self.name, len(pairs), previous)
        return len(pairs)

    def _copy(self, source: Source, partial: str, previous: str | None) -> _Copied:
        argv = self.rsync_argv()
        # The published local backup whole (mail/, mailsnap.json, manifest) in one transfer;
        # from a snapshot, its tree into mail/ and the two files after it.
        whole = source.local is not None and source.tree == source.local / CONTENT
        if previous is not None:
            # Relative to the receiving directory: <id>.partial, or <id>.partial/mail.
            argv.append(f"--link-dest=../{previous}" if whole
                        else f"--link-dest=../../{previous}/{CONTENT}")
        with contextlib.ExitStack() as stack:
            if not source.clean:
                rules = [tmp_rule(rel) for rel in survey(source.tree, source.excludes).maildirs]
                if rules and not self.runner.dry_run:
                    argv += ["--from0",
                             f"--exclude-from={stack.enter_context(_rules_file(rules))}"]
                argv += [f"--exclude={pattern}" for pattern in source.excludes]
            argv += ([f"{source.local}/", f"{self.remote.spec}:{partial}/"] if whole else
                     [f"{source.tree}/", f"{self.remote.spec}:{partial}/{CONTENT}/"])
            try:
                result = self.runner.run(argv, mutates=True, timeout=self.settings.timeout)
            except CommandFailed as exc:
                raise self.failed("copying", exc) from None
        stats = parse_stats(result.stdout)
        sent = re.search(r"^Literal data:\s*([\d,]+)", result.stdout, re.MULTILINE)
        if source.local is not None and not whole:
            meta = [str(source.local / name) for name in (MANIFEST, MANIFEST_FILE)
                    if (source.local / name).exists()]
            if meta:
                try:
                    self.runner.run([*self.rsync_argv(), *meta,
                                     f"{self.remote.spec}:{partial}/"],
                                    mutates=True, timeout=COMMAND_TIMEOUT)
                except CommandFailed as exc:
                    raise self.failed("copying the manifest", exc) from None
        return _Copied(stats.files, stats.linked,
                       int(sent.group(1).replace(",", "")) if sent else None)

    def remove(self, stored: list[Stored]) -> None:
        if not stored:
            return
        for item in stored:
            if not re.fullmatch(RUN_ID_RE, item.id):
                raise DestinationFailed(f"refusing to remove {item.id!r}: not a backup name")
        self.run_remote(["sh", "-c", f'cd -- "$0" && {REMOVE}', self.root,
                         *(item.id for item in stored)], mutates=True,
                        what="removing old backups")

    def verify(self, stored: Stored, *, deep: bool) -> list[str]:
        """The remote backup against its own manifest (fetched from there): every file
        present with its size (``deep``: its sha256, computed on the remote host), nothing
        unlisted, the backup directory private."""
        base = f"{self.root}/{stored.id}"
        listing_raw = self.run_remote(
            ["sh", "-c", 'stat -c "%a" -- "$1" && find "$1/mail" -mindepth 1 -printf '
             '"%y %s %P\\0"', "sh", base], mutates=False, what="listing the backup")
        mode, _, rest = listing_raw.partition(b"\n")
        problems = []
        if mode.strip() != b"700":
            problems.append(f"{base}: mode {mode.strip().decode()}, not 0700 (backups are "
                            "private)")
        listing: dict[str, tuple[str, int]] = {}
        for item in rest.split(b"\0"):
            if item:
                kind, size, name = item.split(b" ", 2)
                listing[os.fsdecode(name)] = (kind.decode(), int(size))
        digests = None
        if deep:
            raw = self.run_remote(
                ["sh", "-c", 'cd -- "$1/mail" && find . -type f -exec sha256sum -z -- {} +',
                 "sh", base], mutates=False, what="hashing the backup")
            digests = {}
            for line in raw.split(b"\0"):
                if line:
                    digest, name = line.split(b"  ", 1)
                    digests[os.fsdecode(name).removeprefix("./")] = digest.decode()
        with tempfile.TemporaryDirectory(prefix="mailsnap-verify-") as scratch:
            try:
                self.runner.run([*self.rsync_argv(),
                                 f"{self.remote.spec}:{base}/{MANIFEST_FILE}", scratch],
                                mutates=False, timeout=COMMAND_TIMEOUT)
            except CommandFailed as exc:
                if "No such file" in exc.stderr:
                    return [*problems, f"{base}/{MANIFEST_FILE}: missing (a backup made with "
                            "copier = 'rsync' has none)"]
                raise self.failed("reading the manifest", exc) from None
            try:
                records = read_records(Path(scratch) / MANIFEST_FILE)
                problems += listing_problems(records, listing, digests)
            except ManifestDamaged as exc:
                problems.append(str(exc))
        return problems

    def fetch(self, stored: Stored, subdir: str, into: Path) -> Path:
        mail = into / CONTENT
        local = mail / subdir if subdir else mail
        local.mkdir(mode=0o700, parents=True, exist_ok=True)
        remote = f"{self.root}/{stored.id}/{CONTENT}" + (f"/{subdir}" if subdir else "")
        try:
            self.runner.run([*self.rsync_argv(), f"{self.remote.spec}:{remote}/", f"{local}/"],
                            mutates=False, timeout=self.settings.timeout)
        except CommandFailed as exc:
            raise self.failed(f"fetching {stored.id}", exc) from None
        return mail


def _files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular file below ``root``: (relative path, lstat), symlinks not followed."""
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(root / rel if rel else root) as entries:
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append(child)
                elif entry.is_file(follow_symlinks=False):
                    yield child, entry.stat(follow_symlinks=False)


def renamed_by_manifest(before: Path, after: Path) -> list[tuple[str, str]] | None:
    """(name in ``before``, name in ``after``) from two backups' manifests: a file of
    ``after`` under a name ``before`` lacks, whose record (size, mtime, mode, owner, sha256)
    is that of a file of ``before`` in the same mailbox. For backups that are btrfs
    subvolumes, which share no hard links. None when a manifest is missing or damaged."""
    if not before.is_file() or not after.is_file():
        return None
    earlier, later = PreviousManifest(before), PreviousManifest(after)
    try:
        if earlier.damaged or later.damaged:
            return None
        pairs: list[tuple[str, str]] = []
        for section in later.all_sections():
            old = earlier.section(section.key)
            if old is None:
                continue
            by_record: dict[str, str] | None = None
            for path, tail in section.files.items():
                if path in old.files:
                    continue
                if by_record is None:  # only for a mailbox where something is new
                    by_record = {}
                    for old_path, old_tail in old.files.items():
                        by_record.setdefault(old_tail, old_path)
                found = by_record.get(tail)
                if found is not None and tail.rsplit("\t", 1)[1]:  # a sha256 to match on
                    pairs.append((found, path))
        if later.damaged:
            return None
        return sorted(pairs, key=lambda pair: pair[1])
    finally:
        earlier.close()
        later.close()


def renamed_pairs(before: Path, after: Path) -> list[tuple[str, str]]:
    """(name in ``before``, name in ``after``) for every file of ``after`` that is a hard link
    to a file of ``before`` but not under the same name there."""
    linked: dict[tuple[int, int], list[str]] = {}
    for rel, info in _files(after):
        if info.st_nlink > 1:
            linked.setdefault((info.st_dev, info.st_ino), []).append(rel)
    if not linked:
        return []
    earlier: dict[tuple[int, int], list[str]] = {}
    for rel, info in _files(before):
        key = (info.st_dev, info.st_ino)
        if key in linked:
            earlier.setdefault(key, []).append(rel)
    pairs = []
    for key, names in earlier.items():
        old = set(names)
        # A name the file had before too is linked by rsync's --link-dest already.
        pairs += [(min(names), name) for name in linked[key] if name not in old]
    return sorted(pairs, key=lambda pair: pair[1])


@dataclass(frozen=True)
class _Copied:
    files: int
    linked: int
    bytes_sent: int | None
