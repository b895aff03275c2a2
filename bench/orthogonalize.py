"""Muon's orthogonalisers per step: Newton-Schulz against Polar Express, banded and whole-matrix, float32 and
bfloat16, beside the forward/backward of the same step; and how close each lands to the exact polar factor.

For every preset, one torch thread, a tier-0 replica (the universal model):
  cost        the orthogonalisation of every Muon matrix of one optimizer step (each nested band on its own,
              as Aftermath's Muon does; `whole`: each matrix at once, standard Muon), in ms per step and ns
              per Muon-updated parameter; the methods alternate within each repeat, so load hits them alike
  fwd/bwd     one forward/backward of the run's batch (--batch sequences of --seq-len tokens), for scale
  accuracy    on the bands of a real gradient of that batch: the singular values of each orthogonalised band
              against 1 (what an exact polar factor gives), as the worst and the mean |s - 1| over the bands
Each timing is repeated (--repeats) and reported as min and median, with the load average before and after.

Run:   .venv/bin/python bench/orthogonalize.py --out bench/results/orthogonalize.json   (tiny + small, ~2 min)
Quick: .venv/bin/python bench/orthogonalize.py --quick --out /tmp/orthogonalize.json    (tiny, ~10 s)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

METHODS = [  # (label, orthogonalizer, dtype, bands)
    ("newton_schulz fp32", "newton_schulz", "float32", "nested"),
    ("polar_express fp32", "polar_express", "float32", "nested"),
    ("newton_schulz bf16", "newton_schulz", "bfloat16", "nested"),
    ("polar_express bf16", "polar_express", "bfloat16", "nested"),
    ("newton_schulz fp32 whole", "newton_schulz", "float32", "whole"),
    ("polar_express fp32 whole", "polar_express", "float32", "whole"),
]


def band_blocks(opt: Any, grads: dict[str, Any]) -> list[Any]:
    """The matrices one Muon step orthogonalises: each band (rows or columns between band edges) of each
    matrix in `opt.bands`, cut from `grads`."""
    blocks = []
    for name, (dim, bounds) in opt.bands.items():
        start = 0
        for end in bounds:
            g = grads[name]
            blocks.append((g[start:end] if dim == 0 else g[:, start:end]).contiguous())
            start = end
    return blocks


def measure(preset: str, repeats: int, batch: int, seq_len: int) -> dict[str, Any]:
    import torch

    from aftermath.model import build_model, preset_config, tier_spec
    from aftermath.optim import DenseConfig, DenseOptimizer

    cfg = preset_config(preset)
    spec = tier_spec(cfg, 0)
    model = build_model(cfg, seed=0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()

    fwd_bwd()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    plans: dict[str, tuple[Any, list]] = {}  # label -> (orthogonaliser, the blocks of one step)
    muon_params = 0
    for label, name, dtype, bands in METHODS:
        config = DenseConfig(algorithm="muon", orthogonalizer=name, ortho_dtype=dtype, muon_bands=bands)
        opt = DenseOptimizer(config, cfg, spec, params)
        blocks = band_blocks(opt, grads)
        muon_params = sum(b.numel() for b in blocks)
        plans[label] = (config.orthogonalize(), blocks)

    times: dict[str, list[float]] = {label: [] for label in [*plans, "fwd/bwd"]}
    for _ in range(repeats):
        for label, (orth, blocks) in plans.items():
            t0 = time.perf_counter()
            for b in blocks:
                orth(b)
            times[label].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fwd_bwd()
        times["fwd/bwd"].append(time.perf_counter() - t0)

    accuracy: dict[str, dict[str, float]] = {}
    for label, (orth, blocks) in plans.items():
        deviations = []
        for b in blocks:
            s = torch.linalg.svdvals(orth(b).double())
            deviations.append(float((s - 1).abs().max()))
        accuracy[label] = {"worst": max(deviations), "mean": statistics.mean(deviations)}
    total_params = sum(p.numel() for p in params.values())
    rows = {}
    for label, ts in times.items():
        per = total_params if label == "fwd/bwd" else muon_params
        rows[label] = {"min_ms": min(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3,
                       "ns_per_param": min(ts) / per * 1e9, **accuracy.get(label, {})}
    return {"preset": preset, "params": total_params, "muon_params": muon_params, "batch": batch,
            "seq_len": seq_len, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small", help="comma-separated model presets (default tiny,small)")
    ap.add_argument("--repeats", type=int, default=5, help="timings per method (default 5; min and median)")
    ap.add_argument("--batch", type=int, default=8, help="sequences in the fwd/bwd step (default 8)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 2 repeats: checks that it runs")
    ap.add_argument("--out", default="bench/results/orthogonalize.json")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    presets = ["tiny"] if args.quick else [p.strip() for p in args.presets.split(",") if p.strip()]
    repeats = 2 if args.quick else args.repeats
    load_before = os.getloadavg()
    results = [measure(p, repeats, args.batch, args.seq_len) for p in presets]
    load_after = os.getloadavg()
    columns = ["preset", "method", "min ms/step", "median ms/step", "ns/param", "worst |s-1|", "mean |s-1|"]
    table = []
    for r in results:
        for label, row in r["rows"].items():
            table.append([r["preset"], label, round(row["min_ms"], 2), round(row["median_ms"], 2),
                          round(row["ns_per_param"], 2), row.get("worst") and round(row["worst"], 3),
                          row.get("mean") and round(row["mean"], 3)])
    _common.print_table(f"Muon orthogonalisers per optimizer step (tier 0, one thread; fwd/bwd of {args.batch} x "
                        f"{args.seq_len} tokens, ns per model parameter); load {load_before[0]:.1f} -> "
                        f"{load_after[0]:.1f}", columns, table)
    path = _common.write_json(args.out, {"benchmark": "orthogonalize", "quick": args.quick, "repeats": repeats,
                                         "load_before": load_before, "load_after": load_after,
                                         "results": results, "markdown": _common.markdown_table(columns, table)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
