"""Human approval with suspension and signals: `python examples/approval.py --auto-approve`.

- A worker drafts a document and suspends on `review` (10-minute timeout): the lease is released
  and nothing runs while the execution waits.
- A reviewer learns the waitpoint and its token from `watch_waitpoints` (the CLI equivalent is
  `flowfabric waitpoints <id>`) and delivers `review` with {"approved": true} (or false with
  `--reject`; without either flag it asks on the terminal). `--tamper` first sends a token with
  one character changed and shows the server refusing it (PERMISSION_DENIED invalid_token).
- The signal resumes the execution: the worker claims it again (same attempt), the handler runs
  again from the top, finds the review in `ctx.resume_signals` and completes or fails.
- Early signals: a second handler creates a pending waitpoint, hands its token to a "payment
  provider" that confirms before the handler even suspends; the confirmation is buffered, and
  `suspend(waitpoint=...)` finds it already there: no suspension, the handler just continues.
Exits non-zero if any outcome differs from the above.
"""

import argparse
import asyncio
import sys
from typing import Any

from _embedded import server

from flowfabric import (
    Client,
    ExecutionState,
    InvalidWaitpointToken,
    NonRetryableError,
    PendingWaitpoint,
    TaskContext,
    Waitpoint,
    Worker,
)

REVIEWER = "reviewer@example.com"


def kid(token: str) -> str:
    """Tokens are credentials: show only the key id."""
    return token.split(":", 1)[0] + ":…"


def make_worker(client: Client) -> Worker:
    worker = Worker(client, concurrency=4, lease_ttl_ms=10_000)

    @worker.handler("draft")
    async def draft(ctx: TaskContext) -> dict[str, Any]:
        # The handler re-runs from the top after the resume: cheap steps may simply run again.
        document = f"Release notes for {ctx.json()['title']}"
        if not ctx.resume_signals:
            print(f"[worker]   drafted {document!r}; suspending until it is reviewed")
        review = await ctx.wait_for_signal("review", timeout=600, reason="waiting_for_approval")
        verdict = review.json()
        print(
            f"[worker]   resumed (attempt {ctx.attempt_index} again, resumed={ctx.resumed}): "
            f"review by {review.source_identity}: {verdict}"
        )
        if not verdict["approved"]:
            raise NonRetryableError(f"rejected by {review.source_identity}: {verdict['comment']}")
        return {"document": document, "approved_by": review.source_identity}

    @worker.handler("checkout")
    async def checkout(ctx: TaskContext) -> dict[str, Any]:
        wp = await ctx.create_waitpoint(expires_in=60)
        print(f"[worker]   pending waitpoint {wp.id} created; charging the card")
        await payment_provider(client, wp, amount=ctx.json()["amount"])
        matched = await ctx.suspend(
            "payment_confirmed", waitpoint=wp, timeout=600, reason="waiting_for_callback"
        )
        print("[worker]   the early confirmation already met the condition: not suspended")
        return {"paid": matched[0].json()}

    return worker


async def payment_provider(client: Client, wp: PendingWaitpoint, amount: int) -> None:
    """An external system that calls back before the charge request even returns."""
    delivery = await client.deliver_signal(
        wp.execution_id, wp.id, "payment_confirmed", wp.token, {"amount": amount},
        source_type="webhook", source_identity="payments", idempotency_key=f"charge-{wp.id}",
    )  # fmt: skip
    print(f"[provider] confirmation sent early: {delivery.effect}")


async def active_waitpoint(client: Client, execution_id: str) -> Waitpoint:
    async for event in client.watch_waitpoints(execution_id):
        if event.kind == "opened" and event.waitpoint and event.waitpoint.state == "active":
            return event.waitpoint
    raise RuntimeError(f"{execution_id} ended without waiting for a review")


async def decide(args: argparse.Namespace) -> bool:
    if args.auto_approve or args.reject:
        return bool(args.auto_approve)
    if not sys.stdin.isatty():
        # No terminal (CI, a pipe, `< /dev/null`): take a piped answer if there is one,
        # and approve when stdin is empty, so the example still runs end to end.
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            print("[reviewer] no terminal and no piped answer: approving (--reject to reject)")
            return True
        return line.strip().lower() in ("y", "yes")
    answer = await asyncio.to_thread(input, "[reviewer] approve the draft? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


async def review(client: Client, execution_id: str, args: argparse.Namespace) -> bool:
    wp = await active_waitpoint(client, execution_id)
    print(
        f"[reviewer] {execution_id} waits on {wp.id} for {list(wp.signal_names)} "
        f"(token {kid(wp.token)}, times out at {wp.expires_at} ms)"
    )
    ok = True
    if args.tamper:
        forged = wp.token[:-1] + ("0" if wp.token[-1] != "0" else "1")
        try:
            await client.deliver_signal(execution_id, wp.id, "review", forged, {"approved": True})
        except InvalidWaitpointToken as exc:
            print(f"[reviewer] tampered token refused: {exc.code.name} {exc.reason}")
            ok = exc.reason == "invalid_token"
        else:
            print("[reviewer] UNEXPECTED: a tampered token was accepted")
            ok = False
    approved = await decide(args)
    payload = {"approved": approved, "comment": "ship it" if approved else "needs work"}
    print(
        f"[reviewer] sending review {payload} (CLI: flowfabric signal {execution_id} review "
        f"--payload '{{\"approved\": {str(approved).lower()}}}')"
    )
    delivery = await client.deliver_signal(
        execution_id, wp.id, "review", wp.token, payload, category="approval",
        source_type="user", source_identity=REVIEWER, idempotency_key=f"review-{wp.id}",
    )  # fmt: skip
    print(f"[reviewer] delivered: {delivery.effect}")
    return ok and delivery.resumed


async def main(args: argparse.Namespace) -> int:
    async with server() as target, Client(target) as client:
        worker = make_worker(client)
        async with worker:
            running = asyncio.create_task(worker.run())
            print("-- approval: suspend, review, resume")
            doc = await client.submit("draft", {"title": "v2.0"})
            reviewed = await review(client, doc.execution_id, args)
            final_doc = await client.wait(doc.execution_id, timeout=60)
            print(f"draft     {final_doc.name.lower()}")
            if final_doc is ExecutionState.COMPLETED:
                print(f"          result: {(await client.result(doc.execution_id)).decode()}")
            print("-- early signal: pending waitpoint, then suspend(waitpoint=...)")
            pay = await client.submit("checkout", {"amount": 4200})
            final_pay = await client.wait(pay.execution_id, timeout=60)
            paid = (await client.result(pay.execution_id)).decode()
            print(f"checkout  {final_pay.name.lower()}: {paid}")
            worker.stop()
            await running
        stats = worker.stats

    approved = final_doc is ExecutionState.COMPLETED
    ok = reviewed and final_pay is ExecutionState.COMPLETED
    ok = ok and (approved == bool(args.auto_approve) if args.auto_approve or args.reject else True)
    ok = ok and stats.suspended == 1 and stats.claimed == 3  # draft twice, checkout once
    print("as expected" if ok else "UNEXPECTED OUTCOME")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--auto-approve", action="store_true", help="approve without asking")
    choice.add_argument("--reject", action="store_true", help="reject without asking")
    parser.add_argument("--tamper", action="store_true", help="first try a forged token")
    sys.exit(asyncio.run(main(parser.parse_args())))
