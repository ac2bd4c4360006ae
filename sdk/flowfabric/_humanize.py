"""Times and durations for people: the CLI's tables print epoch ms with these; `--json` keeps
the raw values. Pure functions; `now` is taken from this machine's clock unless given (the
server's clock is the one that decides, so a distance is approximate)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1_000))


def duration(ms: int) -> str:
    """`250 ms`, `3 s`, `2 min 5 s`, `1 h 30 min`, `3 d 4 h`: at most two units, rounded down."""
    ms = abs(int(ms))
    if ms < 1_000:
        return f"{ms} ms"
    parts: list[str] = []
    for name, size in _UNITS:
        if ms >= size or parts:
            count, ms = divmod(ms, size)
            if count:
                parts.append(f"{count} {name}")
            elif parts:
                break  # no zero second unit: `2 h`, not `2 h 0 min`
        if len(parts) == 2:
            break
    return " ".join(parts)


def stamp(ms: int) -> str:
    """`2026-12-03 04:41:07.123 UTC` (milliseconds kept: for event lines); `-` for 0."""
    if not ms:
        return "-"
    at = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return f"{at:%Y-%m-%d %H:%M:%S}.{ms % 1000:03d} UTC"


def when(ms: int | None, now: int | None = None) -> str:
    """`2026-12-03 02:41:07 UTC (3 s ago)`, `... (in 5 min)` or `... (now)`; `-` for 0 or None
    (unset).

    `ms` and `now` are epoch milliseconds."""
    if not ms:
        return "-"
    now_ms = int(time.time() * 1000) if now is None else now
    stamp = datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = ms - now_ms
    if abs(delta) < 1_000:
        return f"{stamp} (now)"
    if delta > 0:
        return f"{stamp} (in {duration(delta)})"
    return f"{stamp} ({duration(delta)} ago)"
