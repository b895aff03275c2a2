"""DisTrO payload sizes and encode / aggregate / apply times, per preset and tier.

For every preset and tier: the exact bytes of one payload (raw float32 values, bfloat16 values, 1-bit signs)
against the dense float32 and bfloat16 sizes of the region it stands for; the time to encode one payload; the
time to aggregate N payloads of that tier (a replica of that tier: the universal replica for tier 0, a sliced
replica for tiers 1 and 2) for N = 2, 4, 16; the time to apply the aggregate. Gradients are random (the sizes do
not depend on them; the times hardly). One torch thread.

    .venv/bin/python bench/distro.py --quick                 # small preset, 2 and 4 peers (< 1 minute)
    .venv/bin/python bench/distro.py --out bench/results/distro.json # small + gpt2-124m, 2 / 4 / 16 peers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from rich.console import Console
from rich.table import Table

from aftermath.model import param_shapes, preset_config, tier_spec
from aftermath.optim import DistroConfig, DistroOptimizer, decode_payload, size_report


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_tier(preset: str, tier: int, peers: list[int], topk: int, console: Console) -> dict:
    cfg = preset_config(preset)
    spec = tier_spec(cfg, tier)
    shapes = param_shapes(cfg, spec)
    gen = torch.Generator().manual_seed(tier)
    grads = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    row: dict = {"preset": preset, "tier": tier, "topk": topk}
    for label, extra in (("fp32", {}), ("bf16", {"value_dtype": "bfloat16"}), ("1bit", {"one_bit": True})):
        params = {n: torch.zeros(s) for n, s in shapes.items()}  # a sliced replica of the tier
        opt = DistroOptimizer(DistroConfig(topk=topk, **extra), cfg, spec, params)
        data, seconds = timed(lambda: opt.encode(grads, 0, "bench", "c0"))
        report = size_report(data, opt.plan, spec)
        row[f"bytes_{label}"] = report.payload_bytes
        if label == "fp32":
            row.update(region_params=report.region_params, dense_fp32=report.dense_fp32_bytes,
                       dense_bf16=report.dense_bf16_bytes, encode_s=seconds)
            payload, row["decode_s"] = timed(lambda: decode_payload(data, opt.expectation("bench", 0)))
            for n in peers:
                copies = [dataclasses.replace(payload, client_id=f"c{i:03d}") for i in range(n)]
                update, row[f"aggregate_{n}_s"] = timed(lambda: opt.aggregate(copies))
            _, row["apply_s"] = timed(lambda: opt.apply(update, 0))
    console.log(f"{preset} tier {tier}: {row['bytes_fp32']:,} B/payload, encode {row['encode_s']:.2f} s")
    return row


def markdown(rows: list[dict], peers: list[int]) -> str:
    head = ["preset", "tier", "region params", "payload fp32 values", "bf16 values", "1-bit", "dense fp32",
            "dense bf16", "dense fp32 / payload", "encode s"] + [f"aggregate {n} peers s" for n in peers] + ["apply s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["preset"], str(r["tier"]), f"{r['region_params'] / 1e6:.2f}M",
                 *[f"{r[k] / 1e6:.3f} MB" for k in ("bytes_fp32", "bytes_bf16", "bytes_1bit", "dense_fp32", "dense_bf16")],
                 f"{r['dense_fp32'] / r['bytes_fp32']:.0f}x", f"{r['encode_s']:.2f}",
                 *[f"{r[f'aggregate_{n}_s']:.2f}" for n in peers], f"{r['apply_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small preset only, 2 and 4 peers")
    parser.add_argument("--presets", nargs="+", default=None, help="presets (default: small gpt2-124m)")
    parser.add_argument("--tiers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--topk", type=int, default=DistroConfig().topk)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console(width=200)
    presets = args.presets or (["small"] if args.quick else ["small", "gpt2-124m"])
    peers = [2, 4] if args.quick else [2, 4, 16]
    rows = [bench_tier(p, t, peers, args.topk, console) for p in presets for t in args.tiers]

    table = Table(title=f"DisTrO payloads (chunk 64, top-{args.topk}; times on 1 CPU thread)")
    for col in ["preset", "tier", "params", "fp32 vals", "bf16 vals", "1-bit", "dense fp32", "dense bf16",
                "x fp32", "encode s"] + [f"agg {n} s" for n in peers] + ["apply s"]:
        table.add_column(col, justify="right")
    mb = lambda b: f"{b / 1e6:.2f} MB"  # noqa: E731
    for r in rows:
        table.add_row(r["preset"], str(r["tier"]), f"{r['region_params'] / 1e6:.1f}M", mb(r["bytes_fp32"]),
                      mb(r["bytes_bf16"]), mb(r["bytes_1bit"]), mb(r["dense_fp32"]), mb(r["dense_bf16"]),
                      f"{r['dense_fp32'] / r['bytes_fp32']:.0f}", f"{r['encode_s']:.2f}",
                      *[f"{r[f'aggregate_{n}_s']:.2f}" for n in peers], f"{r['apply_s']:.2f}")
    console.print(table)
    console.print("\nmarkdown:\n" + markdown(rows, peers), markup=False, highlight=False)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "peers": peers, "topk": args.topk}, f, indent=2)
        console.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
