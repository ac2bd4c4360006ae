"""Regenerate the Python stubs in ``generated/`` from the protos in ``protos/``.

Usage (from anywhere)::

    .venv/bin/python protos/generate.py          # rewrite generated/flowfabric/v1
    .venv/bin/python protos/generate.py --check  # exit 1 if generated/ is stale

Writes ``*_pb2.py``, ``*_pb2_grpc.py`` and their mypy-protobuf ``.pyi`` stubs, plus
``__init__.py`` and ``py.typed``. The output directory is replaced wholesale, so
stubs of deleted protos do not linger. Output depends only on the protos and the
pinned grpcio-tools / mypy-protobuf versions, so ``--check`` is a reliable CI
drift check.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
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
        sys.exit(f"{name} not found next to {sys.executable}; install mypy-protobuf")
    return f"--plugin={name}={path}"


def generate(out_root: Path) -> Path:
    """Generate stubs under ``out_root`` and return the package directory."""
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
    """Map file name -> content for the files directly in ``directory``."""
    if not directory.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


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
                f"generated/{PACKAGE}/{name}",
                f"fresh/{name}",
                lineterm="",
                n=1,
            )
            lines = list(diff)
            problems.append(f"differs: {name} ({len(lines)} diff lines)")
            problems.extend("    " + line for line in lines[:20])
    if problems:
        print(f"generated/{PACKAGE} is out of date with protos/:", file=sys.stderr)
        for line in problems:
            print("  " + line, file=sys.stderr)
        print("run: .venv/bin/python protos/generate.py", file=sys.stderr)
        return 1
    print(f"generated/{PACKAGE} is up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir and fail if generated/ differs",
    )
    args = parser.parse_args()
    target = OUT_ROOT / PACKAGE
    with tempfile.TemporaryDirectory(prefix="ff-protos-") as tmp:
        fresh = generate(Path(tmp))
        if args.check:
            return check(fresh, target)
        # Replace the whole package directory so removed protos leave nothing behind.
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(fresh, target)
    print(f"wrote {len(snapshot(target))} files to {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
