"""The key schema (docs/architecture.md#key-schema), in one place. Servicers never format key
strings.

Execution keys are `<prefix>:{fp:N}:<eid>:<suffix>`; the execution id itself starts with
`{fp:N}:`, so the literal key carries the tag twice and the first one routes. Every key one
FCALL receives is built from the same `ExecutionId`, so every call is single-slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowfabric.server.valkey.ids import ExecutionId

PARTITION_CONFIG = "ff:config:partitions"
WORKERS_INDEX = "ff:idx:workers"
DURABILITY_TICK = "ff:durability:tick"
# lane control states (docs/lanes.md#lane-control): lane -> JSON {state, reason, at}
LANE_CONTROL = "ff:config:lane_control"
# bulk jobs (docs/lanes.md#bulk-actions): every job id by creation time, and the running ones
BULK_INDEX = "ff:idx:bulk"
BULK_RUNNING = "ff:idx:bulk:running"


def durability_tick(first_key: str) -> str:
    """The counter a durability round increments (docs/durability.md#batched-rounds): in the
    slot of `first_key` (its hash tag, or the whole key), so on Cluster it lands on the node that
    ran the call."""
    start = first_key.find("{")
    end = first_key.find("}", start + 1) if start >= 0 else -1
    tag = first_key[start + 1 : end] if end > start + 1 else first_key
    return f"{DURABILITY_TICK}:{{{tag}}}"


def noop(tag: str) -> str:
    """Placeholder for an absent optional key; keeps the KEYS list single-slot."""
    return f"ff:noop:{tag}"


@dataclass(frozen=True)
class ExecKeys:
    """Every per-execution key of one execution."""

    eid: ExecutionId

    @property
    def tag(self) -> str:
        return self.eid.tag

    def _k(self, suffix: str) -> str:
        return f"ff:exec:{self.tag}:{self.eid}:{suffix}"

    @property
    def core(self) -> str:
        return self._k("core")

    @property
    def payload(self) -> str:
        return self._k("payload")

    @property
    def result(self) -> str:
        return self._k("result")

    @property
    def policy(self) -> str:
        return self._k("policy")

    @property
    def tags(self) -> str:
        return self._k("tags")

    @property
    def claim_grant(self) -> str:
        return self._k("claim_grant")

    @property
    def lease_current(self) -> str:
        return self._k("lease:current")

    @property
    def lease_history(self) -> str:
        return self._k("lease:history")

    @property
    def attempts(self) -> str:
        return self._k("attempts")

    @property
    def suspension_current(self) -> str:
        return self._k("suspension:current")

    @property
    def waitpoints(self) -> str:
        """Set of every waitpoint id of the execution (pending ones included)."""
        return self._k("waitpoints")

    @property
    def signals(self) -> str:
        """Zset of every accepted signal id, scored by accepted_at; never trimmed."""
        return self._k("signals")

    @property
    def deps_meta(self) -> str:
        """A flow member's join and dependency counters (docs/flows.md#keys)."""
        return self._k("deps:meta")

    @property
    def deps_unresolved(self) -> str:
        return self._k("deps:unresolved")

    def dep(self, edge_id: str) -> str:
        """The member's copy of inbound edge `edge_id`, with its resolution state."""
        return self._k(f"dep:{edge_id}")

    def attempt(self, index: int) -> str:
        return f"ff:attempt:{self.tag}:{self.eid}:{index}"

    def attempt_usage(self, index: int) -> str:
        return f"{self.attempt(index)}:usage"

    def attempt_policy(self, index: int) -> str:
        return f"{self.attempt(index)}:policy"

    def stream(self, index: int) -> str:
        return f"ff:stream:{self.tag}:{self.eid}:{index}"

    def stream_meta(self, index: int) -> str:
        return f"{self.stream(index)}:meta"

    def idempotency(self, namespace: str, key: str) -> str:
        return f"ff:idem:{self.tag}:{namespace}:{key}"


@dataclass(frozen=True)
class WaitpointKeys:
    """Keys of one waitpoint (and its signals) on the execution's tag."""

    tag: str
    waitpoint_id: str

    @property
    def waitpoint(self) -> str:
        return f"ff:wp:{self.tag}:{self.waitpoint_id}"

    @property
    def condition(self) -> str:
        return f"{self.waitpoint}:condition"

    @property
    def stream(self) -> str:
        """Per-waitpoint signal history (stream, MAXLEN ~ signal_maxlen)."""
        return f"{self.waitpoint}:signals"

    def dedup(self, idempotency_key: str) -> str:
        return f"ff:sigdedup:{self.tag}:{self.waitpoint_id}:{idempotency_key}"


def signal_key(tag: str, signal_id: str) -> str:
    return f"ff:signal:{tag}:{signal_id}"


def signal_payload_key(tag: str, signal_id: str) -> str:
    return f"{signal_key(tag, signal_id)}:payload"


@dataclass(frozen=True)
class PartitionKeys:
    """Per-partition indexes (docs/architecture.md#key-schema) of the flow/execution family."""

    tag: str

    @classmethod
    def of(cls, partition: int) -> PartitionKeys:
        return cls(f"{{fp:{partition}}}")

    def lane(self, lane: str, which: str) -> str:
        """`which`: eligible, delayed, active, suspended, terminal, blocked:<reason>."""
        return f"ff:idx:{self.tag}:lane:{lane}:{which}"

    def lane_namespace(self, lane: str, namespace: str) -> str:
        """The eligible ids of one namespace in the lane, scored as `eligible`
        (docs/lifecycle.md#tenant-fairness)."""
        return self.lane(lane, f"eligible:ns:{namespace}")

    def lane_namespaces(self, lane: str) -> str:
        """The lane's namespaces with eligible work, scored by virtual time
        (docs/lifecycle.md#tenant-fairness)."""
        return self.lane(lane, "eligible:namespaces")

    def _idx(self, name: str) -> str:
        return f"ff:idx:{self.tag}:{name}"

    def index(self, name: str) -> str:
        """`ff:idx:{p}:<name>`: the partition's index `name` (`lease_expiry`,
        `lane:<lane>:eligible`, ...), as `ff_probe_due` builds it
        (docs/architecture.md#scanners)."""
        return self._idx(name)

    @property
    def lease_expiry(self) -> str:
        return self._idx("lease_expiry")

    @property
    def attempt_timeout(self) -> str:
        return self._idx("attempt_timeout")

    @property
    def execution_deadline(self) -> str:
        return self._idx("execution_deadline")

    @property
    def suspension_timeout(self) -> str:
        return self._idx("suspension_timeout")

    @property
    def pending_waitpoint_expiry(self) -> str:
        return self._idx("pending_waitpoint_expiry")

    @property
    def all_executions(self) -> str:
        return self._idx("all_executions")

    @property
    def lanes(self) -> str:
        return self._idx("lanes")

    def worker_leases(self, worker_instance_id: str) -> str:
        return self._idx(f"worker:{worker_instance_id}:leases")

    @property
    def hmac_keystore(self) -> str:
        """Waitpoint HMAC keystore; identical on every partition
        (docs/suspension.md#the-keystore)."""
        return f"ff:sec:{self.tag}:waitpoint_hmac"

    @property
    def flow_index(self) -> str:
        """Every flow on the partition (docs/flows.md#keys)."""
        return self._idx("flow_index")

    @property
    def cancel_backlog(self) -> str:
        """Flows owing member cancels, by due time (docs/flows.md#cancelling-a-flow)."""
        return self._idx("cancel_backlog")

    @property
    def deps_pending(self) -> str:
        """Flow members whose outgoing edges a terminal call left unresolved past its per-call
        bound; read by the dependency reconciler (docs/flows.md#the-dependency-reconciler)."""
        return self._idx("deps_pending")

    @property
    def exec_events(self) -> str:
        return f"ff:exec_events:{self.tag}"

    @property
    def ready(self) -> str:
        """Where flow work became claimable, and dependency resolutions left over
        (docs/lifecycle.md#work-off-the-lane-partition)."""
        return f"ff:ready:{self.tag}"

    @property
    def signal_events(self) -> str:
        return f"ff:signal_events:{self.tag}"

    @property
    def noop(self) -> str:
        return noop(self.tag)


@dataclass(frozen=True)
class FlowKeys:
    """Keys of one flow (docs/flows.md#keys), on the flow's partition tag: the same tag as every
    member's keys, so one call may touch the flow and its members."""

    tag: str
    flow_id: str

    def _k(self, suffix: str) -> str:
        return f"ff:flow:{self.tag}:{self.flow_id}:{suffix}"

    @property
    def core(self) -> str:
        return self._k("core")

    @property
    def members(self) -> str:
        return self._k("members")

    @property
    def tags(self) -> str:
        return self._k("tags")

    @property
    def refs(self) -> str:
        """SubmitFlow's member keys -> execution ids."""
        return self._k("refs")

    @property
    def failures(self) -> str:
        """The first member failures (list of JSON records)."""
        return self._k("failures")

    @property
    def pending_cancels(self) -> str:
        """Members still owed a cancel (docs/flows.md#cancelling-a-flow)."""
        return self._k("pending_cancels")

    @property
    def cancel_attempts(self) -> str:
        """Failed cancel attempts per member owed one (bounded retries)."""
        return self._k("cancel_attempts")

    def edge(self, edge_id: str) -> str:
        return self._k(f"edge:{edge_id}")

    def outgoing(self, eid: str) -> str:
        return self._k(f"out:{eid}")

    def incoming(self, eid: str) -> str:
        return self._k(f"in:{eid}")


@dataclass(frozen=True)
class BulkKeys:
    """The keys of one bulk job (docs/lanes.md#bulk-actions): global (no hash tag), not
    execution state; each is read and written alone."""

    bulk_id: str

    @property
    def job(self) -> str:
        return f"ff:bulk:{self.bulk_id}"

    @property
    def lease(self) -> str:
        return f"ff:bulk:{self.bulk_id}:lease"

    @staticmethod
    def request(request_id: str) -> str:
        return f"ff:bulk:request:{request_id}"


@dataclass(frozen=True)
class WorkerKeys:
    """The registry keys of one worker instance: global (no hash tag), not execution state."""

    instance: str

    @property
    def info(self) -> str:
        return f"ff:worker:{self.instance}"

    @property
    def caps(self) -> str:
        return f"{self.info}:caps"

    @property
    def alive(self) -> str:
        return f"{self.info}:alive"


@dataclass(frozen=True)
class BudgetKeys:
    """Keys of one budget and its partition's indexes (docs/budgets.md#keys), all on the budget
    partition's tag `{b:M}`. With `budget_id=""` only the partition keys are meaningful."""

    tag: str
    budget_id: str = ""

    @classmethod
    def of(cls, partition: int, budget_id: str = "") -> BudgetKeys:
        return cls(f"{{b:{partition}}}", budget_id)

    @property
    def definition(self) -> str:
        return f"ff:budget:{self.tag}:{self.budget_id}"

    @property
    def limits(self) -> str:
        return f"{self.definition}:limits"

    @property
    def usage(self) -> str:
        return f"{self.definition}:usage"

    @property
    def waiters(self) -> str:
        """Executions blocked on this budget: sorted set, execution id -> block time
        (docs/budgets.md#waking-blocked-work)."""
        return f"{self.definition}:waiters"

    @property
    def reserved(self) -> str:
        """Outstanding reservations: hash, dimension -> sum held (docs/budgets.md#reservations)."""
        return f"{self.definition}:reserved"

    @property
    def holds(self) -> str:
        """Per-execution reservations: hash, execution id -> JSON {dimension: amount held}."""
        return f"{self.definition}:holds"

    @property
    def inflight(self) -> str:
        """Executions admitted on this budget and not yet released: sorted set, execution id
        -> admission time (docs/budgets.md#hard-limit-actions)."""
        return f"{self.definition}:inflight"

    @property
    def resets(self) -> str:
        return f"ff:idx:{self.tag}:budget_resets"

    @property
    def policies(self) -> str:
        return f"ff:idx:{self.tag}:budget_policies"

    def dedup(self, raw: str) -> str:
        """The usage dedup marker of a caller's raw id, wrapped in the partition's tag (scoped
        to the partition, not the budget: docs/budgets.md#dedup)."""
        return f"ff:usagededup:{self.tag}:{raw}"

    @property
    def noop(self) -> str:
        return noop(self.tag)


@dataclass(frozen=True)
class ScheduleKeys:
    """Keys of one schedule and its partition's indexes, all on `{sp:N}`
    (docs/schedules.md#keys). With `schedule_id=""` only the partition keys are meaningful."""

    tag: str
    schedule_id: str = ""

    @classmethod
    def of(cls, partition: int, schedule_id: str = "") -> ScheduleKeys:
        return cls(f"{{sp:{partition}}}", schedule_id)

    @property
    def definition(self) -> str:
        return f"ff:sched:{self.tag}:{self.schedule_id}"

    @property
    def due(self) -> str:
        """Active schedules: sorted set, schedule id -> cursor (the next slot)."""
        return f"ff:idx:{self.tag}:schedule_due"

    @property
    def all(self) -> str:
        """Every schedule of the partition: set of schedule ids."""
        return f"ff:idx:{self.tag}:schedules"


@dataclass(frozen=True)
class QuotaKeys:
    """Keys of one quota policy and its partition's index (docs/budgets.md#keys), all on the
    quota partition's tag `{q:K}`. With a `concurrency_key` the bucket keys (window, counter,
    admitted set, waiters) are that key's own (docs/budgets.md#per-key-limits); the definition
    and the indexes are the policy's."""

    tag: str
    quota_policy_id: str = ""
    concurrency_key: str = ""

    @classmethod
    def of(cls, partition: int, quota_policy_id: str = "", concurrency_key: str = "") -> QuotaKeys:
        return cls(f"{{q:{partition}}}", quota_policy_id, concurrency_key)

    def bucket(self, concurrency_key: str) -> QuotaKeys:
        """The same policy's bucket for `concurrency_key` ("" = policy-wide)."""
        return QuotaKeys(self.tag, self.quota_policy_id, concurrency_key)

    @property
    def definition(self) -> str:
        return f"ff:quota:{self.tag}:{self.quota_policy_id}"

    @property
    def _prefix(self) -> str:
        if self.concurrency_key:
            return f"{self.definition}:k:{self.concurrency_key}"
        return self.definition

    @property
    def window(self) -> str:
        """One member per admission (`<eid>:<seq>`) -> admission time."""
        if self.concurrency_key:
            return f"{self._prefix}:window"
        return f"{self.definition}:window:requests_per_window"

    @property
    def concurrency(self) -> str:
        return f"{self._prefix}:concurrency"

    @property
    def admitted(self) -> str:
        """Executions holding a slot: sorted set, execution id -> admission time."""
        return f"{self._prefix}:admitted"

    @property
    def keys_index(self) -> str:
        """The policy's concurrency keys in use (set)."""
        return f"{self.definition}:keys"

    @property
    def admission_seq(self) -> str:
        return f"{self.definition}:admission_seq"

    def waiters(self, concurrency_key: str | None = None) -> str:
        """Executions blocked on this policy (for `concurrency_key`, when given; else this
        bucket's key): sorted set, execution id -> block time
        (docs/budgets.md#waking-blocked-work)."""
        ck = self.concurrency_key if concurrency_key is None else concurrency_key
        if ck:
            return f"{self.definition}:k:{ck}:waiters"
        return f"{self.definition}:waiters"

    @property
    def policies(self) -> str:
        return f"ff:idx:{self.tag}:quota_policies"
