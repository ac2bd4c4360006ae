#!/usr/bin/env python3
"""Sum a pytest run's `--durations=0` lines per test file (setup, call, teardown), slowest first.

    .venv/bin/pytest -q --durations=0 -p no:cacheprovider > /tmp/suite.log 2>&1
    .venv/bin/python scripts/suite_durations.py /tmp/suite.log --top 20

See tests/README.md (keeping the suite fast).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

LINE = re.compile(r"\s*([\d.]+)s (setup|call|teardown)\s+(\S+?)::")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", type=Path, help="the output of a pytest run with --durations=0")
    p.add_argument("--top", type=int, default=20, help="files to print")
    args = p.parse_args()
    per_file: Counter[str] = Counter()
    per_phase: Counter[tuple[str, str]] = Counter()
    for line in args.log.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            seconds, phase, path = float(m[1]), m[2], m[3]
            per_file[path] += seconds
            per_phase[(path, phase)] += seconds
    print(f"total {sum(per_file.values()):.1f} s in {len(per_file)} files")
    for path, seconds in per_file.most_common(args.top):
        setup, call = per_phase[(path, "setup")], per_phase[(path, "call")]
        print(f"{seconds:8.1f} s  (setup {setup:6.1f}, call {call:7.1f})  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
