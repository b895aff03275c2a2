"""Protocol overhead: a client's tokens/s inside the testnet against a plain PyTorch loop training the same model
at the same tier in one process, and the share of a round spent outside forward/backward.

1. A short testnet (`aftermath.testnet.Testnet`: a coordinator and one client per tier, real processes on
   127.0.0.1, the embedded default run: tiny preset, DisTrO) runs --steps rounds. From each client's metrics
   JSONL ("round" records): tokens per round, the round's wall time (between consecutive round records, so it
   includes waiting for the slower peer and for the coordinator), and the parts the client measures: data,
   forward/backward (t_train), encode, upload+commit, prefetch, download, decode+aggregate, apply. The first
   round is left out (warm-up).
2. The plain loop: the same preset sliced to the same tier, `torch.optim.AdamW`, the same sequences per step
   and micro-batch size, one torch thread, --steps steps in this process (after the testnet has finished).
Ratios: in-network tokens/s over plain-loop tokens/s; 1 - t_train / round time = the share outside
forward/backward.

Run:   .venv/bin/python bench/overhead.py --out bench/results/overhead.json   (2 clients, 12 steps; ~2-3 min)
Quick: .venv/bin/python bench/overhead.py --quick --out /tmp/overhead.json     (3 steps)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# the parts of a round a client times (aftermath.round.protocol.RoundRecord)
PARTS = ("t_data", "t_train", "t_encode", "t_upload", "t_prefetch", "t_download", "t_decode", "t_aggregate")


def network_rates(out: Path) -> list[dict[str, Any]]:
    """Per client: tokens/s over round wall time and over t_train, and the mean time of each part."""
    from aftermath.metrics import read_metrics
    from aftermath.round.protocol import RoundRecord

    rows = []
    for path in sorted((out / "metrics").glob("client-*.jsonl")):
        records = sorted((RoundRecord.model_validate(r) for r in read_metrics(path) if r.get("event") == "round"),
                         key=lambda r: r.step)
        if len(records) < 3:
            continue
        # round k+1's wall time: record k -> record k+1; only rounds in which this client trained
        pairs = [(a, b) for a, b in zip(records[1:-1], records[2:]) if b.t_train]
        if not pairs:
            continue
        tokens = [b.tokens for _, b in pairs]
        walls = [b.time - a.time for a, b in pairs]
        train = [b.t_train for _, b in pairs]
        row: dict[str, Any] = {
            "client": path.stem, "tier": records[0].tier, "rounds": len(pairs),
            "tokens_per_round": statistics.fmean(tokens), "round_s": statistics.fmean(walls),
            "tokens_per_s_round": sum(tokens) / sum(walls), "tokens_per_s_train": sum(tokens) / sum(train),
            "outside_fwd_bwd_share": 1.0 - sum(train) / sum(walls)}
        for part in PARTS:
            row[part] = statistics.fmean([getattr(b, part) or 0.0 for _, b in pairs])
        row["t_other"] = row["round_s"] - sum(row[p] for p in PARTS if p != "t_prefetch")
        rows.append(row)
    return rows


def plain_loop(preset: str, tier: int, sequences: int, seq_len: int, micro: int, steps: int,
               lr: float) -> dict[str, Any]:
    """Tokens/s of forward/backward/AdamW on the sliced tier in one process (first step left out)."""
    import torch

    from aftermath.data import TokenStream, default_data_dir
    from aftermath.model import build_model, preset_config, tier_spec
    from aftermath.model.slicing import sliced_model

    cfg = preset_config(preset)
    model = build_model(cfg, seed=0)
    if tier:
        model = sliced_model(model, tier_spec(cfg, tier))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    stream = TokenStream(default_data_dir(), seq_len, seed=0, split="train", vocab_size=cfg.vocab_size)
    times = []
    for step in range(steps + 1):
        batch = stream.sequences(step * sequences, (step + 1) * sequences)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for lo in range(0, sequences, micro):
            part = batch[lo: lo + micro]
            loss = model.loss(part[:, :-1], part[:, 1:])
            (loss * (part.shape[0] / sequences)).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    tokens = sequences * seq_len
    return {"tier": tier, "steps": steps, "tokens_per_step": tokens, "step_s": statistics.fmean(times[1:]),
            "tokens_per_s": tokens * steps / sum(times[1:])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 steps")
    ap.add_argument("--steps", type=int, default=None, help="testnet rounds and plain-loop steps (default 12)")
    ap.add_argument("--tiers", default="0,1", help="one client per tier (default 0,1)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the testnet's output in this directory")
    ap.add_argument("--out", default="bench/results/overhead.json")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console

    from aftermath.testnet import Testnet, TestnetOptions

    torch.set_num_threads(1)
    console = Console(width=200)
    steps = args.steps or (3 if args.quick else 12)
    tiers = [int(t) for t in args.tiers.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aftermath-overhead-") as tmp:
        out = args.keep or Path(tmp)
        options = TestnetOptions(clients=len(tiers), tiers=tiers, steps=steps, out=out, live=False, threads=1,
                                 extra_overrides={"schedule.rounds_per_epoch": steps})
        testnet = Testnet(options, console=console)
        summary = testnet.run()
        import tomllib

        from aftermath.runconfig import parse_run_config

        run = parse_run_config(tomllib.loads((out / "logs" / "run.toml").read_text()))
        network = network_rates(out)
    console.log(f"testnet done: {len(network)} clients measured")
    plain = []
    for row in network:
        sequences = round(row["tokens_per_round"] / run.data.seq_len)
        p = plain_loop(run.model.preset, row["tier"], sequences, run.data.seq_len, run.train.micro_batch_size,
                       steps, run.optimizer.lr)
        row["plain_tokens_per_s"] = p["tokens_per_s"]
        row["network_over_plain"] = row["tokens_per_s_round"] / p["tokens_per_s"]
        plain.append(p)

    cols = ["client", "tier", "tokens/round", "round s", "tokens/s in testnet", "tokens/s fwd/bwd only",
            "tokens/s plain loop", "testnet / plain", "share outside fwd/bwd"]
    rows = [[r["client"], r["tier"], round(r["tokens_per_round"]), f"{r['round_s']:.2f}",
             f"{r['tokens_per_s_round']:.0f}", f"{r['tokens_per_s_train']:.0f}", f"{r['plain_tokens_per_s']:.0f}",
             f"{r['network_over_plain']:.2f}", f"{100 * r['outside_fwd_bwd_share']:.0f}%"] for r in network]
    part_cols = ["client", "tier", *[p[2:] for p in PARTS], "other (waiting)", "round"]
    part_rows = [[r["client"], r["tier"], *[f"{r[p]:.3f}" for p in PARTS], f"{r['t_other']:.3f}",
                  f"{r['round_s']:.3f}"] for r in network]
    _common.print_table(f"Tokens/s: testnet client vs plain PyTorch loop ({run.model.preset}, seq {run.data.seq_len})",
                        cols, rows, console)
    _common.print_table("Mean seconds per round by part (prefetch overlaps the wait; other = waiting for peers "
                        "and the coordinator)", part_cols, part_rows, console)
    path = _common.write_json(args.out, {
        "benchmark": "overhead", "quick": args.quick, "complete": bool(network), "steps": steps, "tiers": tiers,
        "preset": run.model.preset, "seq_len": run.data.seq_len, "optimizer": run.optimizer.name,
        "testnet_summary": {k: summary.get(k) for k in ("steps", "replicas_consistent", "wall_seconds")},
        "clients": network, "plain": plain, "wall_seconds": round(time.perf_counter() - t0, 1),
        "markdown": {"rates": _common.markdown_table(cols, rows), "parts": _common.markdown_table(part_cols, part_rows)},
    })
    console.print(f"wrote {path}")
    return 0 if network else 1


if __name__ == "__main__":
    sys.exit(main())
