"""Server interceptors: bearer-token auth and the one place errors become gRPC statuses.

Auth (docs/architecture.md#configuration-and-boot): `authorization: Bearer <FF_API_TOKEN>`, compared
in constant time; health
and reflection are exempt; `FF_ADMIN_TOKEN`, when set, is required for AdminService instead.
Errors: every handler is wrapped so a `FlowFabricError` aborts with its status and ErrorInfo,
and anything unexpected becomes INTERNAL without leaking internals.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_status import rpc_status

from flowfabric.server.api import limits, logs
from flowfabric.server.api.handlers import rewrap
from flowfabric.server.valkey.errors import FlowFabricError

log = logging.getLogger("flowfabric.rpc")
audit = logging.getLogger("audit")

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_PREFIX = "/flowfabric.v1.AdminService/"
# operator-only services: FF_ADMIN_TOKEN, when set, is required for them (docs/lanes.md)
OPERATOR_PREFIXES = (ADMIN_PREFIX, "/flowfabric.v1.LaneService/")
# Operator actions: each call writes one audit line (docs/architecture.md#logs)
AUDITED = frozenset(
    f"/flowfabric.v1.{m}"
    for m in (
        "ExecutionService/CancelExecution", "ExecutionService/ReplayExecution",
        "ExecutionService/RevokeLease", "ExecutionService/ResumeExecution",
        "ExecutionService/ChangePriority", "FlowService/CancelFlow", "FlowService/ReplayFlow",
        "BudgetService/ResetBudget", "AdminService/RotateWaitpointSecret",
        "AdminService/RepairSweep", "ScheduleService/PauseSchedule",
        "ScheduleService/ResumeSchedule", "ScheduleService/DeleteSchedule",
        "ScheduleService/TriggerSchedule", "LaneService/PauseLane", "LaneService/ResumeLane",
        "LaneService/DrainLane", "LaneService/StartBulkAction", "LaneService/CancelBulkAction",
    )
)  # fmt: skip
# the request fields an audit line names its target by (ids only, never payloads)
TARGET_FIELDS = ("execution_id", "flow_id", "budget_id", "schedule_id", "lane_id", "bulk_action_id")

if TYPE_CHECKING:  # generic only in the stubs, not at run time
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler, Context = grpc.RpcMethodHandler, grpc.aio.ServicerContext
    Interceptor = grpc.aio.ServerInterceptor
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]


async def abort(context: Context, error: FlowFabricError) -> None:
    # abort_with_status is missing from the grpc stubs' aio ServicerContext
    await context.abort_with_status(rpc_status.to_status(error.to_status()))  # type: ignore[attr-defined]


async def _guard(call: Awaitable[Any], context: Context, method: str) -> Any:
    """Await one handler call, turning every failure into a status with ErrorInfo."""
    try:
        return await call
    except FlowFabricError as exc:
        await abort(context, exc)
    except (grpc.aio.AbortError, grpc.aio.UsageError, asyncio.CancelledError, StopAsyncIteration):
        raise
    except Exception:
        log.exception("unexpected error in %s", method)
        await abort(context, FlowFabricError("protocol_error", message="internal error"))


def _execution_id(request: Any) -> str:
    eid = getattr(request, "execution_id", "")
    if not eid and hasattr(request, "HasField"):
        try:
            if request.HasField("lease"):
                eid = request.lease.execution_id
        except ValueError:  # no `lease` field on this message
            pass
    return eid if isinstance(eid, str) else ""


def _bind(request: Any, context: Context, method: str) -> None:
    sent = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), None)
    logs.bind(logs.new_request_id(sent if isinstance(sent, str) else None), method,
              _execution_id(request))  # fmt: skip


def _targets(message: Any) -> list[str]:
    return [f"{f}={getattr(message, f)}" for f in TARGET_FIELDS if getattr(message, f, "")]


def _audit(method: str, request: Any, outcome: str, reply: Any = None) -> None:
    found = _targets(request)
    # a bulk action names its filter's lane, and the job the reply names
    for part in (getattr(request, "filter", None), getattr(reply, "bulk_action", None)):
        found += [x for x in _targets(part) if x not in found] if part is not None else []
    if getattr(request, "dry_run", False):
        found.append("dry_run=true")
    targets = " ".join(found)
    audit.info("operator_action method=%s %s outcome=%s", method.rsplit("/", 1)[1], targets,
               outcome)  # fmt: skip


async def _audited(call: Awaitable[Any], method: str, request: Any) -> Any:
    """Await an operator action, then write its audit line: `ok` or the refusal's reason."""
    try:
        reply = await call
    except FlowFabricError as exc:
        _audit(method, request, exc.code)
        raise
    _audit(method, request, "ok", reply)
    return reply


def _wrap(handler: Handler, method: str, deny: FlowFabricError | None) -> Handler:
    """Rebuild `handler` with its behaviour wrapped (or replaced by a denial)."""
    limit = limits.REQUEST_LIMITS.get(method, limits.CONTROL_REQUEST_MAX)
    audited = method in AUDITED

    async def check(request: Any, context: Context) -> None:
        _bind(request, context, method)  # a client stream's "request" is its iterator: no id
        if deny is not None:
            await abort(context, deny)
        size = request.ByteSize() if hasattr(request, "ByteSize") else 0
        if size > limit:
            await abort(
                context,
                FlowFabricError(
                    "payload_too_large",
                    message=f"request is {size} bytes; the limit for this RPC is {limit}",
                    metadata={"limit_bytes": str(limit)},
                ),
            )

    async def unary(request: Any, context: Context) -> Any:
        await check(request, context)
        # the stubs type handler behaviours as sync callables; under grpc.aio they are async
        behavior: Any = handler.unary_unary or handler.stream_unary
        call = behavior(request, context)
        if audited:
            call = _audited(call, method, request)
        return await _guard(call, context, method)

    async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
        await check(request, context)
        behavior: Any = handler.unary_stream or handler.stream_stream
        iterator = behavior(request, context).__aiter__()
        while True:
            try:
                item = await _guard(iterator.__anext__(), context, method)
            except StopAsyncIteration:
                return
            yield item

    return rewrap(handler, unary, streaming)


def _token_ok(metadata: tuple[Any, ...] | None, expected: str) -> bool:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), expected.encode()
            )
    return False


class FlowFabricInterceptor(Interceptor):
    """Auth, then error mapping, for every FlowFabric RPC (health and reflection untouched)."""

    def __init__(
        self, api_token: str | None, admin_token: str | None = None,
        trace: Callable[[Handler, str], Handler] | None = None,
    ) -> None:  # fmt: skip
        self.api_token = api_token
        self.admin_token = admin_token
        # api/tracing.wrap when tracing is on (docs/observability.md#traces): a span per RPC
        self.trace = trace

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> Handler:
        method = details.method
        handler: Handler | None = await continuation(details)
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler  # type: ignore[return-value]  # grpc.aio accepts None: unknown method
        wrapped = _wrap(handler, method, self._deny(method, details.invocation_metadata))
        return wrapped if self.trace is None else self.trace(wrapped, method)

    def _deny(self, method: str, metadata: tuple[Any, ...] | None) -> FlowFabricError | None:
        if method.startswith(OPERATOR_PREFIXES) and self.admin_token:
            if _token_ok(metadata, self.admin_token):
                return None
            return FlowFabricError(
                "admin_token_required", message="AdminService requires the admin token"
            )
        if self.api_token and not _token_ok(metadata, self.api_token):
            return FlowFabricError("unauthenticated", message="missing or invalid bearer token")
        return None
