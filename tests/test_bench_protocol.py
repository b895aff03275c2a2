"""bench/bandwidth.py, bench/scale.py and bench/overhead.py: each runs end to end and its JSON holds sane numbers.

bandwidth and scale run as scripts (`--quick`, reduced further) in subprocesses. overhead's end-to-end run is a
whole testnet (minutes on a loaded 2-core machine), so here its measuring functions run on real inputs: a
metrics JSONL written the way the client writes it, the plain PyTorch loop for two steps, the side-by-side
plain loops (two spawned processes, two steps each) and the report over repeats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def run_script(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bandwidth_quick(tmp_path: Path) -> None:
    out = tmp_path / "bandwidth.json"
    run_script("bandwidth.py", "--quick", "--presets", "tiny", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["benchmark"] == "bandwidth" and data["complete"] is True
    sizes = {r["tier"]: r for r in data["payloads"]}
    assert sorted(sizes) == [0, 1, 2, 3]
    for t in range(3):  # a smaller tier sends less, in every wire
        for wire in ("top-4 1-bit (default)", "top-32 1-bit", "top-32 fp32"):
            assert sizes[t + 1][wire] < sizes[t][wire]
    for r in sizes.values():
        assert r["top-4 1-bit (default)"] < r["top-32 1-bit"] < r["top-32 fp32"] < r["dense_bf16"] < r["dense_fp32"]
        assert r["dense_fp32"] == 4 * r["region_params"]
    assert sizes[0]["top-4 1-bit (default) x bf16"] > 900  # tiny's tier 0: 1.5 M parameters in ~2.9 KB
    rounds = {(r["mix"], r["wire"]): r for r in data["rounds"]}
    mix = rounds[("1+3 (tier 0 + 3 x tier 1)", "top-32 fp32")]
    payloads = [sizes[t]["top-32 fp32"] for t in (0, 1, 1, 1)]
    # each client uploads its own payload and downloads the three others
    assert mix["total"] == 4 * sum(payloads)
    assert mix["up_max"] == sizes[0]["top-32 fp32"]
    assert mix["down_max"] == sum(payloads) - sizes[1]["top-32 fp32"]
    assert mix["dense_fp32_total"] == 4 * sum(sizes[t]["dense_fp32"] for t in (0, 1, 1, 1))
    assert mix["ratio_vs_fp32"] > 10


def test_scale_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    run_script("scale.py", "--quick", "--machine-clients", "4,64", "--service-clients", "4", "--rounds", "3",
               "--timeout", "120", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["benchmark"] == "scale" and data["complete"] is True
    machine = {r["clients"]: r for r in data["state_machine"]}
    assert set(machine) == {4, 64}
    assert machine[64]["snapshot_bytes"] > machine[4]["snapshot_bytes"]  # every member is in the state
    (service,) = data["service"]
    assert service["clients"] == 4 and service["finished"] is True and not service["errors"]
    assert service["rounds_seen"] == 3 and service["rounds_measured"] >= 1
    assert service["round_s"] > 0 and service["coordinator_cpu_s_per_round"] > 0
    # join + a few long polls, ready, and per round: the commit with its payload, the peers' payloads, applied
    assert service["requests"] >= 4 * (2 + 3 * 3)
    # four clients of tiny payloads: below the crossover, every client fetches the three others' payloads
    assert service["planes"] == ["payloads"] and service["max_client_bytes_down_per_round"] == 3 * service["payload_bytes"]
    assert service["coordinator_bytes_out_per_round"] > 4 * 3 * service["payload_bytes"]


def test_overhead_measures(tmp_path: Path) -> None:
    import overhead

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    from aftermath.round.protocol import RoundRecord

    lines = []
    for step in range(5):  # round k ends at time 10 + 2k: 2 s per round, 1.5 s of it forward/backward
        # the record the client writes (its model), so this test cannot drift from the client's format
        lines.append(RoundRecord(
            time=10.0 + 2 * step, client_id="client-0", tier=1, spec="tier1", step=step, loss=5.0, tokens=1280,
            sequences=10, tokens_per_s=853.3, bytes_up=0, bytes_down=0, peak_memory=0, payload_bytes=100,
            accepted=1, t_data=0.01, t_train=1.5, t_encode=0.1, t_upload=0.05, t_prefetch=0.3, prefetched=0,
            t_download=0.02, t_decode=0.01, t_aggregate=0.2, faults={}).model_dump())
    lines[-1]["time"] = 18.5  # the last round trains nothing new (overlapped: it trained the round before): left out
    lines.insert(1, {"time": 10.5, "client_id": "client-0", "event": "heartbeat"})  # other records are skipped
    (metrics / "client-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (row,) = overhead.network_rates(tmp_path)
    assert row["tier"] == 1 and row["rounds"] == 2  # the first round is warm-up, the last the tail; 2 remain
    assert row["tokens_per_s_round"] == pytest.approx(640.0)
    assert row["tokens_per_s_train"] == pytest.approx(1280 / 1.5)
    assert row["outside_fwd_bwd_share"] == pytest.approx(0.25) == row["critical_path_share"]
    assert row["critical_path_s"] == pytest.approx(0.5)
    # prefetch runs beside training or the wait: not on the critical path, not subtracted from "other"
    assert row["t_other"] == pytest.approx(2.0 - (0.01 + 1.5 + 0.1 + 0.05 + 0.02 + 0.2 + 0.01))
    assert row["t_upload_share"] == pytest.approx(0.025) and row["t_prefetch_share"] == pytest.approx(0.15)
    assert sum(row[f"{p}_share"] for p in overhead.CRITICAL) == pytest.approx(0.25)

    plain = overhead.plain_loop("tiny", 1, sequences=4, seq_len=32, micro=2, steps=2, lr=1e-3)
    assert plain["tokens_per_step"] == 128 and plain["tokens_per_s"] > 0 and plain["busy_steps_after"] == 0

    # side by side: one spawned process per client, measured at the same time; the faster keeps training
    jobs = [dict(preset="tiny", tier=0, sequences=4, seq_len=32, micro=2, steps=2, lr=1e-3),
            dict(preset="tiny", tier=2, sequences=2, seq_len=32, micro=2, steps=2, lr=1e-3)]
    both = overhead.side_by_side(jobs, timeout=120)
    assert [r["tier"] for r in both] == [0, 2] and [r["tokens_per_step"] for r in both] == [128, 64]
    assert all(r["tokens_per_s"] > 0 for r in both)
    (skew,) = {r["start_skew_s"] for r in both}
    assert skew < 2.0 and both[0]["measured_together_s"] > 0  # they really ran at the same time
    assert len({os.getpid(), *(r["pid"] for r in both)}) == 3  # in two other processes

    # the report: per link/schedule/client, min and median over repeats, and overlap against sync
    def run(link, schedule, ratio, round_s):
        return {"link": link, "schedule": schedule, "clients": [{
            **row, "round_s": round_s, "plain_tokens_per_s": 1000.0, "network_over_plain": ratio}]}

    summary = overhead.summarize([run("home", "overlap", 0.5, 2.0), run("home", "overlap", 0.7, 2.0),
                                  run("home", "overlap", 0.9, 2.0), run("home", "sync", 0.4, 3.0)])
    assert [(s["schedule"], s["repeats"]) for s in summary] == [("overlap", 3), ("sync", 1)]
    assert summary[0]["network_over_plain_min"] == 0.5 and summary[0]["network_over_plain_median"] == 0.7
    made = overhead.tables(summary)
    assert set(made) == {"rates", "parts", "overlap_vs_sync"} and made["overlap_vs_sync"][2][0][5] == "1.50x"
