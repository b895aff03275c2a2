"""optimizer.local_steps (SparseLoCo/DiLoCo-style outer rounds): a round is H inner AdamW steps on a client's share,
and what it sends is the DisTrO-compressed pseudo-gradient of its region. Real training steps of a tiny model
against torch's own AdamW run by hand; and a whole in-process run (a real coordinator on 127.0.0.1 and two
clients of different tiers) whose rounds carry H global batches and whose replicas end bit-identical."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
import torch
from aiohttp.test_utils import TestServer

from aftermath.coordinator.service import CoordinatorService
from aftermath.data import TokenStream, default_data_dir
from aftermath.errors import ConfigError
from aftermath.model import build_model, preset_config, tier_spec
from aftermath.model.slicing import sliced_model
from aftermath.round.replica import Replica, inner_batches, training_loss
from aftermath.runconfig import RunConfig
from coordinator_helpers import run_client, small_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = preset_config("tiny")
TOKEN = "local-steps"


def test_inner_batches_split_a_share_into_contiguous_near_equal_parts():
    assert inner_batches(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert inner_batches(2, 4) == [range(0, 1), range(1, 2)]  # fewer sequences than steps: one step each


def test_a_local_round_is_H_adamw_steps_and_the_replica_is_restored_bit_for_bit():
    run = RunConfig().with_overrides({
        "optimizer.local_steps": 3, "optimizer.inner_lr": 2e-3, "optimizer.schedule": "constant",
        "optimizer.warmup_steps": 0, "train.objective": "own", "data.seq_len": 16})
    spec = tier_spec(CFG, 1)
    model = sliced_model(build_model(CFG, seed=3), spec)
    replica = Replica.build(model, CFG, spec, run)
    reference = copy.deepcopy(model)
    adamw = torch.optim.AdamW(reference.parameters(), lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    stream = TokenStream(default_data_dir(), 16, seed=0, split="train", vocab_size=CFG.vocab_size)
    for step in range(2):  # the second round goes on from the inner AdamW's state of the first
        batch = stream.sequences(7 * step, 7 * step + 7)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = replica.train(batch, 8, step=step, client_id="c")
        assert result.inner_steps == 3 and result.sequences == 7
        for n, p in model.named_parameters():  # only the round's aggregate moves the replica
            assert torch.equal(p.detach(), before[n]), n
        start = {n: p.detach().clone() for n, p in reference.named_parameters()}
        for rows in ([0, 1, 2], [3, 4], [5, 6]):
            adamw.zero_grad(set_to_none=True)
            training_loss(reference, batch[rows], None, "fp32").backward()
            adamw.step()
        for n, p in reference.named_parameters():
            torch.testing.assert_close(result.grads[n], start[n] - p.detach(), rtol=1e-5, atol=1e-8)
        # the round's update is applied to the reference too, so both start the next round at the same weights
        payload = replica.decode(replica.encode(result.grads, step, "c"), step, "c", spec)
        replica.apply([payload], step)
        with torch.no_grad():
            for n, p in reference.named_parameters():
                p.copy_(dict(model.named_parameters())[n])


def test_local_steps_need_distro_and_live_in_one_place():
    with pytest.raises(ConfigError, match="local_steps 4 needs optimizer.name"):
        RunConfig().with_overrides({"optimizer.name": "adamw", "optimizer.local_steps": 4})
    run = RunConfig().with_overrides({"optimizer.distro": {"local_steps": 2}})
    with pytest.raises(ConfigError, match="set as optimizer.local_steps"):
        Replica.build(build_model(CFG, seed=0), CFG, tier_spec(CFG, 0), run)


def test_a_network_run_with_local_steps_carries_H_batches_per_round_and_replicas_agree(tmp_path):
    run = small_run_config(**{
        "optimizer.local_steps": 2, "optimizer.warmup_steps": 1, "schedule.total_steps": 4,
        "schedule.rounds_per_epoch": 2, "schedule.global_batch_size": 4, "schedule.init_min_clients": 2,
        "schedule.warmup_time": 30.0, "schedule.cooldown_time": 10.0, "schedule.heartbeat_interval": 0.5,
        "data.val_sequences": 4, "train.micro_batch_size": 2})

    async def main() -> list[dict]:
        service = CoordinatorService(run, tmp_path / "run", token=TOKEN, data_dir=default_data_dir(), linger=1.0)
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")
            clients = [run_client(url, TOKEN, tmp_path, "a", 0), run_client(url, TOKEN, tmp_path, "b", 1)]
            results = await asyncio.wait_for(asyncio.gather(*(c.run_async() for c in clients)), timeout=240)
            await service.finished.wait()
            summary = service.summary
            assert summary.replicas_consistent and summary.divergences == [] and summary.local_steps == 2
            return list(results)

    results = {r["client_id"]: r for r in asyncio.run(main())}
    reference = json.loads((tmp_path / "run" / "checkpoint" / "checkpoint.json").read_text())["weights_sha256"]
    assert results["a"]["weights_sha256"] == reference["tier0"]
    assert results["b"]["weights_sha256"] == reference["tier1"]
    records = [json.loads(line) for name in ("a", "b") for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r.get("sequences")]
    by_step: dict[int, int] = {}
    for r in rounds:
        assert r["inner_steps"] == 2
        by_step[r["step"]] = by_step.get(r["step"], 0) + r["sequences"]
    assert by_step == {s: 8 for s in range(4)}  # every round: local_steps x global_batch_size sequences
