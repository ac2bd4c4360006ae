"""The client's SignalService part: deliver signals, find and watch waitpoints."""

from __future__ import annotations

import builtins
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from flowfabric._errors import NotFound
from flowfabric._models import Payload, Time, encode_payload, to_ms
from flowfabric._signals import (
    Duration,
    Signal,
    SignalDelivery,
    Waitpoint,
    WaitpointEvent,
    choose_waitpoints,
    duration_ms,
)
from flowfabric._transport import Connected
from flowfabric.v1 import signal_pb2


class SignalsMixin(Connected):
    """Signals and waitpoints (SignalService)."""

    async def deliver_signal(
        self,
        execution_id: str,
        waitpoint_id: str,
        name: str,
        token: str,
        payload: Payload | None = None,
        *,
        idempotency_key: str | None = None,
        category: str = "",
        source_type: str = "",
        source_identity: str = "",
        correlation_id: str | None = None,
        payload_encoding: str | None = None,
        resume_delay: Duration | None = None,
        created_at: Time | None = None,
    ) -> SignalDelivery:
        """Deliver signal `name` to a waitpoint, presenting its token.

        On an active waitpoint the signal is evaluated and may resume the execution; on a
        pending one it is buffered and evaluated when the suspension activates it. Retried on
        UNAVAILABLE only with an `idempotency_key` (a repeat then answers `duplicate`).

        Args:
            payload: bytes verbatim, str as UTF-8, mappings and lists as JSON; ≤ 65 536 bytes.
            idempotency_key: Dedup key, scoped to the waitpoint (24 h window).
            category: Free-form (e.g. `approval`, `callback`).
            source_type: Who sends it (e.g. `user`, `webhook`).
            source_identity: Which one of them.
            resume_delay: If this signal resumes the execution: eligible only after this long.
            created_at: The sender's timestamp (default: acceptance time).

        Raises:
            InvalidWaitpointToken: The token is wrong, expired or missing (also for an unknown
                waitpoint).
            WaitpointClosed: The waitpoint no longer takes signals, or the execution ended.
            ResourceExhausted: `signal_limit_exceeded`.
            InvalidArgument: `payload_too_large`.
        """
        data, encoding = encode_payload(payload)
        request = signal_pb2.DeliverSignalRequest(
            execution_id=execution_id,
            waitpoint_id=waitpoint_id,
            signal_name=name,
            signal_category=category,
            source_type=source_type,
            source_identity=source_identity,
            waitpoint_token=token,
        )
        if data is not None:
            request.payload = data
        if payload_encoding or encoding:
            request.payload_encoding = payload_encoding or encoding or ""
        if correlation_id is not None:
            request.correlation_id = correlation_id
        if idempotency_key is not None:
            request.idempotency_key = idempotency_key
        if resume_delay is not None:
            request.resume_delay_ms = duration_ms(resume_delay, "resume_delay")
        if created_at is not None:
            request.created_at = to_ms(created_at)
        reply = await self._transport.unary(
            self._transport.signals.DeliverSignal, request, retry=idempotency_key is not None
        )
        if reply.WhichOneof("outcome") == "duplicate":
            return SignalDelivery(reply.duplicate.existing_signal_id, "duplicate", duplicate=True)
        return SignalDelivery(reply.accepted.signal_id, reply.accepted.effect)

    async def signal(
        self,
        execution_id: str,
        name: str,
        payload: Payload | None = None,
        **options: Any,
    ) -> SignalDelivery:
        """`deliver_signal` to the execution's one open waitpoint that takes `name` (found with
        `find_waitpoint`); `options` are `deliver_signal`'s keyword arguments."""
        wp = await self.find_waitpoint(execution_id, name)
        return await self.deliver_signal(execution_id, wp.id, name, wp.token, payload, **options)

    async def list_waitpoints(self, execution_id: str) -> builtins.list[Waitpoint]:
        """The execution's open (`pending` and `active`) waitpoints with their tokens, ordered
        by id. The tokens are credentials: do not log them.

        Raises:
            NotFound: No such execution.
        """
        out: builtins.list[Waitpoint] = []
        page_token = ""
        while True:
            reply = await self._transport.unary(
                self._transport.signals.ListPendingWaitpoints,
                signal_pb2.ListPendingWaitpointsRequest(
                    execution_id=execution_id, page_token=page_token
                ),
            )
            out += [Waitpoint.from_proto(info) for info in reply.waitpoints]
            if not reply.next_page_token:
                return out
            page_token = reply.next_page_token

    async def find_waitpoint(self, execution_id: str, name: str | None = None) -> Waitpoint:
        """The one open waitpoint a signal `name` should go to: among those that may take it
        (any, without `name`), active ones win over pending ones, then those naming it over
        wildcards.

        Raises:
            NotFound: `waitpoint_not_found`: no open waitpoint takes it (or no execution).
            ValueError: Several do; choose one with `list_waitpoints`.
        """
        candidates = choose_waitpoints(await self.list_waitpoints(execution_id), name)
        if not candidates:
            what = f" takes signal {name!r}" if name is not None else ""
            raise NotFound(
                f"no open waitpoint of {execution_id}{what}",
                code=grpc.StatusCode.NOT_FOUND,
                reason="waitpoint_not_found",
            )
        if len(candidates) > 1:
            ids = ", ".join(wp.id for wp in candidates)
            raise ValueError(f"{len(candidates)} open waitpoints of {execution_id} fit: {ids}")
        return candidates[0]

    async def watch_signals(
        self,
        execution_id: str,
        waitpoint_id: str | None = None,
        *,
        after: str | int | None = None,
    ) -> AsyncGenerator[Signal, None]:
        """Accepted (and buffered) signals with their payloads: the stored history after
        `after`, then live, each once; ends when the execution is terminal.

        Args:
            waitpoint_id: Only this waitpoint's signals.
            after: Resume cursor: with `waitpoint_id`, the `stream_id` of the last signal
                handled; without, its `accepted_at` (ms). None = the whole history.

        A stream broken by UNAVAILABLE is re-opened from the last signal received.
        """
        if waitpoint_id is None and isinstance(after, str):
            raise TypeError("without waitpoint_id, `after` is an accepted_at time in ms")
        cursor: str | int | None = after
        seen: set[str] = set()

        def request() -> signal_pb2.WatchSignalsRequest:
            req = signal_pb2.WatchSignalsRequest(execution_id=execution_id)
            if waitpoint_id is not None:
                req.waitpoint_id = waitpoint_id
                if cursor is not None:
                    req.after_stream_id = str(cursor)
            elif cursor is not None:
                req.after_accepted_at = int(cursor)
            return req

        async for message in self._transport.server_stream(
            self._transport.signals.WatchSignals, request
        ):
            signal = Signal.from_proto(message.signal)
            if signal.signal_id in seen:
                continue
            seen.add(signal.signal_id)
            if waitpoint_id is not None:
                cursor = signal.stream_id or cursor
            else:  # re-read the last millisecond on a reconnect; `seen` drops the repeats
                cursor = max(signal.accepted_at - 1, 0)
            yield signal

    async def watch_waitpoints(self, execution_id: str) -> AsyncGenerator[WaitpointEvent, None]:
        """Each open waitpoint (with its token), then each that opens or closes; ends when the
        execution is terminal. A stream broken by UNAVAILABLE is re-opened; waitpoints already
        reported are not repeated. A pending waitpoint is reported again (`opened`, state
        `active`) when a suspension activates it. The tokens are credentials: do not log the
        events."""
        seen: set[tuple[str, str, str]] = set()

        def request() -> signal_pb2.WatchWaitpointsRequest:
            return signal_pb2.WatchWaitpointsRequest(execution_id=execution_id)

        async for message in self._transport.server_stream(
            self._transport.signals.WatchWaitpoints, request
        ):
            event = WaitpointEvent.from_proto(message)
            state = event.waitpoint.state if event.waitpoint is not None else ""
            key = (event.kind, event.waitpoint_id, state)
            if key in seen:
                continue
            seen.add(key)
            yield event
