"""The README's Limits table is the bounds table (server/flowfabric/valkey/bounds.py), rendered;
and the Functions library carries the same numbers (docs/architecture.md#limits)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


def _policy_paths(desc: Any, prefix: str = "") -> list[str]:
    """Every field of ExecutionPolicy, as its JSON path; message fields with fields of their own
    are listed through their leaves (`retry_policy` itself is listed too)."""
    paths = []
    for field in desc.fields:
        path = prefix + field.name
        sub = field.message_type
        if sub is not None and sub.fields and not field.is_repeated:
            if prefix == "" and field.name == "retry_policy":
                paths.append(path)
            paths += _policy_paths(sub, path + ".")
        else:
            paths.append(path)
    return paths


def test_readme_policy_table_lists_every_policy_field() -> None:
    from flowfabric.v1 import types_pb2

    text = README.read_text()
    found = re.search(r"<!-- policy:begin -->\n(.*?)<!-- policy:end -->", text, re.S)
    assert found, "README.md lost its <!-- policy:begin/end --> markers"
    rows = [ln for ln in found.group(1).splitlines() if ln.startswith("| `")]
    documented = [row.split("`")[1] for row in rows]
    assert all(row.count(" | ") == 4 for row in rows), (
        "each row: field, type, default, bound, effect"
    )
    assert documented == _policy_paths(types_pb2.ExecutionPolicy.DESCRIPTOR)
