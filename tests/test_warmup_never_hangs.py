"""End to end (issue: a run hung for ever at step 0 when a member was not ready at the end of warmup): with
init_min_clients = 2 and a client whose link is too slow to load its tier within warmup_time, the run still
starts once the slow client has the model, and finishes."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestServer

from aftermath.client.loop import ClientOptions, TrainingClient
from aftermath.coordinator.service import CoordinatorService
from aftermath.data import default_data_dir
from aftermath.faults import FaultConfig
from aftermath.metrics import read_metrics
from coordinator_helpers import small_run_config

TOKEN = "warmup"


def test_a_client_slower_than_warmup_gets_another_warmup_and_the_run_finishes(tmp_path, one_torch_thread):
    run = small_run_config(**{"schedule.init_min_clients": 2, "schedule.min_clients": 1,
                              "schedule.warmup_time": 1.5, "schedule.total_steps": 2, "data.val_sequences": 4,
                              "schedule.heartbeat_interval": 0.5})

    async def main() -> None:
        service = CoordinatorService(run, tmp_path / "run", token=TOKEN, data_dir=default_data_dir(), linger=0.5)
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")

            def client(name: str, tier: int, faults: FaultConfig | None = None) -> TrainingClient:
                return TrainingClient(ClientOptions(coordinator=url, token=TOKEN, tier=tier, name=name, threads=1,
                                                    work_dir=tmp_path / "c", faults=faults,
                                                    metrics_path=tmp_path / f"{name}.jsonl"))

            # ~4 MB of tier-1 files at 1.2 MB/s: about 3 s, twice the warmup
            slow = client("slowlink", 1, FaultConfig(bandwidth=1_200_000))
            results = await asyncio.wait_for(asyncio.gather(client("fast", 0).run_async(), slow.run_async()),
                                             timeout=120)
            assert {r["step"] for r in results} == {2}
            await service.finished.wait()

    asyncio.run(main())
    events = [r for r in read_metrics(tmp_path / "run" / "metrics" / "coordinator.jsonl")]
    deferred = [r for r in events if r.get("event") == "deferred" and r.get("client_id") == "slowlink"]
    assert deferred, "the slow client was ready within the first warmup: the test did not test the hang"
    rounds = [r for r in read_metrics(tmp_path / "slowlink.jsonl") if r.get("event") == "round"]
    assert [r["step"] for r in rounds] == [0, 1]  # it trained every round once it had the model


def test_a_mix_n_match_first_client_gets_its_spec_exported_and_trains(tmp_path, one_torch_thread):
    run = small_run_config(**{"schedule.total_steps": 2, "data.val_sequences": 4, "schedule.warmup_time": 10.0})

    async def main() -> dict:
        service = CoordinatorService(run, tmp_path / "run", token=TOKEN, data_dir=default_data_dir(), linger=0.5)
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")
            result = await asyncio.wait_for(TrainingClient(ClientOptions(
                coordinator=url, token=TOKEN, tier=None, spec="mix=512,256,128,64", name="mix", threads=1,
                work_dir=tmp_path / "c")).run_async(), timeout=120)
            await service.finished.wait()
            return result

    result = asyncio.run(main())
    assert result["step"] == 2
    info = (tmp_path / "run" / "checkpoint" / "checkpoint.json").read_text()
    assert '"mix"' in info  # the final checkpoint exports the spec, with its reference hash
