"""An example test of the tasks in tasks_app.py with the `flowfabric.testing` fixture.

Run it with `pytest examples/test_tasks_app.py` (pytest-asyncio, asyncio_mode = auto).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks_app import add, greet

if TYPE_CHECKING:  # imported by pytest as the plugin below, not here
    from flowfabric.testing import Env

pytest_plugins = ["flowfabric.testing"]


async def test_greet_and_add(flowfabric_env: Env) -> None:
    flowfabric_env.worker(greet, add)
    hello = await greet.submit(flowfabric_env.client, "tests")
    total = await add.submit(flowfabric_env.client, a=20, b=22)
    assert await hello.result(timeout=10) == "hello, tests!"
    assert await total.result(timeout=10) == 42
