"""Attacks end to end on real processes: a coordinator and 4 clients at tiers 0, 1, 1, 2 on 127.0.0.1, the second
of them a member that holds the token and signs what it commits, but commits poisoned payloads (the test-only
attacker of aftermath.client.hooks). The screen must leave its results out, exclude it, say so in the summary
and on the dashboard's event list, exclude no honest member, and the replicas must stay bit-identical.
The three-seed matrix over every attack is bench/stress.py --attacks (docs/reliability.md). Slow."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from aftermath.dashboard.history import RunHistory
from aftermath.metrics import read_metrics
from aftermath.testnet import Testnet, TestnetOptions

pytestmark = pytest.mark.slow

RUN = {"schedule.rounds_per_epoch": 3, "schedule.global_batch_size": 16, "optimizer.warmup_steps": 1,
       "data.val_sequences": 8, "schedule.max_round_train_time": 20.0, "schedule.round_witness_time": 20.0,
       "schedule.cooldown_time": 10.0, "schedule.warmup_time": 30.0, "schedule.heartbeat_interval": 0.5,
       "schedule.heartbeat_timeout": 8.0, "network.data_plane": "payloads"}


def run_attack(out: Path, attack: str, steps: int = 6) -> dict:
    opts = TestnetOptions(clients=4, tiers=[0, 1, 1, 2], steps=steps, out=out, live=False, timeout=400,
                          extra_overrides=RUN, attacks={1: attack})
    return Testnet(opts, Console(quiet=True)).run()


@pytest.mark.parametrize("attack, reason", [("flip", "signs agree -"), ("replay", "its payload repeats")])
def test_an_attacker_is_screened_out_and_excluded_and_the_honest_run_goes_on(tmp_path, attack, reason):
    out = tmp_path / "out"
    summary = run_attack(out, attack)
    assert summary["steps"] == 6
    assert summary["replicas_consistent"] is True and summary["hashes_checked"] >= 3, summary["unrecovered"]
    assert [e["client_id"] for e in summary["excluded"]] == ["client-1"]  # the attacker, and no honest member
    assert reason in summary["excluded"][0]["reason"] and summary["excluded"][0]["step"] <= 3
    assert {r["client_id"] for r in summary["screened"]} == {"client-1"}
    status = {c["id"]: c["status"] for c in summary["clients"]}
    assert status["client-1"] == "gone" and all(status[f"client-{i}"] == "member" for i in (0, 2, 3))
    # no round after the exclusion holds anything of the attacker, and every round before held only what passed
    records = read_metrics(out / "metrics" / "coordinator.jsonl")
    accepted = {r["step"]: r["accepted"] for r in records if r.get("event") == "round_accepted"}
    screened_steps = {r["step"] for r in summary["screened"]}
    assert all("client-1" not in accepted[s] for s in screened_steps)
    assert all("client-1" not in accepted[s] for s in accepted if s > summary["excluded"][0]["step"])
    # the dashboard's event list (the same builder as the live page) shows the exclusion with its reason
    events = RunHistory().add_all(records).events
    excluded = [e for e in events if e["kind"] == "excluded"]
    assert len(excluded) == 1 and reason in excluded[0]["detail"]["reason"]
    assert (out / "logs" / "client-1.log").read_text().count("excluded this client") == 1
