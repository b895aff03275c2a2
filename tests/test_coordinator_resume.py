"""A restarted coordinator forgets nothing and resumes only the run it was given: history, reference hashes, the
data position and the screen's exclusions come back from state.json; a changed run config is refused, naming each
changed field."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from aftermath.client.loop import ClientOptions, TrainingClient
from aftermath.coordinator.service import CoordinatorService
from aftermath.coordinator.state import ClientInfo, Rejected
from aftermath.data import default_data_dir
from aftermath.errors import ConfigError
from coordinator_helpers import small_run_config

TOKEN = "resume"
RUN = {"schedule.total_steps": 4, "schedule.rounds_per_epoch": 2, "data.val_sequences": 4,
       "schedule.heartbeat_interval": 0.5}


async def _serve(service: CoordinatorService, tmp_path: Path, stop_at_epoch: int | None) -> None:
    """Serve with one tier-0 client; with `stop_at_epoch`, stop (like a kill) once that epoch is persisted."""
    async with TestServer(service.app, host="127.0.0.1") as server:
        url = str(server.make_url("")).rstrip("/")
        client = asyncio.create_task(TrainingClient(ClientOptions(
            coordinator=url, token=TOKEN, tier=0, name="a", threads=1, work_dir=tmp_path / "c")).run_async())
        if stop_at_epoch is None:
            await asyncio.wait_for(client, timeout=120)
            await service.finished.wait()
            return
        state = service.run_dir / "state.json"
        while not (state.is_file() and json.loads(state.read_text())["epoch"] >= stop_at_epoch):
            await asyncio.sleep(0.05)
        client.cancel()


def test_a_restart_keeps_the_history_and_the_summary_tells_the_whole_run(tmp_path, one_torch_thread):
    run = small_run_config(**RUN)
    run_dir = tmp_path / "run"
    first = CoordinatorService(run, run_dir, token=TOKEN, data_dir=default_data_dir(), linger=0.2)
    asyncio.run(_serve(first, tmp_path, stop_at_epoch=0))
    initial = first.keeper.val_history[0]
    assert initial["epoch"] == -1
    # as if the screen of the first process had excluded a member "z" (trust.py): an exclusion is for good
    persisted = json.loads((run_dir / "state.json").read_text())
    assert persisted["exclusions"] == {}
    persisted["exclusions"] = {"z": [1, "2 results flagged in 10 rounds, the last at step 1: its signs agree -0.9"]}
    (run_dir / "state.json").write_text(json.dumps(persisted))

    second = CoordinatorService(run, run_dir, token=TOKEN, data_dir=default_data_dir(), linger=0.2)
    with pytest.raises(Rejected, match="'z' was excluded from this run: 2 results flagged"):
        second.machine.join("z", ClientInfo(tier=0, spec="tier0"), 0.0)
    assert [h["epoch"] for h in second.keeper.val_history] == [-1, 0]
    assert set(second.checks.reference) == {-1, 0}
    assert second.machine.data_position(2) == 2 * run.schedule.global_batch_size
    asyncio.run(_serve(second, tmp_path, stop_at_epoch=None))
    summary = second.summary
    assert summary.steps == 4 and summary.replicas_consistent
    assert summary.tiers["0"].initial_val_loss == initial["val_loss"]["tier0"]  # not the resumed epoch's
    assert [h["epoch"] for h in summary.val_history] == [-1, 0, 1]
    state = json.loads((run_dir / "state.json").read_text())
    assert sorted(state["reference_hashes"]) == ["-1", "0", "1"] and state["finished"]
    assert [(e.client_id, e.step) for e in summary.excluded] == [("z", 1)] and "z" in state["exclusions"]


def test_a_changed_config_is_refused_naming_each_field_unless_forced(tmp_path, one_torch_thread):
    run = small_run_config(**RUN)
    run_dir = tmp_path / "run"
    asyncio.run(_serve(CoordinatorService(run, run_dir, token=TOKEN, data_dir=default_data_dir(), linger=0.2),
                       tmp_path, stop_at_epoch=0))
    changed = run.with_overrides({"seed": 7, "data.seq_len": 32, "schedule.global_batch_size": 8,
                                  "optimizer.lr": 0.01, "schedule.cooldown_time": 5.0})
    with pytest.raises(ConfigError) as info:
        CoordinatorService(changed, run_dir, token=TOKEN, data_dir=default_data_dir())
    message = str(info.value)
    for name in ("seed: 0 -> 7", "data.seq_len: 16 -> 32", "schedule.global_batch_size: 4 -> 8",
                 "optimizer.lr: 0.003 -> 0.01", "--force-resume"):
        assert name in message
    assert "cooldown_time" not in message and "\n" not in message  # timeouts may change; one line
    forced = CoordinatorService(changed, run_dir, token=TOKEN, data_dir=default_data_dir(), force_resume=True)
    # it goes on from the data it had reached (2 steps of 4 sequences), now 8 sequences a step
    assert forced.machine.step == 2 and forced.machine.data_position(2) == 8 and forced.machine.data_position(3) == 16
