"""A whole run in one process (torchft style): a real coordinator on 127.0.0.1 and real TrainingClients as
tasks of one event loop, a few rounds in seconds, for every update rule, including a client that joins late and
rebuilds its replica (weights and optimizer state) from a checkpoint mid-run. Every same-tier replica ends
bit-identical to the others and to the coordinator's own replica of that tier."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from aftermath.client.loop import ClientOptions, TrainingClient
from aftermath.coordinator.service import CoordinatorService
from aftermath.data import default_data_dir
from aftermath.model import tier_spec
from aftermath.round.protocol import RunSummary
from coordinator_helpers import run_client, small_run_config

TOKEN = "in-process"


def _run(tmp_path: Path, optimizer: str, precision: str = "auto",
         objective: str = "sampled") -> tuple[RunSummary, list[dict], dict[str, str]]:
    run = small_run_config(**{
        "optimizer.name": optimizer, "train.precision": precision, "train.objective": objective,
        "optimizer.lr": 1e-3, "optimizer.warmup_steps": 1,
        "schedule.total_steps": 6, "schedule.rounds_per_epoch": 2, "schedule.global_batch_size": 6,
        "schedule.init_min_clients": 2, "schedule.warmup_time": 20.0, "schedule.cooldown_time": 10.0,
        "schedule.heartbeat_interval": 0.5, "schedule.heartbeat_timeout": 10.0, "data.val_sequences": 4,
        "train.micro_batch_size": 3, "network.max_blob_bytes": 16 * 2**20})  # dense payloads are ~6 MB

    async def main() -> tuple[RunSummary, list[dict]]:
        service = CoordinatorService(run, tmp_path / "run", token=TOKEN, data_dir=default_data_dir(), linger=1.0)
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")

            def client(name: str, tier: int) -> TrainingClient:
                return run_client(url, TOKEN, tmp_path, name, tier)

            first = [asyncio.create_task(client(n, t).run_async()) for n, t in (("a", 0), ("b", 1), ("c", 1))]
            while service.machine.step < 2:  # the late client joins once the first epoch is checkpointed
                await asyncio.sleep(0.05)
            late = asyncio.create_task(client("late", 1).run_async())
            results = await asyncio.wait_for(asyncio.gather(*first, late), timeout=240)
            await service.finished.wait()
            return service.summary, list(results)

    summary, results = asyncio.run(main())
    return summary, results, service_hashes(tmp_path / "run")


def service_hashes(run_dir: Path) -> dict[str, str]:
    return json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())["weights_sha256"]


# bf16: the clients' gradients come from a bf16 forward; the replicas (fp32, applied on the CPU) stay identical.
# sampled (the default): the clients also train the exported tiers inside their own (aftermath.round.objective)
@pytest.mark.parametrize("optimizer,precision,objective", [
    ("distro", "auto", "sampled"), ("adamw", "auto", "sampled"), ("muon", "auto", "sampled"),
    ("distro", "bf16", "sampled"), ("distro", "auto", "own")])
def test_every_same_tier_replica_ends_identical_including_a_late_joiner(tmp_path, optimizer, precision, objective,
                                                                        one_torch_thread):
    summary, results, reference = _run(tmp_path, optimizer, precision, objective)
    assert summary.steps == 6 and summary.replicas_consistent, summary.unrecovered
    assert summary.divergences == [] and summary.hashes_checked >= 4
    by_id = {r["client_id"]: r for r in results}
    assert {r["step"] for r in results} == {6}
    assert by_id["late"]["weights_sha256"] == by_id["b"]["weights_sha256"] == by_id["c"]["weights_sha256"]
    assert by_id["late"]["weights_sha256"] == reference["tier1"]
    assert by_id["a"]["weights_sha256"] == reference["tier0"]
    late = [json.loads(line) for line in (tmp_path / "late.jsonl").read_text().splitlines()]
    plans = [r for r in late if r["event"] == "memory_plan"]
    assert plans and plans[0]["precision"] == ("bf16" if precision == "bf16" else "fp32")
    loaded = [r for r in late if r["event"] == "model_loaded"]
    assert loaded and loaded[0]["step"] >= 2  # rebuilt from a mid-run checkpoint, not the initial model
    assert any(r["event"] == "round" for r in late)  # and trained after it
    # after a client's first step, its batch comes from the window it fetched while it trained the step before
    a_rounds = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    trained = [r for r in a_rounds if r["event"] == "round" and r["sequences"]]
    assert len(trained) >= 5 and all(r["batch_ahead"] for r in trained[1:])
    # every exported tier and the Mix'n'Match specs between adjacent ones are evaluated at each checkpoint
    assert {"0", "1", "2", "mix0-1", "mid0-1", "mix1-2", "mid1-2"} <= set(summary.tiers)


def test_the_checkpoint_holds_the_optimizer_state_of_every_tier(tmp_path, one_torch_thread):
    from aftermath.checkpoint.manifest import read_manifest
    from aftermath.checkpoint.optimizer_state import OPTIMIZER_STATE_FILE, load_optimizer_state

    run = small_run_config(**{"optimizer.name": "adamw", "schedule.total_steps": 1, "schedule.rounds_per_epoch": 1,
                              "network.max_blob_bytes": 16 * 2**20})

    async def main() -> None:
        service = CoordinatorService(run, tmp_path / "run", token=TOKEN, data_dir=default_data_dir(), linger=0.5)
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")
            await TrainingClient(ClientOptions(coordinator=url, token=TOKEN, tier=0, name="a", threads=1,
                                               work_dir=tmp_path / "clients")).run_async()
            await service.finished.wait()

    asyncio.run(main())
    model_dir = tmp_path / "run" / "checkpoint" / "model"
    manifest = read_manifest(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    for entry in manifest.tiers:
        state_file = next(f for f in entry.files if f.endswith(OPTIMIZER_STATE_FILE))
        assert state_file in manifest.sha256  # listed and hashed like the weights
        state = load_optimizer_state(model_dir / state_file, "adamw")
        assert int(state["t"]) == 1  # one step applied
        shape = state["exp_avg/model.layers.0.mlp.up_proj.weight"].shape
        from aftermath.model import MatFormerConfig

        spec = tier_spec(MatFormerConfig.from_dict(config), entry.tier)
        assert shape[0] == spec.ffn_widths[0]  # the tier's cut of the universal moments
        assert state["exp_avg/model.layers.0.mlp.up_proj.weight"].abs().sum() > 0


def test_a_replica_at_the_checkpoint_step_but_of_another_timeline_is_reloaded(tmp_path, one_torch_thread):
    # After a coordinator restart the steps after its last checkpoint are retrained; a client that lived
    # through the old timeline can hold a replica at the checkpoint's step with other weights.
    import aiohttp
    import torch

    from aftermath.client.transport import Transport

    run = small_run_config()

    async def main() -> list[dict]:
        service = CoordinatorService(run, tmp_path / "run", token=TOKEN, data_dir=default_data_dir(), linger=0.0)
        records: list[dict] = []
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")
            client = TrainingClient(ClientOptions(coordinator=url, token=TOKEN, tier=1, name="a", threads=1,
                                                  work_dir=tmp_path / "c", on_update=records.append))
            async with aiohttp.ClientSession() as session:
                client.transport = Transport(url, session)
                await client._join()
                await client._ensure_model(0)  # loads the initial checkpoint
                await client._ensure_model(0)  # the same model: kept
                with torch.no_grad():
                    next(client.replica.model.parameters()).add_(1e-3)  # another timeline, same step
                await client._ensure_model(0)  # reloaded
                reference = json.loads((service.run_dir / "checkpoint" / "checkpoint.json").read_text())
                assert client.replica.weights_sha256() == reference["weights_sha256"]["tier1"]
        return records

    loads = [r for r in asyncio.run(main()) if r["event"] == "model_loaded"]
    assert len(loads) == 2
