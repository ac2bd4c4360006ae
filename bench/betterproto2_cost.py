"""Why the SDK does not use betterproto2: measure its per-message cost against upb protobuf.

    .venv/bin/python bench/betterproto2_cost.py

Creates `bench/.venvs/betterproto2` (betterproto2 + its compiler, pinned), generates dataclass
messages from protos/ into a temporary directory, checks that a ClaimNextResponse and a
CompleteExecutionRequest round-trip byte-for-byte between the two encodings, and prints the
parse/serialize cost of each runtime as a ratio measured in the same process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venvs" / "betterproto2"
PLUGIN = VENV / "bin" / "protoc-gen-python_betterproto2"
PINS = [
    "betterproto2==0.10.0",
    "betterproto2_compiler==0.10.1",
    "grpcio-tools==1.85.1",
    "googleapis-common-protos",
    "ruff",
]

MEASURE = textwrap.dedent(
    """
    import sys, time
    gen, out = sys.argv[1], sys.argv[2]
    sys.path[:0] = [out, gen]
    from flowfabric.v1 import types_pb2, worker_pb2
    import bpff.v1 as bp

    lease = types_pb2.LeaseHandle(
        execution_id="{fp:86}:3e3ee561-1c39-4035-8054-068828bf99ca", lane_id="default",
        worker_id="w", worker_instance_id="wi-1", attempt_index=0, attempt_id="a" * 36,
        lease_id="l" * 36, lease_epoch=1, lease_ttl_ms=30000, lease_expires_at=1795870852376)
    task = types_pb2.ClaimedTask(lease=lease, payload=b'{"name":"world"}',
        payload_encoding="json", execution_kind="greet", tags={"app.k": "v"}, namespace="n")
    cases = [
        ("parse ClaimNextResponse", worker_pb2.ClaimNextResponse(task=task), bp.ClaimNextResponse),
        ("parse CompleteExecutionRequest",
         worker_pb2.CompleteExecutionRequest(lease=lease, result_payload=b"x" * 100),
         bp.CompleteExecutionRequest),
    ]
    n = 20000
    for name, msg, bp_cls in cases:
        raw = msg.SerializeToString()
        other = bp_cls.parse(raw)
        assert type(msg).FromString(bytes(other)) == msg, name  # round trip both ways
        t = time.perf_counter()
        for _ in range(n):
            type(msg).FromString(raw)
        upb = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(n):
            bp_cls.parse(raw)
        dc = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(n):
            bytes(other)
        dc_ser = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(n):
            msg.SerializeToString()
        upb_ser = (time.perf_counter() - t) / n
        print(f"{name}: protobuf {upb*1e6:.2f} us, betterproto2 {dc*1e6:.2f} us "
              f"({dc/upb:.0f}x); serialize {upb_ser*1e6:.2f} vs {dc_ser*1e6:.2f} us "
              f"({dc_ser/upb_ser:.0f}x)")
    """
)


def main() -> None:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gen"
        out.mkdir()
        env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        protos = sorted(str(p) for p in (ROOT / "protos/flowfabric/v1").glob("*.proto"))
        subprocess.run(
            [
                str(py),
                "-m",
                "grpc_tools.protoc",
                f"-I{ROOT / 'protos'}",
                f"--plugin=protoc-gen-python_betterproto2={PLUGIN}",
                f"--python_betterproto2_out={out}",
                *protos,
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        pkg = Path(tmp) / "bpff"
        (pkg / "v1").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "message_pool.py").write_text((out / "message_pool.py").read_text())
        body = (out / "flowfabric/v1/__init__.py").read_text()
        (pkg / "v1/__init__.py").write_text(
            body.replace("from ...message_pool", "from ..message_pool")
        )
        script = Path(tmp) / "measure.py"
        script.write_text(MEASURE)
        subprocess.run([str(py), str(script), str(ROOT / "generated"), tmp], check=True)


if __name__ == "__main__":
    main()
