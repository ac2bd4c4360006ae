"""Next fire times: 5-field cron in a time zone, or a fixed interval (docs/schedules.md).

Times are epoch milliseconds. A cron expression is `minute hour day-of-month month day-of-week`
with `*`, `a`, `a-b`, `*/n`, `a/n`, `a-b/n` and comma lists; month and day-of-week accept names
(JAN..DEC, SUN..SAT; day-of-week 0 and 7 are Sunday). When both day fields are restricted a day
matches if either matches (the classic cron OR rule).

DST rule (docs/schedules.md#time-zones-and-dst): fields are matched against local wall time. A
wall time that does not exist (the spring-forward gap) never fires; a wall time that happens twice
(fall-back) fires once, at its first occurrence.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

UTC = dt.UTC
MONTHS = {n.upper(): i for i, n in enumerate(calendar.month_abbr) if n}
DAYS = {"SUN": 0, "MON": 1, "TUE": 2, "WED": 3, "THU": 4, "FRI": 5, "SAT": 6}
# (name, low, high, names)
FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day_of_month", 1, 31, {}),
    ("month", 1, 12, MONTHS),
    ("day_of_week", 0, 7, DAYS),
)
# Day-of-month-only expressions like "0 0 29 2 *" fire every 4 (at most 8) years.
SEARCH_DAYS = 9 * 366


class InvalidTimeZone(ValueError):
    """The time zone name is not a known IANA zone."""


def zone(name: str) -> ZoneInfo:
    if not name:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidTimeZone(f"unknown time zone {name!r}") from exc


def _value(token: str, field: str, low: int, high: int, names: dict[str, int]) -> int:
    if token.upper() in names:
        return names[token.upper()]
    if not token.isdigit():
        raise ValueError(f"{field}: {token!r} is not a number or name")
    v = int(token)
    if not low <= v <= high:
        raise ValueError(f"{field}: {v} is outside {low}-{high}")
    return v


def _field(text: str, field: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    out: set[int] = set()
    if not text:
        raise ValueError(f"{field}: empty")
    for item in text.split(","):
        rng, slash, step_s = item.partition("/")
        step = 1
        if slash:
            if not step_s.isdigit() or not 1 <= int(step_s) <= high:
                raise ValueError(f"{field}: bad step {step_s!r}")
            step = int(step_s)
        if rng == "*":
            a, b = low, high
        elif "-" in rng:
            lo_s, _, hi_s = rng.partition("-")
            a = _value(lo_s, field, low, high, names)
            b = _value(hi_s, field, low, high, names)
            if a > b:
                raise ValueError(f"{field}: range {rng!r} runs backwards")
        else:
            a = _value(rng, field, low, high, names)
            b = high if slash else a
        out.update(range(a, b + 1, step))
    return frozenset(out)


@dataclass(frozen=True)
class Cron:
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    doms: frozenset[int]
    months: frozenset[int]
    dows: frozenset[int]
    dom_star: bool
    dow_star: bool
    tz: ZoneInfo

    @classmethod
    def parse(cls, expr: str, time_zone: str = "") -> Cron:
        parts = expr.split()
        if len(parts) != 5:
            raise ValueError(
                "expression: want 5 fields (minute hour day_of_month month day_of_week),"
                f" got {len(parts)}"
            )
        sets = [_field(p, *spec) for p, spec in zip(parts, FIELDS, strict=True)]
        dows = frozenset(0 if d == 7 else d for d in sets[4])
        cron = cls(
            minutes=tuple(sorted(sets[0])),
            hours=tuple(sorted(sets[1])),
            doms=sets[2],
            months=sets[3],
            dows=dows,
            dom_star=parts[2].startswith("*"),
            dow_star=parts[4].startswith("*"),
            tz=zone(time_zone),
        )
        longest = {m: 29 if m == 2 else calendar.monthrange(2001, m)[1] for m in cron.months}
        if (cron.dow_star or cron.dom_star) and not any(
            d <= longest[m] for m in cron.months for d in cron.doms
        ):
            raise ValueError("day_of_month: no month in the month field has any of these days")
        return cron

    def day_matches(self, d: dt.date) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.doms
        dow = (d.isoweekday() % 7) in self.dows
        if self.dom_star or self.dow_star:
            return dom and dow
        return dom or dow

    def _times(self, d: dt.date, reverse: bool) -> Iterator[int]:
        """Existing first-occurrence local wall times on day d as epoch ms, in order."""
        hours = reversed(self.hours) if reverse else self.hours
        for h in hours:
            minutes = reversed(self.minutes) if reverse else self.minutes
            for m in minutes:
                local = dt.datetime(d.year, d.month, d.day, h, m, tzinfo=self.tz)
                utc = local.astimezone(UTC)
                back = utc.astimezone(self.tz)
                if (back.hour, back.minute, back.fold) != (h, m, 0):
                    continue  # in the spring-forward gap
                yield int(utc.timestamp()) * 1000

    def _local_date(self, epoch_ms: int) -> dt.date:
        return dt.datetime.fromtimestamp(epoch_ms // 1000, UTC).astimezone(self.tz).date()

    def next_after(self, epoch_ms: int) -> int:
        """The first fire time strictly after epoch_ms."""
        day = self._local_date(epoch_ms) - dt.timedelta(days=1)
        for _ in range(SEARCH_DAYS):
            if self.day_matches(day):
                for t in self._times(day, reverse=False):
                    if t > epoch_ms:
                        return t
            day += dt.timedelta(days=1)
        raise ValueError("expression: no fire time within 9 years")

    def last_at_or_before(self, epoch_ms: int) -> int | None:
        """The latest fire time at or before epoch_ms (None if none within the search span)."""
        day = self._local_date(epoch_ms) + dt.timedelta(days=1)
        for _ in range(SEARCH_DAYS):
            if self.day_matches(day):
                for t in self._times(day, reverse=True):
                    if t <= epoch_ms:
                        return t
            day -= dt.timedelta(days=1)
        return None


@dataclass(frozen=True)
class Interval:
    """Every period_ms from anchor_ms (slots are anchor + k * period, k >= 0)."""

    period_ms: int
    anchor_ms: int

    def next_after(self, epoch_ms: int) -> int:
        if epoch_ms < self.anchor_ms:
            return self.anchor_ms
        return self.anchor_ms + ((epoch_ms - self.anchor_ms) // self.period_ms + 1) * self.period_ms

    def last_at_or_before(self, epoch_ms: int) -> int | None:
        if epoch_ms < self.anchor_ms:
            return None
        return self.anchor_ms + (epoch_ms - self.anchor_ms) // self.period_ms * self.period_ms


Timetable = Cron | Interval


def upcoming(tt: Timetable, after_ms: int, n: int) -> list[int]:
    """The next n fire times strictly after after_ms."""
    out: list[int] = []
    t = after_ms
    for _ in range(n):
        t = tt.next_after(t)
        out.append(t)
    return out
