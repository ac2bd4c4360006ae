"""The Function declarations (`valkey/functions/`) against the Lua sources and engine.proto.

* every declaration has the KEYS / ARGV counts its contract header in `lua/*.lua` states;
* every registered function is declared, and a declaration is read-only iff its registration
  carries `flags = {'no-writes'}`;
* a read-only declaration goes out as FCALL_RO (and Valkey refuses FCALL_RO for a writer);
* for each declaration with an `<Name>Args` message in engine.proto, the ARGV names and the
  message's fields agree, up to the explicit exceptions below.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import Functions, all_batches, all_declarations
from flowfabric.server.valkey.functions.core import Decl, KeyCtx, build
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import engine_pb2

LUA = Path(__file__).resolve().parents[2] / "lua"
DECLS = {d.name: d for d in all_declarations()}
BATCHES = {b.name: b for b in all_batches()}


@dataclass(frozen=True)
class Count:
    fixed: int
    variadic: bool


@dataclass(frozen=True)
class Header:
    keys: Count
    argv: Count
    optional_keys: bool  # "KEYS (4, or 7+n ...)": extra keys the server never sends


def _count(spec: str | None) -> Count:
    """`(12)`, `(2+n)`, `(9 + 2 x max_tasks)` -> fixed count (+ variadic); `: none` -> 0;
    `: k1, v1, ...` (no count) -> a variadic list."""
    if spec is None or spec.strip().startswith(": none"):
        return Count(0, False)
    m = re.match(r"\s*\((\d+)\s*(\+)?", spec)
    if m:
        return Count(int(m.group(1)), bool(m.group(2)))
    return Count(0, True)


def headers() -> dict[str, Header]:
    out: dict[str, Header] = {}
    for path in sorted(LUA.glob("*.lua")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^-- (ff_\w+)", line)
            if not m:
                continue
            block = []
            for later in lines[i + 1 :]:
                if not later.startswith("--"):
                    break
                block.append(later)
            body = "\n".join(block[:12])
            keys = re.search(r"KEYS(\s*\([^)]*\)|: none)", body)
            argv = re.search(r"ARGV(\s*\([^)]*\)|: none|:[^\n]*)", body)
            if keys is None:
                continue
            out.setdefault(m.group(1), Header(
                _count(keys.group(1)), _count(argv.group(1) if argv else None),
                optional_keys=", or " in keys.group(1),
            ))  # fmt: skip
    return out


def registrations() -> dict[str, bool]:
    """Registered function name -> has `flags = {'no-writes'}`."""
    out: dict[str, bool] = {}
    for path in sorted(LUA.glob("*.lua")):
        src = path.read_text()
        for m in re.finditer(r"register_function\('(\w+)'", src):
            out[m.group(1)] = False
        for m in re.finditer(r"register_function\s*\{(.*?)\n\}", src, re.S):
            name = re.search(r"function_name\s*=\s*'(\w+)'", m.group(1))
            assert name, m.group(0)
            out[name.group(1)] = "'no-writes'" in m.group(1)
    return out


def test_headers_are_parsed() -> None:
    found = headers()
    assert len(found) == len(registrations()), sorted(set(registrations()) - set(found))
    assert found["ff_claim_batch"] == Header(Count(4, False), Count(11, True), False)
    assert found["ff_set_execution_tags"].argv == Count(0, True)
    assert found["ff_replay_execution"] == Header(Count(4, False), Count(2, True), True)
    assert found["ff_list_waitpoint_hmac_kids"].argv == Count(0, False)
    assert found["ff_buffer_signal_for_pending_waitpoint"].argv == Count(18, False)


@pytest.mark.parametrize("name", sorted(DECLS))
def test_declaration_matches_its_lua_header(name: str) -> None:
    header = headers()[name]
    decl = DECLS[name]
    assert len(decl.keys) == header.keys.fixed
    assert not header.keys.variadic  # no function takes a variadic KEYS tail from the server
    fixed = [a for a in decl.argv if not a.variadic]
    assert len(fixed) == header.argv.fixed
    assert decl.variadic == header.argv.variadic
    assert all(not a.variadic for a in decl.argv[:-1]), "only the last ARGV may be a tail"


def test_every_registered_function_is_declared_and_read_only_iff_no_writes() -> None:
    registered = registrations()
    assert set(registered) == set(DECLS) | set(BATCHES)
    assert all(b.single.name in DECLS and not b.single.read_only for b in BATCHES.values())
    assert {n for n, ro in registered.items() if ro} == {n for n, d in DECLS.items() if d.read_only}
    assert {n for n, d in DECLS.items() if d.read_only} >= {
        "ff_read_attempt_stream", "ff_list_waitpoints", "ff_read_resume_signals",
        "ff_list_waitpoint_hmac_kids", "ff_version",
    }  # fmt: skip


def test_routing_placeholders_are_the_noop_key() -> None:
    eid = ExecutionId(3, str(uuid.uuid4()))
    ctx = KeyCtx(eid=eid, tag=eid.tag, lane="default", worker_instance_id="wi", waitpoint_id="w")
    for decl in DECLS.values():
        if not decl.keys:
            continue
        keys, _ = build(decl, ctx, {a.name: _sample(a.enc) for a in decl.argv if not a.variadic})
        for k, spec in zip(keys, decl.keys, strict=True):
            assert (k == f"ff:noop:{eid.tag}") == spec.routing_only or "noop" in spec.name, (
                decl.name, spec.name, k,
            )  # fmt: skip
            assert eid.tag in k  # single-slot


def _sample(enc: str) -> Any:
    return {"int": 1, "opt_int": None, "bytes": b"", "json": {}, "bool": False}.get(enc, "x")


# -- FCALL_RO ------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, store: Store) -> None:
        self.commands: list[str] = []
        original = store.client.execute_command

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.commands.append(str(args[0]))
            return await original(*args, **kwargs)

        store.client.execute_command = wrapper


async def test_read_only_declarations_go_out_as_fcall_ro(store: Store) -> None:
    fn = Functions(store)
    eid = ExecutionId(5, str(uuid.uuid4()))
    rec = Recorder(store)
    with pytest.raises(FlowFabricError) as err:
        await fn.suspension.list_waitpoints(eid)
    assert err.value.code == "execution_not_found"
    read = await fn.stream.read_attempt_stream(eid, 0, "-", "+", 10)
    assert read.entries == () and read.closed_at is None
    kids = await fn.signal.list_waitpoint_hmac_kids(eid.tag)
    assert kids.current_kid == ""
    with pytest.raises(FlowFabricError):
        await fn.suspension.read_resume_signals(eid, 0)
    with pytest.raises(FlowFabricError):
        await fn.admission.block_execution(eid, "waiting_for_capable_worker", "")
    assert rec.commands == ["FCALL_RO"] * 4 + ["FCALL"]


async def test_valkey_refuses_fcall_ro_for_a_writer(store: Store) -> None:
    """FCALL_RO is what reaches Valkey: a function without no-writes is refused under it."""
    eid = ExecutionId(5, str(uuid.uuid4()))
    decl: Decl[Any] = DECLS["ff_block_execution_for_admission"]
    keys, argv = build(decl, KeyCtx(eid=eid, tag=eid.tag), {
        "execution_id": str(eid), "blocking_reason": "x", "blocking_detail": "",
    })  # fmt: skip
    with pytest.raises(FlowFabricError) as err:
        await store.fcall(decl.name, keys, argv, read_only=True)
    assert err.value.code == "backend_error"
    assert "write" in (err.value.message or "").lower()


# -- engine.proto --------------------------------------------------------------------------------

# Declaration -> engine.proto Args message, where the name differs from the function's.
ARGS_MESSAGE = {
    "ff_mark_lease_expired_if_due": "MarkLeaseExpiredArgs",
    "ff_buffer_signal_for_pending_waitpoint": "BufferSignalArgs",
    "ff_block_execution_for_admission": "BlockExecutionArgs",
}
# Documented differences: (ARGV names not in the message, message fields not in ARGV).
# `now` fields are server time (the engine.proto header says so) and never an argument.
EXCEPTIONS: dict[str, tuple[set[str], set[str]]] = {
    # Shares ff_deliver_signal's ARGV; BufferSignalArgs lists only what buffering uses (the
    # delivery tunables and the correlation id take their defaults or are unused here).
    "ff_buffer_signal_for_pending_waitpoint": (
        {
            "correlation_id",
            "created_at",
            "dedup_ttl_ms",
            "max_signals_per_execution",
            "resume_delay_ms",
            "signal_maxlen",
        },
        set(),
    ),
    # The quota policy and the concurrency key name the call's bucket (its key prefix), passed
    # beside the contract's Args so the function can check its KEYS against them.
    "ff_release_admission": ({"quota_policy_id", "concurrency_key"}, set()),
    # The server also passes the grant's capability hash and the renew hint; the expected
    # attempt index only names the attempt keys (the function builds them from the core).
    "ff_claim_execution": ({"capability_hash", "renew_before_ms"}, {"expected_attempt_index"}),
    # The worker's capability tokens are checked on the reclaim grant as on a claim grant.
    "ff_issue_reclaim_grant": ({"worker_capabilities_csv"}, set()),
    # The reclaim limit comes from the stored policy, the old holder and the interrupted
    # attempt from the core; the capability check happened on the reclaim grant.
    "ff_reclaim_execution": (
        set(),
        {"capability_hash", "current_attempt_index", "max_reclaim_count", "old_worker_instance_id"},
    ),
}


def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.removeprefix("ff_").split("_")) + "Args"


def test_declarations_agree_with_engine_proto() -> None:
    matched = []
    for name, decl in sorted(DECLS.items()):
        msg = getattr(engine_pb2, ARGS_MESSAGE.get(name, _camel(name)), None)
        if msg is None:
            continue
        matched.append(name)
        fields = {f.name for f in msg.DESCRIPTOR.fields} - {"now"}
        argv = {a.name for a in decl.argv}
        extra_argv, extra_fields = EXCEPTIONS.get(name, (set(), set()))
        assert argv - fields == extra_argv, (name, "ARGV not in the message")
        assert fields - argv == extra_fields, (name, "message fields not in ARGV")
    assert len(matched) >= 10, matched
    assert set(EXCEPTIONS) <= set(matched)
