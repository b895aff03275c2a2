"""DisTrO's math per parameter: encode, decode, and aggregate + apply, in nanoseconds per parameter of the replica.

For every preset and replica tier (tier 0: the universal replica; tier t > 0: a sliced replica holding only its
region), one torch thread:
  encode      one step of the tier's optimizer on random gradients: momentum, chunked DCT, top-k, error
              feedback, payload bytes (per parameter of the tier's region)
  decode      the strict decode of every peer's payload of the round (per parameter of the replica)
  aggregate   aggregate_and_apply of the round's payloads, streamed band by band, as the network client does
              (per parameter of the replica)
The round's peers are a mix of tiers (--peers, default "0,1": the two-client testnet; "0*8,1*8" gives 16 peers
and the dense-coefficient path). Each timing is repeated (--repeats) and reported as min and median, with the
load average before and after.

To compare two builds side by side (e.g. before/after a change), run this script once per build in one session,
alternating, each with PYTHONPATH pointing at that build's `src`:
    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before/src .venv/bin/python bench/distro.py --label before --out /tmp/distro-before.json
    .venv/bin/python bench/distro.py --label after --out /tmp/distro-after.json
The script only uses the optimizer's long-standing interface (DistroOptimizer, encode, decode_payload,
aggregate_and_apply), so it runs against older builds too.

Run:   .venv/bin/python bench/distro.py --out bench/results/distro.json     (small + gpt2-124m, a few minutes)
Quick: .venv/bin/python bench/distro.py --quick --out /tmp/distro.json       (small, tiers 0 and 1, ~20 s)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def parse_peers(text: str) -> list[int]:
    """'0,1' -> [0, 1]; '0*8,1*8' -> eight tier-0 and eight tier-1 peers."""
    out: list[int] = []
    for part in text.split(","):
        tier, _, count = part.strip().partition("*")
        out += [int(tier)] * int(count or 1)
    return out


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, list[float]]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def bench_replica(preset: str, tier: int, peers: list[int], settings: dict[str, Any], repeats: int) -> dict:
    import torch

    from aftermath.model import param_shapes, preset_config, tier_spec
    from aftermath.optim import DistroConfig, DistroOptimizer, decode_payload

    cfg = preset_config(preset)
    config = DistroConfig(**settings)

    def optimizer(t: int) -> Any:
        spec = tier_spec(cfg, t)
        return DistroOptimizer(config, cfg, spec, {n: torch.zeros(s) for n, s in param_shapes(cfg, spec).items()})

    def grads(t: int, seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        return {n: torch.randn(s, generator=gen) for n, s in param_shapes(cfg, tier_spec(cfg, t)).items()}

    replica = optimizer(tier)
    n_params = sum(p.numel() for p in replica.params.values())
    own = grads(tier, 0)
    step = [0]

    def encode() -> bytes:
        step[0] += 1
        return replica.encode(own, step[0], "bench", "me")

    _, encode_s = timed(encode, repeats)
    senders = {t: optimizer(t) for t in set(peers)}
    blobs = [senders[t].encode(grads(t, 1 + i), 0, "bench", f"peer{i:03d}") for i, t in enumerate(peers)]
    expectation = replica.expectation("bench", 0)
    payloads, decode_s = timed(lambda: [decode_payload(b, expectation) for b in blobs], repeats)
    _, aggregate_s = timed(lambda: replica.aggregate_and_apply(payloads, 0), repeats)
    ns = lambda seconds: [1e9 * s / n_params for s in seconds]  # noqa: E731
    row: dict[str, Any] = {"preset": preset, "tier": tier, "params": n_params, "peers": len(peers),
                           "payload_bytes": len(blobs[peers.index(tier)]) if tier in peers else None}
    for name, seconds in (("encode", encode_s), ("decode", decode_s), ("aggregate", aggregate_s)):
        row[f"{name}_ns_min"] = min(ns(seconds))
        row[f"{name}_ns_median"] = statistics.median(ns(seconds))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small preset, tiers 0 and 1, 2 repeats")
    ap.add_argument("--presets", default=None, help="comma-separated (default small,gpt2-124m)")
    ap.add_argument("--tiers", default="0,1", help="replica tiers (default 0,1)")
    ap.add_argument("--peers", default="0,1", help="the round's peers by tier, e.g. 0,1 or 0*8,1*8 (default 0,1)")
    ap.add_argument("--topk", type=int, default=4, help="coefficients per chunk (default 4)")
    ap.add_argument("--raw-values", action="store_true", help="send float32 values instead of 1-bit signs")
    ap.add_argument("--repeats", type=int, default=None, help="timings per measurement (default 3, quick 2)")
    ap.add_argument("--label", default="", help="a name for this build in the JSON (e.g. 'before')")
    ap.add_argument("--out", default="bench/results/distro.json")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console

    torch.set_num_threads(1)
    console = Console(width=200)
    presets = (args.presets or ("small" if args.quick else "small,gpt2-124m")).split(",")
    tiers = [int(t) for t in args.tiers.split(",")]
    peers = parse_peers(args.peers)
    repeats = args.repeats or (2 if args.quick else 3)
    settings = {"topk": args.topk, "one_bit": not args.raw_values}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    for preset in presets:
        for tier in tiers:
            rows.append(bench_replica(preset, tier, peers, settings, repeats))
            console.log(f"{preset} tier {tier}: encode {rows[-1]['encode_ns_min']:.1f} ns/param")
    load_after = os.getloadavg()
    wire = f"top-{args.topk} {'fp32 values' if args.raw_values else '1-bit'}"
    cols = ["preset", "replica tier", "params (M)", "payload (KB)", "encode ns/param (min / median)",
            f"decode {len(peers)} ns/param", f"aggregate + apply {len(peers)} ns/param"]
    table = [[r["preset"], r["tier"], f"{r['params'] / 1e6:.2f}",
              "-" if r["payload_bytes"] is None else f"{r['payload_bytes'] / 1e3:.1f}",
              *[f"{r[f'{k}_ns_min']:.2f} / {r[f'{k}_ns_median']:.2f}" for k in ("encode", "decode", "aggregate")]]
             for r in rows]
    _common.print_table(f"DisTrO per parameter ({wire}, peers {args.peers}, {repeats} repeats, 1 thread"
                        f"{', ' + args.label if args.label else ''})", cols, table, console)
    path = _common.write_json(args.out, {
        "benchmark": "distro", "label": args.label, "quick": args.quick, "complete": True, "wire": settings,
        "peers": peers, "repeats": repeats, "rows": rows, "loadavg_before": load_before, "loadavg_after": load_after,
        "wall_seconds": round(time.perf_counter() - t0, 1), "markdown": _common.markdown_table(cols, table),
    })
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
