"""Bytes per round: per client and in total, for mixes of tiers, against dense fp32 and bf16 gradients.

Every payload size here is the exact length of a real payload (`DistroOptimizer.encode` on random gradients of
the tier's region; the size does not depend on the values), measured once per (preset, tier, wire). The dense
sizes are those of the same region's gradient (`size_report`: 4 or 2 bytes per parameter).

A round, as the protocol runs it: each client uploads its own payload once and downloads every OTHER accepted
payload of the round (it keeps its own). So, for a mix of N clients with payload sizes p_i:
  up_i   = p_i                       down_i = sum_j p_j - p_i
  total  = sum_i up_i + sum_i down_i = N * sum_j p_j    (bytes through the blob store per round)
The same formula with dense region gradients gives the dense columns.

Mixes: all tier 0 (4 clients); 1+3 (one tier 0, three tier 1); 0+1+2+3 (one client of each tier).
Wires (all wire version 2: 12-bit packed indices for 64 x 64 chunks, a header of a few hundred bytes): the
default, top-4 with 1-bit signs (Psyche's production setting); top-10 and top-32 with 1-bit signs; top-32 with float32
values (the settings of the version-1 default, which measured 42x below dense bf16 at gpt2-124m).

Local steps (optimizer.local_steps H, `--local-steps 1,4,8`): a round sends one payload of the same size for H
inner steps, so the bytes per inner step are the payload / H; the table gives them for the default wire and for
top-10 1-bit (the local-steps setting measured in docs/results.md).

A real testnet (`--testnet-steps N`): two clients (tiers 0 and 1) per preset run N steps, and summary.json says
how many bytes each sent in all (payloads, commits, heartbeats, state requests), per step (per inner step with
`--testnet-local-steps H`, at top-k `--testnet-topk K`).

Run:   .venv/bin/python bench/bandwidth.py --out bench/results/bandwidth.json   (small + gpt2-124m, ~10 s)
       add --testnet-steps 12 --presets small for the real testnet (a few minutes), and
       --testnet-local-steps 4 for it to run 4 local steps per round
Quick: .venv/bin/python bench/bandwidth.py --quick --out /tmp/bandwidth.json    (tiny + small)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

MIXES: dict[str, tuple[int, ...]] = {
    "4 x tier 0": (0, 0, 0, 0),
    "1+3 (tier 0 + 3 x tier 1)": (0, 1, 1, 1),
    "0+1+2+3": (0, 1, 2, 3),
}
WIRES: dict[str, dict[str, Any]] = {
    "top-4 1-bit (default)": {"topk": 4, "one_bit": True},
    "top-10 1-bit": {"topk": 10, "one_bit": True},  # the local-steps setting measured in docs/results.md
    "top-32 1-bit": {"topk": 32, "one_bit": True},
    "top-32 fp32": {"topk": 32, "one_bit": False},
}
LOCAL_WIRES = ("top-4 1-bit (default)", "top-10 1-bit")  # the local-steps table's wires
MB = 1e6


def payload_sizes(preset: str, tiers: list[int], console: Any) -> list[dict[str, Any]]:
    """One real payload per (tier, wire): its exact bytes and the dense sizes of its region."""
    import torch

    from aftermath.model import param_shapes, preset_config, tier_spec
    from aftermath.optim import DistroConfig, DistroOptimizer, size_report

    cfg = preset_config(preset)
    rows = []
    for tier in tiers:
        spec = tier_spec(cfg, tier)
        shapes = param_shapes(cfg, spec)
        gen = torch.Generator().manual_seed(tier)
        grads = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
        row: dict[str, Any] = {"preset": preset, "tier": tier}
        for wire, extra in WIRES.items():
            params = {n: torch.zeros(s) for n, s in shapes.items()}  # a sliced replica of the tier
            opt = DistroOptimizer(DistroConfig(**extra), cfg, spec, params)
            start = time.perf_counter()
            data = opt.encode(grads, 0, "bench-bandwidth", "c0")
            report = size_report(data, opt.plan, spec)
            row[wire] = report.payload_bytes
            row[f"{wire} x bf16"] = report.ratio_bf16
            row.update(region_params=report.region_params, dense_fp32=report.dense_fp32_bytes,
                       dense_bf16=report.dense_bf16_bytes)
            console.log(f"{preset} tier {tier} {wire}: {report.payload_bytes:,} B "
                        f"(encode {time.perf_counter() - start:.1f} s)")
        rows.append(row)
    return rows


def round_traffic(sizes: list[int]) -> dict[str, float]:
    """Per-client up/down and the total bytes through the blob store for one round."""
    total = sum(sizes)
    return {"up_max": max(sizes), "down_max": max(total - s for s in sizes), "total": len(sizes) * total}


def testnet_bytes(preset: str, steps: int, local_steps: int, topk: int, console: Any) -> list[dict[str, Any]]:
    """A real testnet (tiers 0 and 1, 1-bit top-`topk`, `local_steps` per round): bytes each client sent per
    (inner) step, from summary.json, against the dense bf16 gradient of its region. Everything a client sends
    counts (payloads, commits, heartbeats, state requests)."""
    import tempfile

    from aftermath.model import parameter_count, preset_config, tier_spec
    from aftermath.testnet import Testnet, TestnetOptions

    cfg = preset_config(preset)
    with tempfile.TemporaryDirectory(prefix="aftermath-bandwidth-") as tmp:
        options = TestnetOptions(clients=2, tiers=[0, 1], steps=steps, out=Path(tmp) / "out", live=False, threads=1,
                                 extra_overrides={"model.preset": preset, "schedule.rounds_per_epoch": steps,
                                                  "optimizer.local_steps": local_steps,
                                                  "optimizer.distro": {"topk": topk}})
        summary = Testnet(options, console=console).run()
    rows = []
    for c in summary["clients"]:
        dense = 2 * parameter_count(cfg, tier_spec(cfg, c["tier"]))
        per_step = c["bytes_up"] / max(1, c["rounds_contributed"]) / summary["local_steps"]
        rows.append({"preset": preset, "client": c["id"], "tier": c["tier"], "steps": c["rounds_contributed"],
                     "local_steps": summary["local_steps"], "topk": topk,
                     "bytes_up": c["bytes_up"], "bytes_up_per_step": per_step, "dense_bf16": dense,
                     "x_below_bf16": dense / per_step, "replicas_consistent": summary["replicas_consistent"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny and small presets (seconds)")
    ap.add_argument("--presets", default=None, help="comma-separated (default small,gpt2-124m)")
    ap.add_argument("--testnet-steps", type=int, default=0,
                    help="also run a real testnet of this many steps per preset (tiers 0 and 1) and report the "
                         "bytes each client sent per step (default 0: none)")
    ap.add_argument("--local-steps", default="1,4,8", help="comma-separated optimizer.local_steps H: bytes per "
                    "inner step of the default wire at each (default 1,4,8)")
    ap.add_argument("--testnet-local-steps", type=int, default=1,
                    help="optimizer.local_steps of the real testnet (default 1: DisTrO)")
    ap.add_argument("--testnet-topk", type=int, default=4, help="top-k per chunk of the real testnet (default 4)")
    ap.add_argument("--out", default="bench/results/bandwidth.json")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console

    torch.set_num_threads(1)
    console = Console(width=200)
    presets = (args.presets or ("tiny,small" if args.quick else "small,gpt2-124m")).split(",")
    t0 = time.perf_counter()
    sizes: list[dict[str, Any]] = []
    tiers = sorted({t for mix in MIXES.values() for t in mix})
    for preset in presets:
        sizes += payload_sizes(preset, tiers, console)

    by = {(r["preset"], r["tier"]): r for r in sizes}
    rows: list[dict[str, Any]] = []
    for preset in presets:
        for mix, tiers_of_mix in MIXES.items():
            dense32 = round_traffic([by[(preset, t)]["dense_fp32"] for t in tiers_of_mix])
            dense16 = round_traffic([by[(preset, t)]["dense_bf16"] for t in tiers_of_mix])
            for wire in WIRES:
                traffic = round_traffic([by[(preset, t)][wire] for t in tiers_of_mix])
                rows.append({
                    "preset": preset, "mix": mix, "tiers": list(tiers_of_mix), "wire": wire,
                    "per_client_up": {f"tier{t}": by[(preset, t)][wire] for t in sorted(set(tiers_of_mix))},
                    "up_max": traffic["up_max"], "down_max": traffic["down_max"], "total": traffic["total"],
                    "dense_fp32_total": dense32["total"], "dense_bf16_total": dense16["total"],
                    "ratio_vs_fp32": dense32["total"] / traffic["total"],
                    "ratio_vs_bf16": dense16["total"] / traffic["total"],
                })

    size_cols = ["preset", "tier", "region params (M)", "dense bf16 (MB)"] + [
        f"{w} (KB, x below bf16)" for w in WIRES]
    size_rows = [[r["preset"], r["tier"], f"{r['region_params'] / 1e6:.2f}", f"{r['dense_bf16'] / MB:.1f}"]
                 + [f"{r[w] / 1e3:.1f} ({r[f'{w} x bf16']:.0f}x)" for w in WIRES] for r in sizes]
    mix_cols = ["preset", "mix", "wire", "upload per client (MB)", "max download per client (MB)",
                "total per round (MB)", "dense fp32 total (MB)", "dense bf16 total (MB)", "x fewer than fp32",
                "x fewer than bf16"]
    mix_rows = [[r["preset"], r["mix"], r["wire"],
                 " / ".join(f"t{t[4:]}: {v / MB:.3f}" for t, v in r["per_client_up"].items()),
                 f"{r['down_max'] / MB:.3f}", f"{r['total'] / MB:.3f}", f"{r['dense_fp32_total'] / MB:.1f}",
                 f"{r['dense_bf16_total'] / MB:.1f}", f"{r['ratio_vs_fp32']:.0f}", f"{r['ratio_vs_bf16']:.0f}"]
                for r in rows]
    hs = [int(h) for h in args.local_steps.split(",") if h.strip()]
    local = [{"preset": r["preset"], "tier": r["tier"], "wire": w, "local_steps": h,
              "bytes_per_inner_step": r[w] / h, "x_below_bf16": r["dense_bf16"] * h / r[w]}
             for r in sizes for w in LOCAL_WIRES for h in hs]
    local_cols = ["preset", "tier", "wire", "local steps H", "bytes per inner step",
                  "x below dense bf16 per inner step"]
    local_rows = [[r["preset"], r["tier"], r["wire"], r["local_steps"], round(r["bytes_per_inner_step"]),
                   f"{r['x_below_bf16']:.0f}"] for r in local]
    real = [row for preset in presets
            for row in testnet_bytes(preset, args.testnet_steps, args.testnet_local_steps, args.testnet_topk,
                                     console)] \
        if args.testnet_steps else []
    real_cols = ["preset", "client", "tier", "rounds", "local steps", "top-k", "bytes up per inner step",
                 "dense bf16 (MB)", "x below bf16"]
    real_rows = [[r["preset"], r["client"], r["tier"], r["steps"], r["local_steps"], r["topk"],
                  round(r["bytes_up_per_step"]),
                  f"{r['dense_bf16'] / MB:.1f}", f"{r['x_below_bf16']:.0f}"] for r in real]
    _common.print_table("One payload per tier (exact bytes)", size_cols, size_rows, console)
    _common.print_table("Local steps: one payload per H inner steps", local_cols, local_rows, console)
    if real:
        _common.print_table("A real testnet: everything each client sent, per step", real_cols, real_rows, console)
    _common.print_table("One round, 4 clients (each uploads its payload, downloads the 3 others)", mix_cols,
                        mix_rows, console)
    path = _common.write_json(args.out, {
        "benchmark": "bandwidth", "quick": args.quick, "complete": True, "wires": WIRES, "presets": presets,
        "payloads": sizes, "rounds": rows, "local_steps": local, "testnet": real,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "markdown": {"payloads": _common.markdown_table(size_cols, size_rows),
                     "rounds": _common.markdown_table(mix_cols, mix_rows),
                     "local_steps": _common.markdown_table(local_cols, local_rows),
                     "testnet": _common.markdown_table(real_cols, real_rows)},
    })
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
