"""mypy --strict over the server and the SDK, as the installed package `flowfabric` sees them.

The source tree maps three folders into one package (sdk/flowfabric is `flowfabric`,
server/flowfabric is `flowfabric.server`, generated/flowfabric/v1 is `flowfabric.v1`; see
pyproject.toml), which mypy cannot follow from the folders themselves. This script lays the
same mapping out as a tree of symlinks in a temporary directory and checks `-p flowfabric` there,
so every module is checked under the name it is imported by.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ff-mypy-") as tmp:
        pkg = Path(tmp) / "flowfabric"
        pkg.mkdir()
        for entry in sorted((ROOT / "sdk" / "flowfabric").iterdir()):
            if entry.name != "__pycache__":
                (pkg / entry.name).symlink_to(entry)
        (pkg / "server").symlink_to(ROOT / "server" / "flowfabric")
        (pkg / "v1").symlink_to(ROOT / "generated" / "flowfabric" / "v1")
        cmd = [
            sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"),
            "-p", "flowfabric", *sys.argv[1:],
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=tmp, check=False)
        return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
