"""Structured logs (docs/architecture.md#logs): `FF_LOG_FORMAT=json` writes one JSON object per
line, carrying the request id, method and execution id of the RPC that logged it.

The interceptor sets the context per call (`bind`); every log record made while that call runs,
in any layer, picks it up through a filter. Callers may send `x-request-id`; otherwise the
server makes one. Nothing here logs a request's payload or a token: what a record holds is
what the code passed to the logger, and those calls log ids and reason codes only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid
from typing import Any

__all__ = ["bind", "configure", "new_request_id"]

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_method: contextvars.ContextVar[str] = contextvars.ContextVar("method", default="")
_execution_id: contextvars.ContextVar[str] = contextvars.ContextVar("execution_id", default="")
REQUEST_ID_MAX = 128


def new_request_id(sent: str | None) -> str:
    """The caller's `x-request-id` if it is a sane one, else a fresh one."""
    if sent and len(sent) <= REQUEST_ID_MAX and sent.isprintable():
        return sent
    return uuid.uuid4().hex[:16]


def bind(request_id: str, method: str, execution_id: str = "") -> None:
    """Set the log context of the current RPC (its own asyncio task's context)."""
    _request_id.set(request_id)
    _method.set(method)
    _execution_id.set(execution_id)


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        record.method = _method.get()
        record.execution_id = getattr(record, "execution_id", "") or _execution_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One object per line: ts (RFC 3339, UTC, ms), level, logger, msg, the RPC's context when
    there is one, and the exception text when a record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "method", "execution_id"):
            value = getattr(record, key, "")
            if value:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Root logging for `flowfabric serve`: text (the default) or JSON lines, on stderr."""
    handler = logging.StreamHandler()
    handler.addFilter(_Context())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("audit").setLevel(logging.INFO)
