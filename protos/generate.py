"""Regenerate the Python stubs in ``generated/`` from the protos in ``protos/``.

Usage (from anywhere)::

    .venv/bin/python protos/generate.py          # rewrite generated/flowfabric/v1
    .venv/bin/python protos/generate.py --check  # exit 1 if generated/ is stale

Writes ``*_pb2.py``, ``*_pb2_grpc.py`` and their mypy-protobuf ``.pyi`` stubs, plus
``__init__.py`` and ``py.typed``, into ``generated/flowfabric/v1`` (``flowfabric.v1``), and
the betterproto2 dataclass messages and grpcio clients of the same protos into
``generated/bp2`` (``flowfabric.bp2.v1``, the optional ``betterproto2`` extra; see
docs/betterproto2.md). Each output directory is replaced wholesale, so stubs of deleted
protos do not linger. Output depends only on the protos and the pinned grpcio-tools /
mypy-protobuf / betterproto2_compiler versions, so ``--check`` is a reliable CI drift
check.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "generated"
PACKAGE = Path("flowfabric") / "v1"

INIT_PY = '"""Generated; do not edit."""\n'
# betterproto2 output: the package flowfabric.bp2 (generated/bp2), messages in flowfabric.bp2.v1.
BP2_DIR = Path("bp2")
BP2_INIT_PY = (
    '"""betterproto2 dataclass messages of the flowfabric.v1 protos. Generated; do not edit."""\n'
)


def proto_files() -> list[Path]:
    """Return the package's .proto files, relative to ``PROTO_ROOT``, sorted."""
    files = sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    if not files:
        sys.exit(f"no .proto files under {PROTO_ROOT / PACKAGE}")
    return files


def plugin(name: str) -> str:
    """Locate a protoc plugin installed next to the running interpreter."""
    # sys.executable is not resolved on purpose: in a venv it is the venv's bin/.
    path = Path(sys.executable).parent / name
    if not path.exists():
        sys.exit(f"{name} not found next to {sys.executable}; install the dev extra")
    return f"--plugin={name}={path}"


def generate(out_root: Path) -> Path:
    """Generate stubs under ``out_root`` and return the package directory."""
    out_root.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        plugin("protoc-gen-mypy"),
        plugin("protoc-gen-mypy_grpc"),
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out=quiet:{out_root}",
        f"--mypy_grpc_out=quiet:{out_root}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    package_dir = out_root / PACKAGE
    (package_dir / "__init__.py").write_text(INIT_PY)
    (package_dir / "py.typed").write_text("")
    verify(package_dir)
    return package_dir


def generate_bp2(out_root: Path) -> Path:
    """Generate the betterproto2 package under ``out_root`` and return its directory.

    The compiler writes ``message_pool.py`` and ``flowfabric/v1/__init__.py`` at its output
    root; they are moved to ``bp2/`` and ``bp2/v1/`` so they install as ``flowfabric.bp2``
    without shadowing ``flowfabric.v1``, and the one relative import is rewritten to match.
    """
    raw = out_root / "bp2-raw"
    raw.mkdir()
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    # The compiler formats its output with ruff, which it runs from PATH.
    bin_dir = str(Path(sys.executable).parent)
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = bin_dir + os.pathsep + old_path
    try:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                plugin("protoc-gen-python_betterproto2"),
                f"--python_betterproto2_out={raw}",
                *(str(p) for p in proto_files()),
            ]
        )
    finally:
        os.environ["PATH"] = old_path
    if code != 0:
        sys.exit("protoc (betterproto2) failed")
    package_dir = out_root / BP2_DIR
    (package_dir / "v1").mkdir(parents=True)
    (package_dir / "__init__.py").write_text(BP2_INIT_PY)
    (package_dir / "py.typed").write_text("")
    shutil.copyfile(raw / "message_pool.py", package_dir / "message_pool.py")
    body = (raw / PACKAGE / "__init__.py").read_text()
    before = "from ...message_pool import"
    if body.count(before) != 1:
        sys.exit("betterproto2 output changed shape: expected one message_pool import")
    (package_dir / "v1" / "__init__.py").write_text(
        body.replace(before, "from ..message_pool import")
    )
    verify(package_dir)
    verify(package_dir / "v1")
    return package_dir


def verify(package_dir: Path) -> None:
    """Compile every generated module with warnings as errors.

    Proto comments become docstrings, so e.g. a backslash in a comment would
    make the stubs emit SyntaxWarning at import (an error under pytest's
    ``filterwarnings = error``).
    """
    for path in sorted(package_dir.glob("*.py*")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(path.read_text(), str(path.name), "exec")
            except (SyntaxError, SyntaxWarning) as exc:
                sys.exit(f"generated {path.name} does not compile cleanly: {exc}")


def snapshot(directory: Path) -> dict[str, bytes]:
    """Map relative path -> content for the files under ``directory`` (caches skipped)."""
    if not directory.is_dir():
        return {}
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def check(fresh: Path, current: Path) -> int:
    """Compare a fresh generation with the committed one; print a summary."""
    want, have = snapshot(fresh), snapshot(current)
    problems: list[str] = []
    for name in sorted(want.keys() - have.keys()):
        problems.append(f"missing: {name}")
    for name in sorted(have.keys() - want.keys()):
        problems.append(f"stale (no longer generated): {name}")
    for name in sorted(want.keys() & have.keys()):
        if want[name] != have[name]:
            diff = difflib.unified_diff(
                have[name].decode(errors="replace").splitlines(),
                want[name].decode(errors="replace").splitlines(),
                f"{current.relative_to(ROOT)}/{name}",
                f"fresh/{name}",
                lineterm="",
                n=1,
            )
            lines = list(diff)
            problems.append(f"differs: {name} ({len(lines)} diff lines)")
            problems.extend("    " + line for line in lines[:20])
    if problems:
        print(f"{current.relative_to(ROOT)} is out of date with protos/:", file=sys.stderr)
        for line in problems:
            print("  " + line, file=sys.stderr)
        print("run: .venv/bin/python protos/generate.py", file=sys.stderr)
        return 1
    print(f"{current.relative_to(ROOT)} is up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir and fail if generated/ differs",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ff-protos-") as tmp:
        outputs = [
            (generate(Path(tmp) / "pb2"), OUT_ROOT / PACKAGE),
            (generate_bp2(Path(tmp)), OUT_ROOT / BP2_DIR),
        ]
        if args.check:
            return max(check(fresh, target) for fresh, target in outputs)
        for fresh, target in outputs:
            # Replace the whole package directory so removed protos leave nothing behind.
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(fresh, target)
            print(f"wrote {len(snapshot(target))} files to {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
