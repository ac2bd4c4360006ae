"""The W3C trace context an execution carries (docs/observability.md#traces): checked at the
API edge, stored in one core field (`trace_context`), handed back on every claim.

Stored form: `parent <traceparent>` or `link <traceparent>`, then ` <tracestate>` when there
is one. A traceparent never holds a space, so the first two spaces split it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from flowfabric.server.valkey import bounds
from flowfabric.server.valkey.errors import InvalidInput

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
KEYS = frozenset((TRACEPARENT, TRACESTATE))
MAX_TRACESTATE_MEMBERS = 32  # the W3C limit on list members
# version 00: version-traceid-parentid-flags, lower-case hex
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
PARENT, LINK = "parent", "link"
# SubmitFlow: members at these indexes (request order) are handed the submitter's context as
# their parent, every later one as a link, so a wide flow is not one giant trace.
PARENTED_MEMBERS = 8


def encode(carrier: Mapping[str, str], field: str, *, link: bool = False) -> str:
    """The stored form of a request's `trace_context` map ("" for an empty one), or
    `invalid_input` naming the field; nothing is stored for a bad one."""
    if not carrier:
        return ""
    unknown = sorted(set(carrier) - KEYS)
    if unknown:
        raise InvalidInput(
            field, f"{field} takes only traceparent and tracestate, got: {unknown[0]!r}"
        )
    parent = carrier.get(TRACEPARENT, "")
    m = _TRACEPARENT.fullmatch(parent)
    if m is None or set(m.group(1)) == {"0"} or set(m.group(2)) == {"0"}:
        raise InvalidInput(
            f"{field}.traceparent",
            f"{field}.traceparent must be a W3C version-00 traceparent "
            "(00-<32 hex>-<16 hex>-<2 hex>, ids not all zero)",
        )
    state = carrier.get(TRACESTATE, "").strip(" \t")
    if state:
        bounds.check_size(bounds.TRACE_STATE_BYTES, state, f"{field}.tracestate")
        members = [s for s in state.split(",") if s.strip(" \t")]
        if (
            not _PRINTABLE.fullmatch(state)
            or len(members) > MAX_TRACESTATE_MEMBERS
            or any("=" not in s for s in members)
        ):
            raise InvalidInput(
                f"{field}.tracestate",
                f"{field}.tracestate must be printable ASCII, at most "
                f"{MAX_TRACESTATE_MEMBERS} comma-separated key=value members",
            )
    stored = f"{LINK if link else PARENT} {parent}"
    return f"{stored} {state}" if state else stored


def decode(stored: str) -> tuple[dict[str, str], bool]:
    """(the carrier, link?) of a stored value; ({}, False) for none or an unreadable one."""
    mode, _, rest = stored.partition(" ")
    if mode not in (PARENT, LINK) or not rest:
        return {}, False
    parent, _, state = rest.partition(" ")
    carrier = {TRACEPARENT: parent}
    if state:
        carrier[TRACESTATE] = state
    return carrier, mode == LINK
