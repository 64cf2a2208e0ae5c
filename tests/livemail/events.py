"""The event log: which message existed when, on the ``time.monotonic()`` clock.

A message is identified by its ``Message-ID``. It can exist as several *instances* at once (an IMAP
COPY makes a second file with the same Message-ID); an instance is created by seeding, an LMTP
delivery or a COPY, survives flag changes and MOVEs (Dovecot hard-links into the target folder
before unlinking the source, so it never stops existing), and is destroyed by EXPUNGE.

Timestamps are taken conservatively so that the checker never demands a message that might not
have existed: an instance counts as created when Dovecot *confirmed* it (after the LMTP/COPY
reply), and as destroyed when the EXPUNGE was *sent*.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
import json
import math
from pathlib import Path
import secrets
import threading
import time
from typing import Any

CREATE_KINDS = ("seed", "deliver", "copy")
DESTROY_KINDS = ("expunge",)


@dataclass
class Instance:
    id: int
    message_id: str
    created: float
    destroyed: float | None = None


@dataclass(frozen=True)
class Event:
    at: float
    kind: str  # seed | deliver | copy | flag | move | expunge
    instance: int
    message_id: str
    detail: dict[str, Any] = field(default_factory=dict)


class EventLog:
    """Thread-safe, append-only record of every message instance and every change."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(3)  # makes Message-IDs unique across runs
        self._lock = threading.Lock()
        self.instances: list[Instance] = []
        self.events: list[Event] = []
        self._first: dict[str, int] = {}
        self._serial = 0

    def new_token(self, kind: str) -> str:
        """A fresh, unique message token (``<tag>-<kind>-<serial>``) for a new message."""
        with self._lock:
            self._serial += 1
            return f"{self.tag}-{kind}-{self._serial:07d}"

    def created(self, message_id: str, kind: str, at: float | None = None, **detail: Any) -> int:
        """Record a new instance of ``message_id`` (confirmed at ``at``); return its id."""
        assert kind in CREATE_KINDS, kind
        at = time.monotonic() if at is None else at
        with self._lock:
            inst = Instance(len(self.instances), message_id, at)
            self.instances.append(inst)
            self.events.append(Event(at, kind, inst.id, message_id, detail))
            self._first.setdefault(message_id, inst.id)
            return inst.id

    def destroyed(self, instance: int, at: float, **detail: Any) -> None:
        """Record that ``instance`` may be gone from ``at`` on (the EXPUNGE was sent)."""
        with self._lock:
            inst = self.instances[instance]
            inst.destroyed = at if inst.destroyed is None else min(inst.destroyed, at)
            self.events.append(Event(at, "expunge", instance, inst.message_id, detail))

    def changed(self, kind: str, instance: int, at: float | None = None, **detail: Any) -> None:
        """Record a change that keeps the instance alive (a flag rename, a MOVE)."""
        at = time.monotonic() if at is None else at
        with self._lock:
            mid = self.instances[instance].message_id
            self.events.append(Event(at, kind, instance, mid, detail))

    def first_instance(self, message_id: str) -> int | None:
        """The instance a seed or delivery created for ``message_id`` (None if not logged yet)."""
        with self._lock:
            return self._first.get(message_id)

    def message_id_of(self, instance: int) -> str:
        return self.instances[instance].message_id

    def copied(self) -> set[str]:
        """Message-IDs that ever had more than one instance (an IMAP COPY was made)."""
        with self._lock:
            return {i.message_id for i in self.instances if self._first[i.message_id] != i.id}

    # -- queries -----------------------------------------------------------------------------

    def required(self, start: float, end: float) -> set[str]:
        """Message-IDs that existed (in some folder, as some instance) during all of
        [start, end]: the union of their instances' lifetimes covers the window."""
        spans: dict[str, list[tuple[float, float]]] = {}
        with self._lock:
            for inst in self.instances:
                gone = math.inf if inst.destroyed is None else inst.destroyed
                spans.setdefault(inst.message_id, []).append((inst.created, gone))
        needed = set()
        for mid, intervals in spans.items():
            intervals.sort()
            cover_start, cover_end = intervals[0]
            for lo, hi in intervals[1:]:
                if lo <= cover_end:
                    cover_end = max(cover_end, hi)
                else:
                    if cover_start <= start and cover_end >= end:
                        break
                    cover_start, cover_end = lo, hi
            if cover_start <= start and cover_end >= end:
                needed.add(mid)
        return needed

    def changes(self, start: float = -math.inf, end: float = math.inf) -> Counter[str]:
        """Changes (every event but seeding) per kind with ``start <= at <= end``."""
        with self._lock:
            return Counter(
                e.kind for e in self.events if e.kind != "seed" and start <= e.at <= end
            )

    def unsettled(self, since: float) -> set[str]:
        """Message-IDs whose files may have changed at or after ``since``: those with an event
        (delivery, COPY, flag change, MOVE) logged then, plus every one with an expunged
        instance. Those events are logged after Dovecot's reply, so one still in flight at
        ``since`` is counted; an expunge is logged before its EXPUNGE command is sent, so it
        may have run after ``since`` whatever its time. Every other Message-ID kept its
        folders and flags from ``since`` on."""
        with self._lock:
            gone = {i.message_id for i in self.instances if i.destroyed is not None}
            return gone | {e.message_id for e in self.events if e.at >= since}

    def last_change(self) -> float:
        with self._lock:
            return max((e.at for e in self.events if e.kind != "seed"), default=-math.inf)

    # -- persistence (for a checker run outside the test process) -------------------------

    def dump(self, path: Path) -> None:
        """Write the log as JSON lines: one per event."""
        with self._lock, open(path, "w") as out:
            out.write(json.dumps({"tag": self.tag}) + "\n")
            for e in self.events:
                out.write(
                    json.dumps(
                        {"at": e.at, "kind": e.kind, "instance": e.instance,
                         "message_id": e.message_id, **e.detail}
                    )
                    + "\n"
                )

    @classmethod
    def load(cls, path: Path) -> EventLog:
        lines = path.read_text().splitlines()
        log = cls(tag=json.loads(lines[0])["tag"])
        for line in lines[1:]:
            record = json.loads(line)
            at, kind = record.pop("at"), record.pop("kind")
            instance, mid = record.pop("instance"), record.pop("message_id")
            if kind in CREATE_KINDS:
                new = log.created(mid, kind, at=at, **record)
                assert new == instance, "event log instances out of order"
            elif kind in DESTROY_KINDS:
                log.destroyed(instance, at, **record)
            else:
                log.changed(kind, instance, at, **record)
        return log
