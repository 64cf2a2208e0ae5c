"""rsync-style exclude patterns, for copiers that do not hand them to rsync.

The subset mailsnap documents: ``*`` (within one path component), ``**`` (across components),
``?``, ``[...]``; a leading ``/`` anchors at the top of the tree; a pattern with a ``/`` in it
matches the end of the path; one without matches the last component; a trailing ``/`` matches
directories only. This mirrors what rsync does with the same list, so both copiers skip the
same files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import re


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    dirs_only: bool


def _translate(glob: str) -> str:
    out, i = "", 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out += "(?:.*/)?"  # like rsync: "**/" also matches no directory at all
            i += 3
            continue
        if glob.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = glob.find("]", i + 1)
            if end == -1:
                out += re.escape(c)
            else:
                out += glob[i : end + 1]
                i = end
        else:
            out += re.escape(c)
        i += 1
    return out


_WILDCARD = re.compile(r"[*?\[/]")


class ExcludeMatcher:
    def __init__(self, patterns: Sequence[str]) -> None:
        self.rules = []
        # A plain name with no wildcard and no "/" ("dovecot-uidlist.lock", the defaults)
        # matches the last component exactly: a set lookup, not a regex per file.
        self.names: frozenset[str] = frozenset(
            p for p in patterns if p and not p.endswith("/") and not _WILDCARD.search(p))
        for pattern in patterns:
            if pattern in self.names:
                continue
            dirs_only = pattern.endswith("/")
            body = pattern.rstrip("/")
            if body.startswith("/"):
                regex = "^" + _translate(body[1:]) + "$"
            else:
                # Unanchored: match a whole trailing run of components (for a pattern with no
                # "/", that is the last component).
                regex = "(?:^|.*/)" + _translate(body) + "$"
            self.rules.append(_Rule(re.compile(regex, re.DOTALL), dirs_only))

    def excluded(self, relpath: str, *, is_dir: bool) -> bool:
        """``relpath`` is relative to the top of the copy, with ``/`` separators."""
        if self.names and relpath.rsplit("/", 1)[-1] in self.names:
            return True
        return bool(self.rules) and any(
            rule.regex.match(relpath) and (is_dir or not rule.dirs_only) for rule in self.rules
        )
