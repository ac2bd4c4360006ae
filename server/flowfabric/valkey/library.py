"""Assembles the `flowfabric` Functions library from the files in `lua/`.

The library is one `#!lua name=flowfabric` chunk: the shared helpers first, then one file per
domain. Each domain file is wrapped in its own `do ... end` block so its locals go out of scope
at the end of the file (Lua 5.1 allows at most 200 locals in one function, and the library body
is one function). The version is a content hash of the assembled body, so any change to any
function changes `ff_version` and the server reloads the library at boot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

LIBRARY_NAME = "flowfabric"

# Load order (spec 00 §8.1). Helpers are top-level locals visible to every domain file.
HELPERS = "helpers"
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
    "flow",
    "maintenance",
)


@dataclass(frozen=True)
class Library:
    """The assembled library source and its version string."""

    source: str
    version: str


def lua_dir() -> Path:
    """Where the Lua sources live: inside an installed wheel, or the repository's `lua/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "lua", here.parents[2] / "lua"):
        if (candidate / f"{HELPERS}.lua").is_file():
            return candidate
    raise FileNotFoundError("cannot find the flowfabric Lua sources (lua/helpers.lua)")


def assemble(directory: Path | None = None) -> Library:
    """Build the library text from `directory` (default: `lua_dir()`)."""
    directory = directory or lua_dir()
    known = {HELPERS, *DOMAINS}
    unknown = sorted(p.stem for p in directory.glob("*.lua") if p.stem not in known)
    if unknown:
        raise ValueError(f"Lua files not in the load order: {unknown}")
    parts = [(directory / f"{HELPERS}.lua").read_text()]
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
