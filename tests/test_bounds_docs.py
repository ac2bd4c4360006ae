"""The README's Limits table is the bounds table (server/flowfabric/valkey/bounds.py), rendered;
and the Functions library carries the same numbers (docs/architecture.md#limits)."""

from __future__ import annotations

import re
from pathlib import Path

from flowfabric.server.valkey import bounds, library

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_limits_table_is_the_bounds_table() -> None:
    text = README.read_text()
    found = re.search(r"<!-- limits:begin -->\n(.*?)<!-- limits:end -->", text, re.S)
    assert found, "README.md lost its <!-- limits:begin/end --> markers"
    assert found.group(1) == bounds.markdown_table(), (
        "README Limits table is stale: paste bounds.markdown_table() between the markers"
    )


def test_the_library_carries_every_bound() -> None:
    source = library.default_library().source
    for b in bounds.BOUNDS:
        assert f"\nBounds.{b.name} = {b.hi}\n" in source, b.name
