"""What changed since the previous backup, folder by folder, without listing the folder.

A Maildir's ``cur/`` and ``new/`` get a new mtime on every delivery, flag change (a rename) and
expunge in them; Dovecot itself relies on that to know when to re-read a folder. So a message
directory whose mtime, ctime, inode, mode and owner are what the previous backup's manifest
recorded holds what it held then, and the copy takes its records over without listing it.

The holes, and how they are closed:

* Two changes in one tick of the file system's clock give a directory the same mtime twice.
  The previous copy recorded ``listed_before``, a time no later than the moment it saw the
  source (taken before the snapshot; a live copy's start). A change after that moment gets an
  mtime of at least ``listed_before`` minus a tick; so a directory whose recorded mtime is
  older than ``listed_before - CLOCK_SLACK_NS`` and still the same has not changed, and any
  other directory is listed.
* A message rewritten in place, or ``chown``/``chmod``/``utime`` on a message, does not touch
  its directory. Dovecot never does any of these, but other tools might: every
  ``full_check_every`` a backup lists every folder and compares every message's size, mtime,
  mode and owner with its previous record (a night with no usable previous folder times does
  the same).
* Files at a folder's root (``dovecot-uidlist``, ``dovecot.index*``) are rewritten in place:
  those directories are never taken over, only ``cur/`` and ``new/`` are.
* A directory holding a symlink (not a Maildir message; its record is not kept) is listed.
* Exclude patterns that changed since the previous backup: every folder is listed.

``st_dev`` differs between two snapshots of one file system, so it is not compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
import logging
import os
import stat
import zlib

log = logging.getLogger(__name__)

# Far more than any file system's timestamp granularity (ext4/XFS/btrfs: the kernel's coarse
# clock, a few ms; FAT: 2 s) plus the skew between it and time.time_ns().
CLOCK_SLACK_NS = 2_000_000_000
# A full check "every 7 days" from a nightly job must not wait for the 8th night because the
# 7th ran a few seconds earlier in the day.
DUE_SLACK = 0.1


def directory_fields(info: os.stat_result) -> str:
    """A ``D`` record after its path: mode, owner, mtime, ctime and inode."""
    return (f"{stat.S_IMODE(info.st_mode):o}\t{info.st_uid}\t{info.st_gid}\t"
            f"{info.st_mtime_ns}\t{info.st_ctime_ns}\t{info.st_ino}")


@dataclass(frozen=True)
class FolderTimes:
    """Tells an unchanged message directory from its ``lstat`` and its previous record."""

    listed_before: int  # the previous copy's: see the module docstring

    def unchanged(self, record: str | None, info: os.stat_result) -> bool:
        return (record is not None
                and info.st_mtime_ns < self.listed_before - CLOCK_SLACK_NS
                and record == directory_fields(info))


@dataclass(frozen=True)
class FolderPlan:
    """This copy's folder check (None: list every folder) and the ``full_check`` time its
    manifest carries forward."""

    times: FolderTimes | None
    full_check: int
    reason: str


def excludes_fingerprint(patterns: Sequence[str]) -> int:
    """A checksum of the job's exclude patterns: a folder taken over unlisted keeps what the
    previous backup kept, which is only right if the same names are left out."""
    return zlib.crc32("\0".join(patterns).encode("utf-8", "surrogateescape"))


def plan_folders(end_fields: dict[str, int] | None, every: timedelta, now_ns: int,
                 excludes: int | None = None) -> FolderPlan:
    """Whether this copy may take unchanged folders over, from the previous manifest's end
    line (None: there is no usable previous manifest) and this job's ``excludes``
    fingerprint."""
    if end_fields is None:
        return FolderPlan(None, now_ns, "no previous manifest")
    if excludes is not None and end_fields.get("excludes") != excludes:
        return FolderPlan(None, now_ns, "full check: the exclude patterns are not those of "
                          "the previous backup")
    listed_before = end_fields.get("listed_before")
    last_full = end_fields.get("full_check")
    if listed_before is None or last_full is None:
        return FolderPlan(None, now_ns, "the previous manifest has no folder times")
    if every <= timedelta(0):
        return FolderPlan(None, now_ns, "full_check_every = 0")
    due = every.total_seconds() * (1 - DUE_SLACK) * 1e9
    age = now_ns - last_full
    if age >= due or age < 0:
        days = age / 86400e9
        return FolderPlan(None, now_ns, f"full check: the last one listing every folder was "
                          f"{days:.1f} days ago (full_check_every = {every})")
    return FolderPlan(FolderTimes(listed_before), last_full, "unchanged folders taken over")
