"""train.micro_batch_size = "auto": the client takes the largest power-of-two micro-batch whose estimated step fits
its memory budget (ClientOptions.memory_limit here), and activation checkpointing when not even 1 fits. Gradient
accumulation keeps the client's batch: the payload it commits is the one an explicit micro-batch of the chosen
size gives. Real coordinators and clients in one process, one AdamW round each (dense payloads: the gradient's
own bits)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from aftermath.client.loop import HEADROOM, ClientOptions, TrainingClient, choose_micro_batch, estimate_memory
from aftermath.coordinator.service import CoordinatorService
from aftermath.data import default_data_dir
from aftermath.model import preset_config, tier_spec
from coordinator_helpers import small_run_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = "micro"
CFG = preset_config("tiny")
SEQ = 16  # small_run_config's data.seq_len; its global batch is 4 sequences


def one_round(tmp_path: Path, micro: int | str, memory_limit: int | None) -> tuple[str, dict]:
    """The sha256 of the payload a lone tier-0 client commits at step 0, and its memory_plan record."""
    run = small_run_config(**{"optimizer.name": "adamw", "optimizer.dense": {"value_dtype": "float32"},
                              "schedule.total_steps": 1, "schedule.rounds_per_epoch": 1,
                              "train.micro_batch_size": micro, "network.max_blob_bytes": 16 * 2**20,
                              # every sequence at tier 0, so that the micro-batch really splits the share
                              "train.objective": "own"})
    records: list[dict] = []

    async def main() -> str:
        service = CoordinatorService(run, tmp_path / "run", token=TOKEN, data_dir=default_data_dir(), linger=0.5)
        async with TestServer(service.app, host="127.0.0.1") as server:
            url = str(server.make_url("")).rstrip("/")
            await TrainingClient(ClientOptions(coordinator=url, token=TOKEN, tier=0, name="a", threads=1,
                                               memory_limit=memory_limit, work_dir=tmp_path / "client",
                                               on_update=records.append)).run_async()
            await service.finished.wait()
            return service.machine.round_at(0).accepted[0].blob

    blob = asyncio.run(main())
    return blob, next(r for r in records if r["event"] == "memory_plan")


def limit_for(micro: int, checkpointing: bool = False) -> int:
    """A memory limit whose usable share fits exactly the step of `micro` (and nothing larger)."""
    need = estimate_memory(CFG, tier_spec(CFG, 0), micro, SEQ, "adamw", checkpointing=checkpointing)
    return int(need / HEADROOM) + 2


def test_the_planner_takes_the_largest_power_of_two_that_fits():
    spec = tier_spec(CFG, 0)
    need = {m: estimate_memory(CFG, spec, m, 128, "distro") for m in (1, 2, 4, 8, 16)}
    assert list(need.values()) == sorted(need.values())  # more sequences, more memory
    assert choose_micro_batch(CFG, spec, need[4], 128, "distro", 32).size == 4
    assert choose_micro_batch(CFG, spec, need[4] - 1, 128, "distro", 32).size == 2
    assert choose_micro_batch(CFG, spec, need[16] * 100, 128, "distro", 12).size == 8  # capped by the batch
    plan = choose_micro_batch(CFG, spec, need[1] - 1, 128, "distro", 32)  # not even 1 without checkpointing
    assert plan is not None and plan.size >= 1 and plan.checkpointing and plan.need < need[1]
    assert choose_micro_batch(CFG, spec, 1000, 128, "distro", 32) is None
    # checkpointing, bf16 and a GPU (the replica's optimizer state stays in host memory) each need less
    assert estimate_memory(CFG, spec, 8, 128, "distro", checkpointing=True) < need[8]
    assert estimate_memory(CFG, spec, 8, 128, "distro", gpu=True) < need[8]


def test_a_small_memory_limit_gives_a_smaller_micro_batch_with_the_same_payload(tmp_path):
    roomy_blob, roomy = one_round(tmp_path / "roomy", "auto", None)
    assert roomy["micro_batch"] == 4 and not roomy["checkpointing"]  # the whole share of 4 sequences at once
    blob, plan = one_round(tmp_path / "limited", "auto", limit_for(2))
    assert plan["micro_batch"] == 2 and not plan["checkpointing"] and plan["micro_batch_setting"] == "auto"
    assert plan["budget_bytes"] == limit_for(2)
    explicit_blob, explicit = one_round(tmp_path / "explicit", 2, None)
    assert explicit["micro_batch"] == 2
    assert blob == explicit_blob  # the same gradient, bit for bit
    assert blob != roomy_blob  # and the micro-batch does change its bits (so the equality above says something)


def test_checkpointing_when_not_even_one_sequence_fits(tmp_path):
    limit = limit_for(1, checkpointing=True)
    assert int(limit * HEADROOM) < estimate_memory(CFG, tier_spec(CFG, 0), 1, SEQ, "adamw")
    blob, plan = one_round(tmp_path / "ckpt", "auto", limit)
    assert plan["micro_batch"] == 1 and plan["checkpointing"]
    plain_blob, _ = one_round(tmp_path / "plain", 1, None)
    assert blob == plain_blob  # recomputed activations give the same gradient
