"""Tasks as functions: `@task` / `@worker.task` on `async def` or plain `def` (docs/tasks.md).

The function's signature is the payload schema: `submit` binds the arguments (a TypeError
before any call), sends them as one JSON object, and the worker binds them again before the
function runs; a payload that does not fit fails the execution at once (non-retryable,
category `bad_arguments`). The return value is sent as JSON and `TaskHandle.result` decodes it.
A plain `def` runs in a thread pool with a `SyncTaskContext`; a cancelled task sets its
`cancel_event` and `check_cancelled()` raises `Cancelled` (Python cannot stop a thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import json
import threading
import types
import typing
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from flowfabric._client import Client
from flowfabric._errors import NonRetryableError
from flowfabric._models import ExecutionState
from flowfabric._task import TaskContext

#: Every task the `task` decorator made, by kind (what `flowfabric worker MODULE` runs).
REGISTRY: dict[str, Task] = {}
_SUBMIT_OPTIONS = ("lane", "priority", "policy", "tags", "namespace", "budgets", "quota")


class Cancelled(Exception):
    """Raised by `SyncTaskContext.check_cancelled` once the task must stop."""


class TaskFailed(Exception):
    """`TaskHandle.result`: the execution ended other than completed."""

    def __init__(self, execution_id: str, state: ExecutionState) -> None:
        super().__init__(f"{execution_id} ended {state.name.lower()}")
        self.execution_id = execution_id
        self.state = state


class SyncTaskContext:
    """What a plain-`def` task sees: the task's fields and blocking versions of the calls.

    Attributes:
        cancel_event: Set once the task must stop (lease lost, worker shutting down).
    """

    def __init__(self, ctx: TaskContext, loop: asyncio.AbstractEventLoop) -> None:
        self.async_context = ctx
        self._loop = loop
        self.cancel_event = threading.Event()

    def __getattr__(self, name: str) -> Any:  # execution_id, attempt_index, json(), ...
        if name.startswith("_") or name == "async_context":
            raise AttributeError(name)
        value = getattr(self.async_context, name)
        if inspect.iscoroutinefunction(value):
            # every async call of TaskContext (report_usage, suspend, create_waitpoint, ...)
            # blocks here until the worker's loop has run it, so none hands back a coroutine
            def blocking(*args: Any, **kwargs: Any) -> Any:
                return self._blocking(value(*args, **kwargs))

            blocking.__name__ = blocking.__qualname__ = name
            blocking.__doc__ = value.__doc__
            return blocking
        return value

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set() or self.async_context.cancelled

    def check_cancelled(self) -> None:
        """Raise `Cancelled` if the task must stop."""
        if self.cancelled:
            reason = self.async_context.lease_lost_reason or "worker shutting down"
            raise Cancelled(f"task cancelled: {reason}")

    def sleep(self, seconds: float) -> None:
        """Sleep, woken at once (raising `Cancelled`) if the task is cancelled meanwhile."""
        self.cancel_event.wait(seconds)
        self.check_cancelled()

    def _blocking(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def progress(self, pct: int | None = None, message: str | None = None) -> None:
        self._blocking(self.async_context.progress(pct, message))

    def emit(self, frame_type: str, payload: Any = b"", **options: Any) -> None:
        self._blocking(self.async_context.emit(frame_type, payload, **options))

    def flush(self) -> None:
        self._blocking(self.async_context.flush())


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an unresolvable annotation is just not checked
        return {}


def _check(value: Any, hint: Any, where: str) -> Any:
    """`value` as `hint` wants it (a dataclass from a dict); TypeError when it does not fit.
    Checked: None, bool, int, float, str, list[...], dict[...], unions, dataclasses."""
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, hint, where)
    if hint is None or hint is type(None):
        if value is not None:
            raise TypeError(f"{where}: expected null, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _check_dataclass(value, hint, where)
    base = origin or hint
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base in (bool, int, float, str, list, dict) and (
        not isinstance(value, base) or (base in (int, float) and isinstance(value, bool))
    ):
        raise TypeError(f"{where}: expected {_name(hint)}, got {value!r}")
    args = typing.get_args(hint)
    if base is list and args:
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if base is dict and len(args) == 2:
        return {k: _check(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    return value


def _check_union(value: Any, hint: Any, where: str) -> Any:
    for option in typing.get_args(hint):
        try:
            return _check(value, option, where)
        except TypeError:
            continue
    raise TypeError(f"{where}: {value!r} is not {_name(hint)}")


def _check_dataclass(value: Any, hint: type, where: str) -> Any:
    if isinstance(value, hint):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}: expected an object for {hint.__name__}, got {value!r}")
    try:
        return hint(**value)
    except TypeError as exc:
        raise TypeError(f"{where}: {exc}") from None


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON-encodable")


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=_jsonable).encode()


@dataclass(frozen=True)
class TaskHandle:
    """A submitted task: `await handle.result()` waits and decodes the return value."""

    task: Task
    client: Client
    execution_id: str
    duplicate: bool
    state: ExecutionState

    async def result(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Wait until the execution ends; its return value decoded.

        Raises:
            TaskFailed: It ended other than completed.
            TimeoutError: Not ended within `timeout` seconds.
        """
        state = await self.client.wait(self.execution_id, timeout=timeout)
        if state != ExecutionState.COMPLETED:
            raise TaskFailed(self.execution_id, state)
        data = await self.client.result(self.execution_id)
        value = json.loads(data) if data else None
        return _check(value, self.task.hints.get("return", Any), "result")


class Task:
    """A function registered as a task kind (made by `task` or `Worker.task`).

    Calling it runs the function directly (no context is passed: for unit tests of
    context-free tasks); `submit` creates an execution of it.
    """

    def __init__(self, fn: Callable[..., Any], kind: str | None, options: Mapping[str, Any]):
        unknown = set(options) - set(_SUBMIT_OPTIONS)
        if unknown:
            raise TypeError(f"unknown task option(s) {sorted(unknown)}; known: {_SUBMIT_OPTIONS}")
        self.fn = fn
        self.kind = kind or f"{fn.__module__}.{fn.__qualname__}"
        self.options = dict(options)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.hints = _hints(fn)
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        self.takes_context = bool(params) and (
            params[0].name == "ctx"
            or self.hints.get(params[0].name) in (TaskContext, SyncTaskContext)
        )
        if self.takes_context:
            params = params[1:]
        for p in params:
            if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
                raise TypeError(
                    f"task {self.kind}: parameter {p.name!r} cannot be named in a JSON payload "
                    "(no positional-only parameters or *args)"
                )
        self.signature = signature.replace(parameters=params)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.kind}>"

    # -- the submitting side --------------------------------------------------------------------

    def payload(self, *args: Any, **kwargs: Any) -> bytes:
        """The JSON payload of these arguments. TypeError if they do not fit the signature."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {self.kind}: {exc}") from None
        fields: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            param = self.signature.parameters[name]
            if param.kind == param.VAR_KEYWORD:
                fields.update(value)
            else:
                _check(value, self.hints.get(name, Any), f"task {self.kind}: argument {name!r}")
                fields[name] = value
        try:
            return encode_json(fields)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"task {self.kind}: {exc}") from None

    async def submit(self, client: Client, /, *args: Any, **kwargs: Any) -> TaskHandle:
        """Create an execution of this task with these arguments (the task's options, e.g.
        `lane`, apply). Raises TypeError, before any call, if the arguments do not fit."""
        data = self.payload(*args, **kwargs)
        submitted = await client.submit(self.kind, data, payload_encoding="json", **self.options)
        return TaskHandle(
            self, client, submitted.execution_id, submitted.duplicate, submitted.state
        )

    # -- the worker side -----------------------------------------------------------------------

    def arguments(self, ctx: TaskContext) -> inspect.BoundArguments:
        """The payload bound to the signature; `bad_arguments` (non-retryable) if it does not
        fit."""
        try:
            fields = json.loads(ctx.payload) if ctx.payload else {}
        except ValueError as exc:
            raise _bad(self, f"payload is not JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise _bad(self, f"payload is not a JSON object: {fields!r}"[:300])
        try:
            bound = self.signature.bind(**fields)
        except TypeError as exc:
            raise _bad(self, str(exc)) from None
        for name, value in list(bound.arguments.items()):
            if self.signature.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
                continue
            try:
                bound.arguments[name] = _check(value, self.hints.get(name, Any), repr(name))
            except TypeError as exc:
                raise _bad(self, str(exc)) from None
        return bound

    def handler(self, executor: Callable[[], ThreadPoolExecutor]) -> Any:
        """The string-kind handler running this task (plain `def`s on `executor()`)."""

        async def handle(ctx: TaskContext) -> bytes:
            bound = self.arguments(ctx)
            if self.is_async:
                head = (ctx,) if self.takes_context else ()
                value = await self.fn(*head, *bound.args, **bound.kwargs)
            else:
                value = await self._run_in_thread(ctx, bound, executor())
            return encode_json(value)

        return handle

    async def _run_in_thread(
        self, ctx: TaskContext, bound: inspect.BoundArguments, executor: ThreadPoolExecutor
    ) -> Any:
        loop = asyncio.get_running_loop()
        sync_ctx = SyncTaskContext(ctx, loop)
        head = (sync_ctx,) if self.takes_context else ()
        call = functools.partial(self.fn, *head, *bound.args, **bound.kwargs)
        future = loop.run_in_executor(executor, call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # the handler observes it (check_cancelled / sleep); wait for it to return
            sync_ctx.cancel_event.set()
            await asyncio.wait({future})  # a second cancel abandons the thread
            if not future.cancelled():
                future.exception()  # retrieved: the outcome is the cancellation
            raise


def _bad(task: Task, problem: str) -> NonRetryableError:
    return NonRetryableError(
        f"bad_arguments: task {task.kind}: {problem}", category="bad_arguments"
    )


def task(kind: str | Callable[..., Any] | None = None, **options: Any) -> Any:
    """Register a function as a task (`@task` or `@task("kind", lane=...)`); kind defaults to
    `module.qualname`. Options (`lane`, `priority`, `policy`, `tags`, `namespace`, `budgets`,
    `quota`) apply to its `submit`."""
    if callable(kind):
        return _register(Task(kind, None, options))

    def decorate(fn: Callable[..., Any]) -> Task:
        return _register(Task(fn, kind, options))

    return decorate


def _register(made: Task) -> Task:
    existing = REGISTRY.get(made.kind)
    # the same function again (a module imported twice) replaces its entry
    same = existing is not None and (
        getattr(existing.fn, "__code__", None) is getattr(made.fn, "__code__", None)
    )
    if existing is not None and not same:
        raise ValueError(f"a task of kind {made.kind!r} is already registered")
    REGISTRY[made.kind] = made
    return made


def tasks_of(module: Any) -> list[Task]:
    """The tasks defined as attributes of `module`."""
    return [v for v in vars(module).values() if isinstance(v, Task)]
