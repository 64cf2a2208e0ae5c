"""Configuration: TOML (``/etc/mailsnap.toml`` by default) validated by pydantic models.

A file holds one or more ``[[job]]`` tables. The ``backend`` key picks the model (a discriminated
union), so a btrfs job cannot carry an LVM-only key by accident (``extra="forbid"``). A one-off job
can also be built from CLI flags (``--source``, ``--target``, ``--backend``) with no file at all.
Errors come back as ``ConfigError`` with one line per bad field, e.g. ``job[0].target: …``.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from pathlib import Path
import re
import tomllib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mailsnap.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/mailsnap.toml")
JOB_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Dovecot's temporary files and lock files: half-written or meaningless in a backup.
DEFAULT_EXCLUDES = ("tmp/*", "dovecot-uidlist.lock", "dovecot-keywords.lock")


def default_run_dir() -> Path:
    """Where mailsnap puts its mount points: ``/run/mailsnap`` as root, a private dir otherwise."""
    if os.geteuid() == 0:
        return Path("/run/mailsnap")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "mailsnap" if runtime else Path(f"/tmp/mailsnap-{os.geteuid()}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobBase(_Model):
    """Keys every job has, whatever its backend."""

    name: str = Field(
        pattern=JOB_NAME_RE,
        description="Job name: letters, digits, '.', '_', '-'. Part of every snapshot, mount "
        "and backup directory this job creates.",
    )
    source: Path = Field(description="The live mail directory (a Maildir root or a tree of them).")
    target: Path = Field(description="Where backups go: TARGET/<job>/<UTC timestamp>/.")
    exclude: tuple[str, ...] = Field(
        default=(),
        description="Extra rsync-style exclude patterns, added to the built-in ones "
        "(tmp/ contents and Dovecot lock files).",
    )
    run_dir: Path | None = Field(
        default=None,
        description="Directory for mailsnap's private mount points and work files "
        "(default /run/mailsnap as root).",
    )

    @field_validator("source", "target", "run_dir")
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
        source, target = _normal(self.source), _normal(self.target)
        if target == source or source in target.parents:
            raise ValueError(
                f"target {str(self.target)!r} is inside source {str(self.source)!r}: "
                "put backups on another path, or every backup would contain the previous ones"
            )
        if target in source.parents:
            raise ValueError(
                f"source {str(self.source)!r} is inside target {str(self.target)!r}: "
                "choose a target outside the mail tree"
            )
        return self

    @property
    def excludes(self) -> tuple[str, ...]:
        return DEFAULT_EXCLUDES + self.exclude

    @property
    def work_dir(self) -> Path:
        """This job's private directory for mount points: ``<run_dir>/<job>``."""
        return (self.run_dir or default_run_dir()) / self.name


class BtrfsJob(JobBase):
    """A read-only btrfs snapshot of the subvolume that holds the source."""

    backend: Literal["btrfs"]
    snapshot_dir: Path | None = Field(
        default=None,
        description="A directory on the same btrfs file system for snapshots. Default: mount the "
        "top level (subvolid=5) privately and snapshot into its 'mailsnap' directory.",
    )

    @field_validator("snapshot_dir")
    @classmethod
    def _absolute_snapshot_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(value)!r}")
        return value

    @model_validator(mode="after")
    def _snapshot_dir_outside_source(self) -> BtrfsJob:
        if self.snapshot_dir is not None:
            snap, source = _normal(self.snapshot_dir), _normal(self.source)
            if snap == source or source in snap.parents:
                raise ValueError(
                    f"snapshot_dir {str(self.snapshot_dir)!r} is inside source: Dovecot would "
                    "see the snapshot as a mail folder; use a directory outside the mail tree"
                )
        return self


class LiveJob(JobBase):
    """No snapshot: the Maildir-aware live copier reads the running store directly."""

    backend: Literal["live"]
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


Job = Annotated[BtrfsJob | LiveJob | AutoJob, Field(discriminator="backend")]
BACKEND_NAMES = ("auto", "btrfs", "live")


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
        else:
            out += f".{part}" if out else str(part)
    return out


def _error_lines(exc: ValidationError, origin: str) -> list[str]:
    lines = []
    for err in exc.errors():
        where = _location(tuple(err["loc"])) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key; remove it (see examples/mailsnap.toml for the keys)"
        elif err["type"] == "union_tag_invalid":
            message = f"backend must be one of {', '.join(BACKEND_NAMES)}"
        elif err["type"] == "union_tag_not_found":
            message = f"missing key 'backend' (one of {', '.join(BACKEND_NAMES)})"
        lines.append(f"{origin}: {where}: {message}")
    return lines


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
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, origin=str(path))


def one_off_job(
    *, name: str, source: Path, target: Path, backend: str, exclude: tuple[str, ...] = ()
) -> Job:
    """A job from CLI flags; relative paths are taken from the current directory."""
    data: dict[str, Any] = {
        "name": name,
        "source": str(Path(source).expanduser().absolute()),
        "target": str(Path(target).expanduser().absolute()),
        "backend": backend,
        "exclude": list(exclude),
    }
    return parse_config({"job": [data]}, origin="flags").job[0]


def is_valid_job_name(name: str) -> bool:
    return re.match(JOB_NAME_RE, name) is not None
