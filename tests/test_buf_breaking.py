"""`buf breaking` against the last released protos (.ci/released-protos): the API as it stands
passes, and the check does catch a wire break (docs/api-compatibility.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".ci" / "released-protos"


def buf() -> str:
    path = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    assert Path(path).exists(), "buf is a dev dependency"
    return path


def breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [buf(), "breaking", "--against", str(BASELINE)],
        cwd=workspace, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_api_keeps_the_released_wire_and_json_shape() -> None:
    result = breaking(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_renumbered_field_is_caught(tmp_path: Path) -> None:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos" / "flowfabric", tmp_path / "protos" / "flowfabric")
    proto = tmp_path / "protos" / "flowfabric" / "v1" / "signal.proto"
    text = proto.read_text()
    assert "string execution_id = 1;" in text
    proto.write_text(text.replace("string execution_id = 1;", "string execution_id = 99;", 1))
    result = breaking(tmp_path)
    assert result.returncode != 0
    assert 'field "1" with name "execution_id"' in result.stdout, result.stdout
