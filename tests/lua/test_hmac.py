"""Waitpoint tokens: HMAC-SHA1 in Lua against the published test vectors and Python's hmac module,
token
validation order, and the keystore functions (docs/suspension.md#waitpoint-tokens,
docs/suspension.md#kid-rotation)."""

from __future__ import annotations

import random
import string
import uuid

import pytest

from flowfabric.server.valkey.keys import PartitionKeys
from flowfabric.server.valkey.store import Store
from tests.lua.util import (
    HMAC_SECRET,
    core_of,
    create_pending,
    flip_last,
    hash_of,
    hmac_token,
    install_secret,
    keystore,
    leased,
    list_kids,
    new_eid,
    now_ms,
    rotate,
    send_signal,
    signal_keys,
    snapshot,
    wp_key,
)

VECTOR_ID = "6f1c2b1e-2f4a-4b8e-9d6a-1a2b3c4d5e6f"
VECTOR_CREATED = 1713100800000


async def pending_vector_waitpoint(store: Store) -> tuple:
    """A leased execution holding a pending waitpoint with the test vectors' id, key and
    created_at."""
    lease = await leased(store)
    reply = await create_pending(store, lease, wpid=VECTOR_ID)
    assert reply[:4] == [1, b"OK", VECTOR_ID.encode(), f"wpk:{VECTOR_ID}".encode()]
    await store.call("HSET", wp_key(lease.eid, VECTOR_ID), "created_at", str(VECTOR_CREATED))
    return lease


async def test_spec_vectors(store: Store) -> None:
    """docs/suspension.md#waitpoint-tokens test vectors: a token with the vector digest is accepted,
    any other is not."""
    assert hmac_token(HMAC_SECRET, VECTOR_ID, f"wpk:{VECTOR_ID}", VECTOR_CREATED) == (
        "k1:dd8386c4ba659b15cc2292d6ab15bf37c3287135"
    )
    lease = await pending_vector_waitpoint(store)
    eid = lease.eid
    wrong = "k1:e5e282813224ced606e9ddcebef427de0cccd4fc"
    assert (await send_signal(store, eid, VECTOR_ID, wrong, buffer=True))[1] == b"invalid_token"
    good = "k1:dd8386c4ba659b15cc2292d6ab15bf37c3287135"
    assert (await send_signal(store, eid, VECTOR_ID, good, buffer=True))[:2] == [1, b"OK"]
    assert (
        await send_signal(store, eid, VECTOR_ID, good.upper().replace("K1", "k1"), buffer=True)
    )[1] == b"invalid_token"
    # created_at + 1 ms
    await store.call("HSET", wp_key(eid, VECTOR_ID), "created_at", str(VECTOR_CREATED + 1))
    assert (await send_signal(store, eid, VECTOR_ID, good, buffer=True))[1] == b"invalid_token"
    plus_one = "k1:e5e282813224ced606e9ddcebef427de0cccd4fc"
    assert (await send_signal(store, eid, VECTOR_ID, plus_one, buffer=True))[:2] == [1, b"OK"]
    # secret = 32 bytes of 0x11, first message
    await store.call("HSET", wp_key(eid, VECTOR_ID), "created_at", str(VECTOR_CREATED))
    await store.call("HSET", keystore(eid), "secret:k1", "11" * 32)
    elevens = "k1:4c5521bf8bfb80ce6914b5e64dcdc1d9b6531d07"
    assert (await send_signal(store, eid, VECTOR_ID, elevens, buffer=True))[:2] == [1, b"OK"]
    assert (await send_signal(store, eid, VECTOR_ID, good, buffer=True))[1] == b"invalid_token"


async def test_mint_and_validate_agree_with_python_hmac(store: Store) -> None:
    """Random secrets (1-100 bytes, mixed-case hex: keys over 64 bytes are hashed first) and
    random waitpoint keys: the minted token equals Python's hmac, which then validates."""
    rng = random.Random(20)
    lease = await leased(store)
    alphabet = string.ascii_letters + string.digits + "|:-_ é✓"
    for _ in range(25):
        secret = bytes(rng.randrange(256) for _ in range(rng.choice([1, 16, 32, 64, 65, 100])))
        hexed = "".join(c.upper() if rng.random() < 0.5 else c for c in secret.hex())
        await store.call("HSET", keystore(lease.eid), "secret:k1", hexed)
        wpid = str(uuid.uuid4())
        wpkey = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        reply = await create_pending(store, lease, wpid=wpid, wpkey=wpkey)
        assert reply[:2] == [1, b"OK"], reply
        created = (await hash_of(store, wp_key(lease.eid, wpid)))["created_at"]
        expected = hmac_token(secret.hex(), wpid, wpkey, created)
        assert reply[4].decode() == expected
        bad = await send_signal(store, lease.eid, wpid, flip_last(expected), buffer=True)
        assert bad[1] == b"invalid_token"
        good = await send_signal(store, lease.eid, wpid, expected, buffer=True)
        assert good[:2] == [1, b"OK"], good


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("", b"missing_token"),
        ("k1", b"invalid_token"),
        (":" + "0" * 40, b"invalid_token"),
        ("k1:", b"invalid_token"),
        ("k1:abc", b"invalid_token"),
        ("k1:" + "0" * 41, b"invalid_token"),
        ("k9:" + "0" * 40, b"invalid_token"),
        ("k1:" + "0" * 40, b"invalid_token"),
    ],
)
async def test_malformed_tokens_are_rejected_and_stamped(
    store: Store, token: str, code: bytes
) -> None:
    lease = await leased(store)
    wpid = str(uuid.uuid4())
    assert (await create_pending(store, lease, wpid=wpid))[:2] == [1, b"OK"]
    before = await snapshot(store, lease.eid)
    reply = await send_signal(store, lease.eid, wpid, token, buffer=True)
    assert reply == [0, code]
    core = await core_of(store, lease.eid)
    assert int(core.pop("last_hmac_validation_failed_at")) >= 0
    after = await snapshot(store, lease.eid)
    after["core"].pop(b"last_hmac_validation_failed_at")
    assert after == before
    assert await store.call("XLEN", f"{wp_key(lease.eid, wpid)}:signals") == 0


async def test_keystore_faults(store: Store) -> None:
    lease = await leased(store)
    wpid = str(uuid.uuid4())
    token = (await create_pending(store, lease, wpid=wpid))[4].decode()
    ks, eid = keystore(lease.eid), lease.eid
    # the keystore slot holds the placeholder
    sig = str(uuid.uuid4())
    keys = signal_keys(eid, wpid, sig)
    keys[2] = PartitionKeys(eid.tag).noop
    reply = await send_signal(store, eid, wpid, token, buffer=True, sig=sig, keys=keys)
    assert reply == [0, b"invalid_keys_missing_hmac"]
    # a bad stored secret
    await store.call("HSET", ks, "secret:k1", "zz")
    assert (await send_signal(store, eid, wpid, token, buffer=True)) == [0, b"invalid_secret"]
    assert (await create_pending(store, lease))[:2] == [0, b"invalid_secret"]
    # an uninitialised keystore
    await store.call("DEL", ks)
    reply = await send_signal(store, eid, wpid, token, buffer=True)
    assert reply == [0, b"hmac_secret_not_initialized"]
    assert "last_hmac_validation_failed_at" not in await core_of(store, eid), "not a token failure"
    before = await snapshot(store, eid)
    other = str(uuid.uuid4())
    assert (await create_pending(store, lease, wpid=other)) == [0, b"hmac_secret_not_initialized"]
    assert await snapshot(store, eid) == before
    assert await store.call("EXISTS", wp_key(eid, other)) == 0


# -- install (boot) -------------------------------------------------------------------------------


async def test_install(store: Store) -> None:
    eid = new_eid()
    ks = keystore(eid)
    assert await install_secret(store, eid) == [1, b"OK", b"installed"]
    assert await hash_of(store, ks) == {"current_kid": "k1", "secret:k1": HMAC_SECRET}
    assert await install_secret(store, eid) == [1, b"OK", b"unchanged"]
    assert await install_secret(store, eid, HMAC_SECRET.upper()) == [1, b"OK", b"unchanged"]
    assert await install_secret(store, eid, "ab" * 32) == [1, b"OK", b"mismatch"]
    assert (await hash_of(store, ks))["secret:k1"] == HMAC_SECRET, "the stored secret is kept"
    await store.call("HDEL", ks, "secret:k1")
    assert await install_secret(store, eid) == [1, b"OK", b"repaired"]
    assert (await hash_of(store, ks))["secret:k1"] == HMAC_SECRET
    for bad in ("", "abc", "zz11"):
        assert await install_secret(store, eid, bad) == [0, b"invalid_secret_hex"]
    assert await install_secret(store, eid, kid="a:b") == [0, b"invalid_kid"]


# -- rotate and list kids (docs/suspension.md#kid-rotation)
# ---------------------------------------------------------


async def test_rotation_scenarios(store: Store) -> None:
    ks = keystore(new_eid())
    assert await list_kids(store, ks) == [1, b"OK", b"", b"0"]
    # 1. bootstrap
    assert await rotate(store, ks, "kid-boot", "aa" * 32) == [
        1,
        b"OK",
        b"rotated",
        b"",
        b"kid-boot",
        b"0",
    ]
    assert await list_kids(store, ks) == [1, b"OK", b"kid-boot", b"0"]
    assert "previous_kid" not in await hash_of(store, ks)
    # 2. a -> b with 60 s grace
    ks2 = keystore(new_eid(8))
    await rotate(store, ks2, "kid-a", "aa" * 32)
    before = await now_ms(store)
    assert await rotate(store, ks2, "kid-b", "bb" * 32, 60_000) == [
        1,
        b"OK",
        b"rotated",
        b"kid-a",
        b"kid-b",
        b"0",
    ]
    listed = await list_kids(store, ks2)
    assert listed[:5] == [1, b"OK", b"kid-b", b"1", b"kid-a"]
    assert before <= int(listed[5]) <= before + 65_000
    h = await hash_of(store, ks2)
    assert h["previous_kid"] == "kid-a" and h["previous_expires_at"] == listed[5].decode()
    assert "expires_at:kid-b" not in h, "the current kid never has an expiry"
    # 3. same kid: same secret -> noop, another -> conflict (nothing written)
    assert await rotate(store, ks2, "kid-b", "bb" * 32) == [1, b"OK", b"noop", b"kid-b"]
    assert await rotate(store, ks2, "kid-b", "cc" * 32) == [0, b"rotation_conflict", b"kid-b"]
    assert await hash_of(store, ks2) == h
    # torn keystore: the current secret is missing -> written, noop
    await store.call("HDEL", ks2, "secret:kid-b")
    assert await rotate(store, ks2, "kid-b", "bb" * 32) == [1, b"OK", b"noop", b"kid-b"]
    assert await hash_of(store, ks2) == h
    # 4. GC of an expired kid
    await store.call("HSET", ks2, "expires_at:kid-stale", "1", "secret:kid-stale", "dd" * 32)
    assert (await rotate(store, ks2, "kid-c", "cc" * 32))[5] == b"1"
    h = await hash_of(store, ks2)
    assert "expires_at:kid-stale" not in h and "secret:kid-stale" not in h
    # 11. past grace: omitted from the listing before GC
    await store.call("HSET", ks2, "expires_at:kid-a", "1")
    kids = await list_kids(store, ks2)
    assert kids[2] == b"kid-c" and b"kid-a" not in kids and b"kid-b" in kids


async def test_rotation_input_validation(store: Store) -> None:
    ks = keystore(new_eid())
    assert await rotate(store, ks, "kid:with:colon", "aa") == [0, b"invalid_kid"]
    assert await rotate(store, ks, "", "aa") == [0, b"invalid_kid"]
    for bad in ("", "abc", "zz11", "1234567"):
        assert await rotate(store, ks, "k", bad) == [0, b"invalid_secret_hex"]
    for grace in (2**53, -1, "1.5", "x", ""):
        assert await rotate(store, ks, "k", "aa", grace) == [0, b"invalid_grace_ms"]
    assert await rotate(store, ks, "k", "aa", 2**53 - 1) == [1, b"OK", b"rotated", b"", b"k", b"0"]
    assert await store.call("EXISTS", ks) == 1


async def test_rotation_reusing_a_verifying_kid(store: Store) -> None:
    """Required fix: a held verifying kid is reinstated only with its own secret."""
    ks = keystore(new_eid())
    await rotate(store, ks, "k1", "11" * 32)
    await rotate(store, ks, "k2", "22" * 32)
    before = await hash_of(store, ks)
    assert await rotate(store, ks, "k1", "33" * 32) == [0, b"rotation_conflict", b"k1"]
    assert await hash_of(store, ks) == before
    assert await rotate(store, ks, "k1", "11" * 32) == [1, b"OK", b"rotated", b"k2", b"k1", b"0"]
    h = await hash_of(store, ks)
    assert h["current_kid"] == "k1" and h["secret:k1"] == "11" * 32
    assert "expires_at:k1" not in h, "a stale expiry would let a later GC delete the current secret"
    assert "expires_at:k2" in h
    # a later GC never touches the current secret
    await store.call("HSET", ks, "expires_at:k2", "1")
    assert (await rotate(store, ks, "k3", "44" * 32))[5] == b"1"
    h = await hash_of(store, ks)
    assert h["secret:k1"] == "11" * 32 and "secret:k2" not in h


async def test_tokens_across_rotations(store: Store) -> None:
    """docs/suspension.md#kid-rotation: a k1 token survives k1->k2->k3 in grace, expires, then is
    unknown."""
    lease = await leased(store)
    eid, ks = lease.eid, keystore(lease.eid)
    wpid = str(uuid.uuid4())
    token = (await create_pending(store, lease, wpid=wpid))[4].decode()
    assert token.startswith("k1:")
    await rotate(store, ks, "k2", "22" * 32, 600_000)
    await rotate(store, ks, "k3", "33" * 32, 600_000)
    assert (await send_signal(store, eid, wpid, token, buffer=True))[:2] == [1, b"OK"]
    # a fresh waitpoint is minted with k3
    assert (await create_pending(store, lease))[4].startswith(b"k3:")
    now = await now_ms(store)
    await store.call("HSET", ks, "expires_at:k1", str(now - 1000))
    assert (await send_signal(store, eid, wpid, token, buffer=True)) == [0, b"token_expired"]
    assert (await core_of(store, eid))["last_hmac_validation_failed_at"] != ""
    # a malformed expiry fails closed
    await store.call("HSET", ks, "expires_at:k1", "soon")
    assert (await send_signal(store, eid, wpid, token, buffer=True)) == [0, b"token_expired"]
    await store.call("HSET", ks, "expires_at:k1", str(now - 1000))
    assert (await rotate(store, ks, "k4", "44" * 32))[5] == b"1"
    assert (await send_signal(store, eid, wpid, token, buffer=True)) == [0, b"invalid_token"]
