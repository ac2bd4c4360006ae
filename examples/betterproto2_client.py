"""Submit, claim, complete and read a result with the betterproto2 dataclass stubs.

    pip install 'flowfabric[betterproto2]'
    python examples/betterproto2_client.py

The client side uses only `flowfabric.bp2.v1` (dataclass messages, synchronous grpcio stubs);
see docs/betterproto2.md.
"""

import asyncio
import json

import grpc
from _embedded import server

from flowfabric.bp2 import v1 as bp


def run(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        executions = bp.ExecutionServiceStub(channel)
        workers = bp.WorkerServiceStub(channel)
        created = executions.create_execution(
            bp.CreateExecutionRequest(
                lane_id="default",
                execution_kind="greet",
                input_payload=json.dumps({"name": "dataclasses"}).encode(),
                payload_encoding="json",
            )
        )
        record = created.created or created.duplicate
        assert record is not None
        print("submitted:", record.execution_id)
        claimed = workers.claim_next(
            bp.ClaimNextRequest(
                worker_id="bp2-example",
                worker_instance_id="bp2-example-1",
                lane_ids=["default"],
                wait_ms=5000,
            )
        )
        task = claimed.task
        assert task is not None and task.lease is not None, claimed
        name = json.loads(task.payload)["name"]
        print("claimed:", task.execution_kind, "attempt", task.lease.attempt_index)
        workers.complete_execution(
            bp.CompleteExecutionRequest(
                lease=task.lease,
                result_payload=json.dumps({"greeting": f"hello, {name}"}).encode(),
                result_encoding="json",
            )
        )
        result = executions.get_execution_result(
            bp.GetExecutionResultRequest(execution_id=record.execution_id)
        )
        print("result:", result.result_payload.decode())


async def main() -> None:
    async with server() as target:
        await asyncio.to_thread(run, target)  # the generated stubs are synchronous


asyncio.run(main())
