"""A client never waits for ever: an unreachable coordinator at start, or one gone for good mid-run, ends it with
an error saying so after `give_up_after` seconds."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiohttp.test_utils import TestServer

from aftermath.client.loop import ClientOptions, TrainingClient
from aftermath.client.transport import Unreachable
from aftermath.coordinator.service import CoordinatorService
from aftermath.data import default_data_dir
from coordinator_helpers import small_run_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_coordinator_at_start_gives_up_saying_so(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    client = TrainingClient(ClientOptions(coordinator=url, token="t", give_up_after=1.0, work_dir=tmp_path))
    started = time.monotonic()
    with pytest.raises(Unreachable, match=r"cannot reach the coordinator at http://127\.0\.0\.1:\d+ .*giving up"):
        client.run_blocking()
    assert time.monotonic() - started < 30


def test_a_coordinator_gone_for_good_mid_run_ends_the_client(tmp_path, one_torch_thread):
    run = small_run_config(**{"schedule.total_steps": 50, "schedule.init_min_clients": 1})

    async def main() -> None:
        service = CoordinatorService(run, tmp_path / "run", token="t", data_dir=default_data_dir(), linger=0.0)
        server = TestServer(service.app, host="127.0.0.1")
        await server.start_server()
        url = str(server.make_url("")).rstrip("/")
        task = asyncio.create_task(TrainingClient(ClientOptions(
            coordinator=url, token="t", name="a", threads=1, give_up_after=2.0, work_dir=tmp_path / "c")).run_async())
        while service.machine.step < 1:  # it trains ...
            await asyncio.sleep(0.05)
        await server.close()  # ... then the coordinator is gone for good
        with pytest.raises(Unreachable, match="has not answered for .*giving up"):
            await asyncio.wait_for(task, timeout=60)

    asyncio.run(main())
