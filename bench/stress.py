"""Stress matrices on the tiny model, each scenario a real local testnet on 127.0.0.1.

Faults (the default): seeds x {no fault, latency, loss, bandwidth, kills, all}, a coordinator and 3 client
processes at tiers 0, 1, 2. Per scenario: steps completed, faults injected (delayed + dropped + throttled
requests), clients killed and rejoined, replica-hash mismatches (must be 0), NaN/Inf losses (must be 0), wall time.

Attacks (`--attacks`): seeds x {clean, unscreened, one attack per mode of aftermath.client.hooks.ATTACKS}, 4 client
processes at tiers 0, 1, 1, 2 of which the second (tier 1) is the attacker from step 0. Per scenario: held-out
loss of tiers 0, 1, 2 against the clean run of the same seed (`scale` against `clean-raw`: raw values, raw apply),
who was excluded and after how many rounds, honest results screened out and honest members excluded (false
positives), replica consistency, and the cost of the screen (its seconds per round against the round's, and the
clean round with the screen against the `unscreened` one), and how far the honest payloads' screening statistics
stayed from the thresholds (`honest_margins`: min / median / max).

    .venv/bin/python bench/stress.py --quick            # 1 seed, 4 steps per run (about 6 minutes on 2 cores)
    .venv/bin/python bench/stress.py --seeds 0,1 --steps 6 --out bench/results/stress.json
    .venv/bin/python bench/stress.py --attacks --seeds 0,1,2 --steps 20 --out bench/results/stress-attacks.json
    .venv/bin/python bench/stress.py --attacks --scenarios clean --seeds 3 --steps 40 --out bench/results/stress-honest.json

The screen's own cost (`--screen-cost N,N,...`): seconds of one round's screen (aftermath.coordinator.trust) on
N distinct DisTrO payloads of a tiny-preset tier-1 replica, min and median of --repeats, in this process:

    .venv/bin/python bench/stress.py --screen-cost 4,16,64,256,1024 --out bench/results/screen-cost.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

from rich.console import Console  # noqa: E402

from aftermath.faults import FaultConfig  # noqa: E402
from aftermath.metrics import read_metrics  # noqa: E402
from aftermath.testnet import Testnet, TestnetOptions  # noqa: E402

SCENARIOS = ("none", "latency", "loss", "bandwidth", "kills", "all")
ATTACK_SCENARIOS = ("clean", "unscreened", "flip", "random", "replay", "constant", "other-data", "region",
                    "clean-raw", "scale")
ATTACKER = 1  # the client index of the attacker: a tier-1 client, so that another client shares its spec
# raw values, raw apply: the update is lr x the mean of lr-scaled momenta. 20 steps of clean-raw (--raw-lr): lr 1.0
# diverges in 2 seeds of 3 (held-out 8.6, 9.8 from 8.3), 0.3 is slow (7.35-7.38), 0.5 trains (7.07-7.09; the sign
# apply at 3e-3: 6.54-6.58)
RAW_WIRE = {"optimizer.distro": {"one_bit": False, "apply_mode": "raw"}}
RAW_LR = 0.5
BASELINE = {"scale": "clean-raw", "clean-raw": "clean-raw"}  # the clean run each scenario is held against
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


def attack_overrides(name: str, seed: int, raw_lr: float = RAW_LR) -> dict:
    overrides = {**SHORT, "seed": seed, "schedule.rounds_per_epoch": 5, "schedule.global_batch_size": 16,
                 "data.val_sequences": 16, "schedule.heartbeat_timeout": 8.0, "network.data_plane": "payloads"}
    if name == "unscreened":
        overrides["trust.screen"] = False
    if name in ("clean-raw", "scale"):
        overrides.update({**RAW_WIRE, "optimizer.lr": raw_lr})
    return overrides


def round_seconds(out: Path) -> tuple[float | None, float | None]:
    """The median time between two rounds' starts, and the median seconds the screen took per round."""
    records = read_metrics(out / "metrics" / "coordinator.jsonl")
    starts = [r["time"] for r in records if r.get("event") == "round_started"]
    gaps = sorted(b - a for a, b in zip(starts, starts[1:]))
    screens = sorted(r["seconds"] for r in records if r.get("event") == "screen")
    return (gaps[len(gaps) // 2] if gaps else None), (screens[len(screens) // 2] if screens else None)


def honest_margins(out: Path, attacker: str | None) -> dict:
    """The range of the honest payloads' screening statistics (the coordinator's `screen` records): how far they
    stay from the [trust] thresholds. Shares and losses as ratios to the round's other payloads' median."""
    agreement, worst, shared, loss = [], [], [], []
    for r in read_metrics(out / "metrics" / "coordinator.jsonl"):
        if r.get("event") != "screen":
            continue
        payloads = r["payloads"]
        for cid, v in payloads.items():
            others = [o for other, o in payloads.items() if other != cid]
            if cid == attacker or len(others) < 2:
                continue
            agreement += [v["agreement"]] if v["agreement"] is not None else []
            worst += [v["worst"]] if v["worst"] is not None else []
            shares = sorted(o["shared"] for o in others if o["shared"])
            if v["shared"] and len(shares) >= 2:
                shared.append(v["shared"] / statistics.median(shares))
            loss.append(v["loss"] / statistics.median(o["loss"] for o in others))

    def span(values: list[float]) -> list[float] | None:
        return [round(min(values), 3), round(statistics.median(values), 3), round(max(values), 3)] if values else None

    return {"payloads": len(loss), "agreement": span(agreement), "worst_param_agreement": span(worst),
            "shared_ratio": span(shared), "loss_ratio": span(loss)}


def run_attack(name: str, seed: int, steps: int, root: Path, raw_lr: float = RAW_LR) -> dict:
    out = root / f"attack-{name}-{seed}"
    attack = name if name not in ("clean", "unscreened", "clean-raw") else None
    opts = TestnetOptions(clients=4, tiers=[0, 1, 1, 2], steps=steps, out=out, live=False, timeout=900,
                          extra_overrides=attack_overrides(name, seed, raw_lr),
                          attacks={ATTACKER: attack} if attack else {})
    started = time.perf_counter()
    try:
        summary = Testnet(opts, Console(quiet=True)).run()
    except Exception as exc:  # a failed scenario is a result too
        return {"scenario": name, "seed": seed, "error": str(exc)[:300],
                "wall_s": round(time.perf_counter() - started, 1)}
    round_s, screen_s = round_seconds(out)
    return {"scenario": name, "seed": seed, "steps": summary["steps"], "target_steps": steps,
            "attacker": f"client-{ATTACKER}" if attack else None,
            "val_loss": {t: summary["tiers"].get(t, {}).get("val_loss") for t in ("0", "1", "2")},
            "excluded": {e["client_id"]: e["step"] for e in summary["excluded"]},
            "exclusion_reasons": {e["client_id"]: e["reason"] for e in summary["excluded"]},
            "screened": [[r["step"], r["client_id"], r["reason"]] for r in summary["screened"]],
            "replicas_consistent": summary["replicas_consistent"], "hashes_checked": summary["hashes_checked"],
            "honest_margins": honest_margins(out, f"client-{ATTACKER}" if attack else None),
            "round_s": round_s, "screen_s": screen_s, "wall_s": round(time.perf_counter() - started, 1)}


def attack_table(rows: list[dict]) -> tuple[list[str], list[list], list[dict]]:
    """Each scenario against its seed's clean run: the per-row table, and the per-scenario summary. Every client
    but a scenario's attacker is honest: each of its results screened out, and its exclusion, a false positive."""
    clean = {(r["scenario"], r["seed"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        attacker = r["attacker"]
        r["screened_honest"] = sum(cid != attacker for _, cid, _ in r["screened"])
        r["honest_excluded"] = sorted(cid for cid in r["excluded"] if cid != attacker)
        # attacks start at step 0: excluded at step s = after s + 1 rounds
        r["rounds_to_exclusion"] = r["excluded"][attacker] + 1 if attacker in r["excluded"] else None
        base = clean.get((BASELINE.get(r["scenario"], "clean"), r["seed"]))
        if base is not None:
            r["loss_delta_pct"] = {t: round(100 * (r["val_loss"][t] / base["val_loss"][t] - 1), 2)
                                   for t in r["val_loss"] if r["val_loss"][t] and base["val_loss"][t]}
    columns = ["scenario", "seed", "steps", "loss Δ% t0/t1/t2", "excluded after (rounds)", "honest screened",
               "honest excluded", "consistent", "round s", "screen ms"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["scenario"], r["seed"], r["error"][:60]] + ["-"] * (len(columns) - 3))
            continue
        delta = r.get("loss_delta_pct", {})
        table.append([r["scenario"], r["seed"], r["steps"], "/".join(f"{delta[t]:+.2f}" for t in sorted(delta)) or "-",
                      r.get("rounds_to_exclusion") or "-", r["screened_honest"], len(r["honest_excluded"]),
                      r["replicas_consistent"], r["round_s"] and round(r["round_s"], 3),
                      r["screen_s"] and round(1000 * r["screen_s"], 2)])
    summary = []
    for name in dict.fromkeys(r["scenario"] for r in rows):
        done = [r for r in rows if r["scenario"] == name and "error" not in r]
        deltas = [abs(v) for r in done for v in r.get("loss_delta_pct", {}).values()]
        rounds = sorted(r["rounds_to_exclusion"] for r in done if r.get("rounds_to_exclusion"))
        summary.append({"scenario": name, "runs": len(done),
                        "max_abs_loss_delta_pct": round(max(deltas), 2) if deltas else None,
                        "excluded_runs": len(rounds), "rounds_to_exclusion": rounds,
                        "honest_screened": sum(r["screened_honest"] for r in done),
                        "honest_excluded": sum(len(r["honest_excluded"]) for r in done),
                        "consistent": all(r["replicas_consistent"] for r in done),
                        "median_round_s": _median([r["round_s"] for r in done if r["round_s"]]),
                        "median_screen_ms": _median([1000 * r["screen_s"] for r in done if r["screen_s"]])})
    return columns, table, summary


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return round(values[len(values) // 2], 4) if values else None


def run_matrix(run: Callable[[str, int, int, Path], dict], seeds: list[int], scenarios: list[str],
               steps: int) -> list[dict]:
    """`run(scenario, seed, steps, root)` for every seed and scenario, with progress."""
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="aftermath-stress-") as tmp:
        for seed in seeds:
            for name in scenarios:
                console.print(f"[bold]{name}[/bold] seed {seed} ...")
                rows.append(run(name, seed, steps, Path(tmp)))
                console.print(rows[-1])
    return rows


def attacks_main(seeds: list[int], steps: int, scenarios: list[str], out: Path, merge: bool, raw_lr: float) -> int:
    run = functools.partial(run_attack, raw_lr=raw_lr)
    rows = run_matrix(run, seeds, scenarios, steps) if scenarios else []
    if merge and out.is_file():  # keep the other (scenario, seed) rows of an earlier run at the same steps
        earlier = json.loads(out.read_text())
        if earlier.get("steps") != steps:
            raise SystemExit(f"--merge: {out} holds {earlier.get('steps')}-step runs, these are {steps}-step")
        new = {(r["scenario"], r["seed"]) for r in rows}
        rows = [r for r in earlier["rows"] if (r["scenario"], r["seed"]) not in new] + rows
        order = {name: i for i, name in enumerate(ATTACK_SCENARIOS)}
        rows.sort(key=lambda r: (r["seed"], order[r["scenario"]]))
        seeds = sorted({r["seed"] for r in rows})
    columns, table, summary = attack_table(rows)
    _common.print_table("attacks: tiny model, 4 clients (tiers 0,1,1,2), client-1 attacks", columns, table)
    print(_common.markdown_table(columns, table))
    scolumns = list(summary[0]) if summary else []
    print(_common.markdown_table(scolumns, [[s[c] for c in scolumns] for s in summary]))
    _common.write_json(out, {"steps": steps, "seeds": seeds, "attacker": f"client-{ATTACKER}", "rows": rows,
                             "summary": summary})
    failed = [r for r in rows if "error" in r or not r["replicas_consistent"] or r["steps"] != steps]
    return 1 if failed else 0


def screen_cost(counts: list[int], repeats: int, out: Path) -> int:
    """Seconds of PayloadScreen.screen on N distinct payloads (what runs when a round's set is fixed), and of
    PayloadScreen.prepare per payload (what runs as each commit arrives). 32 come from real compressions of a common
    gradient plus each its own noise; the others are copies of those with a fifth of their signs flipped."""
    import os

    import torch

    from aftermath.coordinator.trust import PayloadScreen, Submitted
    from aftermath.model import build_model, preset_config, tier_spec
    from aftermath.model.slicing import sliced_model
    from aftermath.optim import Payload, SparseCoefficients
    from aftermath.round.replica import Replica, build_codec
    from aftermath.runconfig import RunConfig

    torch.set_num_threads(1)
    run, cfg = RunConfig(), preset_config("tiny")
    spec = tier_spec(cfg, 1)
    codec = build_codec(run, cfg)
    model = build_model(cfg, seed=0)
    direction = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    base = []
    for i in range(32):
        replica = Replica.build(sliced_model(model, spec), cfg, spec, run)
        grads = {n: (d + 0.7 * torch.randn(d.shape))[tuple(slice(0, k) for k in replica.rule.shapes[n])]
                 for n, d in direction.items()}
        base.append(codec.decode(replica.encode(grads, 0, f"b{i}"), run.run_id, 0, f"b{i}", spec))
    rows = []
    for n in counts:
        payloads = []
        for i in range(n):
            p = base[i % 32]
            params = p.params if i < 32 else {
                name: SparseCoefficients(c.shape, c.indices, torch.where(torch.rand(c.values.shape) < 0.2,
                                                                         -c.values, c.values))
                for name, c in p.params.items()}
            payload = Payload(p.kind, p.run_id, 0, f"c{i}", p.spec, params)
            payloads.append((payload, codec.encode(payload)))
        times, prepare = [], []
        for _ in range(repeats):
            screen = PayloadScreen(run.trust, codec.plan, codec.wire.one_bit)
            started = time.perf_counter()
            submitted = [Submitted(p.client_id, screen.prepare(p, data), 5.0) for p, data in payloads]
            prepare.append((time.perf_counter() - started) / n)
            started = time.perf_counter()
            screen.screen(0, submitted)
            times.append(time.perf_counter() - started)
        rows.append({"payloads": n, "min_s": round(min(times), 4), "median_s": round(statistics.median(times), 4),
                     "prepare_s_per_payload": round(statistics.median(prepare), 5)})
        print(rows[-1], flush=True)
    columns = ["payloads", "min_s", "median_s", "prepare_s_per_payload"]
    table = [[r[c] for c in columns] for r in rows]
    _common.print_table(f"the screen's seconds per round (tiny tier 1 payloads, load {os.getloadavg()[0]:.1f})",
                        columns, table)
    print(_common.markdown_table(columns, table))
    _common.write_json(out, {"preset": "tiny", "tier": 1, "repeats": repeats, "load_average": os.getloadavg(),
                             "rows": rows})
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, 4 steps per scenario")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    p.add_argument("--attacks", action="store_true", help="the attack matrix instead of the fault one")
    p.add_argument("--merge", action="store_true", help="--attacks: replace only these scenarios' rows in --out, "
                   "keep the others (with --scenarios none: only tabulate --out again)")
    p.add_argument("--raw-lr", type=float, default=RAW_LR, help=f"--attacks: optimizer.lr of the raw-wire scenarios "
                   f"clean-raw and scale (default {RAW_LR})")
    p.add_argument("--screen-cost", metavar="N,N,...", help="instead: time the screen on N distinct payloads")
    p.add_argument("--repeats", type=int, default=3, help="--screen-cost: timings per N (default 3)")
    p.add_argument("--scenarios", help="subset of " + ",".join(SCENARIOS) + " (or, with --attacks, of " +
                   ",".join(ATTACK_SCENARIOS) + "); default all")
    p.add_argument("--out", type=Path, help="JSON results (default bench/results/stress.json, or with --attacks "
                   "bench/results/stress-attacks.json)")
    args = p.parse_args()
    if args.screen_cost:
        return screen_cost([int(n) for n in args.screen_cost.split(",")], args.repeats,
                           args.out or Path("bench/results/screen-cost.json"))
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = 4 if args.quick else args.steps
    known = ATTACK_SCENARIOS if args.attacks else SCENARIOS
    scenarios = [s for s in (args.scenarios or ",".join(known)).split(",") if s and s != "none"]
    unknown = set(scenarios) - set(known)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(known)}")
    if args.attacks:
        return attacks_main(seeds, steps, scenarios, args.out or Path("bench/results/stress-attacks.json"), args.merge,
                            args.raw_lr)
    rows = run_matrix(run_one, seeds, scenarios, steps)
    columns = ["scenario", "seed", "steps", "faults_injected", "dropped", "kills", "rejoins", "hash_mismatches",
               "nan_inf", "wall_s"]
    table = [[r.get(c, r.get("error", "-") if c == "steps" else "-") for c in columns] for r in rows]
    _common.print_table("stress: tiny model, 3 clients (tiers 0,1,2)", columns, table)
    print(_common.markdown_table(columns, table))
    _common.write_json(args.out or Path("bench/results/stress.json"), {"steps": steps, "seeds": seeds, "rows": rows})
    failed = [r for r in rows if "error" in r or r["hash_mismatches"] or r["nan_inf"] or r["steps"] != steps]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
