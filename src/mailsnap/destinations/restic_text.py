"""What restic's text means, and how to write text restic reads: repository URLs, patterns,
env files, times, and the error lines restic prints. Pure functions, no commands."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
import re

from mailsnap import maildirs
from mailsnap.backends.base import RUN_ID_RE

_ENV_LINE = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")
# Go's filepath.Match, which restic applies to each path component: these are special, and a
# backslash makes the next character literal.
_GO_SPECIAL = re.compile(r"([*?\[\\])")
_FRACTION = re.compile(r"(\.\d{6})\d+")


# -- what restic prints when it fails ---------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    what: str
    todo: str
    signs: tuple[str, ...]


# Checked in this order: an unreachable S3 endpoint also says "unable to open config file".
_KINDS = (
    Kind("wrong password", "check password_file / password_command (or RESTIC_PASSWORD)",
          ("wrong password", "no key found")),
    Kind("cannot reach the repository", "check the repository address, the network, the "
          "credentials in env/env_file and options",
          ("connection refused", "no such host", "dial tcp", "i/o timeout",
           "network is unreachable", "unable to start the sftp session", "subprocess ssh:",
           "connection reset", "tls:", "x509:", "access denied", "invalidaccesskeyid",
           "signaturedoesnotmatch", "permission denied (publickey")),
    Kind("no repository there", "set init = true or run restic init",
          ("unable to open config file", "is there a repository at the following location",
           "specified bucket does not exist")),
    Kind("the repository is locked", "wait for the other restic process, or run `restic "
          "unlock` if none is running", ("repository is already locked", "unable to create lock")),
)


MISSING = _KINDS[2]


def kind_of(stderr: str) -> Kind | None:
    low = stderr.lower()
    for kind in _KINDS:
        if any(sign in low for sign in kind.signs):
            return kind
    return None


def telling_line(stderr: str, repository: str) -> str:
    """The line of restic's stderr that says why: its last ``Fatal:`` line, else its last
    line (not the repository echoed back, which ends the "is there a repository" message)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    lines = [line for line in lines if line != repository]
    fatal = [line.removeprefix("Fatal:").strip() for line in lines if line.startswith("Fatal:")]
    # sftp: restic's own line says only "unable to start the sftp session, error: EOF"; ssh's
    # line before it says why.
    ssh = [line.removeprefix("subprocess ssh:").strip() for line in lines
           if line.startswith("subprocess ssh:")]
    if fatal and ssh:
        return f"{ssh[-1]} ({fatal[-1]})"
    if fatal:
        return fatal[-1]
    return lines[-1] if lines else "no error output"


# -- names and patterns --------------------------------------------------------------------

def redact(repository: str) -> str:
    """``repository`` without the ``user:password@`` of a URL (``rest:https://u:p@host/``)."""
    match = re.match(r"(?P<head>[^/]*://)(?P<authority>[^/]*)(?P<tail>.*)", repository,
                     re.DOTALL)
    if not match or "@" not in match.group("authority"):
        return repository
    userinfo, host = match.group("authority").rsplit("@", 1)
    if ":" not in userinfo:
        return repository  # a user name alone is no secret
    return f"{match.group('head')}{host}{match.group('tail')}"


def literal(path: str) -> str:
    """``path`` as a restic pattern on the command line that matches only itself."""
    return _GO_SPECIAL.sub(r"\\\1", path)


def file_literal(path: str) -> str:
    """``path`` as a pattern line of a restic exclude file.

    restic reads such a file line by line, trims the whitespace around each line and expands
    ``$VAR``/``${VAR}`` in it, with no way to escape either. A tmp rule starts with "/" and
    ends in "*", so trimming never reaches a name; but a ``$`` or a newline in a folder name
    cannot be written, so each becomes ``?`` (any one character). At worst that also leaves
    out the tmp/ content of a sibling folder whose name differs only there.
    """
    out = []
    for char in path:
        if char in "$\n\r":
            out.append("?")
        elif char in "*?[\\":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def tmp_exclude(root: str, maildir: str) -> str:
    """The exclude-file line for the content of ``maildir``'s tmp/ (relative, "" for the
    root) when ``root`` is what restic backs up: anchored, since restic matches a leading "/"
    against the absolute path."""
    base = root.rstrip("/") + (f"/{maildir}" if maildir else "")
    return f"{file_literal(base)}/{maildirs.TMP_DIR}/*"


def job_exclude(pattern: str, root: str) -> str:
    """A job exclude pattern (rsync style) as restic takes it. rsync anchors a leading "/" at
    the top of the copy, restic at the file system root, so the backed-up root goes in front;
    restic has no "directories only", so a trailing "/" is dropped (the name is left out
    whatever it is). ``*``, ``**``, ``?`` and ``[…]`` mean the same in both."""
    if pattern.startswith("/"):
        pattern = literal(root.rstrip("/")) + pattern
    return pattern.rstrip("/") or pattern


def run_time(run_id: str) -> datetime | None:
    """When the run ``20261201T023000Z`` (or ``….1``) started, or None for another name."""
    if not re.fullmatch(RUN_ID_RE, run_id):
        return None
    return datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def restic_time(text: str) -> datetime:
    """restic's RFC 3339 time with nanoseconds (``…T16:38:25.984326746Z``) as aware UTC."""
    return datetime.fromisoformat(_FRACTION.sub(r"\1", text)).astimezone(UTC)


def read_env_file(path: Path) -> tuple[dict[str, str], int | None]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines, an optional ``export``, one pair of
    quotes around the value). Returns the variables, or the number of the first bad line."""
    found: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(line)
        if not match:
            return found, number
        value = match.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[match.group(1)] = value
    return found, None
