"""The layering rule as a test over the import graph (docs/architecture.md, "Layers").

server/flowfabric/ is the boot (`app`, `config`, `embedded`, `main`) over three layers:
`valkey` <- `engine` <- `api`. A module may import its own layer and the layers below it, never
one above; `config` and `embedded` are leaves the layers may read (they import only `valkey`).
The SDK (sdk/flowfabric) never imports the server, except the CLI's `serve` command, which is the
server's entry point and loads it lazily inside the command.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "server" / "flowfabric"
SDK = ROOT / "sdk" / "flowfabric"

# What each part of the server may import from flowfabric.server.*
ALLOWED: dict[str, set[str]] = {
    "valkey": {"valkey"},
    "engine": {"valkey", "engine", "config"},
    "api": {"valkey", "engine", "api", "config"},
    "config": {"valkey"},
    "embedded": {"valkey"},
    "app": {"valkey", "engine", "api", "config", "embedded", "app"},
    "main": {"app", "config"},
}
# The one sanctioned way into the server from the SDK: `flowfabric serve`.
SDK_SERVER_ENTRY = {("cli.py", "serve"), ("testing.py", "server")}


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module imported, name of the enclosing top-level function or None) for every import."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            name = func
            if func is None and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = child.name
            if isinstance(child, ast.Import):
                out.extend((alias.name, name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.append((child.module, name))
                out.extend((f"{child.module}.{alias.name}", name) for alias in child.names)
            visit(child, name)

    visit(tree, None)
    return out


def _part(path: Path) -> str:
    rel = path.relative_to(SERVER)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _server_modules() -> list[Path]:
    return sorted(p for p in SERVER.rglob("*.py") if p.name != "__init__.py" or p.parent != SERVER)


def test_every_server_module_belongs_to_a_known_part() -> None:
    parts = {_part(p) for p in _server_modules()}
    assert parts <= set(ALLOWED), f"modules outside the known layers: {parts - set(ALLOWED)}"
    assert {"valkey", "engine", "api"} <= parts


@pytest.mark.parametrize("path", _server_modules(), ids=lambda p: str(p.relative_to(SERVER)))
def test_server_imports_point_downwards(path: Path) -> None:
    part = _part(path)
    bad = []
    for module, _func in _imports(path):
        if not module.startswith("flowfabric.server."):
            continue
        target = module.split(".")[2]
        if target not in ALLOWED[part]:
            bad.append(module)
    assert not bad, f"{path.relative_to(ROOT)} ({part}) imports upward: {sorted(set(bad))}"


@pytest.mark.parametrize("path", sorted(SDK.rglob("*.py")), ids=lambda p: p.name)
def test_sdk_never_imports_the_server(path: Path) -> None:
    bad = [
        (module, func)
        for module, func in _imports(path)
        if (module == "flowfabric.server" or module.startswith("flowfabric.server."))
        and (path.name, func) not in SDK_SERVER_ENTRY
    ]
    assert not bad, f"{path.relative_to(ROOT)} imports the server: {bad}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rule above can fail: an upward import is found by the same walk."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from flowfabric.server.api import limits\n")
    assert ("flowfabric.server.api", "f") in _imports(bad)
