"""`flowfabric serve` as a real process: boots on the embedded Valkey, stops cleanly on SIGTERM;
the signal, waitpoint, resume, key-rotation and flow commands as real processes against a
server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowfabric.server.config import Config, ConfigError
from tests.api.test_lifecycle import claim_next
from tests.conftest import API_TOKEN, Api

# The commands' own behaviour (parsing, printing, exit codes) is the same on either topology, and
# the server paths they drive are tested on both in tests/api: these run on standalone only.
standalone = pytest.mark.parametrize("valkey_url", ["standalone"], indirect=True)
CLI = [sys.executable, "-c", "from flowfabric.cli import main; main()"]


@pytest.mark.parametrize("data_dir", ["absolute", "default"])
def test_serve_boots_embedded_and_stops_on_sigterm(tmp_path: Path, data_dir: str) -> None:
    """`default` is the README's first command: the relative `./.flowfabric` data dir."""
    log = tmp_path / "serve.log"
    argv = [*CLI, "serve", "--listen-addr", "127.0.0.1:0"]
    if data_dir == "absolute":
        argv += ["--data-dir", str(tmp_path / "d")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FF_")}
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=tmp_path, env=env
        ) as proc,
    ):
        _serve_and_stop(proc, log)
    # the embedded Valkey was stopped with its data (and the generated token secret) on disk
    stored = tmp_path / ("d" if data_dir == "absolute" else ".flowfabric")
    assert (stored / "appendonlydir").is_dir()
    assert (stored / "waitpoint_hmac_secret").stat().st_mode & 0o777 == 0o600


def test_serve_refuses_a_taken_port(tmp_path: Path) -> None:
    """No silent SO_REUSEPORT sharing: a second server on the same port exits 1."""
    first = [*CLI, "serve", "--data-dir", str(tmp_path / "a"), "--listen-addr", "127.0.0.1:0"]
    with subprocess.Popen(
        first, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline().rsplit(":", 1)[1])
            second = subprocess.run(
                [*CLI, "serve", "--data-dir", str(tmp_path / "b"),
                 "--listen-addr", f"127.0.0.1:{port}"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert second.returncode == 1, second.stderr
            assert f"cannot bind 127.0.0.1:{port}" in second.stderr
            assert proc.poll() is None, "the first server is unaffected"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def _serve_and_stop(proc: subprocess.Popen[str], log: Path) -> None:
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("flowfabric listening on 127.0.0.1:"), log.read_text()
        port = int(line.rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_configuration_exits_1_naming_the_variable(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "serve", "--flow-partitions", "zero"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert "FF_FLOW_PARTITIONS" in done.stderr


def test_malformed_valkey_url_exits_1_naming_it_without_a_traceback() -> None:
    secret = "ab" * 32
    env = {**os.environ, "FF_VALKEY_URL": "redis://u:pw@h:x", "FF_WAITPOINT_HMAC_SECRET": secret}
    done = subprocess.run([*CLI, "serve"], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 1, done.stderr
    assert "FF_VALKEY_URL" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "pw" not in done.stderr  # credentials are masked
    for bad in ("notaurl", "http://h:6379", "redis://:@/", "redis://h:70000", "unix://"):
        with pytest.raises(ConfigError, match="FF_VALKEY_URL"):
            Config.load([], env={"FF_VALKEY_URL": bad, "FF_WAITPOINT_HMAC_SECRET": secret})
    for good in ("valkey://h:6379", "rediss://u:pw@h", "redis://h/2?cluster=1", "unix:///tmp/v.s"):
        env = {"FF_VALKEY_URL": good, "FF_WAITPOINT_HMAC_SECRET": secret}
        assert Config.load([], env=env).valkey_url == good


def test_config_from_env_and_flags() -> None:
    env = {"FF_LISTEN_ADDR": "127.0.0.1:1", "FF_LANES": "a,b", "FF_API_TOKEN": ""}
    cfg = Config.load(["--listen-addr", "127.0.0.1:2"], env=env)
    assert cfg.listen_addr == "127.0.0.1:2"  # a flag wins over the environment
    assert cfg.lanes == ("a", "b")
    assert cfg.api_token is None  # empty string = unset
    assert cfg.embedded
    assert cfg.interval_ms("FF_LEASE_EXPIRY_INTERVAL_MS") == 1500
    assert (
        Config.load([], env={"FF_UNBLOCK_INTERVAL_S": "7"}).interval_ms("FF_UNBLOCK_INTERVAL_S")
        == 7000
    )
    weights = Config.load([], env={"FF_TENANT_WEIGHTS": "acme=3, a=b=2,,other=1"})
    assert weights.tenant_weights == {"acme": 3, "a=b": 2, "other": 1}
    assert Config.load([], env={}).tenant_weights == {}
    for bad in (
        {"FF_TENANT_WEIGHTS": "acme"},
        {"FF_TENANT_WEIGHTS": "acme=0"},
        {"FF_TENANT_WEIGHTS": "acme=1001"},
        {"FF_TENANT_WEIGHTS": "acme=1,acme=2"},
        {"FF_LANES": "a,a"},
        {"FF_TLS_CERT": "x"},
        {"FF_WAITPOINT_HMAC_SECRET": "abc"},
        {"FF_LEASE_EXPIRY_INTERVAL_MS": "10"},
    ):
        try:
            Config.load([], env=bad)
        except ConfigError as exc:
            assert next(iter(bad)) in str(exc) or "FF_TLS" in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")


# -- signals, waitpoints, resume, key rotation (client commands against the in-process server) --


async def _cli(api: Any, *args: str) -> subprocess.CompletedProcess[str]:
    base = [*CLI, "--target", api.address, "--token", API_TOKEN]
    return await asyncio.to_thread(
        subprocess.run, [*base, *args], capture_output=True, text=True, timeout=60
    )


@standalone
async def test_signal_waitpoints_watch_signals_resume(api: Api) -> None:
    from flowfabric import Client, ExecutionState, TaskContext, Worker
    from tests.sdk.conftest import running

    async with Client(api.address, token=API_TOKEN) as client:
        worker = Worker(client, lanes=["cli-signals"], claim_wait_ms=200)

        @worker.handler("review")
        async def review(ctx: TaskContext) -> Any:
            if ctx.resumed and not ctx.resume_signals:
                return "operator"
            return (await ctx.wait_for_signal("review")).json()

        first = (await client.submit("review", lane="cli-signals")).execution_id
        second = (await client.submit("review", lane="cli-signals")).execution_id
        async with running(worker):
            wp = await _suspended(client, first)
            await _suspended(client, second)
            listed = await _cli(api, "waitpoints", first)
            assert listed.returncode == 0, listed.stderr
            header, row = listed.stdout.splitlines()
            assert header.split() == ["WAITPOINT_ID", "STATE", "SIGNALS", "TOKEN", "EXPIRES_AT"]
            assert row.split() == [wp.id, "active", "review", wp.token, "-"]

            tampered = wp.token[:-1] + ("0" if wp.token[-1] != "0" else "1")
            denied = await _cli(api, "signal", first, "review", "--waitpoint", wp.id,
                                "--token", tampered)  # fmt: skip
            assert denied.returncode == 1 and "PERMISSION_DENIED invalid_token" in denied.stderr
            assert tampered not in denied.stderr + denied.stdout
            not_json = await _cli(api, "signal", first, "review", "--payload", "{nope")
            assert not_json.returncode == 2 and "not JSON" in not_json.stderr
            no_wp = await _cli(api, "signal", first, "other-name", "--waitpoint", "x")
            assert no_wp.returncode == 3

            sent = await _cli(api, "signal", first, "review", "--payload", '{"approved": true}',
                              "--idempotency-key", "cli-review")  # fmt: skip
            assert sent.returncode == 0, sent.stderr
            assert "resume_condition_satisfied" in sent.stdout and wp.id in sent.stdout
            assert await client.wait(first, timeout=20) is ExecutionState.COMPLETED
            assert await client.result(first) == b'{"approved":true}'

            resumed = await _cli(api, "resume", second)
            assert resumed.returncode == 0 and "waiting" in resumed.stdout, resumed.stderr
            assert await client.wait(second, timeout=20) is ExecutionState.COMPLETED
            again = await _cli(api, "resume", second)
            assert again.returncode == 1 and "execution_not_suspended" in again.stderr

        watched = await _cli(api, "watch-signals", first)  # stored history, then ends: terminal
        assert watched.returncode == 0, watched.stderr
        (line,) = watched.stdout.splitlines()
        assert line.split("  ")[1:] == [
            "review",
            "resume_condition_satisfied",
            '{"approved": true}',
        ]
        missing = await _cli(api, "signal", "{fp:1}:00000000-0000-4000-8000-000000000000", "x")
        assert missing.returncode == 3 and "execution_not_found" in missing.stderr


async def _suspended(client: Any, eid: str) -> Any:
    async for event in client.watch_waitpoints(eid):
        if event.kind == "opened" and event.waitpoint.state == "active":
            return event.waitpoint
    raise AssertionError("no active waitpoint")


@standalone
async def test_admin_kids_and_rotate_secret(api: Api) -> None:
    bad = await _cli(api, "admin", "rotate-secret", "--kid", "k:2")
    assert bad.returncode == 2 and "invalid_kid" in bad.stderr
    rotated = await _cli(api, "admin", "rotate-secret", "--kid", "k2", "--grace-ms", "60000")
    assert rotated.returncode == 0, rotated.stderr
    assert "new_kid  k2" in rotated.stdout and "secret_hex" not in rotated.stdout
    kids = await _cli(api, "admin", "kids", "--partition", "3")
    assert kids.returncode == 0 and "signing kid k2" in kids.stdout, kids.stdout
    shown = await _cli(api, "admin", "rotate-secret", "--kid", "k3", "--show-secret")
    assert shown.returncode == 0 and "secret_hex" in shown.stdout
    secret = shown.stdout.split("secret_hex", 1)[1].split()[0]
    assert len(secret) == 64 and int(secret, 16) >= 0
    repeat = await _cli(api, "admin", "rotate-secret", "--kid", "k3", "--secret-hex", secret)
    assert repeat.returncode == 0  # the same kid and secret: a safe no-op
    conflict = await _cli(api, "admin", "rotate-secret", "--kid", "k3", "--secret-hex", "ab" * 32)
    assert conflict.returncode == 1 and "rotation_conflict" in conflict.stderr
    kids = await _cli(api, "--json", "admin", "kids", "--partition", "3")
    assert json.loads(kids.stdout)["kids"]["current_kid"] == "k3"


# -- flow submit / show / cancel / replay ----------------------------------------------------

FLOW_SPEC = {
    "kind": "dag",
    "members": [
        {"key": "fetch", "kind": "step", "lane": "cli-flows", "payload": {"url": "u"}},
        {"key": "parse", "kind": "step", "lane": "cli-flows", "after": ["fetch"]},
        {"key": "index", "kind": "step", "lane": "cli-flows", "after": ["fetch"]},
        {"key": "report", "kind": "step", "lane": "cli-flows", "after": ["parse", "index"],
         "join": {"quorum": 1}, "edge_kind": "completion"},
    ],
}  # fmt: skip


@standalone
async def test_flow_submit_show_cancel_replay(api: Api, tmp_path: Path) -> None:
    spec = tmp_path / "flow.json"
    spec.write_text(json.dumps(FLOW_SPEC))
    done = await _cli(api, "--json", "flow", "submit", str(spec))
    assert done.returncode == 0, done.stderr
    sub = json.loads(done.stdout)["submitted"]
    fid, members = sub["flow_id"], {m["key"]: m["execution_id"] for m in sub["members"]}
    assert list(members) == ["fetch", "parse", "index", "report"]
    table = await _cli(api, "flow", "submit", str(spec), "--flow-id", fid)
    assert table.returncode == 0 and "already existed" in table.stderr
    assert "KEY" in table.stdout and members["report"] in table.stdout

    shown = await _cli(api, "flow", "show", fid)
    assert shown.returncode == 0, shown.stderr
    assert f"flow {fid}  open  (4 members: 1 waiting, 3 waiting_children; 4 edges" in shown.stdout
    if "no WatchFlow" not in shown.stderr:
        lines = shown.stdout.splitlines()[1:]
        assert lines[0].startswith("fetch  waiting  ")
        assert any(line.startswith("├── index  waiting_children") for line in lines)
        assert any("report  waiting_children" in line and "(after completion)" in line
                   for line in lines)  # fmt: skip
    as_json = json.loads((await _cli(api, "--json", "flow", "show", fid)).stdout)
    assert as_json["flow"]["public_flow_state"] == "open"
    assert as_json["members_by_state"] == {"waiting": 1, "waiting_children": 3}

    cancelled = await _cli(api, "flow", "cancel", fid, "--wait")
    assert cancelled.returncode == 0, cancelled.stderr
    assert "outcome  cancelled" in cancelled.stdout and "members  4" in cancelled.stdout
    replayed = await _cli(api, "flow", "replay", fid)
    if replayed.returncode == 1 and "UNIMPLEMENTED" in replayed.stderr:
        return  # the server does not serve ReplayFlow yet
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed        4" in replayed.stdout


@standalone
async def test_flow_submit_refusals(api: Api, tmp_path: Path) -> None:
    cycle = tmp_path / "cycle.json"
    cycle.write_text(json.dumps({"members": [
        {"key": "a", "kind": "k", "after": ["b"]}, {"key": "b", "kind": "k", "after": ["a"]},
    ]}))  # fmt: skip
    refused = await _cli(api, "flow", "submit", str(cycle))
    assert refused.returncode == 1 and "cycle_detected: the flow has a cycle" in refused.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    usage = await _cli(api, "flow", "submit", str(junk))
    assert usage.returncode == 2 and "not JSON" in usage.stderr
    yaml_file = tmp_path / "flow.yaml"
    yaml_file.write_text("members: []\n")
    yaml_done = await _cli(api, "flow", "submit", str(yaml_file))
    assert yaml_done.returncode in (1, 2)  # no PyYAML: usage; with it: the empty list refused
    missing = await _cli(api, "flow", "show", "00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 3 and "flow_not_found" in missing.stderr


def test_flow_tree_rendering() -> None:
    from flowfabric import ExecutionState as S
    from flowfabric.cli_flows import _Graph

    graph = _Graph.__new__(_Graph)
    graph.states = {"a": S.COMPLETED, "b": S.FAILED, "c": S.COMPLETED, "d": S.SKIPPED}
    graph.labels = {"a": "fetch", "b": "parse", "c": "index", "d": "report"}
    graph.kinds = dict(graph.labels)
    graph.children = {"a": [("c", "success"), ("b", "success")], "b": [("d", "success")],
                      "c": [("d", "completion")], "d": []}  # fmt: skip
    graph.parents = {"b": ["a"], "c": ["a"], "d": ["b", "c"]}
    assert graph.render() == [
        "fetch  completed  a",
        "├── index  completed  c",
        "│   └── report  skipped  d  (after completion)",
        "└── parse  failed  b",
        "    └── report  skipped  d",
    ]
    assert graph.as_json()[-1] == {
        "execution_id": "d", "key": "report", "kind": "report", "state": "skipped",
        "upstreams": ["b", "c"],
    }  # fmt: skip


@standalone
async def test_why_prints_the_reason_and_eta(api: Api) -> None:
    from flowfabric import Client

    async with Client(api.address, token=API_TOKEN) as client:
        due = await client.submit("job", b"x", lane="cli-why", delay_until=timedelta(days=2))
        f = client.flow()
        a = f.add("step", lane="cli-why")
        b = f.add("step", lane="cli-why", after=[a])
        flow = await f.submit()
    shown = await _cli(api, "why", due.execution_id)
    assert shown.returncode == 0, shown.stderr
    rows = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert rows["why"] == "delay" and rows["state"] == "delayed"
    assert " UTC (in 1 d " in rows["eta"] or " UTC (in 2 d" in rows["eta"], rows["eta"]
    deps = await _cli(api, "why", flow[b])
    rows = dict(line.split(None, 1) for line in deps.stdout.splitlines())
    assert rows["why"] == "dependencies" and rows["upstream"] == f"{flow[a]} waiting"
    assert rows["join"] == "all needs 1: 0 of 1 satisfied, 0 impossible, 1 unresolved"
    for args in (("why", "--json", flow[b]), ("--json", "why", flow[b])):
        body = json.loads((await _cli(api, *args)).stdout)
        assert body["kind"] == "KIND_DEPENDENCIES" and body["state"] == "waiting_children"
        assert body["dependencies"]["upstreams"][0]["execution_id"] == flow[a]
    missing = await _cli(api, "why", "{fp:0}:00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 3 and "execution_not_found" in missing.stderr
    bad = await _cli(api, "why", "nope")
    assert bad.returncode == 2 and "invalid_input" in bad.stderr


@standalone
async def test_why_prints_who_holds_a_full_quota(api: Api) -> None:
    from flowfabric import Client

    async with Client(api.address, token=API_TOKEN) as client:
        q = await client.create_quota_policy(window_seconds=60, max_concurrent=1)
        first = await client.submit("job", lane="cli-why-q", quota=q.quota_policy_id)
        second = await client.submit("job", lane="cli-why-q", quota=q.quota_policy_id)
    held = await claim_next(api, lanes=("cli-why-q",), max_tasks=16)
    assert [t.lease.execution_id for t in held.batch.tasks] == [first.execution_id]
    out = await _cli(api, "why", second.execution_id)
    rows = dict(line.split(None, 1) for line in out.stdout.splitlines())
    assert rows["why"] == "quota_concurrency", out.stdout
    assert (rows["cap"], rows["holders"]) == ("1", first.execution_id)


@standalone
async def test_budget_and_quota_commands(api: Api) -> None:
    from flowfabric import Client

    created = await _cli(api, "--json", "budget", "create", "--dim", "total_tokens=100:50",
                         "--dim", "custom:calls=0", "--scope-type", "tenant",
                         "--scope-id", "acme")  # fmt: skip
    assert created.returncode == 0, created.stderr
    bid = json.loads(created.stdout)["budget_id"]
    assert json.loads(created.stdout)["existed"] is False
    again = await _cli(api, "budget", "create", bid, "--dim", "x=1")
    assert again.returncode == 0 and "existed" in again.stdout and "yes" in again.stdout

    ok = await _cli(api, "--json", "budget", "report", bid, "total_tokens=40", "--dedup-key", "k1")
    assert json.loads(ok.stdout) | {} == {
        "outcome": "ok", "budget_id": bid, "dimension": None, "usage": None, "limit": None,
        "on_hard_limit": None, "revoked_leases": 0, "execution_revoked": False, "applied": True,
    }  # fmt: skip
    dup = await _cli(api, "--json", "budget", "report", bid, "total_tokens=40", "--dedup-key", "k1")
    assert json.loads(dup.stdout)["outcome"] == "already_applied"
    soft = await _cli(api, "budget", "report", bid, "total_tokens=20", "custom:calls=2")
    assert soft.returncode == 0, soft.stderr
    assert "soft_breach" in soft.stdout and "60 (limit 50, soft)" in soft.stdout
    hard = await _cli(api, "--json", "budget", "report", bid, "total_tokens=41")
    assert hard.returncode == 0, "a breach is an outcome, not an error"
    assert json.loads(hard.stdout) | {} == {
        "outcome": "hard_breach", "budget_id": bid, "dimension": "total_tokens", "usage": 60,
        "limit": 100, "on_hard_limit": "fail", "revoked_leases": 0, "execution_revoked": False,
        "applied": False,
    }  # fmt: skip

    shown = await _cli(api, "budget", "show", bid)
    assert shown.returncode == 0, shown.stderr
    assert "tenant acme" in shown.stdout and "1 hard, 1 soft" in shown.stdout
    line = next(row for row in shown.stdout.splitlines() if row.startswith("total_tokens"))
    assert line.split() == ["total_tokens", "60", "100", "50", "-", "0", "40"]
    as_json = json.loads((await _cli(api, "--json", "budget", "show", bid)).stdout)
    assert as_json["usage"] == {"total_tokens": 60, "custom:calls": 2}
    assert as_json["hard_limits"]["total_tokens"] == 100 and as_json["exhausted"] is False

    listed = await _cli(api, "budget", "list")
    assert listed.returncode == 0 and bid in listed.stdout
    assert "total_tokens=60/100" in listed.stdout
    lines = (await _cli(api, "--json", "budget", "list", "--limit", "5")).stdout.splitlines()
    assert [json.loads(x)["budget_id"] for x in lines] == [bid]

    reset = await _cli(api, "--json", "budget", "reset", bid)
    assert json.loads(reset.stdout) == {"budget_id": bid, "next_reset_at": None}
    after = (await _cli(api, "budget", "show", bid)).stdout.splitlines()
    assert next(r for r in after if r.startswith("total_tokens")).split()[1] == "0"
    assert next(r for r in after if r.startswith("resets")).split() == ["resets", "1"]

    held = await _cli(api, "--json", "budget", "create", "--dim", "total_tokens=100", "--reserve",
                      "total_tokens=10", "--on-hard-limit", "cancel_running")  # fmt: skip
    assert held.returncode == 0, held.stderr
    hid = json.loads(held.stdout)["budget_id"]
    held_show = json.loads((await _cli(api, "--json", "budget", "show", hid)).stdout)
    assert held_show["reserve"] == {"total_tokens": 10} and held_show["reserved"] == {}
    assert held_show["in_flight"] == 0 and held_show["on_hard_limit"] == "cancel_running"
    shown_held = (await _cli(api, "budget", "show", hid)).stdout.splitlines()
    assert next(r for r in shown_held if r.startswith("in flight")).split() == ["in", "flight", "0"]
    assert next(r for r in shown_held if r.startswith("total_tokens")).split() == [
        "total_tokens", "0", "100", "-", "10", "0", "100",
    ]  # fmt: skip
    unknown = await _cli(api, "budget", "create", "--dim", "t=1", "--on-hard-limit", "explode")
    assert unknown.returncode == 2
    too_big = await _cli(api, "budget", "create", "--dim", "t=1", "--reserve", "t=5")
    assert too_big.returncode == 2 and "invalid_input" in too_big.stderr
    not_a_dim = await _cli(api, "budget", "create", "--dim", "t=10", "--reserve", "u=5")
    assert not_a_dim.returncode == 2 and "not a dimension" in not_a_dim.stderr

    bad = await _cli(api, "budget", "create", "not-a-uuid", "--dim", "t=1")
    assert bad.returncode == 2 and "invalid_input" in bad.stderr
    usage = await _cli(api, "budget", "create", "--dim", "t")
    assert usage.returncode == 2 and "NAME=HARD" in usage.stderr
    missing = "00000000-0000-4000-8000-000000000000"
    gone = await _cli(api, "budget", "show", missing)
    assert gone.returncode == 3 and "budget_not_found" in gone.stderr

    q = await _cli(api, "--json", "quota", "create", "--window-seconds", "60",
                   "--max-per-window", "10", "--max-concurrent", "2")  # fmt: skip
    assert q.returncode == 0, q.stderr
    qid = json.loads(q.stdout)["quota_policy_id"]
    qshow = await _cli(api, "quota", "show", qid)
    assert qshow.returncode == 0 and "60 s" in qshow.stdout
    qjson = json.loads((await _cli(api, "--json", "quota", "show", qid)).stdout)
    assert (qjson["max_per_window"], qjson["max_concurrent"], qjson["window_seconds"]) == (
        10,
        2,
        60,
    )
    qlist = await _cli(api, "quota", "list")
    assert qid in qlist.stdout
    assert [json.loads(x)["quota_policy_id"] for x in
            (await _cli(api, "--json", "quota", "list")).stdout.splitlines()] == [qid]  # fmt: skip
    zero = await _cli(api, "quota", "create", "--window-seconds", "0", "--max-per-window", "1")
    assert zero.returncode == 2 and "invalid_input" in zero.stderr
    assert (await _cli(api, "quota", "show", missing)).returncode == 3

    sub = await _cli(api, "--json", "submit", "llm", "--budget", bid, "--quota", qid,
                     "--policy", '{"max_replay_count": 2}')  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    eid = json.loads(sub.stdout)["created"]["execution_id"]
    async with Client(api.address, token=API_TOKEN) as client:
        assert (await client.state(eid)).name == "WAITING"
    from tests.sdk.test_budgets import _core

    core = await _core(api, eid)
    assert (core.get("budget_ids"), core.get("quota_policy_id")) == (bid, qid)


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    shown = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"flowfabric {version('flowfabric')}"


@standalone
async def test_an_unreadable_payload_file_is_a_usage_error(api: Api, tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    for args in (
        ("submit", "job", "--payload", f"@{missing}"),
        ("signal", "{fp:0}:00000000-0000-4000-8000-000000000000", "review", "--payload",
         f"@{missing}"),
    ):  # fmt: skip
        shown = await _cli(api, *args)
        assert shown.returncode == 2, (args, shown.stderr)
        assert "Traceback" not in shown.stderr
        assert f"--payload @{missing}: No such file or directory" in shown.stderr


@standalone
async def test_a_refused_call_names_its_reason_once_and_json_errors_are_json(api: Api) -> None:
    missing = "{fp:0}:00000000-0000-4000-8000-000000000000"
    shown = await _cli(api, "get", missing)
    assert shown.returncode == 3, shown.stderr
    lines = shown.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: NOT_FOUND execution_not_found")
    assert lines[0].count("execution_not_found") == 1, lines[0]
    as_json = await _cli(api, "--json", "get", missing)
    assert as_json.returncode == 3
    err = json.loads(as_json.stderr)["error"]
    assert (err["code"], err["reason"]) == ("NOT_FOUND", "execution_not_found")
    assert "execution_not_found" not in err["message"]
