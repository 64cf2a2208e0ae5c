"""What the Maildir copier does to one file: copy it (hashing as it goes), or link it.

Shared by the one-pass walk of a frozen snapshot and the live copier's re-scanning walk.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat

from mailsnap.errors import CopyFailed
from mailsnap.manifest import file_tail

INFO_SEPARATOR = ":"  # Maildir's "NAME:2,FLAGS"; Dovecot's maildir_info_separator default
CHUNK = 1 << 20
IS_ROOT = os.geteuid() == 0


def _umask() -> int | None:
    """This process's umask, read without changing it (Linux 4.7+), or None."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


UMASK = _umask()


def base_name(filename: str) -> str:
    """``1700000000.M1P2.host,S=123:2,RS`` → ``1700000000.M1P2.host,S=123``."""
    return filename.split(INFO_SEPARATOR, 1)[0]


def size_digits(filename: str) -> str | None:
    """The digits of Dovecot's ``,S=<size>`` in a message's base name, or None."""
    base = filename.split(INFO_SEPARATOR, 1)[0]
    at = base.find(",S=")
    if at < 0:
        return None
    end = base.find(",", at + 3)
    digits = base[at + 3 : end if end >= 0 else len(base)]
    return digits if digits.isdigit() else None


def size_in_name(filename: str) -> int | None:
    """Dovecot's ``,S=<size>`` in a message's base name (the file's size on disk), or None.
    It lets a message be matched to the previous backup without a ``stat``."""
    digits = size_digits(filename)
    return int(digits) if digits is not None else None


def tail_of(info: os.stat_result, sha256: str) -> str:
    return file_tail(info.st_size, info.st_mtime_ns, stat.S_IMODE(info.st_mode), info.st_uid,
                     info.st_gid, sha256)


def same_file(tail: str, info: os.stat_result) -> bool:
    """A previous record describes this file (size, mtime, mode, owner): link, don't copy."""
    return tail.rsplit("\t", 1)[0] == tail_of(info, "").rstrip("\t")


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
# errnos that say "no reflink between these two files", as opposed to a real failure.
NO_REFLINK = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL,
                        errno.EPERM, errno.ENOSYS})


class Reflinks:
    """Whether to try ``FICLONE`` (a copy that shares the source's extents: no data written)
    for the next file. One refusal for a reason that holds for every file (another file
    system, no reflink support) turns it off for the rest of the copy."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def clone(self, source: int, target: int) -> bool:
        if not self.enabled:
            return False
        try:
            fcntl.ioctl(target, FICLONE, source)
        except OSError as exc:
            if exc.errno in NO_REFLINK:
                self.enabled = False
                return False
            raise
        return True


def copy_open_file(fd: int, info: os.stat_result, target: str,
                   reflinks: Reflinks | None = None) -> tuple[str, bool]:
    """Copy the open source file ``fd`` (described by ``info``) to a new file ``target`` with
    its owner (as root), mode and times, hashing it on the way. Returns the sha256 hex digest
    and whether the data was reflinked (shared with the source, not written) rather than
    copied. Not fsync'ed: the store syncs the whole target file system once before
    publishing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    mode = stat.S_IMODE(info.st_mode)
    # Created with its mode when the umask keeps it whole (a message's 0600 always): then no
    # fchmod. A set-id or sticky bit still gets one, after the chown (which clears set-id).
    created_whole = UMASK is not None and not mode & 0o7000 and not mode & UMASK
    try:
        out = os.open(target, flags, mode if created_whole else 0o600)
    except OSError as exc:
        raise CopyFailed(f"cannot write {target}: {exc.strerror}") from None
    digest = hashlib.sha256()
    cloned = False
    try:
        cloned = reflinks is not None and reflinks.clone(fd, out)
        # Ask for the file's size plus one: a message comes back in one read, and the short
        # read says "end of file" without another call. (A fixed 1 MiB request makes CPython
        # allocate, and the kernel map and unmap, a 1 MiB buffer for every 8 KiB message.)
        want = min(info.st_size + 1, CHUNK)
        while chunk := os.read(fd, want):
            digest.update(chunk)
            if not cloned:
                _write_all(out, chunk)
            if len(chunk) < want:
                break
        if IS_ROOT:
            os.fchown(out, info.st_uid, info.st_gid)
        if not created_whole:
            os.fchmod(out, mode)
        os.utime(out, ns=(info.st_atime_ns, info.st_mtime_ns))
    except OSError as exc:
        raise CopyFailed(f"cannot write {target}: {exc.strerror}") from None
    finally:
        os.close(out)
    return digest.hexdigest(), cloned


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` may write less than it was given (a signal, a quota): until all is."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_open_file(fd: int, info: os.stat_result, target: str, old_size: int,
                     old_sha256: str) -> str | None:
    """Grow ``target`` in place to the open source file ``fd`` (described by ``info``) by
    writing only what follows its first ``old_size`` bytes; return the sha256 of the whole.

    For a backup that started as a snapshot of the previous one (``target_snapshots``):
    ``target`` is the previous backup's copy of the file, ``old_size`` and ``old_sha256`` its
    manifest record. Dovecot appends to ``dovecot.index.log`` and ``dovecot.index.cache``, and
    copying them whole wrote most of the bytes of a night with few changes. The source's first
    ``old_size`` bytes are hashed on the way and must give ``old_sha256``, so an appended file
    is proven equal to the source as a copy is. None, with nothing written, when they do not
    (the file was rewritten, not appended to) or ``target`` is not that file (another size,
    another kind, a second link): the caller copies it whole.
    """
    if not old_sha256 or info.st_size <= old_size:
        return None
    try:
        out = os.open(target, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # gone, a symlink, a directory, not writable: copy it whole
    try:
        there = os.fstat(out)
        if not stat.S_ISREG(there.st_mode) or there.st_nlink != 1 or there.st_size != old_size:
            return None
        digest = hashlib.sha256()
        left = old_size
        while left:
            chunk = os.read(fd, min(left, CHUNK))
            if not chunk:
                return None
            digest.update(chunk)
            left -= len(chunk)
        if digest.hexdigest() != old_sha256:
            return None
        os.lseek(out, old_size, os.SEEK_SET)
        want = min(info.st_size - old_size + 1, CHUNK)
        while chunk := os.read(fd, want):
            digest.update(chunk)
            _write_all(out, chunk)
        if IS_ROOT and (there.st_uid, there.st_gid) != (info.st_uid, info.st_gid):
            os.fchown(out, info.st_uid, info.st_gid)
        if stat.S_IMODE(there.st_mode) != stat.S_IMODE(info.st_mode):
            os.fchmod(out, stat.S_IMODE(info.st_mode))
        os.utime(out, ns=(info.st_atime_ns, info.st_mtime_ns))
    except OSError as exc:
        raise CopyFailed(f"cannot write {target}: {exc.strerror}") from None
    finally:
        os.close(out)
    return digest.hexdigest()


def make_directory(target: str, info: os.stat_result) -> None:
    """Create a backup directory 0700, then give it the source's owner and mode. Its times
    are set at the end of the copy (creating entries in it would change them)."""
    try:
        os.mkdir(target, 0o700)
    except FileExistsError:
        pass
    if IS_ROOT:
        os.chown(target, info.st_uid, info.st_gid)
    os.chmod(target, stat.S_IMODE(info.st_mode))


def copy_symlink(source: str, target: str, info: os.stat_result) -> str:
    """Recreate a symlink (never followed); returns its target."""
    link = os.readlink(source)
    os.symlink(link, target)
    if IS_ROOT:
        os.chown(target, info.st_uid, info.st_gid, follow_symlinks=False)
    return link
