"""Structured logs from a real `flowfabric serve`: FF_LOG_FORMAT=json lines carry request and
execution ids, operator actions leave an audit line, and no line holds a token, the HMAC
secret or payload bytes (docs/architecture.md#logs)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from flowfabric.server.embedded import ValkeyProcess
from flowfabric.v1 import execution_pb2 as pb
from flowfabric.v1 import execution_pb2_grpc

CLI = [sys.executable, "-c", "from flowfabric.cli import run; run()"]
TOKEN = "tok-7f3a9c1e5b2d"
SECRET = "5e" * 32
PAYLOAD = b"payload-marker-4b1d"


def _serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    with log.open("w") as err:
        proc = subprocess.Popen(
            [*CLI, "serve", "--listen-addr", "127.0.0.1:0"],
            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, log.read_text()
    return proc, line.strip().rsplit(" ", 1)[1]


async def test_json_logs_carry_ids_audit_operator_actions_and_hold_no_secrets(
    valkey_standalone: ValkeyProcess, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    env = {"FF_VALKEY_URL": valkey_standalone.url, "FF_LOG_FORMAT": "json", "FF_LOG_LEVEL": "debug",
           "FF_API_TOKEN": TOKEN, "FF_WAITPOINT_HMAC_SECRET": SECRET}  # fmt: skip
    proc, address = _serve(env, log)
    meta = (("authorization", f"Bearer {TOKEN}"), ("x-request-id", "req-audit-1"))
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = execution_pb2_grpc.ExecutionServiceStub(ch)
            created = await stub.CreateExecution(
                pb.CreateExecutionRequest(execution_kind="logged", lane_id="logs",
                                          input_payload=PAYLOAD), metadata=meta)  # fmt: skip
            eid = created.created.execution_id
            await stub.CancelExecution(
                pb.CancelExecutionRequest(execution_id=eid, reason="audited"), metadata=meta
            )
            with pytest.raises(grpc.aio.AioRpcError):  # a refused operator action
                await stub.CancelExecution(
                    pb.CancelExecutionRequest(execution_id=eid, reason="again"), metadata=meta
                )
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        if proc.stdout:
            proc.stdout.close()
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    audits = [r for r in records if r["logger"] == "audit"]
    ok = [r for r in audits if "method=CancelExecution" in r["msg"] and "outcome=ok" in r["msg"]]
    assert len(ok) == 1, audits
    assert f"execution_id={eid}" in ok[0]["msg"]
    assert ok[0]["request_id"] == "req-audit-1" and ok[0]["execution_id"] == eid
    assert ok[0]["method"] == "/flowfabric.v1.ExecutionService/CancelExecution"
    refused = [r for r in audits if "method=CancelExecution" in r["msg"] and r not in ok]
    assert len(refused) == 1 and "outcome=ok" not in refused[0]["msg"], audits
    for needle in (TOKEN, SECRET, PAYLOAD.decode(), base64.b64encode(PAYLOAD).decode()):
        assert needle not in text, f"{needle!r} is in the server's log"


def test_an_unknown_log_format_exits_1_naming_it(valkey_standalone: ValkeyProcess) -> None:
    env = {**os.environ, "FF_VALKEY_URL": valkey_standalone.url, "FF_LOG_FORMAT": "xml",
           "FF_WAITPOINT_HMAC_SECRET": SECRET}  # fmt: skip
    done = subprocess.run([*CLI, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "FF_LOG_FORMAT must be text|json" in done.stderr
    assert "Traceback" not in done.stderr
