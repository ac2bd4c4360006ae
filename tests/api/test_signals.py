"""Signals, tokens and the waitpoint HMAC keystore end to end over gRPC (docs/suspension.md;
docs/suspension.md#signal-delivery, docs/suspension.md#token-validation,
docs/suspension.md#kid-rotation): delivery and its token failures, dedup, listing pages,
rotation fan-out (partial failure, conflicts, single flight), the boot install of
FF_WAITPOINT_HMAC_SECRET (install, repair, mismatch, embedded generation) and its configuration.
Tokens and secrets must never appear in error messages or logs."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from flowfabric.server.app import BootError, FlowFabricServer
from flowfabric.server.config import Config, ConfigError
from flowfabric.server.engine.keystore import SECRET_FILE
from flowfabric.server.engine.scanners import server_time_ms
from flowfabric.server.valkey.codec import hash_to_dict
from flowfabric.server.valkey.ids import parse_execution_id
from flowfabric.server.valkey.keys import ExecKeys, PartitionKeys
from flowfabric.server.valkey.store import Store
from flowfabric.v1 import admin_pb2 as apb
from flowfabric.v1 import execution_pb2 as epb
from flowfabric.v1 import signal_pb2 as spb
from flowfabric.v1 import types_pb2 as t
from flowfabric.v1 import worker_pb2 as wpb
from tests.api.suspend_util import (
    claim,
    deliver,
    flip_last,
    new_id,
    started,
    state,
    suspended,
    waitpoint,
)
from tests.api.util import error_info, expect_error, keyspace_size
from tests.conftest import API_TOKEN, HMAC_SECRET, Api

C = grpc.StatusCode
SECRET_B = "11" * 32
SECRET_C = "22" * 32


def no_leak(exc: grpc.aio.AioRpcError, *secrets: str) -> None:
    """Neither the status message nor any ErrorInfo metadata carries a secret or token."""
    info = error_info(exc)
    texts = [exc.details() or "", *info.metadata.values(), *info.metadata.keys()]
    for secret in secrets:
        digest = secret.split(":", 1)[-1]
        assert all(digest not in text for text in texts), (secret, texts)


async def rejected(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


# -- scenario 23: token failures -----------------------------------------------------------------


async def test_token_failures_are_permission_denied_and_leak_nothing(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    lease, s = await suspended(api, "review")
    eid, token = lease.execution_id, s.waitpoint_token
    flipped = flip_last(token)
    exc = await rejected(deliver(api, eid, s.waitpoint_id, flipped, "review"))
    assert exc.code() == C.PERMISSION_DENIED and error_info(exc).reason == "invalid_token"
    no_leak(exc, token, flipped)
    assert await state(api, eid) == t.PUBLIC_STATE_SUSPENDED
    core = ExecKeys(parse_execution_id(eid, 1 << 16)).core
    assert await api.store.call("HGET", core, "last_hmac_validation_failed_at")

    # an unknown waitpoint, any token: the same answer (no existence oracle)
    zeros = "k1:" + "0" * 40
    await expect_error(
        deliver(api, eid, new_id(), zeros, "review"), C.PERMISSION_DENIED, "invalid_token"
    )
    await expect_error(
        deliver(api, eid, s.waitpoint_id, "", "review"), C.PERMISSION_DENIED, "missing_token"
    )
    await expect_error(
        deliver(api, eid, s.waitpoint_id, "no-colon", "review"),
        C.PERMISSION_DENIED,
        "invalid_token",
    )
    # the right token for another execution's waitpoint is refused (binding check)
    other, _ = await suspended(api, "review")
    exc = await rejected(deliver(api, other.execution_id, s.waitpoint_id, token, "review"))
    assert error_info(exc).reason == "invalid_token"
    no_leak(exc, token)

    ok = await deliver(api, eid, s.waitpoint_id, token, "review")
    assert ok.accepted.effect == "resume_condition_satisfied"
    # a replay of a satisfied waitpoint's token is refused
    # (docs/suspension.md#token-security-properties)
    await expect_error(
        deliver(api, eid, s.waitpoint_id, token, "review"),
        C.FAILED_PRECONDITION,
        "waitpoint_closed",
    )
    for secret in (token, flipped, HMAC_SECRET):
        assert secret.split(":", 1)[-1] not in caplog.text


# -- scenario 24: dedup, effects, terminal targets -------------------------------------------


async def test_dedup_effects_and_terminal_targets(api: Api) -> None:
    lease, s = await suspended(api, "sig_a", "sig_b", mode="all")
    eid, wp, token = lease.execution_id, s.waitpoint_id, s.waitpoint_token
    first = await deliver(api, eid, wp, token, "sig_a", idempotency_key="k")
    assert first.accepted.effect == "appended_to_waitpoint"
    dup = await deliver(api, eid, wp, token, "sig_a", idempotency_key="k", signal_id=new_id())
    assert dup.WhichOneof("outcome") == "duplicate"
    assert dup.duplicate.existing_signal_id == first.accepted.signal_id
    ek = ExecKeys(parse_execution_id(eid, 1 << 16))
    assert await api.store.call("ZCARD", ek.signals) == 1
    unmatched = await deliver(api, eid, wp, token, "other")
    assert unmatched.accepted.effect == "no_op"
    assert await state(api, eid) == t.PUBLIC_STATE_SUSPENDED
    given = new_id()
    done = await deliver(api, eid, wp, token, "sig_b", signal_id=given)
    assert (done.accepted.signal_id, done.accepted.effect) == (given, "resume_condition_satisfied")

    # a terminal execution is not signalable, even with a valid token
    lease2, s2 = await suspended(api, "x")
    await api.execution.CancelExecution(
        epb.CancelExecutionRequest(execution_id=lease2.execution_id), metadata=api.metadata
    )
    await expect_error(
        deliver(api, lease2.execution_id, s2.waitpoint_id, s2.waitpoint_token, "x"),
        C.FAILED_PRECONDITION,
        "target_not_signalable",
    )


async def test_signal_limit_and_resume_delay(api: Api) -> None:
    lease, s = await suspended(api, "a", "b", "c", mode="all")
    eid, wp, token = lease.execution_id, s.waitpoint_id, s.waitpoint_token
    await deliver(api, eid, wp, token, "a", max_signals_per_execution=1)
    await expect_error(
        deliver(api, eid, wp, token, "b", max_signals_per_execution=1),
        C.RESOURCE_EXHAUSTED,
        "signal_limit_exceeded",
    )
    await deliver(api, eid, wp, token, "b")
    last = await deliver(api, eid, wp, token, "c", resume_delay_ms=5000)
    assert last.accepted.effect == "resume_condition_satisfied"
    assert await state(api, eid) == t.PUBLIC_STATE_DELAYED


async def test_bad_signals_are_rejected_and_change_nothing(api: Api) -> None:
    lease, s = await suspended(api, "a")
    eid, wp, token = lease.execution_id, s.waitpoint_id, s.waitpoint_token
    size = await keyspace_size(api.store)
    exc = await rejected(deliver(api, eid, wp, token, "a", payload=b"x" * 65_537))
    assert (exc.code(), error_info(exc).reason) == (C.INVALID_ARGUMENT, "payload_too_large")
    no_leak(exc, token)
    for fields in (
        {"signal_id": "nope"},
        {"target_scope": "galaxy"},
        {"idempotency_key": ""},
        {"signal_category": "c" * 257},
    ):
        exc = await rejected(deliver(api, eid, wp, token, "a", **fields))
        assert (exc.code(), error_info(exc).reason) == (C.INVALID_ARGUMENT, "invalid_input")
        no_leak(exc, token)
    await expect_error(deliver(api, eid, wp, token, ""), C.INVALID_ARGUMENT, "invalid_input")
    await expect_error(deliver(api, eid, "WP", token, "a"), C.INVALID_ARGUMENT, "invalid_input")
    await expect_error(
        deliver(api, eid, wp, token, "a", dedup_ttl_ms=1, created_at=-5),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )
    assert await keyspace_size(api.store) == size
    assert await state(api, eid) == t.PUBLIC_STATE_SUSPENDED
    exactly = await deliver(api, eid, wp, token, "a", payload=b"\x00\xff" * 32_768)
    assert exactly.accepted.effect == "resume_condition_satisfied"


# -- listing -----------------------------------------------------------------------------------


async def test_list_pending_waitpoints_pages_by_id(api: Api) -> None:
    lease = await started(api)
    eid = lease.execution_id
    ids = []
    for _ in range(3):
        reply = await api.worker.CreatePendingWaitpoint(
            wpb.CreatePendingWaitpointRequest(lease=lease, expires_in_ms=60_000),
            metadata=api.metadata,
        )
        ids.append(reply.created.waitpoint_id)

    def page(**fields: object) -> object:
        return api.signal.ListPendingWaitpoints(
            spb.ListPendingWaitpointsRequest(execution_id=eid, **fields),  # type: ignore[arg-type]
            metadata=api.metadata,
        )

    first = await page(page_size=2)
    assert [w.waitpoint_id for w in first.waitpoints] == sorted(ids)[:2]  # type: ignore[attr-defined]
    assert first.next_page_token == sorted(ids)[1]  # type: ignore[attr-defined]
    second = await page(page_size=2, page_token=first.next_page_token)  # type: ignore[attr-defined]
    assert [w.waitpoint_id for w in second.waitpoints] == sorted(ids)[2:]  # type: ignore[attr-defined]
    assert second.next_page_token == ""  # type: ignore[attr-defined]
    everything = await page()
    assert {w.state for w in everything.waitpoints} == {"pending"}  # type: ignore[attr-defined]
    await expect_error(page(page_size=1001), C.INVALID_ARGUMENT, "invalid_input")  # type: ignore[arg-type]
    await expect_error(page(page_token="x"), C.INVALID_ARGUMENT, "invalid_input")  # type: ignore[arg-type]
    unknown = f"{{fp:0}}:{new_id()}"
    await expect_error(
        api.signal.ListPendingWaitpoints(
            spb.ListPendingWaitpointsRequest(execution_id=unknown), metadata=api.metadata
        ),
        C.NOT_FOUND,
        "execution_not_found",
    )


# -- scenario 27: rotation ---------------------------------------------------------------------


def rotate(api: Api, kid: str, secret: str, grace_ms: int | None = 600_000) -> object:
    request = apb.RotateWaitpointSecretRequest(new_kid=kid, new_secret_hex=secret)
    if grace_ms is not None:
        request.grace_ms = grace_ms
    return api.admin.RotateWaitpointSecret(request, metadata=api.metadata)


async def kids(api: Api, partition: int = 0) -> t.WaitpointHmacKids:
    reply = await api.admin.ListWaitpointKids(
        apb.ListWaitpointKidsRequest(partition=partition), metadata=api.metadata
    )
    return reply.kids


async def test_rotation_keeps_old_tokens_valid_through_the_grace(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    parts = api.server.config.flow_partitions
    lease, old = await suspended(api, "go")
    eid = lease.execution_id
    part = parse_execution_id(eid, 1 << 16).partition
    assert old.waitpoint_token.startswith("k1:")
    reply = await rotate(api, "k2", SECRET_B)
    assert (reply.rotated, list(reply.failed), reply.new_kid) == (parts, [], "k2")  # type: ignore[attr-defined]
    listed = await kids(api, part)
    assert listed.current_kid == "k2"
    assert [v.kid for v in listed.verifying] == ["k1"]

    _, new = await suspended(api, "go")
    assert new.waitpoint_token.startswith("k2:")
    resumed = await deliver(api, eid, old.waitpoint_id, old.waitpoint_token, "go")
    assert resumed.accepted.effect == "resume_condition_satisfied"

    again = await rotate(api, "k2", SECRET_B)  # the same rotation again: a no-op success
    assert (again.rotated, list(again.failed)) == (parts, [])  # type: ignore[attr-defined]
    exc = await rejected(rotate(api, "k2", SECRET_C))
    assert (exc.code(), error_info(exc).reason) == (C.ALREADY_EXISTS, "rotation_conflict")
    no_leak(exc, SECRET_C)

    # past k1's grace its tokens are expired; after a later rotation collects it, unknown
    holder = (await claim(api, "w-3")).lease
    created = await api.worker.CreatePendingWaitpoint(
        wpb.CreatePendingWaitpointRequest(lease=holder, expires_in_ms=60_000),
        metadata=api.metadata,
    )
    wp = created.created.waitpoint_id
    assert created.created.waitpoint_token.startswith("k2:")
    k1_token = await k1_token_for(api, holder.execution_id, wp)
    keystore_key = PartitionKeys.of(part).hmac_keystore
    await api.store.call("HSET", keystore_key, "expires_at:k1", "1")
    await expect_error(
        deliver(api, holder.execution_id, wp, k1_token, "go"), C.PERMISSION_DENIED, "token_expired"
    )
    await rotate(api, "k3", SECRET_C)
    assert await api.store.call("HGET", keystore_key, "secret:k1") is None
    await expect_error(
        deliver(api, holder.execution_id, wp, k1_token, "go"), C.PERMISSION_DENIED, "invalid_token"
    )
    assert "waitpoint_hmac_rotation_complete" in caplog.text
    for secret in (SECRET_B, SECRET_C, HMAC_SECRET, k1_token[3:]):
        assert secret not in caplog.text


async def k1_token_for(api: Api, eid: str, waitpoint_id: str) -> str:
    """The token k1 (the configured secret) would mint for this waitpoint
    (docs/suspension.md#waitpoint-tokens)."""
    wp = await waitpoint(api, eid, waitpoint_id)
    msg = f"{waitpoint_id}|{wp['waitpoint_key']}|{wp['created_at']}".encode()
    digest = hmac.new(bytes.fromhex(HMAC_SECRET), msg, hashlib.sha1).hexdigest()
    return f"k1:{digest}"


async def test_rotation_validation(api: Api) -> None:
    size = await keyspace_size(api.store)
    for kid, secret, grace, reason in (
        ("k:2", SECRET_B, 1000, "invalid_kid"),
        ("", SECRET_B, 1000, "invalid_kid"),
        ("k2", "", 1000, "invalid_secret_hex"),
        ("k2", "abc", 1000, "invalid_secret_hex"),
        ("k2", "zz11", 1000, "invalid_secret_hex"),
        ("k2", SECRET_B, 1 << 53, "invalid_grace_ms"),
    ):
        exc = await rejected(rotate(api, kid, secret, grace))
        assert (exc.code(), error_info(exc).reason) == (C.INVALID_ARGUMENT, reason)
        if secret:
            no_leak(exc, secret)
    assert await keyspace_size(api.store) == size
    await expect_error(
        api.admin.ListWaitpointKids(
            apb.ListWaitpointKidsRequest(partition=api.server.config.flow_partitions),
            metadata=api.metadata,
        ),
        C.INVALID_ARGUMENT,
        "invalid_input",
    )


async def test_rotation_partial_failure_then_retry_converges(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    parts = api.server.config.flow_partitions
    broken = [3, 7]
    for p in broken:  # a keystore of the wrong type: that partition's call fails
        await api.store.call("SET", PartitionKeys.of(p).hmac_keystore, "garbage")
    with caplog.at_level(logging.INFO, logger="flowfabric"):
        reply = await rotate(api, "k2", SECRET_B)
    assert (reply.rotated, list(reply.failed)) == (parts - 2, broken)  # type: ignore[attr-defined]
    assert caplog.text.count("waitpoint_hmac_rotation_failed") == 2
    assert SECRET_B not in caplog.text
    for p in broken:
        await api.store.call("DEL", PartitionKeys.of(p).hmac_keystore)
    retried = await rotate(api, "k2", SECRET_B)
    assert (retried.rotated, list(retried.failed)) == (parts, [])  # type: ignore[attr-defined]
    assert (await kids(api, 3)).current_kid == "k2"


async def test_rotation_failing_everywhere_is_unavailable(api: Api) -> None:
    parts = api.server.config.flow_partitions
    for p in range(parts):
        await api.store.call("SET", PartitionKeys.of(p).hmac_keystore, "garbage")
    exc = await rejected(rotate(api, "k2", SECRET_B))
    assert (exc.code(), error_info(exc).reason) == (C.UNAVAILABLE, "backend_unavailable")
    no_leak(exc, SECRET_B)


async def test_concurrent_rotation_fails_fast(api: Api) -> None:
    admin = api.server.admin
    assert admin is not None
    async with admin._rotation:  # a rotation in flight
        exc = await rejected(rotate(api, "k2", SECRET_B))
    assert (exc.code(), error_info(exc).reason) == (C.RESOURCE_EXHAUSTED, "concurrency_limit")
    assert error_info(exc).metadata["pool"] == "admin_rotate"
    assert (await kids(api)).current_kid != "k2"
    reply = await rotate(api, "k2", SECRET_B)  # once it ends, a rotation runs
    assert reply.new_kid == "k2"  # type: ignore[attr-defined]


async def test_rotation_default_grace_comes_from_config(api: Api) -> None:
    lease, _ = await suspended(api, "x")  # k1 is installed on this partition
    part = parse_execution_id(lease.execution_id, 1 << 16).partition
    before = await server_time_ms(api.store)
    await rotate(api, "kid-boot", SECRET_B, grace_ms=None)
    after = await server_time_ms(api.store)
    listed = await kids(api, part)
    assert listed.current_kid == "kid-boot"
    assert [v.kid for v in listed.verifying] == ["k1"]
    grace = api.server.config.waitpoint_hmac_grace_ms
    assert before + grace <= listed.verifying[0].expires_at_ms <= after + grace


# -- boot: install, repair, mismatch -------------------------------------------------------------


@pytest.fixture
async def boot(valkey_url: str, store: Store) -> AsyncIterator[list[FlowFabricServer]]:
    """Start servers of its own (4 partitions) on the fixture Valkey; stops them after."""
    await store.call("DEL", "ff:config:partitions")
    servers: list[FlowFabricServer] = []
    yield servers
    for server in servers:
        await server.stop()
    await store.call("DEL", "ff:config:partitions")


def boot_config(url: str, secret: str | None = HMAC_SECRET) -> Config:
    return Config(
        valkey_url=url,
        listen_addr="127.0.0.1:0",
        flow_partitions=4,
        waitpoint_hmac_secret=secret,
        shutdown_grace_s=1,
        boot_retry_s=2,
    )


async def keystore(store: Store, partition: int) -> dict[str, str]:
    return hash_to_dict(await store.call("HGETALL", PartitionKeys.of(partition).hmac_keystore))


async def test_boot_installs_repairs_and_keeps_rotated_secrets(
    valkey_url: str, store: Store, boot: list[FlowFabricServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first = FlowFabricServer(boot_config(valkey_url), run_scanners=False)
    boot.append(first)
    await first.start()
    for p in range(4):
        assert await keystore(store, p) == {"current_kid": "k1", "secret:k1": HMAC_SECRET}
    await first.stop()

    await store.call("HDEL", PartitionKeys.of(1).hmac_keystore, "secret:k1")  # torn
    await store.call("HSET", PartitionKeys.of(2).hmac_keystore, "secret:k1", SECRET_B)  # rotated
    caplog.clear()
    second = FlowFabricServer(boot_config(valkey_url), run_scanners=False)
    boot.append(second)
    await second.start()
    assert (await keystore(store, 1))["secret:k1"] == HMAC_SECRET
    assert (await keystore(store, 2))["secret:k1"] == SECRET_B  # the operator's is kept
    assert "repaired from FF_WAITPOINT_HMAC_SECRET" in caplog.text
    assert "kept the stored one" in caplog.text
    for secret in (HMAC_SECRET, SECRET_B):
        assert secret not in caplog.text


async def test_boot_aborts_on_a_valkey_error(
    valkey_url: str, store: Store, boot: list[FlowFabricServer]
) -> None:
    await store.call("SET", PartitionKeys.of(2).hmac_keystore, "wrong type")
    server = FlowFabricServer(boot_config(valkey_url), run_scanners=False)
    boot.append(server)
    with pytest.raises(BootError, match="waitpoint HMAC secret") as caught:
        await server.start()
    assert HMAC_SECRET not in str(caught.value)


async def test_boot_refuses_an_external_valkey_without_a_secret(
    valkey_url: str, store: Store, boot: list[FlowFabricServer]
) -> None:
    size = await keyspace_size(store)
    server = FlowFabricServer(boot_config(valkey_url, secret=None))
    boot.append(server)
    with pytest.raises(BootError, match="FF_WAITPOINT_HMAC_SECRET"):
        await server.start()
    assert await keyspace_size(store) == size


async def test_embedded_server_generates_and_keeps_its_secret(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "data", listen_addr="127.0.0.1:0", shutdown_grace_s=1)
    server = FlowFabricServer(config, run_scanners=False)
    await server.start()
    try:
        path = tmp_path / "data" / SECRET_FILE
        secret = path.read_text().strip()
        assert len(secret) == 64 and int(secret, 16) >= 0
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert server.store is not None
        assert (await keystore(server.store, 0))["secret:k1"] == secret
    finally:
        await server.stop()
    again = FlowFabricServer(config, run_scanners=False)
    await again.start()
    try:
        assert path.read_text().strip() == secret
        assert again.store is not None
        assert (await keystore(again.store, 3))["secret:k1"] == secret
    finally:
        await again.stop()


# -- configuration -----------------------------------------------------------------------------


def test_secret_configuration_is_validated_and_never_shown() -> None:
    external = {"FF_VALKEY_URL": "valkey://127.0.0.1:1"}
    for env, needle in (
        ({**external}, "FF_WAITPOINT_HMAC_SECRET is required"),
        ({**external, "FF_WAITPOINT_HMAC_SECRET": "abc"}, "FF_WAITPOINT_HMAC_SECRET"),
        ({**external, "FF_WAITPOINT_HMAC_SECRET": "zz"}, "FF_WAITPOINT_HMAC_SECRET"),
        ({"FF_WAITPOINT_HMAC_SECRET": ""}, "FF_WAITPOINT_HMAC_SECRET"),
        ({"FF_WAITPOINT_HMAC_GRACE_MS": str(1 << 53)}, "FF_WAITPOINT_HMAC_GRACE_MS"),
        ({"FF_WAITPOINT_HMAC_GRACE_MS": "-1"}, "FF_WAITPOINT_HMAC_GRACE_MS"),
    ):
        with pytest.raises(ConfigError, match=needle) as caught:
            Config.load([], env=env)
        assert "zz" not in str(caught.value) and "abc" not in str(caught.value)
    good = {**external, "FF_WAITPOINT_HMAC_SECRET": HMAC_SECRET, "FF_API_TOKEN": API_TOKEN}
    cfg = Config.load(["--waitpoint-hmac-grace-ms", "1000"], env=good)
    assert cfg.waitpoint_hmac_secret == HMAC_SECRET and cfg.waitpoint_hmac_grace_ms == 1000
    assert Config.load([], env={}).waitpoint_hmac_grace_ms == 86_400_000
    for shown in (repr(cfg), str(cfg), f"{cfg}"):
        assert HMAC_SECRET not in shown and API_TOKEN not in shown
        assert "waitpoint_hmac_secret=<redacted>" in shown
    assert Config.load([], env={}).hmac_secret_problem() is None  # embedded: generated


async def test_watch_rpcs_validate_before_streaming(api: Api) -> None:
    bad = api.signal.WatchSignals(
        spb.WatchSignalsRequest(execution_id="nope"), metadata=api.metadata
    )
    exc = await rejected(bad.read())
    assert (exc.code(), error_info(exc).reason) == (C.INVALID_ARGUMENT, "invalid_input")
    lease = await started(api)
    bad = api.signal.WatchSignals(
        spb.WatchSignalsRequest(execution_id=lease.execution_id, waitpoint_id="x"),
        metadata=api.metadata,
    )
    exc = await rejected(bad.read())
    assert (exc.code(), error_info(exc).reason) == (C.INVALID_ARGUMENT, "invalid_input")
