"""`aftermath eval`: validation loss and perplexity of a checkpoint at a tier."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

from aftermath.commands.checks import non_negative_int, positive_int
from aftermath.data.cache import ensure_default_data
from aftermath.evaluate import check_data_fits, check_tokenizers_match, evaluate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss and perplexity of a checkpoint at a tier",
        description="Compute the mean next-token loss (nats/token) and perplexity of a checkpoint at a tier, "
        "on the validation split of a prepared data directory (default: the embedded Shakespeare).",
    )
    # a str, not a Path: Path("./m") drops the "./" that marks a local path rather than a hub repo id
    p.add_argument("checkpoint", help="model directory (config.json + safetensors) or hub repo id OWNER/REPO[/FOLDER]")
    p.add_argument("--tier", type=non_negative_int, default=None,
                   help="tier to evaluate (0 = full width; default: the checkpoint's own geometry)")
    p.add_argument("--data", type=Path, default=None, help="prepared data directory (default: the embedded corpus)")
    p.add_argument("--batches", type=positive_int, default=20, help="batches to average over (default 20)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: the model's "
                   "max_position_embeddings)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="order of the validation sequences (default 0)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aftermath.checkpoint.loader import load_tier_model

    torch.set_num_threads(args.threads)
    console = Console()
    data_dir = args.data if args.data is not None else ensure_default_data()
    check_tokenizers_match(args.checkpoint, data_dir)  # cheap, so before the model is read
    model = load_tier_model(args.checkpoint, tier=args.tier)[0]  # only the tier's weights are read
    seq_len = args.seq_len or model.config.max_position_embeddings
    stream = check_data_fits(model.config, data_dir, seq_len, seed=args.seed)
    result = evaluate(model, stream, max_batches=args.batches, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({**result.to_json(), "checkpoint": str(args.checkpoint), "data": str(data_dir)}))
        return 0
    console.print(f"{args.checkpoint} at {result.spec}: validation loss [bold]{result.loss:.4f}[/] nats/token, "
                  f"perplexity [bold]{result.perplexity:.2f}[/]")
    console.print(f"{result.tokens:,} tokens ({result.sequences} sequences of {result.seq_len}) from {data_dir}, "
                  f"{result.seconds:.1f} s")
    return 0
