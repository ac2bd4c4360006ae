"""The CLI's human times (sdk/flowfabric/_humanize.py): pure functions with a fixed `now`."""

from __future__ import annotations

import pytest

from flowfabric._humanize import duration, stamp, when

AT = 1_796_272_867_000  # 2026-12-03 04:41:07 UTC


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0 ms"),
        (250, "250 ms"),
        (3_000, "3 s"),
        (59_999, "59 s"),
        (300_000, "5 min"),
        (125_000, "2 min 5 s"),
        (3_600_000, "1 h"),
        (3_660_000, "1 h 1 min"),
        (5_400_500, "1 h 30 min"),
        (86_400_000 + 4 * 3_600_000 + 59_000, "1 d 4 h"),
        (-3_000, "3 s"),
    ],
)
def test_duration(ms: int, text: str) -> None:
    assert duration(ms) == text


def test_when_past_future_now_and_unset() -> None:
    assert when(AT, now=AT + 3_000) == "2026-12-03 04:41:07 UTC (3 s ago)"
    assert when(AT, now=AT - 300_000) == "2026-12-03 04:41:07 UTC (in 5 min)"
    assert when(AT, now=AT + 400) == "2026-12-03 04:41:07 UTC (now)"
    assert when(0, now=AT) == "-"
    assert when(None, now=AT) == "-"


def test_stamp_keeps_milliseconds() -> None:
    assert stamp(AT + 42) == "2026-12-03 04:41:07.042 UTC"
    assert stamp(0) == "-"
