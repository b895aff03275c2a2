"""`client --nproc N`: one client's step computed by N processes (aftermath.client.data_parallel). Real worker
processes started with spawn, real gloo collectives on 127.0.0.1, real training steps of a tiny model; and a
whole in-process run in which a two-process client trains beside one-process clients and every same-tier replica
ends bit-identical."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from aiohttp.test_utils import TestServer

from aftermath.client.data_parallel import DataParallelGroup, shard
from aftermath.client.loop import TrainingClient
from aftermath.coordinator.service import CoordinatorService
from aftermath.data import default_data_dir
from aftermath.model import build_model, preset_config, tier_spec
from aftermath.round.replica import Replica
from aftermath.runconfig import RunConfig
from coordinator_helpers import run_client, small_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = preset_config("tiny")
TOKEN = "data-parallel"


def test_shards_cover_every_row_once_and_balance():
    rows = tuple(range(3, 14))
    parts = [shard(rows, r, 3) for r in range(3)]
    assert sorted(sum(parts, ())) == list(rows)
    assert {len(p) for p in parts} == {3, 4}


def test_two_gloo_processes_give_the_one_process_gradient_at_every_step():
    """The sampled objective at tier 0 (three sequence groups), an odd batch (uneven shards), micro-batches of 2;
    then the weights change and the next step must see the new ones (they travel every step)."""
    run = RunConfig().with_overrides({"optimizer.lr": 3e-3, "optimizer.warmup_steps": 0})
    replica = Replica.build(build_model(CFG, seed=0), CFG, tier_spec(CFG, 0), run)
    batch = torch.randint(0, CFG.vocab_size, (7, 33), generator=torch.Generator().manual_seed(1))
    assert len(replica.sequence_groups(7, 0, "c")) == 3
    group = DataParallelGroup(2, torch.device("cpu"), threads=1)
    try:
        for step in range(2):
            replica.parallel = None
            alone = replica.train(batch, 2, step=step, client_id="c")
            alone_grads = {n: g.clone() for n, g in alone.grads.items()}
            replica.parallel = group
            together = replica.train(batch, 2, step=step, client_id="c")
            assert all(w.is_alive() for w in group.workers)
            assert together.loss == pytest.approx(alone.loss, rel=1e-6)
            for name, g in alone_grads.items():
                torch.testing.assert_close(together.grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
            with torch.no_grad():  # a different model for the next step
                for p in replica.rule.params.values():
                    p.add_(torch.randn_like(p) * 0.05)
    finally:
        group.close()
    assert not any(w.is_alive() for w in group.workers)


def test_a_two_process_client_keeps_its_replica_identical_to_one_process_clients(tmp_path: Path):
    run = small_run_config(**{
        "optimizer.lr": 1e-3, "optimizer.warmup_steps": 1, "schedule.total_steps": 4,
        "schedule.rounds_per_epoch": 2, "schedule.global_batch_size": 8, "schedule.init_min_clients": 3,
        "schedule.warmup_time": 30.0, "schedule.cooldown_time": 10.0, "schedule.heartbeat_interval": 0.5,
        "schedule.heartbeat_timeout": 20.0, "data.val_sequences": 4, "train.micro_batch_size": 2})

    async def main() -> list[dict]:
        service = CoordinatorService(run, tmp_path / "run", token=TOKEN, data_dir=default_data_dir(), linger=1.0)
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")

            def client(name: str, tier: int, nproc: int = 1) -> TrainingClient:
                return run_client(url, TOKEN, tmp_path, name, tier, nproc=nproc)

            tasks = [client("a", 0).run_async(), client("b", 1).run_async(), client("dp", 1, nproc=2).run_async()]
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)
            await service.finished.wait()
            assert service.summary.replicas_consistent and service.summary.divergences == []
            return list(results)

    results = {r["client_id"]: r for r in asyncio.run(main())}
    reference = json.loads((tmp_path / "run" / "checkpoint" / "checkpoint.json").read_text())["weights_sha256"]
    assert {r["step"] for r in results.values()} == {4}
    assert results["dp"]["weights_sha256"] == results["b"]["weights_sha256"] == reference["tier1"]
    assert results["a"]["weights_sha256"] == reference["tier0"]
    committed = [json.loads(line) for line in (tmp_path / "dp.jsonl").read_text().splitlines()]
    rounds = [r for r in committed if r.get("sequences")]
    assert rounds and all(r["processes"] == 2 and r["loss"] < 1e9 for r in rounds)
