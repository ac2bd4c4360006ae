"""FlowFabric S1 (submit → claim → complete) through the full stack: `flowfabric serve` (its
own process, FF_VALKEY_URL at the shared Valkey) and workers in separate processes.

Enqueue: CreateExecution over gRPC, `--enqueue-concurrency` (64) in flight, through the SDK
`Client.submit` (kind `noop`, empty payload, lane `default`).

Workers (`--impl`):
* `sdk`: `flowfabric.Worker` (RegisterWorker + heartbeat, ClaimNext long-poll with
  `max_tasks` = free slots, one asyncio task per execution with lease renewal armed, a no-op
  handler, completion with the lease handle).
* `raw`: the generated stubs only: ClaimNext(max_tasks = free slots, wait_ms 1000) and the
  completion with the lease handle; no heartbeat, no renewal task.

`--complete`: `batch` (default) = natural batching, as the SDK Worker does: a completion with
none in flight is sent at once, the ones finishing meanwhile share the next CompleteExecutions
call, and with the SDK worker that call also claims work for the slots it frees (the SDK's
default `claim_with_completions`); `noclaim` = natural batching, claims through ClaimNext only
(the SDK's `claim_with_completions=False`: the lock-step cycle of 1153a33); `single` = one
CompleteExecution per task (the SDK's `batch_completions=False`). The raw stubs do the same
with their own slot accounting (`RawSlots`): `batch` = `--completion-calls` calls of at most
slots / calls items, each claiming for the slots it frees while the last claim came back
full; `noclaim` = one call in flight, ClaimNext only; `stream` = the server pushes work over one
`StreamWork` stream (max_in_flight = slots) and the completions are plain CompleteExecutions
batches (`--completion-calls` in flight), no claims at all.

`--procs P` splits the `slots` over P worker processes. The server is started after the
orchestrator's FLUSHALL (the partition config key lives in the keyspace) and stopped at the
end of the run; its CPU is read from /proc around each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

LANE = "default"
KIND = "noop"


# -- the server ---------------------------------------------------------------------------------


class Server:
    def __init__(self, valkey_url: str, log_dir: str) -> None:
        exe = Path(sys.executable).parent / "flowfabric"
        env = {
            **os.environ,
            "FF_VALKEY_URL": valkey_url.replace("redis://", "valkey://"),
            "FF_LISTEN_ADDR": "127.0.0.1:0",
            "FF_LOG_LEVEL": os.environ.get("FF_BENCH_SERVER_LOG_LEVEL", "warning"),
            # required with an external Valkey (waitpoint tokens); S1 never signs one
            "FF_WAITPOINT_HMAC_SECRET": os.environ.get(
                "FF_WAITPOINT_HMAC_SECRET", secrets.token_hex(32)
            ),
        }
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, "server.log")
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        argv = [str(exe), "serve"]
        wrap = os.environ.get("FF_BENCH_SERVER_WRAP")  # e.g. a profiler command prefix
        if wrap:
            argv = [*wrap.split(), *argv]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        deadline = time.monotonic() + 60
        self.target = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited ({self.proc.poll()}); see {self.log_path}")
            if line.startswith("flowfabric listening on "):
                self.target = line.split()[-1]
                break
        if not self.target:
            raise RuntimeError("server did not start")
        self.pid = self.server_pid()

    def server_pid(self) -> int:
        """The python process (a profiler wrapper may sit in between)."""
        if not os.environ.get("FF_BENCH_SERVER_WRAP"):
            return self.proc.pid
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            return int(kids[0]) if kids else self.proc.pid
        except OSError:
            return self.proc.pid

    def cpu(self) -> float:
        return common.proc_cpu(self.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- enqueue ------------------------------------------------------------------------------------


class Submitter:
    """CreateExecution through the SDK `Client.submit` (or the raw stub if the SDK is absent)."""

    def __init__(self, target: str) -> None:
        try:
            from flowfabric import Client
        except ImportError:
            import grpc

            from flowfabric.v1 import execution_pb2, execution_pb2_grpc

            self.client = None
            self.channel = grpc.aio.insecure_channel(target)
            stub = execution_pb2_grpc.ExecutionServiceStub(self.channel)

            async def raw() -> str:
                req = execution_pb2.CreateExecutionRequest(lane_id=LANE, execution_kind=KIND)
                return (await stub.CreateExecution(req)).created.execution_id

            self.submit = raw
        else:
            from flowfabric._transport import transport_of

            self.client = Client(target)
            self.channel = transport_of(self.client).channel  # submit on the client's channel

            async def sdk() -> str:
                return (await self.client.submit(KIND, lane=LANE)).execution_id

            self.submit = sdk

    async def close(self) -> None:
        await self.channel.close()


async def submit_all(target: str, jobs: int, concurrency: int) -> None:
    sub = Submitter(target)
    it = iter(range(jobs))

    async def one() -> None:
        for _ in it:
            await sub.submit()

    await asyncio.gather(*(one() for _ in range(concurrency)))
    await sub.close()


async def submit_open_loop(target: str, rate: float, duration: float) -> tuple[dict, float]:
    sub = Submitter(target)
    await sub.channel.channel_ready()  # connect before the clock starts

    async def send(_: int) -> str:
        return await sub.submit()

    try:
        return await common.open_loop_async(rate, duration, send)
    finally:
        await sub.close()


# -- workers ------------------------------------------------------------------------------------


async def worker_sdk(args: argparse.Namespace, progress: common.Progress, records: dict) -> None:
    from flowfabric import Worker

    keep = args.records is not None
    starts: dict[str, float] = {}

    class BenchWorker(Worker):
        async def _complete(self, ctx, result) -> None:
            await super()._complete(ctx, result)
            t1 = progress.finished()
            if keep:
                records[ctx.execution_id] = [starts.pop(ctx.execution_id), t1]

    worker = BenchWorker(
        args.target, lanes=[LANE], concurrency=args.slots, claim_wait_ms=1000, batch=True,
        worker_id="bench-sdk", lease_ttl_ms=30_000,
        batch_completions=args.complete != "single",
        claim_with_completions=args.complete == "batch",
        completion_calls=args.completion_calls,
    )  # fmt: skip

    @worker.handler(KIND)
    async def noop(ctx) -> None:
        t0 = progress.started()
        if keep:
            starts[ctx.execution_id] = t0

    await worker.start()
    await common.async_ready_then_wait_go(
        progress.board, args.index, lambda: common.dump_records(args.records, records)
    )
    await worker.run()


class RawCompleter:
    """The raw worker's completions: one CompleteExecution each, or natural batching (a
    completion is sent at once while fewer than `calls` calls are in flight; the ones
    finishing meanwhile share the next CompleteExecutions call, at most `max_items`). With
    `slots`, each call also claims (CompleteExecutionsRequest.claim) for the slots it frees
    plus the free unreserved ones, as the SDK worker does."""

    def __init__(self, stub, pb, batch: bool, calls: int = 1, max_items: int = 64,
                 slots: RawSlots | None = None) -> None:  # fmt: skip
        self.stub, self.pb, self.batch = stub, pb, batch
        self.calls, self.max_items, self.slots = calls, max_items, slots
        self.queue: list[tuple[object, asyncio.Future, object]] = []
        self.senders: set[asyncio.Task] = set()

    async def complete(self, lease, owner=None) -> None:
        if not self.batch:
            await self.stub.CompleteExecution(self.pb.CompleteExecutionRequest(lease=lease))
            return
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((lease, fut, owner))
        if len(self.senders) < self.calls:
            sender = asyncio.create_task(self.send_batches())
            self.senders.add(sender)
            sender.add_done_callback(self.senders.discard)
        await fut

    async def send_batches(self) -> None:
        while self.queue:
            batch = self.queue[: self.max_items]
            del self.queue[: self.max_items]
            items = [self.pb.CompleteExecutionRequest(lease=lease) for lease, _, _ in batch]
            request = self.pb.CompleteExecutionsRequest(items=items)
            ticket = self.slots.reserve([o for _, _, o in batch]) if self.slots else None
            if ticket is not None:
                request.claim.CopyFrom(ticket[0])
            try:
                reply = await self.stub.CompleteExecutions(request)
            except Exception as exc:
                if ticket is not None:
                    self.slots.settle(ticket, [], sent=False)
                for _, fut, _ in batch:
                    fut.set_exception(exc)
                continue
            if ticket is not None:
                self.slots.settle(ticket, list(reply.claimed), sent=True)
            for (_, fut, _), result in zip(batch, reply.results, strict=True):
                if result.WhichOneof("outcome") == "error":
                    fut.set_exception(RuntimeError(f"complete failed: {result.error.reason}"))
                else:
                    fut.set_result(None)


class RawSlots:
    """The raw worker's slot accounting (the SDK worker's, minus shutdown): a task whose
    completion is in a claiming call hands its slot to that call until the reply; ClaimNext
    asks only for slots nobody reserved; calls claim only while the last claim came back full."""

    def __init__(self, slots: int, claim_request, spawn) -> None:
        self.slots, self.claim_request, self.spawn = slots, claim_request, spawn
        self.running: set[asyncio.Task] = set()
        self.handed: set[asyncio.Task] = set()
        self.claiming = self.ahead = 0
        self.work_likely = False
        self.slot_free = asyncio.Event()

    def free(self) -> int:
        busy = len(self.running) - len(self.handed) + self.claiming + self.ahead
        return self.slots - busy

    def reserve(self, owners: list):
        if not self.work_likely:
            return None
        handed = [t for t in owners if t in self.running and t not in self.handed]
        self.handed.update(handed)
        n = self.free()
        if n <= 0:
            self.handed.difference_update(handed)
            return None
        self.ahead += n
        return self.claim_request(n, 0), handed, n

    def settle(self, ticket, claimed: list, sent: bool) -> None:
        _, handed, n = ticket
        self.ahead -= n
        if not sent:
            self.handed.difference_update(handed)
        else:
            self.work_likely = len(claimed) >= n
        for task in claimed:
            self.spawn(task)
        self.slot_free.set()

    def done(self, t: asyncio.Task) -> None:
        self.running.discard(t)
        self.handed.discard(t)
        self.slot_free.set()


async def worker_raw(args: argparse.Namespace, progress: common.Progress, records: dict) -> None:
    import grpc

    from flowfabric.v1 import worker_pb2, worker_pb2_grpc

    keep = args.records is not None
    channel = grpc.aio.insecure_channel(args.target)
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    wid, iid = "bench-raw", f"bench-raw-{os.getpid()}"
    await stub.RegisterWorker(
        worker_pb2.RegisterWorkerRequest(worker_id=wid, worker_instance_id=iid, lane_ids=[LANE])
    )
    await common.async_ready_then_wait_go(
        progress.board, args.index, lambda: common.dump_records(args.records, records)
    )

    def claim_request(max_tasks: int, wait_ms: int):
        return worker_pb2.ClaimNextRequest(
            worker_id=wid, worker_instance_id=iid, lane_ids=[LANE], lease_ttl_ms=30_000,
            wait_ms=wait_ms, max_tasks=max_tasks,
        )  # fmt: skip

    def spawn(task) -> None:
        t = asyncio.create_task(run(task))
        slots.running.add(t)
        t.add_done_callback(done)

    slots = RawSlots(args.slots, claim_request, spawn)
    claims = args.complete == "batch"
    calls = args.completion_calls if args.complete in ("batch", "stream") else 1
    complete = RawCompleter(
        stub, worker_pb2, args.complete != "single", calls=calls,
        max_items=min(64, -(-args.slots // calls)), slots=slots if claims else None,
    ).complete  # fmt: skip

    async def run(task) -> None:
        t0 = progress.started()
        # the no-op handler runs here
        await complete(task.lease, asyncio.current_task())
        t1 = progress.finished()
        if keep:
            records[task.lease.execution_id] = [t0, t1]

    def done(t: asyncio.Task) -> None:
        slots.done(t)
        if not t.cancelled() and t.exception() is not None:
            print("task failed:", repr(t.exception()), file=sys.stderr)

    if args.complete == "stream":
        await stream_loop(stub, worker_pb2, wid, iid, args.slots, spawn)
        return
    while True:
        free = slots.free()
        if free <= 0:
            slots.slot_free.clear()
            await slots.slot_free.wait()
            continue
        slots.claiming += free
        try:
            reply = await stub.ClaimNext(claim_request(free, 1000))
        finally:
            slots.claiming -= free
        which = reply.WhichOneof("outcome")
        tasks = [reply.task] if which == "task" else list(reply.batch.tasks)
        slots.work_likely = len(tasks) >= free
        for task in tasks:
            spawn(task)


async def stream_loop(stub, pb, wid: str, iid: str, slots: int, spawn) -> None:
    """`--complete stream`: the server pushes work (StreamWork, max_in_flight = slots) and
    frees a slot once the task's execution leaves its lease; the worker never claims."""
    call = stub.StreamWork(
        pb.StreamWorkRequest(
            worker_id=wid, worker_instance_id=iid, lane_ids=[LANE], lease_ttl_ms=30_000,
            max_in_flight=slots,
        )
    )  # fmt: skip
    async for reply in call:
        spawn(reply.task)


async def worker_main(args: argparse.Namespace) -> None:
    board = common.Board(args.board, args.slots_total)
    progress = common.Progress(board, args.index)
    records: dict[str, list[float]] = {}
    if args.impl == "sdk":
        await worker_sdk(args, progress, records)
    else:
        await worker_raw(args, progress, records)


# -- driver -------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser()
    common.common_args(p)
    p.add_argument("--impl", choices=("sdk", "raw"), default="sdk")
    p.add_argument("--procs", type=int, default=1, help="worker processes sharing the slots")
    p.add_argument(
        "--complete",
        choices=("batch", "noclaim", "single", "stream"),
        default="batch",
        help="completions: natural batching (CompleteExecutions) or one call each",
    )
    p.add_argument("--completion-calls", type=int, default=2,
                   help="SDK worker: CompleteExecutions calls in flight at once")  # fmt: skip
    p.add_argument("--enqueue-concurrency", type=int, default=64)
    p.add_argument("--target", help="(worker) server address")
    args = p.parse_args()
    if args.worker:
        asyncio.run(worker_main(args))
        return
    if args.slots % args.procs:
        raise SystemExit("--slots must be a multiple of --procs")
    impl_note = args.impl
    if args.impl == "sdk":
        try:
            from flowfabric import Worker  # noqa: F401
        except ImportError as exc:  # the SDK is being written elsewhere: fall back to stubs
            print(f"flowfabric.Worker unavailable ({exc}); using raw stubs", file=sys.stderr)
            args.impl, impl_note = "raw", "raw (sdk unavailable)"
    server = Server(args.url, args.log_dir)
    try:
        per = args.slots // args.procs
        me = [sys.executable, os.path.abspath(__file__), "--worker", "--url", args.url,
              "--slots", str(per), "--impl", args.impl, "--target", server.target,
              "--complete", args.complete,
              "--completion-calls", str(args.completion_calls)]  # fmt: skip
        argvs = [list(me) for _ in range(args.procs)]
        if args.mode == "latency":
            c0: list[float] = []
            out = common.run_latency(
                args,
                lambda: asyncio.run(submit_open_loop(server.target, args.rate, args.duration)),
                argvs, around=(lambda: c0.append(server.cpu()),
                               lambda: {"server_cpu_process_s": round(server.cpu() - c0[0], 3)}),
            )  # fmt: skip
        else:
            cpu: dict[str, float] = {}

            def enqueue() -> None:
                c0 = server.cpu()
                asyncio.run(submit_all(server.target, args.jobs, args.enqueue_concurrency))
                cpu["enqueue"] = server.cpu() - c0

            profiler: list[subprocess.Popen] = []

            def at_go() -> None:
                cpu["go"] = server.cpu()
                spy = os.environ.get("FF_BENCH_PYSPY")  # path to py-spy: profile the server
                if spy:
                    out = os.path.join(args.log_dir, "server-profile.txt")
                    extra = os.environ.get("FF_BENCH_PYSPY_ARGS", "").split()
                    if "--native" not in extra:  # --native needs the blocking mode
                        extra.append("--nonblocking")
                    profiler.append(subprocess.Popen(
                        [spy, "record", "--pid", str(server.pid), "--rate", "250",
                         "--format", "raw", "--output", out, *extra],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    ))  # fmt: skip
                    time.sleep(0.5)  # let it attach before the clock starts

            def at_done() -> dict:
                out = {
                    "server_cpu_enqueue_s": round(cpu["enqueue"], 3),
                    "server_cpu_process_s": round(server.cpu() - cpu["go"], 3),
                }
                for prof in profiler:
                    prof.send_signal(signal.SIGINT)
                    prof.wait(30)
                return out

            out = common.run_burn(
                args, enqueue, argvs, around=(at_go, at_done),
                extra=lambda: {"impl": impl_note, "complete": args.complete,
                               "enqueue_concurrency": args.enqueue_concurrency},
            )  # fmt: skip
    finally:
        server.stop()
    common.emit(out)


if __name__ == "__main__":
    main()
