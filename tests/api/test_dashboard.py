"""The web dashboard end to end (docs/dashboard.md): a real server with FF_DASHBOARD on the
standalone fixture Valkey, driven by Debian's headless Chromium through Playwright, and its
HTTP edge (auth, errors, escaping) through plain requests.

The browser part submits an execution with the SDK, sees it appear in the list, watches a
worker's output frames stream onto its page, and takes a screenshot of each main view (saved
under a tmp dir), checking the elements each view must show. One browser for the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from flowfabric import Client, Worker
from flowfabric.server.app import BootError, FlowFabricServer
from flowfabric.server.config import Config
from flowfabric.server.embedded import ValkeyProcess
from flowfabric.server.main import QUICKSTART_DASHBOARD, announce, quickstart_defaults
from flowfabric.server.valkey.store import Store
from tests.conftest import API_TOKEN, HMAC_SECRET, flush

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
ADMIN_TOKEN = "dashboard-admin-token"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
XSS = '<img src=x onerror="window.__xss=1">'


class Dash:
    def __init__(self, server: FlowFabricServer) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.dashboard_port}"
        self.target = f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
async def dash(valkey_standalone: ValkeyProcess) -> AsyncIterator[Dash]:
    store = Store.from_url(valkey_standalone.url)
    await flush(store)
    config = Config(
        valkey_url=valkey_standalone.url, listen_addr="127.0.0.1:0", dashboard="127.0.0.1:0",
        api_token=API_TOKEN, admin_token=ADMIN_TOKEN, waitpoint_hmac_secret=HMAC_SECRET,
        shutdown_grace_s=1.0, boot_retry_s=5.0, lanes=("dash",),
    )  # fmt: skip
    server = FlowFabricServer(config, run_scanners=False)
    await server.start()
    assert server.dashboard is not None
    server.dashboard.overview_interval_s = 0.3
    yield Dash(server)
    await server.stop()
    await flush(store)
    await store.close()


def _request(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def http(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_request, url, method, body, headers)


async def _until(check: Callable[[], bool]) -> None:
    """Poll `check` every 10 ms, for at most 5 s."""
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 5 s")


async def _session(dash: Dash, token: str) -> str:
    status, headers, _ = await http(
        dash.url + "/api/session", "POST", {"token": token}, {"X-FF-Dashboard": "1"}
    )
    assert status == 200
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    return cookie.split(";", 1)[0]


async def test_access_errors_and_no_token_in_page(dash: Dash) -> None:
    # reads need a session when FF_API_TOKEN is set; the page itself does not
    status, _, body = await http(dash.url + "/api/lanes")
    assert status == 401 and json.loads(body)["error"] == "unauthenticated"
    status, headers, page = await http(dash.url + "/")
    assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"]
    _, _, script = await http(dash.url + "/static/app.js")
    for token in (API_TOKEN, ADMIN_TOKEN):
        assert token.encode() not in page + script
    # a malformed request is a 400, never a dropped connection
    reader, writer = await asyncio.open_connection("127.0.0.1", dash.server.dashboard_port)
    writer.write(b"GET /?" + b"&".join(b"a%d=1" % i for i in range(30)) + b" HTTP/1.1\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 400")
    writer.close()
    # a page elsewhere that rebinds its name to 127.0.0.1 is refused
    status, _, body = await http(dash.url + "/", headers={"Host": "rebound.example:80"})
    assert status == 403 and json.loads(body)["error"] == "bad_host"
    status, _, _ = await http(dash.url + "/api/session", "POST", {"token": "wrong"},
                              {"X-FF-Dashboard": "1"})  # fmt: skip
    assert status == 401
    read = {"Cookie": await _session(dash, API_TOKEN)}
    status, _, body = await http(dash.url + "/api/lanes", headers=read)
    assert status == 200 and "dash" in {lane["lane"] for lane in json.loads(body)["lanes"]}
    # bad input is a 400 naming the field, an unknown execution a 404
    status, _, body = await http(dash.url + "/api/executions?lane=dash&state=nope", headers=read)
    assert status == 400 and json.loads(body)["error"] == "invalid_input"
    status, _, body = await http(dash.url + "/api/executions/nope", headers=read)
    assert status == 400
    missing = "{fp:1}:00000000-0000-4000-8000-000000000000"
    status, _, body = await http(f"{dash.url}/api/executions/{missing}", headers=read)
    assert status == 404 and json.loads(body)["error"] == "execution_not_found"
    # mutations: the admin session only, and only with the anti-CSRF header
    url = f"{dash.url}/api/executions/{missing}/cancel"
    status, _, body = await http(url, "POST", {}, {**read, "X-FF-Dashboard": "1"})
    assert status == 403 and json.loads(body)["error"] == "admin_token_required"
    admin = {"Cookie": await _session(dash, ADMIN_TOKEN)}
    status, _, _ = await http(url, "POST", {}, admin)
    assert status == 403
    status, _, body = await http(url, "POST", {}, {**admin, "X-FF-Dashboard": "1"})
    assert status == 404 and json.loads(body)["error"] == "execution_not_found"
    # with the admin session: cancel, then replay, a real execution
    async with Client(dash.target, token=API_TOKEN) as client:
        job = await client.submit("noop", {}, lane="dash")
        act = f"{dash.url}/api/executions/{job.execution_id}"
        post = {**admin, "X-FF-Dashboard": "1"}
        assert (await http(act + "/cancel", "POST", {}, post))[0] == 200
        assert (await client.state(job.execution_id)).name == "CANCELLED"
        assert (await http(act + "/replay", "POST", {}, post))[0] == 200
        assert (await client.state(job.execution_id)).name == "WAITING"
        await client.cancel(job.execution_id)
        # a tail holds a stream-op slot while open, and gives it back when the browser leaves
        slots = dash.server.streams.slots if dash.server.streams else None
        assert slots is not None and slots.in_use == 0
        job = await client.submit("noop", {}, lane="dash")
        reader, writer = await asyncio.open_connection("127.0.0.1", dash.server.dashboard_port)
        path = f"/api/executions/{job.execution_id}/attempts/0/tail"
        cookie = read["Cookie"]
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n".encode())
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        await reader.readuntil(b"retry: 2000\n\n")
        await _until(lambda: slots.in_use == 1)
        writer.close()
        await _until(lambda: slots.in_use == 0)
        await client.cancel(job.execution_id)


@pytest.fixture(scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        if os.environ.get("CI"):  # .ci/run installs it: a CI run without it is a broken run
            pytest.fail("Debian's chromium is not installed (.ci/run should have installed it)")
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )  # fmt: skip
        yield context
        await context.close()


async def test_dashboard_in_chromium(
    dash: Dash, browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shots = tmp_path_factory.mktemp("dashboard-screens")
    page = await browser.new_page()
    page.set_default_timeout(8000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: print("console:", msg.text))
    await page.goto(dash.url + "/")
    # the token prompt, then an admin session (the cookie is HttpOnly: the page never sees it)
    await page.fill("#login-token", ADMIN_TOKEN)
    await page.click("#login button")
    await page.wait_for_selector("#role:text('admin')")
    assert await page.evaluate("document.cookie") == ""

    async with Client(dash.target, token=API_TOKEN) as client:
        # lanes
        await page.wait_for_selector("#lanes-table tr[data-lane='dash']")
        await page.screenshot(path=str(shots / "lanes.png"))

        # a submitted execution appears in the list, live
        await page.goto(dash.url + "/#/executions?lane=dash&state=eligible")
        await page.wait_for_selector("#executions-table")
        job = await client.submit("echo", {"n": 1}, lane="dash", tags={"app.note": XSS})
        row = f"#executions-table tr[data-eid='{job.execution_id}']"
        await page.wait_for_selector(row)
        assert "waiting" in await page.inner_text(row)
        await page.screenshot(path=str(shots / "executions.png"))

        # its page: why it waits, then its output streaming in while a worker runs it
        await page.click(f"{row} a")
        await page.wait_for_selector("#state [data-state='waiting']")
        assert await page.inner_text("#tags") == f"app.note={XSS}"  # shown as text, not markup
        assert "worker" in (await page.inner_text("#why")).lower()
        gate = asyncio.Event()
        worker = Worker(dash.target, token=API_TOKEN, lanes=["dash"], concurrency=2,
                        handle_signals=False)  # fmt: skip

        @worker.handler("echo")
        async def echo(ctx: Any) -> dict[str, bool]:
            await ctx.emit("token", b"hello from the worker")
            await ctx.flush()
            await gate.wait()
            await ctx.emit("token", b"<b>not bold</b>")
            return {"ok": True}

        async with worker:
            running = asyncio.create_task(worker.run())
            try:
                await page.wait_for_selector("#output .frame:text('hello from the worker')")
                await page.wait_for_selector("#state [data-state='active']")
                await page.screenshot(path=str(shots / "execution.png"))

                # workers and their leases, in a second tab while the lease is held
                other = await browser.new_page()
                await other.goto(dash.url + "/#/workers")
                lease = f"#workers-table a:text('{job.execution_id}')"
                await other.wait_for_selector(lease)
                await other.screenshot(path=str(shots / "workers.png"))
                await other.close()

                gate.set()
                await page.wait_for_selector("#output .frame:text('<b>not bold</b>')")
                await page.wait_for_selector("#output-closed:text('attempt_success')")
                await page.wait_for_selector("#state [data-state='completed']")
                assert await page.locator("#output b").count() == 0
                assert await page.locator("img").count() == 0
                assert "ended_success" in await page.inner_text("#attempts-table")
            finally:
                worker.stop()
                await running

        # the admin session's Cancel button
        doomed = await client.submit("echo", {"n": 2}, lane="dash")
        await page.goto(f"{dash.url}/#/execution/{doomed.execution_id}")
        await page.wait_for_selector("#state [data-state='waiting']")
        await page.click("#cancel")
        await page.wait_for_selector("#state [data-state='cancelled']")

        # a flow as a graph: the ten-way fan-out is one node
        f = client.flow()
        fetch = f.add("fetch", {}, lane="dash")
        parts = [f.add("parse", {}, lane="dash", after=[fetch]) for _ in range(10)]
        f.add("merge", {}, lane="dash", after=parts)
        flow = await f.submit()
        await page.goto(f"{dash.url}/#/flow/{flow.flow_id}")
        await page.wait_for_selector("#flow-graph g.node")
        assert await page.locator("#flow-graph g.node").count() == 3
        assert await page.locator("#flow-graph g.node text:text('10 \u00d7 parse')").count() == 1
        assert await page.locator("#flow-graph line").count() == 2
        await page.screenshot(path=str(shots / "flow.png"))

        # budgets and quotas with their usage
        budget, quota = str(uuid.uuid4()), str(uuid.uuid4())
        await client.create_budget(budget, dimensions={"total_tokens": (1000, 800)})
        await client.report_usage(budget, total_tokens=120)
        await client.create_quota_policy(quota, window_seconds=60, max_per_window=10)
        await page.goto(dash.url + "/#/budgets")
        await page.wait_for_selector(f"#budgets-table tr[data-budget='{budget}']")
        assert "total_tokens=120" in await page.inner_text(
            f"#budgets-table tr[data-budget='{budget}'] [data-usage]"
        )
        await page.wait_for_selector(f"#quotas-table tr[data-quota='{quota}']")
        await page.screenshot(path=str(shots / "budgets.png"))

    assert errors == [] and not await page.evaluate("window.__xss")
    for name in ("lanes", "executions", "execution", "workers", "flow", "budgets"):
        assert (shots / f"{name}.png").stat().st_size > 1000
    await page.close()


def test_the_quick_start_turns_the_dashboard_on() -> None:
    config, default = quickstart_defaults(Config())  # embedded Valkey, FF_DASHBOARD unset
    assert (config.dashboard_addr, default) == (QUICKSTART_DASHBOARD, True)
    off, default = quickstart_defaults(Config(dashboard="off"))
    assert (off.dashboard_addr, default) == (None, False)
    external = Config(valkey_url="valkey://127.0.0.1:1", waitpoint_hmac_secret=HMAC_SECRET)
    assert quickstart_defaults(external)[0].dashboard_addr is None  # production: off


async def test_the_dashboard_url_is_printed(dash: Dash) -> None:
    grpc_line, url_line = announce(dash.server)  # what `flowfabric serve` prints
    assert grpc_line == f"flowfabric listening on {dash.target}"
    assert url_line == f"dashboard: {dash.url}/"
    status, _, page = await http(url_line.removeprefix("dashboard: "))
    assert status == 200 and b"<title>FlowFabric dashboard</title>" in page


async def test_a_taken_dashboard_port(valkey_standalone: ValkeyProcess, dash: Dash) -> None:
    """FF_DASHBOARD on a taken port stops the boot; the quick start's default only warns."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        config = Config(valkey_url=valkey_standalone.url, listen_addr="127.0.0.1:0",
                        dashboard=addr, waitpoint_hmac_secret=HMAC_SECRET, boot_retry_s=5.0,
                        lanes=("dash",))  # fmt: skip
        server = FlowFabricServer(config, run_scanners=False)
        with pytest.raises(BootError, match=f"cannot bind the dashboard on {addr}"):
            await server.start()
        await server.stop()
        server = FlowFabricServer(config, run_scanners=False)
        server.dashboard_optional = True
        try:
            assert await server.start() > 0
            assert server.dashboard is None and server.dashboard_port is None
        finally:
            await server.stop()
