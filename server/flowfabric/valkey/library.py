"""Assembles the `flowfabric` Functions library from the files in `lua/`.

The library is one `#!lua name=flowfabric` chunk: the includes of `lua/include/` first, in the
order of `INCLUDES`, then one file per domain in the order of `DOMAINS`. Each include defines one
top-level local, a table of functions (`local Lease = {}`), and may use only the includes before
it; each domain file names the includes it uses in a `-- uses:` header line and is wrapped in its
own `do ... end` block so its locals go out of scope at the end of the file (Lua 5.1 allows at
most 200 locals in one function, and the library body is one function). `tests/lua/
test_includes.py` checks the `-- uses:` lines against the code. The `bounds` include gets its
values from `valkey/bounds.py` here, so the API edge and the functions share one table. The
version is a content hash of the assembled body, so any change to any function (or bound)
changes `ff_version` and the server reloads the library at boot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flowfabric.server.valkey import bounds

LIBRARY_NAME = "flowfabric"

INCLUDE_DIR = "include"

# Include order: an include may use only the includes listed before it.
INCLUDES = (
    "reply",
    "util",
    "bounds",
    "argv",
    "keys",
    "flowstate",
    "state",
    "eligible",
    "stream",
    "lease",
    "attempt",
    "deps",
    "terminal",
    "cancel",
    "policy",
    "replay",
    "capabilities",
    "create",
    "grant",
    "reclaim",
    "hmac",
    "condition",
    "suspend",
)

# Domain order. A domain sees the includes it names, never another domain's locals.
DOMAINS = (
    "version",
    "execution",
    "lease",
    "scheduling",
    "admission",
    "suspension",
    "signal",
    "stream",
    "budget",
    "quota",
    "waiters",
    "flow",
    "schedule",
    "maintenance",
    "probe",
)


@dataclass(frozen=True)
class Library:
    """The assembled library source and its version string."""

    source: str
    version: str


def lua_dir() -> Path:
    """Where the Lua sources live: inside an installed wheel, or the repository's `lua/`."""
    here = Path(__file__).resolve().parent
    sentinel = Path(INCLUDE_DIR) / f"{INCLUDES[0]}.lua"
    for candidate in (here.parents[1] / "lua", here.parents[2] / "lua"):
        if (candidate / sentinel).is_file():
            return candidate
    raise FileNotFoundError(f"cannot find the flowfabric Lua sources (lua/{sentinel})")


def assemble(directory: Path | None = None) -> Library:
    """Build the library text from `directory` (default: `lua_dir()`)."""
    directory = directory or lua_dir()
    unknown = sorted(p.stem for p in directory.glob("*.lua") if p.stem not in DOMAINS)
    unknown += sorted(
        f"{INCLUDE_DIR}/{p.stem}"
        for p in (directory / INCLUDE_DIR).glob("*.lua")
        if p.stem not in INCLUDES
    )
    if unknown:
        raise ValueError(f"Lua files not in the load order: {unknown}")
    parts = [
        f"-- include/{name}.lua\n{(directory / INCLUDE_DIR / f'{name}.lua').read_text()}"
        + (bounds.lua_lines() if name == "bounds" else "")
        for name in INCLUDES
    ]
    for name in DOMAINS:
        path = directory / f"{name}.lua"
        if path.is_file():
            parts.append(f"do -- {name}.lua\n{path.read_text()}\nend\n")
    body = "\n".join(parts)
    digest = hashlib.sha1(body.encode()).hexdigest()[:16]
    version = f"1-{digest}"
    header = f"#!lua name={LIBRARY_NAME}\nlocal FF_LIBRARY_VERSION = '{version}'\n"
    return Library(source=header + body, version=version)


@cache
def default_library() -> Library:
    """The library assembled from the shipped sources (cached for the process)."""
    return assemble()
