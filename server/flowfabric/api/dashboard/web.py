"""The dashboard's HTTP server (docs/dashboard.md): static page, JSON reads, SSE live feeds.

A small HTTP/1.1 server on asyncio streams, one request per connection (`Connection: close`),
GET and POST only: the dashboard needs nothing more, and it keeps the runtime dependencies as
they are. Live views are Server-Sent Events bridged from the gRPC servicers' own machinery, run
in-process: an execution's page follows `WatchExecution` (event-driven), its output follows
`TailAttemptStream` (and so holds one stream-op slot while open). The lane overview is re-read
every `overview_interval_s` on the server and pushed only when a count changed.

Auth (docs/dashboard.md#access): without `FF_API_TOKEN` the reads are open, as on the gRPC port;
with it, the page asks for a token and the server answers with an HttpOnly, SameSite=Strict
session cookie. Mutations (cancel, replay) need a session opened with `FF_ADMIN_TOKEN`; with no
admin token configured the dashboard is read-only. Tokens never reach the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from flowfabric.server.api.dashboard import views
from flowfabric.server.api.interceptors import _audited
from flowfabric.server.api.servicers.base import ServerContext
from flowfabric.server.api.servicers.execution import ExecutionServicer
from flowfabric.server.api.servicers.stream import StreamServicer
from flowfabric.server.valkey.errors import FlowFabricError, InvalidInput
from flowfabric.v1 import execution_pb2, stream_pb2

log = logging.getLogger("flowfabric.dashboard")

HEAD_LIMIT = 16 * 1024
BODY_LIMIT = 4 * 1024
READ_TIMEOUT_S = 10.0
KEEPALIVE_S = 15.0
SESSIONS_MAX = 1000
COOKIE = "ff_dashboard"
OVERVIEW_INTERVAL_S = 2.0
OVERVIEW_FULL_EVERY = 5  # push the wait times at least every this many intervals
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = (
    "Cache-Control: no-store\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "X-Frame-Options: DENY\r\n"
    "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'\r\n"
)
HTTP_STATUS = {  # gRPC status name -> HTTP status
    "INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
    "FAILED_PRECONDITION": 409, "ABORTED": 409, "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}  # fmt: skip
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Too Large",
           429: "Too Many Requests", 431: "Headers Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 504: "Gateway Timeout"}  # fmt: skip

Events = AsyncIterator[tuple[str, dict[str, Any], str]]  # (event name, data, SSE id or "")


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    role: str = "none"  # none | read | admin
    params: dict[str, str] = field(default_factory=dict)

    def arg(self, name: str) -> str:
        return self.query.get(name, "")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[str] = field(default_factory=list)
    events: Events | None = None
    path: str = ""  # of a feed, for its log line


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":")).encode())


def _error(status: int, code: str, message: str) -> Response:
    return json_response({"error": code, "message": message}, status)


class DashboardServer:
    """`await start()` binds and returns the port; `await stop()` closes every connection."""

    def __init__(
        self,
        addr: str,
        ctx: ServerContext,
        executions: ExecutionServicer,
        streams: StreamServicer,
    ) -> None:
        self.addr = addr
        self.ctx = ctx
        self.executions = executions
        self.streams = streams
        self.api_token = ctx.config.api_token
        self.admin_token = ctx.config.admin_token
        self.overview_interval_s = OVERVIEW_INTERVAL_S
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._stopping = asyncio.Event()
        self._loopback = True
        Route = tuple[str, re.Pattern[str], Callable[[Request], Awaitable[Response]], str]
        self._routes: list[Route] = [
            ("GET", re.compile(r"/api/session"), self._session_info, "none"),
            ("POST", re.compile(r"/api/session"), self._login, "none"),
            ("GET", re.compile(r"/api/lanes"), self._lanes, "read"),
            ("GET", re.compile(r"/api/overview/events"), self._overview_events, "read"),
            ("GET", re.compile(r"/api/executions"), self._executions, "read"),
            ("GET", re.compile(r"/api/executions/(?P<id>[^/]+)"), self._execution, "read"),
            ("GET", re.compile(r"/api/executions/(?P<id>[^/]+)/events"), self._watch, "read"),
            ("GET", re.compile(r"/api/executions/(?P<id>[^/]+)/attempts/(?P<n>[0-9]{1,9})/tail"),
             self._tail, "read"),
            ("POST", re.compile(r"/api/executions/(?P<id>[^/]+)/(?P<action>cancel|replay)"),
             self._act, "admin"),
            ("GET", re.compile(r"/api/flows"), self._flows, "read"),
            ("GET", re.compile(r"/api/flows/(?P<id>[^/]+)"), self._flow, "read"),
            ("GET", re.compile(r"/api/budgets"), self._budgets, "read"),
            ("GET", re.compile(r"/api/workers"), self._workers, "read"),
        ]  # fmt: skip

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> int:
        host, _, port = self.addr.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            self._server = await asyncio.start_server(
                self._connection, host, int(port), limit=HEAD_LIMIT
            )
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot bind the dashboard on {self.addr}: {exc}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._loopback = host in ("127.0.0.1", "localhost", "::1")
        if not self._loopback and not self.api_token:
            log.warning(
                "dashboard on %s without FF_API_TOKEN: anyone who can reach it can read "
                "every execution's state and output", self.addr,
            )  # fmt: skip
        return self.port

    async def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    # -- one connection -----------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            try:
                request = await self._read(reader)
                response = await self._dispatch(request)
            except HttpError as exc:
                response = _error(exc.status, exc.code, exc.message)
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                raise
            except Exception:
                log.exception("dashboard request failed")
                response = _error(500, "internal", "the request failed; see the server log")
            if response.events is not None:
                response.path = request.path
                await self._stream(reader, writer, response)
            else:
                self._write_head(writer, response)
                writer.write(response.body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> Request:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                size = int(headers.get("content-length") or 0)
                if size > BODY_LIMIT or size < 0:
                    raise HttpError(413, "too_large", f"request bodies are at most {BODY_LIMIT}")
                body = await reader.readexactly(size) if size else b""
            url = urlsplit(target)
            query = {k: v[0] for k, v in parse_qs(url.query, max_num_fields=20).items()}
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
            raise HttpError(431, "too_large", "request head too large") from exc
        except ValueError as exc:
            raise HttpError(400, "bad_request", "malformed request") from exc
        return Request(method, url.path, query, headers, body)

    def _write_head(self, writer: asyncio.StreamWriter, response: Response) -> None:
        head = (
            f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            + (f"Content-Length: {len(response.body)}\r\n" if response.events is None else "")
            + "Connection: close\r\n"
            + SECURITY_HEADERS
            + "".join(h + "\r\n" for h in response.headers)
            + "\r\n"
        )
        writer.write(head.encode("latin-1"))

    async def _stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: Response
    ) -> None:
        """Send the events as SSE until they end, the client goes away or the server stops."""
        assert response.events is not None
        path = response.path
        self._write_head(writer, response)
        writer.write(b"retry: 2000\n\n")
        await writer.drain()

        async def pump() -> None:
            assert response.events is not None
            try:
                async for name, data, event_id in response.events:
                    out = f"event: {name}\n" + (f"id: {event_id}\n" if event_id else "")
                    out += f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
                    writer.write(out.encode())
                    await writer.drain()
            except FlowFabricError as exc:
                writer.write(_sse_failure(exc.code, exc.describe()))
            except HttpError as exc:
                writer.write(_sse_failure(exc.code, exc.message))
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception:
                log.exception("dashboard feed %s failed", path)
                writer.write(_sse_failure("internal", "the feed failed; see the server log"))
            else:
                writer.write(b"event: end\ndata: {}\n\n")
            await writer.drain()

        async def keepalive() -> None:
            while True:
                await asyncio.sleep(KEEPALIVE_S)
                writer.write(b": keepalive\n\n")
                await writer.drain()

        tasks = [
            asyncio.ensure_future(pump()),
            asyncio.ensure_future(reader.read()),  # EOF: the client went away
            asyncio.ensure_future(keepalive()),
            asyncio.ensure_future(self._stopping.wait()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await response.events.aclose()  # type: ignore[attr-defined]

    # -- routing and auth ---------------------------------------------------------------------

    def _role(self, request: Request) -> str:
        cookie = request.headers.get("cookie", "")
        for part in cookie.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value in self._sessions:
                return self._sessions[value]
        return "none" if self.api_token else "read"

    def _host_ok(self, request: Request) -> bool:
        """On a loopback address only loopback names are served: a page elsewhere cannot
        rebind its own name to 127.0.0.1 and read the dashboard."""
        if not self._loopback:
            return True
        host = request.headers.get("host", "")
        name = host.rpartition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]
        return name in LOOPBACK_NAMES

    async def _dispatch(self, request: Request) -> Response:
        if not self._host_ok(request):
            raise HttpError(403, "bad_host", "the dashboard answers to 127.0.0.1 or localhost")
        if request.method == "GET" and request.path in STATIC:
            name, ctype = STATIC[request.path]
            body = (resources.files(__package__) / "static" / name).read_bytes()
            return Response(200, body, ctype)
        if request.path == "/favicon.ico":
            return Response(204, b"", "image/x-icon")
        request.role = self._role(request)
        allowed = False
        for method, pattern, handler, need in self._routes:
            m = pattern.fullmatch(request.path)
            if m is None:
                continue
            allowed = True
            if method != request.method:
                continue
            if need != "none" and not _permits(request.role, need):
                if need == "admin":
                    why = (
                        "the admin token is required"
                        if self.admin_token
                        else ("the dashboard is read-only: FF_ADMIN_TOKEN is not configured")
                    )
                    raise HttpError(403, "admin_token_required", why)
                raise HttpError(401, "unauthenticated", "open a session with the API token")
            if request.method == "POST" and request.headers.get("x-ff-dashboard") != "1":
                raise HttpError(403, "csrf", "POST needs the X-FF-Dashboard: 1 header")
            request.params = {k: unquote(v) for k, v in m.groupdict().items()}
            try:
                return await handler(request)
            except FlowFabricError as exc:
                status = HTTP_STATUS.get(exc.spec.status.name, 500)
                return _error(status, exc.code, exc.describe())
        if allowed:
            raise HttpError(405, "method_not_allowed", f"{request.method} is not allowed here")
        raise HttpError(404, "not_found", "no such page")

    async def _session_info(self, request: Request) -> Response:
        return json_response({
            "auth_required": bool(self.api_token),
            "role": request.role,
            "admin_available": bool(self.admin_token),
        })  # fmt: skip

    async def _login(self, request: Request) -> Response:
        try:
            token = str(json.loads(request.body or b"{}").get("token", ""))
        except (ValueError, AttributeError):
            raise HttpError(400, "bad_request", 'body must be JSON {"token": ...}') from None
        role = None
        if self.admin_token and hmac.compare_digest(token.encode(), self.admin_token.encode()):
            role = "admin"
        elif self.api_token and hmac.compare_digest(token.encode(), self.api_token.encode()):
            role = "read"
        if role is None:
            raise HttpError(401, "unauthenticated", "wrong token")
        sid = secrets.token_hex(32)
        self._sessions[sid] = role
        while len(self._sessions) > SESSIONS_MAX:
            self._sessions.popitem(last=False)
        response = json_response({"role": role})
        response.headers.append(f"Set-Cookie: {COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/")
        return response

    # -- reads --------------------------------------------------------------------------------

    async def _lanes(self, request: Request) -> Response:
        return json_response(await views.lanes(self.ctx))

    async def _executions(self, request: Request) -> Response:
        return json_response(
            await views.executions(self.ctx, request.arg("lane"), request.arg("state") or
                                   "eligible", request.arg("public_state"), request.arg("page"))
        )  # fmt: skip

    async def _execution(self, request: Request) -> Response:
        return json_response(await views.execution(self.ctx, request.params["id"]))

    async def _flows(self, request: Request) -> Response:
        return json_response(await views.flows(self.ctx))

    async def _flow(self, request: Request) -> Response:
        return json_response(await views.flow(self.ctx, request.params["id"]))

    async def _budgets(self, request: Request) -> Response:
        return json_response(await views.budgets(self.ctx))

    async def _workers(self, request: Request) -> Response:
        return json_response(await views.workers(self.ctx))

    # -- live feeds ---------------------------------------------------------------------------

    async def _overview_events(self, request: Request) -> Response:
        async def events() -> Events:
            last: Any = None
            n = 0
            while True:
                data = await views.lanes(self.ctx)
                counts = [(row["lane"], row["counts"]) for row in data["lanes"]]
                if counts != last or n % OVERVIEW_FULL_EVERY == 0:
                    last = counts
                    yield "lanes", data, ""
                n += 1
                await asyncio.sleep(self.overview_interval_s)

        return Response(content_type="text/event-stream", events=events())

    async def _watch(self, request: Request) -> Response:
        raw = request.params["id"]
        self.ctx.execution_id(raw)  # a bad id is a 400 before the stream opens
        watch = self.executions.WatchExecution(
            execution_pb2.WatchExecutionRequest(execution_id=raw), None
        )

        async def events() -> Events:
            async for _change in watch:
                yield "execution", await views.execution(self.ctx, raw), ""

        return Response(content_type="text/event-stream", events=events())

    async def _tail(self, request: Request) -> Response:
        raw, idx = request.params["id"], int(request.params["n"])
        self.ctx.execution_id(raw)
        after = request.headers.get("last-event-id") or request.arg("after") or "0-0"
        if not re.fullmatch(r"[0-9]{1,20}(-[0-9]{1,20})?", after):
            raise InvalidInput("after", "after must be a stream id like 1700000000000-0")
        tail = self.streams.TailAttemptStream(
            stream_pb2.TailAttemptStreamRequest(execution_id=raw, attempt_index=idx, after=after),
            None,
        )

        async def events() -> Events:
            async for message in tail:
                frames = [_frame(f) for f in message.frames]
                if frames:
                    yield "frames", {"attempt_index": idx, "frames": frames}, frames[-1]["id"]
                if message.HasField("closed_reason"):
                    yield "closed", {"attempt_index": idx, "closed_at": message.closed_at,
                                     "closed_reason": message.closed_reason}, ""  # fmt: skip

        return Response(content_type="text/event-stream", events=events())

    # -- admin actions ------------------------------------------------------------------------

    async def _act(self, request: Request) -> Response:
        raw, action = request.params["id"], request.params["action"]
        if action == "cancel":
            cancel = execution_pb2.CancelExecutionRequest(
                execution_id=raw, reason="cancelled from the dashboard"
            )
            await _audited(self.executions.CancelExecution(cancel, None),
                           "/flowfabric.v1.ExecutionService/CancelExecution", cancel)  # fmt: skip
        else:
            replay = execution_pb2.ReplayExecutionRequest(execution_id=raw)
            await _audited(self.executions.ReplayExecution(replay, None),
                           "/flowfabric.v1.ExecutionService/ReplayExecution", replay)  # fmt: skip
        return json_response({"ok": True, "action": action})


def _permits(role: str, need: str) -> bool:
    rank = {"none": 0, "read": 1, "admin": 2}
    return rank[role] >= rank[need]


def _frame(frame: Any) -> dict[str, Any]:
    """A frame for the page: its payload as text (bad UTF-8 replaced); the page shows it as text."""
    return {
        "id": frame.id,
        "frame_type": frame.frame_type,
        "ts": frame.ts,
        "encoding": frame.encoding,
        "text": bytes(frame.payload).decode("utf-8", errors="replace"),
    }


def _sse_failure(code: str, message: str) -> bytes:
    data = json.dumps({"error": code, "message": message}, separators=(",", ":"))
    return f"event: failure\ndata: {data}\n\n".encode()
