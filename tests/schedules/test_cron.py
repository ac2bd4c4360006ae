"""Cron and interval next-fire times against a brute-force minute matcher (docs/schedules.md)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowfabric.server.engine.cron import Cron, Interval, InvalidTimeZone, upcoming

UTC = dt.UTC
MIN = 60_000
HORIZON_MIN = 2 * 24 * 60


def brute_next(cron: Cron, after_ms: int) -> int | None:
    """Walk UTC minutes; match local wall fields, first occurrence only (fold == 0)."""
    t = (after_ms // MIN + 1) * MIN
    for _ in range(HORIZON_MIN):
        local = dt.datetime.fromtimestamp(t // 1000, UTC).astimezone(cron.tz)
        if (
            local.fold == 0
            and local.minute in cron.minutes
            and local.hour in cron.hours
            and cron.day_matches(local.date())
        ):
            return t
        t += MIN
    return None


def _item(low: int, high: int) -> st.SearchStrategy[str]:
    num = st.integers(low, high)
    return st.one_of(
        st.just("*"),
        num.map(str),
        st.tuples(num, num).map(lambda p: f"{min(p)}-{max(p)}"),
        st.tuples(st.sampled_from(["*", str(low)]), st.integers(1, 7).map(str)).map("/".join),
    )


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    return st.lists(_item(low, high), min_size=1, max_size=3).map(",".join)


exprs = st.tuples(
    _field(0, 59),
    _field(0, 23),
    st.sampled_from(["*", "1-15", "*/2", "10,20"]),
    st.just("*"),
    _field(0, 7),
).map(" ".join)
ZONES = ["", "UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
zones = st.sampled_from(ZONES)
# 2026-03-01 .. 2026-11-30 covers both DST changes in the northern zones.
times = st.integers(1_772_323_200_000, 1_795_996_800_000)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(expr=exprs, tz=zones, after=times)
def test_next_after_matches_brute_force(expr: str, tz: str, after: int) -> None:
    cron = Cron.parse(expr, tz)
    want = brute_next(cron, after)
    got = cron.next_after(after)
    if want is None:
        assert got > after + HORIZON_MIN * MIN - MIN
    else:
        assert got == want
        assert cron.last_at_or_before(got) == got
        assert cron.last_at_or_before(got - 1) is None or cron.last_at_or_before(got - 1) <= after


def _ms(s: str, tz: str) -> int:
    zone = Cron.parse("* * * * *", tz).tz
    return int(dt.datetime.fromisoformat(s).replace(tzinfo=zone).timestamp() * 1000)


def _iso(ms: int, cron: Cron) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, cron.tz).isoformat()


def test_dst_gap_skips_and_overlap_fires_once() -> None:
    ny = "America/New_York"
    # 2026-03-08: 02:30 does not exist; the next 02:30 is on 03-09.
    cron = Cron.parse("30 2 * * *", ny)
    got = cron.next_after(_ms("2026-03-08T00:00", ny))
    assert _iso(got, cron) == "2026-03-09T02:30:00-04:00"
    # 2026-11-01: 01:30 happens twice; it fires once, at the first (EDT) one.
    cron = Cron.parse("30 1 * * *", ny)
    first, second = upcoming(cron, _ms("2026-11-01T00:00", ny), 2)
    assert _iso(first, cron) == "2026-11-01T01:30:00-04:00"
    assert second - first == 24 * 3600_000 + 3600_000


def test_names_and_or_rule() -> None:
    cron = Cron.parse("0 9 1 JAN-MAR MON", "UTC")
    t = cron.next_after(_ms("2026-01-01T09:00", "UTC"))  # Thu 1 Jan already passed; next: Mon 5 Jan
    assert dt.datetime.fromtimestamp(t / 1000, UTC).date() == dt.date(2026, 1, 5)
    assert Cron.parse("0 0 * * 7").dows == Cron.parse("0 0 * * SUN").dows == frozenset({0})


@pytest.mark.parametrize(
    ("expr", "field"),
    [
        ("* * * *", "expression"),
        ("60 * * * *", "minute"),
        ("* 24 * * *", "hour"),
        ("* * 0 * *", "day_of_month"),
        ("* * * FOO *", "month"),
        ("* * * * 8", "day_of_week"),
        ("*/0 * * * *", "minute"),
        ("5-1 * * * *", "minute"),
        ("0 0 31 2,4 *", "day_of_month"),
    ],
)
def test_invalid_names_the_field(expr: str, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        Cron.parse(expr)


def test_unknown_zone() -> None:
    with pytest.raises(InvalidTimeZone):
        Cron.parse("* * * * *", "Mars/Olympus")


def test_interval() -> None:
    iv = Interval(period_ms=10_000, anchor_ms=1_000)
    assert iv.next_after(0) == 1_000
    assert iv.next_after(1_000) == 11_000
    assert iv.last_at_or_before(10_999) == 1_000
    assert iv.last_at_or_before(999) is None
    assert upcoming(iv, 5_000, 3) == [11_000, 21_000, 31_000]
