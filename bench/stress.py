"""Stress matrix: seeds x {no fault, latency, loss, bandwidth, kills, all} on the tiny model, each a real
local testnet (a coordinator and 3 client processes at tiers 0, 1, 2 on 127.0.0.1).

Per scenario: steps completed, faults injected (delayed + dropped + throttled requests), clients killed and
rejoined, replica-hash mismatches (must be 0), NaN/Inf losses (must be 0), wall time.

    .venv/bin/python bench/stress.py --quick            # 1 seed, 4 steps per run (about 6 minutes on 2 cores)
    .venv/bin/python bench/stress.py --seeds 0,1 --steps 6 --out bench/results/stress.json
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

from rich.console import Console  # noqa: E402

from aftermath.faults import FaultConfig  # noqa: E402
from aftermath.metrics import read_metrics  # noqa: E402
from aftermath.testnet import Testnet, TestnetOptions  # noqa: E402

SCENARIOS = ("none", "latency", "loss", "bandwidth", "kills", "all")
SHORT = {"schedule.rounds_per_epoch": 2, "schedule.global_batch_size": 12, "optimizer.warmup_steps": 1,
         "data.val_sequences": 8, "schedule.max_round_train_time": 10.0, "schedule.round_witness_time": 10.0,
         "schedule.cooldown_time": 10.0, "schedule.warmup_time": 30.0, "schedule.heartbeat_interval": 0.5,
         "schedule.heartbeat_timeout": 4.0}


def scenario_options(name: str, seed: int) -> dict:
    latency = dict(latency_ms=30, jitter_ms=20)
    loss = dict(loss=0.1)
    bandwidth = dict(bandwidth=300_000)
    faults = {"none": {}, "latency": latency, "loss": loss, "bandwidth": bandwidth, "kills": {},
              "all": {**latency, **loss, **bandwidth}}[name]
    options: dict = {"faults": FaultConfig(seed=seed, **faults)}
    if name in ("kills", "all"):
        options.update(kill_random=1, kill_interval=8.0)
    return options


def non_finite_losses(out: Path) -> int:
    """Training rounds whose loss is missing or not finite (metrics write NaN/Inf as null), plus validation losses."""
    bad = 0
    for path in (out / "metrics").glob("client-*.jsonl"):
        for rec in read_metrics(path):
            if rec.get("event") == "round" and rec.get("tokens"):
                loss = rec.get("loss")
                bad += loss is None or not math.isfinite(loss)
    for rec in read_metrics(out / "metrics" / "coordinator.jsonl"):
        if rec.get("event") == "checkpoint":
            bad += sum(v is None or not math.isfinite(v) for v in (rec.get("val_loss") or {}).values())
    return bad


def run_one(name: str, seed: int, steps: int, root: Path) -> dict:
    out = root / f"{name}-{seed}"
    opts = TestnetOptions(clients=3, tiers=[0, 1, 2], steps=steps, out=out, live=False, timeout=400,
                          extra_overrides={**SHORT, "seed": seed}, **scenario_options(name, seed))
    started = time.perf_counter()
    try:
        summary = Testnet(opts, Console(quiet=True)).run()
    except Exception as exc:  # a failed scenario is a result too
        return {"scenario": name, "seed": seed, "error": str(exc)[:300], "wall_s": round(time.perf_counter() - started, 1)}
    f = summary["faults"]
    return {"scenario": name, "seed": seed, "steps": summary["steps"], "target_steps": steps,
            "faults_injected": f["latency"] + f["dropped"] + f["throttled"], "delayed": f["latency"],
            "dropped": f["dropped"], "throttled": f["throttled"], "kills": f["kills"], "rejoins": f["rejoins"],
            "hash_mismatches": len(summary["divergences"]), "replicas_consistent": summary["replicas_consistent"],
            "nan_inf": non_finite_losses(out), "wall_s": round(time.perf_counter() - started, 1),
            "val_loss_tier0": summary["tiers"].get("0", {}).get("val_loss")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, 4 steps per scenario")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="subset of " + ",".join(SCENARIOS))
    p.add_argument("--out", type=Path, default=Path("bench/results/stress.json"), help="JSON results")
    args = p.parse_args()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = 4 if args.quick else args.steps
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="aftermath-stress-") as tmp:
        for seed in seeds:
            for name in scenarios:
                console.print(f"[bold]{name}[/bold] seed {seed} ...")
                rows.append(run_one(name, seed, steps, Path(tmp)))
                console.print(rows[-1])
    columns = ["scenario", "seed", "steps", "faults_injected", "dropped", "kills", "rejoins", "hash_mismatches",
               "nan_inf", "wall_s"]
    table = [[r.get(c, r.get("error", "-") if c == "steps" else "-") for c in columns] for r in rows]
    _common.print_table("stress: tiny model, 3 clients (tiers 0,1,2)", columns, table)
    print(_common.markdown_table(columns, table))
    _common.write_json(args.out, {"steps": steps, "seeds": seeds, "rows": rows})
    failed = [r for r in rows if "error" in r or r["hash_mismatches"] or r["nan_inf"] or r["steps"] != steps]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
