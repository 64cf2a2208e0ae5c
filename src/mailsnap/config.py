"""Configuration: TOML (``/etc/mailsnap.toml`` by default) validated by pydantic models.

A file holds one or more ``[[job]]`` tables. The ``backend`` key picks the model (a discriminated
union), so a btrfs job cannot carry an LVM-only key by accident (``extra="forbid"``). A one-off job
can also be built from CLI flags (``--source``, ``--target``, ``--backend``) with no file at all.
Errors come back as ``ConfigError`` with one line per bad field, e.g. ``job[0].target: …``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
import os
from pathlib import Path
import re
import tomllib
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mailsnap.constants import BACKEND_NAMES as BACKEND_NAMES
from mailsnap.constants import DEFAULT_CONFIG as DEFAULT_CONFIG
from mailsnap.errors import ConfigError

JOB_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Dovecot's lock files: meaningless in a backup and harmful in a restore. A Maildir's tmp/
# content (half-written deliveries) is not a pattern here: every copier leaves it out by the
# Maildir rule in ``mailsnap.maildirs`` (only the tmp/ beside cur/ and new/), because a pattern
# like "tmp/*" also drops a user or a folder that happens to be called "tmp".
DEFAULT_EXCLUDES = ("dovecot-uidlist.lock", "dovecot-keywords.lock")


def default_run_dir() -> Path:
    """Where mailsnap puts its mount points: ``$MAILSNAP_RUN_DIR``, else ``/run/mailsnap`` as
    root, else a private directory of the user's."""
    if os.environ.get("MAILSNAP_RUN_DIR"):
        return Path(os.environ["MAILSNAP_RUN_DIR"])
    if os.geteuid() == 0:
        return Path("/run/mailsnap")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "mailsnap" if runtime else Path(f"/tmp/mailsnap-{os.geteuid()}")


def default_state_dir() -> Path:
    """Where mailsnap keeps run reports: ``$MAILSNAP_STATE_DIR``, else ``/var/lib/mailsnap`` as
    root, else ``$XDG_STATE_HOME/mailsnap`` or ``~/.local/state/mailsnap``."""
    if os.environ.get("MAILSNAP_STATE_DIR"):
        return Path(os.environ["MAILSNAP_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/mailsnap")
    state = os.environ.get("XDG_STATE_HOME")
    return Path(state) / "mailsnap" if state else Path.home() / ".local/state/mailsnap"


def parse_age(value: object) -> object:
    """``"26h"``, ``"90m"``, ``"2d"``, ``"45s"`` (or a plain number of seconds) → timedelta."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
        if not match:
            raise ValueError(f"must be an age like '26h', '90m', '2d' or '8w', got {value!r}")
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days",
                "w": "weeks"}[match.group(2)]
        return timedelta(**{unit: float(match.group(1))})
    return value


def _hook_not_string(value: object) -> object:
    if isinstance(value, str):
        raise ValueError(f"a hook is an argv list, not a string: [{value!r}] runs a program of "
                         "that name; split it yourself, or use [\"sh\", \"-c\", \"...\"]")
    return value


def _hook_argv(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if value is not None and (not value or not value[0].strip()):
        raise ValueError("a hook is an argv list with the program first, e.g. "
                         "[\"/usr/local/sbin/flush-mail\", \"--now\"]")
    return value


# A hook is an argv list (["doveadm", "flush"]): no shell parses it, so a path or argument
# with spaces needs no quoting and nothing in it is interpreted.
Hook = Annotated[tuple[str, ...] | None, BeforeValidator(_hook_not_string),
                 AfterValidator(_hook_argv)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DESTINATION_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# A URL of the SSH store: ssh://[user@]host[:port]/path or, as scp writes it,
# ssh://[user@]host:/path.
SSH_TARGET_RE = re.compile(
    r"ssh://(?:(?P<user>[^@/:\s]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@/:\s\[\]]+)"
    r"(?::(?P<port>\d{1,5})?)?(?P<path>/[^\n]*)"
)


class Retention(_Model):
    """The ``keep_*`` keys: for the job's own store and for each destination."""

    keep_last: int | None = Field(default=None, ge=1, description="Retention: keep the N "
                                  "newest backups.")
    keep_hourly: int | None = Field(default=None, ge=1, description="Retention: keep the newest "
                                    "backup of each of the N newest hours that have one.")
    keep_daily: int | None = Field(default=None, ge=1, description="… of the N newest days.")
    keep_weekly: int | None = Field(default=None, ge=1,
                                    description="… of the N newest ISO weeks.")
    keep_monthly: int | None = Field(default=None, ge=1, description="… of the N newest months.")
    keep_yearly: int | None = Field(default=None, ge=1, description="… of the N newest years.")
    keep_within: Annotated[timedelta | None, BeforeValidator(parse_age)] = Field(
        default=None, gt=timedelta(0),
        description="Retention: keep every backup less than this much older than the newest "
        "one ('36h', '14d', '8w'). With no keep_* key at all, every backup is kept.",
    )


class DestinationBase(Retention):
    """Keys every destination has. A destination gets a copy of each backup of its job,
    after the job's own (local) backup is published; it has its own retention."""

    name: str = Field(description="Names the destination in logs, reports and "
                      "`--destination NAME`; unique within the job.")
    read_from: Literal["snapshot", "local"] = Field(
        default="snapshot", alias="from",
        description="'snapshot': read the snapshot while it is still mounted (the snapshot is "
        "held until this destination is done). 'local': read the backup just published in "
        "the job's own target, after the snapshot is released, so a slow upload never keeps "
        "an LVM snapshot filling. A live job always reads 'local'.",
    )
    every: Annotated[timedelta | None, BeforeValidator(parse_age)] = Field(
        default=None, gt=timedelta(0),
        description="Send only when the newest backup there is older than this ('7d' for a "
        "weekly copy from a nightly job; 10% slack, so a timer that fires early still "
        "counts). Default: every run.",
    )
    timeout: float | None = Field(
        default=None, gt=0,
        description="Seconds one transfer may take before it is stopped and this destination "
        "fails (default: no limit).",
    )

    @field_validator("name")
    @classmethod
    def _destination_name(cls, value: str) -> str:
        if not re.fullmatch(DESTINATION_NAME_RE, value):
            raise ValueError(f"{value!r} is not a valid destination name: use 1-64 letters, "
                             "digits, '.', '_' or '-'")
        if value == "local":
            raise ValueError("'local' names the job's own target; give the destination "
                             "another name")
        return value


def _no_quote(value: str) -> str:
    if "'" in value or "\n" in value:
        raise ValueError(f"{value!r}: a path for ssh may not contain a quote or a newline")
    return value


class SshDestination(DestinationBase):
    """The same dated hard-link store on another host, through rsync over SSH."""

    type: Literal["ssh"]
    target: str = Field(description="ssh://[user@]host[:port]/path (or ssh://user@host:/path); "
                        "backups go to PATH/<job>/<run id>/ there.")
    ssh_key: Path | None = Field(default=None, description="Private key file (ssh -i).")
    known_hosts: Path | None = Field(
        default=None, description="known_hosts file holding the host's key; the host key is "
        "always checked (StrictHostKeyChecking=yes).")
    ssh_options: tuple[str, ...] = Field(
        default=(), description="More ssh options, e.g. [\"-o\", \"ConnectTimeout=20\"].")
    rsync_path: str | None = Field(default=None, description="rsync on the remote host, if "
                                   "not on its PATH.")

    @field_validator("target")
    @classmethod
    def _ssh_url(cls, value: str) -> str:
        match = SSH_TARGET_RE.fullmatch(value)
        if not match:
            raise ValueError(f"{value!r} is not an SSH target like "
                             "'ssh://backup@host:/srv/mailsnap' or 'ssh://backup@host:2222/srv/"
                             "mailsnap'")
        if match.group("port") and not 0 < int(match.group("port")) < 65536:
            raise ValueError(f"{value!r}: port must be 1-65535")
        if ".." in match.group("path").split("/") or match.group("path") == "/":
            raise ValueError(f"{value!r}: give a directory below / without '..'")
        _no_quote(match.group("path"))
        return value

    @field_validator("ssh_key", "known_hosts")
    @classmethod
    def _ssh_path(cls, value: Path | None) -> Path | None:
        if value is not None:
            if not value.is_absolute():
                raise ValueError(f"must be an absolute path, got {str(value)!r}")
            _no_quote(str(value))
        return value


class ResticDestination(DestinationBase):
    """A restic repository: local, sftp:, s3:, b2:, rest: …"""

    type: Literal["restic"]
    repository: str = Field(description="restic repository (-r): '/srv/restic', "
                            "'sftp:backup@host:/srv/restic', 's3:https://host/bucket', …")
    password_file: Path | None = Field(default=None, description="File holding the "
                                       "repository password (restic --password-file).")
    password_command: tuple[str, ...] | None = Field(
        default=None, description="Command (argv list) that prints the password.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment for restic, e.g. AWS_ACCESS_KEY_ID "
        "for an S3 repository (keep secrets in env_file).")
    env_file: Path | None = Field(
        default=None, description="File of KEY=VALUE lines added to restic's environment "
        "(for secrets: make it 0600).")
    options: tuple[str, ...] = Field(
        default=(), description="More restic options for every call, e.g. "
        "[\"-o\", \"sftp.command=ssh -i /etc/mailsnap/key backup@host -s sftp\"].")
    read_data_subset: str | None = Field(
        default=None, description="`mailsnap verify --deep` reads this much of the "
        "repository's data ('5%', '1/10'; default: all of it).")
    init: bool = Field(default=False, description="Create the repository if it does not "
                       "exist yet (restic init).")
    prune: bool = Field(
        default=True, description="Retention runs `restic forget --prune`. false: only "
        "`restic forget` (no exclusive lock); for a repository several hosts share, where "
        "one machine runs `restic prune` at a quiet hour.")

    @field_validator("password_file", "env_file")
    @classmethod
    def _abs(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(value)!r}")
        return value

    @field_validator("read_data_subset")
    @classmethod
    def _subset(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+(\.\d+)?%|\d+/\d+", value):
            raise ValueError(f"must be like '5%' or '1/10', got {value!r}")
        return value

    @field_validator("password_command", mode="before")
    @classmethod
    def _argv(cls, value: object) -> object:
        return _hook_not_string(value)

    @model_validator(mode="after")
    def _one_password(self) -> ResticDestination:
        given = [k for k in ("password_file", "password_command") if getattr(self, k)]
        if len(given) != 1 and "RESTIC_PASSWORD" not in self.env:
            raise ValueError("give exactly one of password_file or password_command (restic "
                             "repositories are encrypted)")
        return self


class LocalDestination(DestinationBase):
    """Another dated hard-link store on this host (a second disk, a USB drive)."""

    type: Literal["local"]
    target: Path = Field(description="Backups go to TARGET/<job>/<run id>/, as for the job.")

    @field_validator("target")
    @classmethod
    def _abs_target(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(value)!r}")
        return value


DESTINATION_TYPES = ("ssh", "restic", "local")
Destination = Annotated[SshDestination | ResticDestination | LocalDestination,
                        Field(discriminator="type")]


class JobBase(Retention):
    """Keys every job has, whatever its backend."""

    name: str = Field(
        description="Job name: letters, digits, '.', '_', '-'. Part of every snapshot, mount "
        "and backup directory this job creates.",
    )
    source: Path = Field(description="The live mail directory (a Maildir root or a tree of them).")
    target: Path = Field(description="Where backups go: TARGET/<job>/<UTC timestamp>/.")
    exclude: tuple[str, ...] = Field(
        default=(),
        description="Extra rsync-style exclude patterns, added to the built-in ones "
        "(Dovecot's lock files); each Maildir's tmp/ content is always left out.",
    )
    copier: Literal["maildir", "rsync"] = Field(
        default="maildir",
        description="How a backup is copied. 'maildir' (default): finds each message of the "
        "previous backup again by its base name and size, so flag changes, new/ to cur/ and "
        "folder moves become hard links, and writes a manifest per backup. 'rsync': rsync "
        "-aHAX --link-dest, which matches by path (a renamed message is copied again); "
        "snapshot backends only.",
    )
    full_check_every: Annotated[timedelta, BeforeValidator(parse_age)] = Field(
        default=timedelta(days=7), ge=timedelta(0),
        description="The Maildir copier takes a cur/ or new/ whose mtime, ctime and inode are "
        "unchanged since the previous backup over from it without listing it (Dovecot changes "
        "a folder's mtime on every delivery, flag change and expunge). A tool that rewrites a "
        "message in place, or only changes its owner, does not; so once this long after the "
        "last one, a backup lists every folder and compares every message's size, mtime, mode "
        "and owner ('7d', '1d'; '0s': every backup does).",
    )
    target_snapshots: Literal["auto", "never"] = Field(
        default="auto",
        description="'auto': when the target is on btrfs and the copier is 'maildir', each "
        "backup is a btrfs subvolume that starts as a snapshot of the previous one and gets "
        "only the night's changes; retention deletes it with 'btrfs subvolume delete'. On "
        "ZFS, the backups are snapshots of one dataset per job (<parent>/mailsnap-<job>, "
        "mounted at TARGET/<job>/.mirror) that gets each night's changes; retention runs "
        "'zfs destroy'. 'never': a tree of hard links to the previous backup, on any file "
        "system.",
    )
    run_dir: Path | None = Field(
        default=None,
        description="Directory for mailsnap's private mount points and work files "
        "(default /run/mailsnap as root).",
    )
    min_keep_percent: int = Field(
        default=50,
        ge=0,
        le=100,
        description="Shrink guard: a backup holding fewer than this percentage of the previous "
        "backup's messages is not published (an unmounted volume or a mass expunge must not "
        "rotate the good history away); `backup --allow-shrink` publishes it anyway. 0 turns "
        "the guard off.",
    )
    before_snapshot: Hook = Field(
        default=None,
        description="Command (an argv list, no shell) run right before the snapshot is taken, "
        "e.g. to flush or freeze something; if it fails, no snapshot is taken and the run "
        "fails. Not run for a live copy (there is no snapshot instant).",
    )
    after_snapshot: Hook = Field(
        default=None,
        description="Command run right after the snapshot is taken; it always runs once "
        "before_snapshot succeeded, even if taking the snapshot failed or mailsnap was "
        "interrupted. Not run for a live copy.",
    )
    on_success: Hook = Field(
        default=None,
        description="Command run after a successful backup ($MAILSNAP_BACKUP is its path). "
        "If it fails the run fails, but the backup stays published.",
    )
    on_failure: Hook = Field(
        default=None,
        description="Command run after a failed or interrupted run ($MAILSNAP_ERROR says "
        "why). If it fails too, that is logged and the run's own error is kept.",
    )
    hook_timeout: float = Field(
        default=300.0, gt=0, le=86400,
        description="Seconds a hook may run before it is killed (and counts as failed).",
    )
    state_dir: Path | None = Field(
        default=None,
        description="Directory for run reports, kept in <state_dir>/<job>/ (default "
        "/var/lib/mailsnap as root; $MAILSNAP_STATE_DIR overrides the default).",
    )
    keep_reports: int = Field(
        default=30, ge=1, le=10000,
        description="How many run reports to keep in the job's state directory.",
    )
    max_age: Annotated[timedelta, BeforeValidator(parse_age)] = Field(
        default=timedelta(hours=26), gt=timedelta(0),
        description="`mailsnap status` warns (exit 1) when the newest backup is older than "
        "this: '26h', '90m', '2d'.",
    )
    users: str | None = Field(
        default=None,
        description="Where each user's Maildir is below the source, for restore and the "
        "per-user views: '{domain}/{user}/Maildir' ({user} is the part before '@'), "
        "'{user}/Maildir', or '' when the source is a single Maildir.",
    )
    verify: Literal["off", "snapshot"] = Field(
        default="off",
        description="'snapshot': before the snapshot is torn down, compare the finished copy "
        "with it (names, types, sizes; content too with verify_deep) and do not publish a "
        "copy that differs. Snapshot backends only.",
    )
    verify_deep: bool = Field(
        default=False,
        description="With verify = 'snapshot', also compare every file's content (reads "
        "both copies in full).",
    )
    retention_timezone: str | None = Field(
        default=None,
        description="Time zone the hours, days, weeks … of retention are counted in (an IANA "
        "name like 'Europe/Berlin'; default: the host's local time).",
    )
    metrics_file: Path | None = Field(
        default=None,
        description="Prometheus textfile-collector file (e.g. /var/lib/node_exporter/"
        "mailsnap.prom) rewritten after every run; jobs may share one file.",
    )
    notify: tuple[str, ...] = Field(
        default=(),
        description="Alert URLs (apprise syntax: 'mailtos://user:pass@smtp.example.org', "
        "'ntfy://…'; 'sendmail://admin@example.org' for the local sendmail).",
    )
    notify_on: Literal["failure", "always"] = Field(
        default="failure", description="Send alerts on 'failure' only, or 'always'.",
    )
    healthcheck_url: str | None = Field(
        default=None,
        description="healthchecks.io-style ping URL: <url>/start when a run starts, <url> on "
        "success, <url>/fail (with the log tail) on failure.",
    )

    destination: tuple[Destination, ...] = Field(
        default=(),
        description="More places each backup goes to after it is published in `target`: "
        "[[job.destination]] tables with type 'ssh', 'restic' or 'local', each with its own "
        "keep_* retention.",
    )

    @field_validator("destination")
    @classmethod
    def _unique_destinations(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        seen: set[str] = set()
        for item in value:
            if item.name in seen:
                raise ValueError(f"destination name {item.name!r} is used twice in this job")
            seen.add(item.name)
        return value

    @field_validator("users")
    @classmethod
    def _layout(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("/") or ".." in value.split("/"):
            raise ValueError("a path relative to the source, without '..': "
                             "'{domain}/{user}/Maildir', '{user}/Maildir' or ''")
        try:
            value.format(user="u", domain="d", login="u@d")
        except (KeyError, IndexError, ValueError):
            raise ValueError("only {user}, {domain} and {login} can be filled in, e.g. "
                             "'{domain}/{user}/Maildir'") from None
        if value and "{user}" not in value and "{login}" not in value:
            raise ValueError("must contain {user} (or {login}), or be '' for a source that is "
                             "a single Maildir")
        return value

    @field_validator("retention_timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}: use an IANA name like "
                                 "'Europe/Berlin' or 'UTC'") from None
        return value

    @field_validator("notify")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://\S*", url):
                raise ValueError(f"{url!r} is not a URL like 'mailto://…' or 'ntfy://…'")
        return value

    @field_validator("healthcheck_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://\S+", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/") if value else value

    @field_validator("name")
    @classmethod
    def _job_name(cls, value: str) -> str:
        if not re.fullmatch(JOB_NAME_RE, value):
            raise ValueError(
                f"{value!r} is not a valid job name: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (it is part of every snapshot, mount and "
                "backup name)"
            )
        return value

    @field_validator("source", "target", "run_dir", "state_dir", "metrics_file")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(value)!r}")
        return value

    @field_validator("exclude")
    @classmethod
    def _no_empty_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not pattern.strip():
                raise ValueError("exclude patterns must not be empty")
        return value

    @model_validator(mode="after")
    def _target_outside_source(self) -> JobBase:
        problem = nesting_problem(_normal(self.source), _normal(self.target))
        if problem:
            raise ValueError(problem)
        for item in self.destination:
            if isinstance(item, LocalDestination):
                problem = nesting_problem(_normal(self.source), _normal(item.target))
                if problem:
                    raise ValueError(f"destination {item.name!r}: {problem}")
                if _normal(item.target) == _normal(self.target):
                    raise ValueError(f"destination {item.name!r}: same target as the job; "
                                     "a second copy belongs on another disk")
        return self

    def destination_named(self, name: str) -> Destination:
        for item in self.destination:
            if item.name == name:
                return item
        names = ", ".join(["local", *(d.name for d in self.destination)])
        raise ConfigError(f"--destination: job {self.name!r} has no destination {name!r} "
                          f"(it has: {names})")

    @property
    def excludes(self) -> tuple[str, ...]:
        return DEFAULT_EXCLUDES + self.exclude

    @property
    def work_dir(self) -> Path:
        """This job's private directory for mount points: ``<run_dir>/<job>``."""
        return (self.run_dir or default_run_dir()) / self.name

    @property
    def state_path(self) -> Path:
        """This job's run reports: ``<state_dir>/<job>``."""
        return (self.state_dir or default_state_dir()) / self.name


class BtrfsJob(JobBase):
    """A read-only btrfs snapshot of the subvolume that holds the source.

    The snapshot lives in ``.mailsnap/`` at the file system's top level (subvolid=5), which
    mailsnap mounts privately under ``run_dir`` for the moment it needs it; never inside the
    live mail tree, where Dovecot would take a ``.name`` directory for a mail folder.
    """

    backend: Literal["btrfs"]


class LiveJob(JobBase):
    """No snapshot: the Maildir-aware live copier reads the running store directly."""

    backend: Literal["live"]

    @field_validator("verify")
    @classmethod
    def _no_snapshot_to_verify_against(cls, value: str) -> str:
        if value == "snapshot":
            raise ValueError("backend 'live' has no snapshot to compare the copy with (the "
                             "live tree changes while it is read); use `mailsnap verify` "
                             "on the backup instead")
        return value

    @field_validator("copier")
    @classmethod
    def _no_rsync_on_a_live_tree(cls, value: str) -> str:
        if value == "rsync":
            raise ValueError("rsync loses renamed and moved messages on a live tree; backend "
                             "'live' always uses copier 'maildir' (remove the copier key)")
        return value
    max_passes: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="Re-scan passes at most, until a pass finds no new message.",
    )


class AutoJob(JobBase):
    """Pick the backend from the source: btrfs on a btrfs subvolume, ``live`` otherwise."""

    backend: Literal["auto"]
    max_passes: int = Field(default=10, ge=1, le=1000)


class LvmJob(JobBase):
    """A classic (COW) or thin LVM snapshot of the logical volume that holds the source."""

    backend: Literal["lvm"]
    snapshot_size: str = Field(
        default="10%ORIGIN",
        description="COW space of a classic snapshot: an absolute size ('2G', '512M') or "
        "'N%ORIGIN' of the origin LV. mailsnap refuses to start when the volume group has less "
        "free space. Ignored for thin LVs (their snapshots use the thin pool).",
    )
    cow_warn_percent: float = Field(
        default=80.0,
        gt=0,
        le=100,
        description="Log a warning when the snapshot's COW space (or the thin pool) is this "
        "full; at 100% an LVM snapshot becomes invalid and the run fails.",
    )
    auto_extend: bool = Field(
        default=False,
        description="When the COW space passes cow_warn_percent, grow the snapshot "
        "(lvextend) by its own size again, as far as the volume group's free space allows.",
    )
    mount_options: tuple[str, ...] | None = Field(
        default=None,
        description="Replace the file-system-specific snapshot mount options (XFS: nouuid, "
        "norecovery; ext4: noload). 'ro,nosuid,nodev,noexec' are always added.",
    )

    @field_validator("snapshot_size")
    @classmethod
    def _size(cls, value: str) -> str:
        percent = re.fullmatch(r"(\d{1,3})%ORIGIN", value)
        if percent and 1 <= int(percent.group(1)) <= 100:
            return value
        if not percent and re.fullmatch(r"\d+(\.\d+)?[KMGT]?", value, re.IGNORECASE):
            return value
        raise ValueError(f"must be a size like '2G', '512M' or '1-100%ORIGIN', got {value!r}")


class ZfsJob(JobBase):
    """A ZFS snapshot of the dataset that holds the source (and, by default, its children)."""

    backend: Literal["zfs"]
    recursive: bool = Field(
        default=True,
        description="Snapshot child datasets too, in one atomic 'zfs snapshot -r', and mount "
        "the ones below the source inside the snapshot mount so they are copied.",
    )
    use_snapdir: bool = Field(
        default=False,
        description="Read the snapshot through the dataset's '.zfs/snapshot/<name>' directory "
        "instead of mounting it under run_dir (child datasets are then not included).",
    )


Job = Annotated[BtrfsJob | LvmJob | ZfsJob | LiveJob | AutoJob, Field(discriminator="backend")]


class Config(_Model):
    """The whole file: ``[[job]]`` tables."""

    job: list[Job] = Field(min_length=1, description="One table per job.")

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for job in self.job:
            if job.name in seen:
                raise ValueError(f"job name {job.name!r} is used twice; names must be unique")
            seen.add(job.name)
        return self

    def select(self, name: str | None) -> list[Job]:
        """The jobs to run: all of them, or the one called ``name``."""
        if name is None:
            return list(self.job)
        for job in self.job:
            if job.name == name:
                return [job]
        names = ", ".join(j.name for j in self.job)
        raise ConfigError(f"--job: no job named {name!r} in the config (jobs: {names})")


JobT = TypeVar("JobT", bound=JobBase)


def job_as(model: type[JobT], job: JobBase) -> JobT:
    """``job`` as a job of kind ``model``: the keys every job has are kept, the backend's own
    keys take their defaults. How ``backend = "auto"`` hands a job to the backend it picked."""
    if isinstance(job, model):
        return job
    (kind,) = get_args(model.model_fields["backend"].annotation)
    common = job.model_dump(include=set(JobBase.model_fields))
    return model.model_validate({**common, "backend": kind})


def nesting_problem(source: Path, target: Path) -> str | None:
    """Why ``source`` and ``target`` (both normalised) may not be used together, or None.
    The config compares the paths as written; ``sources.check_target_outside_source`` compares
    them again with symlinks resolved."""
    if target == source or source in target.parents:
        return (f"target {str(target)!r} is inside source {str(source)!r}: put backups on "
                "another path, or every backup would contain the previous ones")
    if target in source.parents:
        return (f"source {str(source)!r} is inside target {str(target)!r}: choose a target "
                "outside the mail tree")
    return None


def _normal(path: Path) -> Path:
    return Path(os.path.normpath(path))


def _location(loc: tuple[int | str, ...]) -> str:
    """``('job', 0, 'btrfs', 'target')`` → ``job[0].target`` (the union tag is noise)."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and part in BACKEND_NAMES and isinstance(loc[i - 1], int):
            continue
        elif (i > 1 and part in DESTINATION_TYPES and isinstance(loc[i - 1], int)
              and loc[i - 2] == "destination"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _in_destination(loc: tuple[int | str, ...]) -> bool:
    return len(loc) >= 2 and isinstance(loc[-1], int) and loc[-2] == "destination"


def _error_lines(exc: ValidationError, origin: str) -> list[str]:
    lines = []
    for err in exc.errors():
        where = _location(tuple(err["loc"])) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key; remove it (see examples/mailsnap.toml for the keys)"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found") and _in_destination(
                tuple(err["loc"])):
            message = (f"type must be one of {', '.join(DESTINATION_TYPES)}"
                       if err["type"] == "union_tag_invalid"
                       else f"missing key 'type' (one of {', '.join(DESTINATION_TYPES)})")
        elif err["type"] == "union_tag_invalid":
            message = f"backend must be one of {', '.join(BACKEND_NAMES)}"
        elif err["type"] == "union_tag_not_found":
            message = f"missing key 'backend' (one of {', '.join(BACKEND_NAMES)})"
        if origin == FLAGS:
            # A one-off job's fields came from flags: name the flag, not job[0].<field>.
            field = where.removeprefix("job[0]").lstrip(".")
            lines.append(f"{_FLAG_OF.get(field, '--source/--target')}: {message}")
        else:
            lines.append(f"{origin}: {where}: {message}")
    return lines


FLAGS = "flags"
_FLAG_OF = {"name": "--job", "source": "--source", "target": "--target", "backend": "--backend"}


def parse_config(data: Mapping[str, Any], origin: str = "config") -> Config:
    """Validate already-parsed TOML data; raise ``ConfigError`` with one line per bad field."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_error_lines(exc, origin)) from None


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such config file; pass --config FILE, or --source DIR --target DIR "
            "for a one-off job"
        ) from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read it; run as root or fix its permissions") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; pass the config file itself") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 (TOML requires it)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, origin=str(path))


def one_off_job(
    *, name: str, source: Path, target: Path, backend: str, exclude: tuple[str, ...] = (),
    copier: str | None = None,
) -> Job:
    """A job from CLI flags; relative paths are taken from the current directory."""
    data: dict[str, Any] = {
        "name": name,
        "source": str(Path(source).expanduser().absolute()),
        "target": str(Path(target).expanduser().absolute()),
        "backend": backend,
        "exclude": list(exclude),
    }
    if copier is not None:
        data["copier"] = copier
    return parse_config({"job": [data]}, origin=FLAGS).job[0]

