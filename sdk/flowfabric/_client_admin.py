"""The client's AdminService part: waitpoint signing keys."""

from __future__ import annotations

from flowfabric._signals import Duration, SecretRotation, WaitpointKids, duration_ms
from flowfabric._transport import Connected
from flowfabric.v1 import admin_pb2

#: RotateWaitpointSecret fans out to every partition; the server gives up after 120 s.
ROTATE_DEADLINE_S = 130.0


class AdminMixin(Connected):
    """Operator calls (AdminService)."""

    async def rotate_waitpoint_secret(
        self, kid: str, secret_hex: str, *, grace: Duration | None = None
    ) -> SecretRotation:
        """Sign new waitpoint tokens with (`kid`, `secret_hex`) on every partition; tokens of
        the outgoing kid stay valid for `grace` (default: the server's
        FF_WAITPOINT_HMAC_GRACE_MS). Retrying the same kid and secret is safe and converges, so
        the call is retried on UNAVAILABLE. Use a kid never used before.

        Raises:
            InvalidArgument: `invalid_kid`, `invalid_secret_hex`, `invalid_grace_ms`.
            AlreadyExists: `rotation_conflict`: the kid exists with another secret.
            ResourceExhausted: Another rotation is running.
        """
        request = admin_pb2.RotateWaitpointSecretRequest(new_kid=kid, new_secret_hex=secret_hex)
        if grace is not None:
            request.grace_ms = duration_ms(grace, "grace")
        reply = await self._transport.unary(
            self._transport.admin.RotateWaitpointSecret,
            request,
            deadline=max(self._transport.default_timeout, ROTATE_DEADLINE_S),
        )
        return SecretRotation(reply.new_kid, reply.rotated, tuple(reply.failed))

    async def waitpoint_kids(self, partition: int | None = None) -> WaitpointKids:
        """One partition's keystore (default 0): the signing kid and the older kids still in
        their grace period. No secrets."""
        request = admin_pb2.ListWaitpointKidsRequest()
        if partition is not None:
            request.partition = partition
        reply = await self._transport.unary(self._transport.admin.ListWaitpointKids, request)
        kids = reply.kids
        return WaitpointKids(
            reply.partition,
            kids.current_kid if kids.HasField("current_kid") else None,
            {v.kid: v.expires_at_ms for v in kids.verifying},
        )
