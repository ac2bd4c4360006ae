"""The waitpoint HMAC keystore across partitions (docs/suspension.md#the-keystore,
docs/suspension.md#kid-rotation).

`ff:sec:{fp:N}:waitpoint_hmac` holds identical content on every execution partition, so every
mint and validate stays single-slot. This module owns the fan-outs over all partitions: the
boot install of FF_WAITPOINT_HMAC_SECRET and the admin rotation. The embedded Valkey's
generated secret lives here too. Secrets and tokens are never logged or put in errors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from flowfabric.server.config import Config, ConfigError, _hex
from flowfabric.server.valkey.errors import FlowFabricError
from flowfabric.server.valkey.functions import INITIAL_KID, Keystore, Outcome
from flowfabric.server.valkey.functions.signal import Rotated
from flowfabric.server.valkey.keys import PartitionKeys

log = logging.getLogger("flowfabric.keystore")
audit = logging.getLogger("flowfabric.audit")

PARALLELISM = 16
ROTATION_DEADLINE_S = 120.0
SECRET_FILE = "waitpoint_hmac_secret"
PASSWORD_FILE = "valkey_password"
R = TypeVar("R")


def embedded_secret(data_dir: Path) -> str:
    """The embedded deployment's secret: read from the data dir, or generated (32 random bytes)
    and stored there with mode 0600 so restarts keep validating the tokens already issued."""
    path = Path(data_dir) / SECRET_FILE
    value, generated = _data_dir_secret(path)
    if generated:
        log.warning(
            "FF_WAITPOINT_HMAC_SECRET is unset: generated a random waitpoint HMAC secret and "
            "stored it in %s (development convenience; set the variable in production)",
            path,
        )
    return value


def embedded_password(data_dir: Path) -> str:
    """The embedded Valkey's `requirepass`: read from the data dir, or generated (32 random
    bytes, hex) and stored there with mode 0600. A data dir from a version without a password
    gets one on its next start."""
    value, generated = _data_dir_secret(Path(data_dir) / PASSWORD_FILE)
    if generated:
        log.info("generated the embedded Valkey's password in %s", Path(data_dir) / PASSWORD_FILE)
    return value


def _data_dir_secret(path: Path) -> tuple[str, bool]:
    """A hex secret kept in `path` (0600): (value, whether it was generated just now)."""
    if path.exists():
        raw = path.read_text().strip()
        try:
            return _hex(str(path), raw), False
        except ConfigError:
            raise ConfigError(f"{path} does not hold an even-length hex secret") from None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value, True


def resolve_secret(config: Config) -> str:
    """The secret to install: the configured one, or the embedded data dir's."""
    problem = config.hmac_secret_problem()
    if problem:
        raise ConfigError(problem)
    if config.waitpoint_hmac_secret is not None:
        return config.waitpoint_hmac_secret
    return embedded_secret(config.data_dir)


async def for_each_partition(
    partitions: int, call: Callable[[int], Awaitable[R]], parallelism: int = PARALLELISM
) -> dict[int, R | FlowFabricError]:
    """Run `call(partition)` for every partition, at most `parallelism` at once; each partition
    ends with its reply or its error."""
    gate = asyncio.Semaphore(parallelism)

    async def one(p: int) -> R | FlowFabricError:
        async with gate:
            try:
                return await call(p)
            except FlowFabricError as exc:
                return exc

    results = await asyncio.gather(*(one(p) for p in range(partitions)))
    return dict(enumerate(results))


async def install_secret(fn: Keystore, partitions: int, secret_hex: str) -> Counter[str]:
    """Boot step (docs/suspension.md#the-keystore): install `k1` on every partition. Returns the
    outcome counts;
    raises the first Valkey error (boot aborts). One aggregated warning per fault class."""

    def call(p: int) -> Awaitable[Outcome]:
        return fn.install(PartitionKeys.of(p).tag, INITIAL_KID, secret_hex)

    results = await for_each_partition(partitions, call)
    errors = {p: r for p, r in results.items() if isinstance(r, FlowFabricError)}
    if errors:
        first = min(errors)
        raise errors[first]
    counts = Counter(r.outcome for r in results.values() if isinstance(r, Outcome))
    if counts["repaired"]:
        log.warning(
            "waitpoint HMAC keystore: the current kid's secret was missing on %d partition(s); "
            "repaired from FF_WAITPOINT_HMAC_SECRET",
            counts["repaired"],
        )
    if counts["mismatch"]:
        log.warning(
            "waitpoint HMAC keystore: %d partition(s) hold a secret different from "
            "FF_WAITPOINT_HMAC_SECRET (rotated by an operator?); kept the stored one",
            counts["mismatch"],
        )
    log.info("waitpoint HMAC keystore ready on %d partitions (%s)", partitions, dict(counts))
    return counts


@dataclass
class RotationResult:
    rotated: int = 0
    failed: list[int] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)


async def rotate_secret(
    fn: Keystore, partitions: int, new_kid: str, new_secret_hex: str, grace_ms: int
) -> RotationResult:
    """Rotate every partition (docs/suspension.md#kid-rotation); `Rotated` and `Noop` count as
    success."""

    def call(p: int) -> Awaitable[Rotated]:
        return fn.rotate(PartitionKeys.of(p).tag, new_kid, new_secret_hex, grace_ms)

    out = RotationResult()
    for p, r in sorted((await for_each_partition(partitions, call)).items()):
        if isinstance(r, FlowFabricError):
            out.failed.append(p)
            out.codes[r.code] += 1
            audit.error("waitpoint_hmac_rotation_failed partition=%d err=%s", p, r.code)
        else:
            out.rotated += 1
            log.debug("waitpoint HMAC rotation partition=%d outcome=%s", p, r.outcome)
    audit.info(
        "waitpoint_hmac_rotation_complete new_kid=%s total_partitions=%d rotated=%d "
        "failed_count=%d",
        new_kid,
        partitions,
        out.rotated,
        len(out.failed),
    )
    return out
