"""The scanners' node-wide probe (`ff_probe_due`, docs/architecture.md#scanners): one call per
node answers exactly the partitions (and lanes) with work, and a scanner cycle acts on exactly
those, on both topologies."""

from __future__ import annotations

import uuid

import pytest

from flowfabric.server.config import Config
from flowfabric.server.engine import probe as probe_mod
from flowfabric.server.engine.lifecycle import lifecycle_scanners
from flowfabric.server.engine.scanners import Scanner, ScannerSet, probe_index_of
from flowfabric.server.valkey.codec import text
from flowfabric.server.valkey.functions import Functions, NewExecution
from flowfabric.server.valkey.ids import ExecutionId
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store, server_time_ms
from flowfabric.server.valkey.workers import WorkerRegistry

PARTITIONS = 16  # spread over all three primaries of the cluster fixture


class Seen:
    """A scanner action that records (member, third argument)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    async def __call__(self, member: str, now: int, extra: str | None) -> None:
        self.calls.append((member, extra))


def pk(p: int) -> PartitionKeys:
    return PartitionKeys.of(p)


@pytest.mark.parametrize("per_call", [128, 3])
async def test_probe_answers_exactly_the_partitions_with_due_entries(
    store: Store, per_call: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probe_mod, "PROBE_PARTITIONS_PER_CALL", per_call)
    now = await server_time_ms(store)
    due = {1, 5, 9, 14}
    for p in due:
        await store.call("ZADD", pk(p).lease_expiry, now - 1000, f"due-{p}")
    for p in (2, 9, 11):  # not due yet: never answered (9 is answered for its due entry)
        await store.call("ZADD", pk(p).lease_expiry, now + 3_600_000, f"later-{p}")
    seen = Seen()
    scanners = ScannerSet(store, PARTITIONS, ())
    scanner = Scanner("t", 100, lambda p, _: p.lease_expiry, seen)
    keys, unprobed = await scanners._probe(scanner, now)
    assert unprobed == []
    assert sorted(k for k, _ in keys) == sorted(pk(p).lease_expiry for p in due)
    # the cycle acts on the due members only
    assert await scanners.run_cycle(scanner) == len(due)
    assert sorted(m for m, _ in seen.calls) == sorted(f"due-{p}" for p in due)


async def test_probe_of_a_lane_set_reads_the_lane_registries_and_the_configured_lanes(
    store: Store,
) -> None:
    now = await server_time_ms(store)
    # registered lanes with delayed entries due, one not due, one configured-only lane
    entries = {(3, "img"): now - 5, (3, "mail"): now - 5, (8, "mail"): now - 5,
               (12, "img"): now + 3_600_000, (6, "cfg"): now - 5}  # fmt: skip
    for (p, lane), score in entries.items():
        if lane != "cfg":
            await store.call("SADD", pk(p).lanes, lane)
        await store.call("ZADD", pk(p).lane(lane, "delayed"), score, f"{lane}-{p}")
    await store.call("ZADD", pk(10).lane("ghost", "delayed"), now - 5, "ghost-10")  # unregistered
    seen = Seen()
    scanners = ScannerSet(store, PARTITIONS, ("cfg",))
    scanner = Scanner("t", 100, lambda p, ln: p.lane(ln or "", "delayed"), seen, per_lane=True)
    assert probe_index_of(scanner) == "delayed"
    keys, unprobed = await scanners._probe(scanner, now)
    assert unprobed == []
    want = {(pk(p).lane(ln, "delayed"), ln) for (p, ln), s in entries.items() if s < now}
    assert set(keys) == want
    assert await scanners.run_cycle(scanner) == 4
    assert sorted(seen.calls) == [("cfg-6", "cfg"), ("img-3", "img"), ("mail-3", "mail"),
                                  ("mail-8", "mail")]  # fmt: skip


async def test_whole_index_and_paged_scanners_probe_for_any_member(store: Store) -> None:
    now = await server_time_ms(store)
    await store.call("SADD", pk(4).lanes, "q")
    await store.call("ZADD", pk(4).lane("q", "blocked:route"), now + 3_600_000, "later")
    seen = Seen()
    scanners = ScannerSet(store, PARTITIONS, ())
    whole = Scanner("w", 100, lambda p, ln: p.lane(ln or "", "blocked:route"), seen,
                    per_lane=True, whole_index=True)  # fmt: skip
    assert await scanners.run_cycle(whole) == 1
    assert seen.calls == [("later", "q")]
    # by_partition: the action gets the partition's tag
    await store.call("ZADD", pk(7).pending_waitpoint_expiry, now - 1, "wp-1")
    tagged = Seen()
    by_tag = Scanner("p", 100, lambda p, _: p.pending_waitpoint_expiry, tagged, by_partition=True)
    assert await scanners.run_cycle(by_tag) == 1
    assert tagged.calls == [("wp-1", pk(7).tag)]


async def test_a_scanner_whose_index_is_not_a_lane_set_is_read_directly(store: Store) -> None:
    await store.call("SADD", pk(2).lanes, "x")
    await store.call("ZADD", "ff:idx:{fp:2}:custom:x", 1, "m")
    seen = Seen()
    scanners = ScannerSet(store, PARTITIONS, ())
    odd = Scanner("o", 100, lambda p, ln: f"ff:idx:{p.tag}:custom:{ln}", seen, per_lane=True)
    assert probe_index_of(odd) is None
    assert await scanners.run_cycle(odd) == 1
    assert seen.calls == [("m", "x")]


async def test_the_delayed_promoter_promotes_through_the_probe(store: Store) -> None:
    fn = Functions(store)
    now = await server_time_ms(store)
    eids = [ExecutionId(p, str(uuid.uuid4())) for p in (0, 7, 13)]
    for eid in eids:
        await fn.execution.create_execution(
            NewExecution(eid, "ns", "later", "k", b"in", 0, "t", delay_until=now + 50)
        )
    config = Config(flow_partitions=PARTITIONS)
    scanners = lifecycle_scanners(config, store, fn, WorkerRegistry(store))
    promoter = next(s for s in scanners.scanners if s.name == "delayed_promoter")
    while await server_time_ms(store) <= now + 50:
        pass  # wait on Valkey's clock until the delay has passed
    assert await scanners.run_cycle(promoter) == 3
    for eid in eids:
        state = await store.call("HGET", ExecKeys(eid).core, "eligibility_state")
        assert text(state) == "eligible_now"
    assert await scanners.run_cycle(promoter) == 0  # nothing left: the idle cycle acts on none


@pytest.mark.parametrize("one_group", [False, True])
async def test_partitions_with_work_in_order_and_when_a_node_cannot_answer(
    store: Store, one_group: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim window's probe: eligible heads and due leases of one lane, in the order asked.
    As one group on the cluster, the call reaches keys of other nodes, Valkey refuses it, and
    those partitions are read directly: the same answer."""
    if one_group:
        monkeypatch.setattr(probe_mod, "node_groups", lambda _store, parts: [list(parts)])
    now = await server_time_ms(store)
    for p in (13, 2, 6):
        await store.call("ZADD", pk(p).lane("w", "eligible"), 1, f"e-{p}")
    await store.call("ZADD", pk(3).lane("w", "active"), now - 10, "due")
    await store.call("ZADD", pk(4).lane("w", "active"), now + 3_600_000, "held")
    await store.call("ZADD", pk(5).lane("other", "eligible"), 1, "not-this-lane")
    order = [13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    eligible = probe_mod.lane_index("w", "eligible")
    _found, unprobed = await probe_mod.probe(store, order, eligible, test="any")
    assert unprobed == (order if one_group and store.cluster else [])
    got = await probe_mod.partitions_with_work(store, order, eligible, test="any")
    assert got == [13, 6, 2]
    active = probe_mod.lane_index("w", "active")
    got = await probe_mod.partitions_with_work(store, order, active, test="due", upper=now)
    assert got == [3]
