"""ff_append_frame and ff_read_attempt_stream called directly (docs/streams.md#appending,
docs/streams.md#reading)."""

from __future__ import annotations

import asyncio
import json

from flowfabric.server.valkey.functions import stream
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import (
    Lease,
    cancel,
    claim,
    complete,
    create,
    create_and_claim,
    ctx_of,
    expire,
    fail,
    fcall,
    fence_values,
    hash_of,
    mark_expired,
    new_eid,
    promote,
    revoke,
)


async def append(
    store: Store,
    lease: Lease,
    frame_type: str = "log",
    payload: bytes = b"hello",
    *,
    fence: list[str] | None = None,
    idx: int | None = None,
    ts: str = "",
    encoding: str = "",
    metadata_json: str = "",
    correlation_id: str = "",
    source: str = "",
    maxlen: str = "",
    cap: str = "",
) -> list:
    index = lease.attempt_index if idx is None else idx
    values = {
        "execution_id": str(lease.eid), "attempt_index": index,
        **fence_values(fence if fence is not None else lease.fence), "frame_type": frame_type,
        "timestamp": ts, "payload": payload, "encoding": encoding, "metadata_json": metadata_json,
        "correlation_id": correlation_id, "source": source, "retention_maxlen": maxlen,
        "max_payload_bytes": cap,
    }  # fmt: skip
    return await fcall(store, stream.APPEND, ctx_of(lease.eid, attempt_index=index), values)


async def read(
    store: Store, eid: ExecutionId, idx: int = 0, frm: str = "-", to: str = "+", n: object = 100
) -> list:
    values = {"from_id": frm, "to_id": to, "count_limit": n}
    return await fcall(store, stream.READ, ctx_of(eid, attempt_index=idx), values)


def fields_of(entry: list) -> dict[bytes, bytes]:
    flat = entry[1]
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


async def test_append_two_frames(store: Store) -> None:
    lease = await create_and_claim(store)
    r1 = await append(store, lease, "log", b"one")
    r2 = await append(store, lease, "output", b"two")
    assert r1[:2] == [1, b"OK"] and r2[:2] == [1, b"OK"]
    assert (r1[3], r2[3]) == (b"1", b"2")
    ms1, seq1 = map(int, r1[2].split(b"-"))
    ms2, seq2 = map(int, r2[2].split(b"-"))
    assert (ms2, seq2) > (ms1, seq1)
    meta = await hash_of(store, ExecKeys(lease.eid).stream_meta(0))
    assert meta["frame_count"] == "2"
    assert meta["last_sequence"] == r2[2].decode()
    assert meta["closed_at"] == "" and meta["closed_reason"] == ""
    assert meta["total_bytes"] == "6"
    assert meta["stream_id"] == f"{lease.eid}:0"
    assert meta["attempt_id"] == lease.attempt_id
    assert meta["durability_mode"] == "durable_full"


async def test_frame_fields_and_defaults(store: Store) -> None:
    lease = await create_and_claim(store)
    await append(store, lease, "token", b"a")
    await append(store, lease, "token", b"b", ts="123", encoding="bin", source="tool",
                 correlation_id="c-1", metadata_json='{"k":1}')  # fmt: skip
    reply = await read(store, lease.eid)
    assert reply[:2] == [1, b"OK"]
    first, second = (fields_of(e) for e in reply[2])
    assert list(first) == [b"frame_type", b"ts", b"payload", b"encoding", b"source"]
    assert (first[b"encoding"], first[b"source"]) == (b"utf8", b"worker")
    assert int(first[b"ts"]) > 1_600_000_000_000
    assert second == {
        b"frame_type": b"token", b"ts": b"123", b"payload": b"b", b"encoding": b"bin",
        b"source": b"tool", b"correlation_id": b"c-1", b"metadata_json": b'{"k":1}',
    }  # fmt: skip


async def test_binary_payload_round_trips(store: Store) -> None:
    lease = await create_and_claim(store)
    payload = bytes(range(256)) * 4
    assert (await append(store, lease, "bin", payload))[1] == b"OK"
    reply = await read(store, lease.eid)
    assert fields_of(reply[2][0])[b"payload"] == payload


async def test_append_after_complete_is_stream_closed(store: Store) -> None:
    lease = await create_and_claim(store)
    await append(store, lease)
    assert (await complete(store, lease.eid, lease.fence))[1] == b"OK"
    assert (await append(store, lease))[:2] == [0, b"stream_closed"]
    k = ExecKeys(lease.eid)
    assert await store.call("XLEN", k.stream(0)) == 1
    assert (await hash_of(store, k.stream_meta(0)))["closed_reason"] == "attempt_success"


async def test_oversize_payload_writes_nothing(store: Store) -> None:
    lease = await create_and_claim(store)
    assert (await append(store, lease, payload=b"x" * 65537))[:2] == [
        0,
        b"retention_limit_exceeded",
    ]
    k = ExecKeys(lease.eid)
    assert await store.call("EXISTS", k.stream_meta(0)) == 0
    assert await store.call("EXISTS", k.stream(0)) == 0
    assert (await append(store, lease, payload=b"x" * 65536))[1] == b"OK"
    # callers may lower the cap, never raise it
    assert (await append(store, lease, payload=b"xyz", cap="2"))[1] == b"retention_limit_exceeded"
    assert (await append(store, lease, cap="65537"))[1] == b"invalid_input"


async def test_stale_owners_cannot_append(store: Store) -> None:
    lease = await create_and_claim(store)
    lid, epoch, aid = lease.fence
    stale = [lid, str(int(epoch) + 1), aid]
    assert (await append(store, lease, fence=stale))[1] == b"stale_owner_cannot_append"
    assert (await append(store, lease, fence=["other", epoch, aid]))[
        1
    ] == b"stale_owner_cannot_append"
    k = ExecKeys(lease.eid)
    wrong_idx = await append(store, lease, idx=1)
    assert wrong_idx == [0, b"stale_owner_cannot_append", b"attempt_index"]
    # elapsed lease deadline (not yet marked): refused, never marked by append
    short = await create_and_claim(store, ttl=50)
    await asyncio.sleep(0.1)
    assert (await append(store, short))[1] == b"stale_owner_cannot_append"
    c = await hash_of(store, ExecKeys(short.eid).core)
    assert c["ownership_state"] == "leased"
    # revoked
    assert (await revoke(store, lease.eid))[1] == b"OK"
    assert (await append(store, lease))[1] == b"stale_owner_cannot_append"
    assert await store.call("EXISTS", k.stream_meta(0)) == 0


async def test_missing_core_is_stream_closed(store: Store) -> None:
    eid = new_eid()
    lease = Lease(eid, "l", "1", 0, "a", 0, "initial")
    assert (await append(store, lease))[:2] == [0, b"stream_closed"]


async def test_frame_type_required(store: Store) -> None:
    lease = await create_and_claim(store)
    assert (await append(store, lease, frame_type=""))[1] == b"invalid_frame_type"


async def test_exact_retention(store: Store) -> None:
    lease = await create_and_claim(store)
    for i in range(200):
        assert (await append(store, lease, payload=str(i).encode(), maxlen="50"))[1] == b"OK"
    k = ExecKeys(lease.eid)
    assert await store.call("XLEN", k.stream(0)) == 50
    meta = await hash_of(store, k.stream_meta(0))
    assert (meta["frame_count"], meta["retention_maxlen"]) == ("200", "50")


async def test_correlation_id_only_when_set(store: Store) -> None:
    lease = await create_and_claim(store)
    await append(store, lease)
    await append(store, lease, correlation_id="x")
    entries = (await read(store, lease.eid))[2]
    assert b"correlation_id" not in fields_of(entries[0])
    assert fields_of(entries[1])[b"correlation_id"] == b"x"


async def test_read_pagination_and_markers(store: Store) -> None:
    lease = await create_and_claim(store)
    empty = await read(store, lease.eid)
    assert empty == [1, b"OK", [], b"", b""]
    ids = [(await append(store, lease, payload=str(i).encode()))[2] for i in range(50)]
    page = await read(store, lease.eid, n=20)
    assert [e[0] for e in page[2]] == ids[:20]
    ms, seq = page[2][-1][0].decode().split("-")
    rest = await read(store, lease.eid, frm=f"{ms}-{int(seq) + 1}")
    assert [e[0] for e in rest[2]] == ids[20:]
    assert (await complete(store, lease.eid, lease.fence))[1] == b"OK"
    done = await read(store, lease.eid)
    assert done[3] != b"" and done[4] == b"attempt_success"


async def test_read_count_limit_bounds(store: Store) -> None:
    eid = new_eid()
    for n in (0, "x", -1):
        assert (await read(store, eid, n=n))[:3] == [
            0,
            b"invalid_input",
            b"count_limit must be >= 1",
        ]
    assert (await read(store, eid, n=10_001))[:3] == [
        0,
        b"invalid_input",
        b"count_limit_exceeds_hard_cap",
    ]
    assert (await read(store, eid, n=10_000))[:2] == [1, b"OK"]


async def test_close_reasons(store: Store) -> None:
    """Every attempt-ending path closes an existing meta with its documented close reason."""
    cases = []
    a = await create_and_claim(store)
    await append(store, a)
    await fail(store, a.eid, a.fence)
    cases.append((a.eid, "attempt_failure"))
    b = await create_and_claim(store)
    await append(store, b)
    await cancel(store, b.eid, fence=b.fence, source="lease_holder")
    cases.append((b.eid, "attempt_cancelled"))
    c = await create_and_claim(store, attempt_timeout_ms="30")
    await append(store, c)
    await asyncio.sleep(0.05)
    assert (await expire(store, c.eid))[2] == b"expired"
    cases.append((c.eid, "expired"))
    d = await create_and_claim(store, ttl=50)
    await append(store, d)
    await asyncio.sleep(0.1)
    await mark_expired(store, d.eid)
    cases.append((d.eid, "lease_expired"))
    for eid, reason in cases:
        meta = await hash_of(store, ExecKeys(eid).stream_meta(0))
        assert meta["closed_reason"] == reason, (eid, meta)
        assert meta["closed_at"] != ""


async def test_close_without_meta_creates_nothing(store: Store) -> None:
    """W7: a silent attempt's close paths write no meta (the live tail checks the attempt)."""
    lease = await create_and_claim(store)
    assert (await complete(store, lease.eid, lease.fence))[1] == b"OK"
    assert await store.call("EXISTS", ExecKeys(lease.eid).stream_meta(0)) == 0


async def test_new_attempt_new_stream(store: Store) -> None:
    policy = json.dumps(
        {"retry_policy": {"max_retries": 2, "backoff": {"type": "fixed", "delay_ms": 1}}}
    )
    eid = new_eid()
    await create(store, eid, policy_json=policy)
    lease = await claim(store, eid)
    await append(store, lease)
    reply = await fail(store, eid, lease.fence)
    assert reply[2] == b"retry_scheduled"
    assert (await promote(store, eid, int(reply[3])))[2] == b"promoted"
    second = await claim(store, eid)
    assert second.attempt_index == 1
    assert (await append(store, second))[3] == b"1"
    assert (await append(store, lease))[1] == b"stale_owner_cannot_append"
    assert (await read(store, eid, 0))[4] == b"attempt_failure"
    assert (await read(store, eid, 1))[4] == b""
