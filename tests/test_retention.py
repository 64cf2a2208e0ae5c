"""Retention as a pure function: tables of backups, policies, time zones and DST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from mailsnap.prune import backup_time
from mailsnap.retention import Candidate, RetentionPolicy, decide

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")


def runs(*stamps: str) -> list[Candidate]:
    return [Candidate(s, backup_time(s)) for s in stamps]


def kept(backups: list[Candidate], policy: RetentionPolicy, tz: ZoneInfo | None = UTC
         ) -> list[str]:
    return sorted(d.id for d in decide(backups, policy, NOW, tz) if d.keep)


def nightly(days: int, hour: int = 2, start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
            ) -> list[Candidate]:
    out = []
    for n in range(days):
        t = start + timedelta(days=n, hours=hour)
        out.append(Candidate(t.strftime("%Y%m%dT%H%M%SZ"), t))
    return out


def test_empty_history_decides_nothing() -> None:
    assert decide([], RetentionPolicy(keep_daily=7), NOW) == []


def test_no_rule_keeps_everything_and_says_so() -> None:
    backups = nightly(5)
    decisions = decide(backups, RetentionPolicy(), NOW)
    assert all(d.keep and d.reasons == ["no retention policy"] for d in decisions)
    assert RetentionPolicy().keeps_everything


def test_newest_is_always_kept() -> None:
    backups = nightly(3)
    decisions = decide(backups, RetentionPolicy(keep_within=timedelta(seconds=1)), NOW)
    assert [d.keep for d in decisions] == [True, False, False]
    assert "newest" in decisions[0].reasons
    assert decisions[-1].reasons == ["matched no keep rule"]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (RetentionPolicy(keep_last=3), ["20260108T020000Z", "20260109T020000Z",
                                        "20260110T020000Z"]),
        (RetentionPolicy(keep_daily=2), ["20260109T020000Z", "20260110T020000Z"]),
        # ISO weeks: 2026-01-01 is a Thursday (week 1 runs Mon 2025-12-29 – Sun 01-04).
        (RetentionPolicy(keep_weekly=3), ["20260104T020000Z", "20260110T020000Z"]),
        (RetentionPolicy(keep_monthly=5), ["20260110T020000Z"]),
        (RetentionPolicy(keep_within=timedelta(days=2)), ["20260109T020000Z",
                                                          "20260110T020000Z"]),
        (RetentionPolicy(keep_last=1, keep_weekly=2), ["20260104T020000Z",
                                                       "20260110T020000Z"]),
    ],
)
def test_rules_on_ten_nightly_backups(policy: RetentionPolicy, expected: list[str]) -> None:
    assert kept(nightly(10), policy) == expected


def test_each_rule_picks_independently_and_names_itself() -> None:
    decisions = {d.id: d for d in decide(nightly(10), RetentionPolicy(keep_last=2, keep_daily=3),
                                         NOW, UTC)}
    assert decisions["20260110T020000Z"].reasons == ["newest", "last 2", "daily 1/3"]
    assert decisions["20260109T020000Z"].reasons == ["last 2", "daily 2/3"]
    assert decisions["20260108T020000Z"].reasons == ["daily 3/3"]
    assert not decisions["20260107T020000Z"].keep


def test_newest_of_each_day_is_the_one_kept() -> None:
    backups = runs("20260105T010000Z", "20260105T130000Z", "20260105T230000Z",
                   "20260106T010000Z")
    assert kept(backups, RetentionPolicy(keep_daily=2)) == ["20260105T230000Z",
                                                            "20260106T010000Z"]


def test_days_are_counted_in_the_policy_time_zone() -> None:
    # 23:30 UTC on Jan 5 is already Jan 6 in Berlin: the two runs share a Berlin day.
    backups = runs("20260105T120000Z", "20260105T233000Z", "20260106T100000Z")
    assert kept(backups, RetentionPolicy(keep_daily=2), UTC) == ["20260105T233000Z",
                                                                 "20260106T100000Z"]
    assert kept(backups, RetentionPolicy(keep_daily=2), BERLIN) == ["20260105T120000Z",
                                                                    "20260106T100000Z"]


def test_dst_fall_back_hour_holds_two_hours_of_backups() -> None:
    # 2026-10-25 in Berlin: 02:00–03:00 local happens twice (00:00–01:00 and 01:00–02:00
    # UTC); local hourly buckets merge them, as in borg and restic.
    backups = runs("20261025T003000Z", "20261025T013000Z", "20261025T023000Z")
    decisions = decide(backups, RetentionPolicy(keep_hourly=3), NOW, BERLIN)
    assert [d.id for d in decisions if d.keep] == ["20261025T023000Z", "20261025T013000Z"]
    assert not next(d for d in decisions if d.id == "20261025T003000Z").keep


def test_dst_spring_forward_day_is_one_day() -> None:
    # 2026-03-29 in Berlin has 23 hours; both runs are on that local day.
    backups = runs("20260328T233000Z", "20260329T213000Z", "20260330T060000Z")
    assert kept(backups, RetentionPolicy(keep_daily=2), BERLIN) == ["20260329T213000Z",
                                                                    "20260330T060000Z"]


def test_runs_in_one_second_are_ordered_by_id() -> None:
    backups = runs("20260105T020000Z", "20260105T020000Z.1", "20260105T020000Z.2")
    decisions = decide(backups, RetentionPolicy(keep_last=1), NOW)
    assert [d.id for d in decisions] == ["20260105T020000Z.2", "20260105T020000Z.1",
                                         "20260105T020000Z"]
    assert [d.keep for d in decisions] == [True, False, False]


def test_keep_within_counts_from_the_newest_backup_not_from_now() -> None:
    # Backups stopped a month ago: the last week of them survives, not nothing.
    backups = nightly(30, start=datetime(2026, 10, 1, tzinfo=UTC))
    policy = RetentionPolicy(keep_within=timedelta(days=7))
    assert len(kept(backups, policy)) == 7


def test_year_boundary_weeks() -> None:
    # 2026-12-31 (Thu) and 2027-01-03 (Sun) are both in ISO week 2026-W53.
    backups = runs("20261228T020000Z", "20261231T020000Z", "20270103T020000Z",
                   "20270104T020000Z")
    assert kept(backups, RetentionPolicy(keep_weekly=2)) == ["20270103T020000Z",
                                                             "20270104T020000Z"]


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(nightly(1), RetentionPolicy(keep_last=1), datetime(2026, 1, 1))
