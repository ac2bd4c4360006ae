"""The Lua includes: each domain and include names exactly the includes it uses, includes use only
the includes before them, each include is one top-level table, and the assembled library loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowfabric.server.valkey import library
from flowfabric.server.valkey.store import Store

LUA = library.lua_dir()
INCLUDE_DIR = LUA / library.INCLUDE_DIR

# Comments and string literals, skipped when looking for uses of a table.
_NOISE = re.compile(r"--\[\[.*?\]\]|--[^\n]*|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"", re.S)
_TABLE = re.compile(r"^local ([A-Z][A-Za-z]*) = \{\}$", re.M)


def _code(text: str) -> str:
    return _NOISE.sub(" ", text)


def _tables() -> dict[str, str]:
    """Include name -> the table it exports."""
    out = {}
    for name in library.INCLUDES:
        found = _TABLE.findall((INCLUDE_DIR / f"{name}.lua").read_text())
        assert len(found) == 1, f"include/{name}.lua must define one `local <Table> = {{}}`"
        out[name] = found[0]
    return out


def _declared(path: Path) -> list[str]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("-- uses:")]
    assert len(lines) == 1, f"{path.name} needs exactly one `-- uses:` header line"
    names = lines[0].removeprefix("-- uses:").strip()
    return [] if names == "(none)" else [n.strip() for n in names.split(",")]


def _used(path: Path, tables: dict[str, str], own: str | None = None) -> set[str]:
    code = _code(path.read_text())
    return {
        name
        for name, table in tables.items()
        if name != own and re.search(rf"(?<![\w.]){table}\.", code)
    }


def _domain_files() -> list[Path]:
    return [LUA / f"{d}.lua" for d in library.DOMAINS if (LUA / f"{d}.lua").is_file()]


def test_every_include_is_one_table_and_nothing_else_at_the_top_level() -> None:
    _tables()
    for name in library.INCLUDES:
        top = re.findall(r"^local\b.*$", (INCLUDE_DIR / f"{name}.lua").read_text(), re.M)
        assert len(top) == 1, f"include/{name}.lua has more than one top-level local: {top}"


@pytest.mark.parametrize("name", library.INCLUDES)
def test_include_declares_what_it_uses_and_only_earlier_includes(name: str) -> None:
    tables = _tables()
    path = INCLUDE_DIR / f"{name}.lua"
    declared = _declared(path)
    assert set(declared) <= set(library.INCLUDES), f"unknown includes in {name}: {declared}"
    assert set(declared) == _used(path, tables, own=name)
    position = library.INCLUDES.index(name)
    later = [d for d in declared if library.INCLUDES.index(d) >= position]
    assert not later, f"include/{name}.lua uses includes loaded after it: {later}"


@pytest.mark.parametrize("path", _domain_files(), ids=lambda p: p.stem)
def test_domain_declares_exactly_the_includes_it_uses(path: Path) -> None:
    declared = _declared(path)
    assert set(declared) <= set(library.INCLUDES), f"unknown includes in {path.name}: {declared}"
    assert len(declared) == len(set(declared)), f"{path.name} names an include twice"
    used = _used(path, _tables())
    assert sorted(used - set(declared)) == [], f"{path.name} uses undeclared includes"
    assert sorted(set(declared) - used) == [], f"{path.name} declares unused includes"


def test_domains_never_define_an_include_table() -> None:
    tables = set(_tables().values())
    for path in _domain_files():
        defined = set(re.findall(r"\blocal\s+(?:function\s+)?(\w+)", _code(path.read_text())))
        assert not defined & tables, f"{path.name} shadows an include table"


def test_assembled_library_puts_includes_in_order_before_the_domains() -> None:
    source = library.default_library().source
    marks = [source.index(f"-- include/{name}.lua\n") for name in library.INCLUDES]
    assert marks == sorted(marks)
    assert marks[-1] < source.index("do -- version.lua\n")
    # One top-level local per include, plus the version constant (the domains are in do-blocks).
    top = re.findall(r"^local\b", source[: source.index("do -- version.lua\n")], re.M)
    assert len(top) == len(library.INCLUDES) + 1


def test_unknown_include_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / library.INCLUDE_DIR).mkdir()
    for name in library.INCLUDES:
        (tmp_path / library.INCLUDE_DIR / f"{name}.lua").write_text(f"-- {name}\n")
    (tmp_path / library.INCLUDE_DIR / "stray.lua").write_text("-- stray\n")
    with pytest.raises(ValueError, match="stray"):
        library.assemble(tmp_path)


async def test_assembled_library_loads(store: Store) -> None:
    # The store fixture loaded the assembled library (FUNCTION LOAD) on every primary.
    await store.ensure_library()
    versions = await store.loaded_versions()
    assert versions and all(v == library.default_library().version for v in versions)
