"""`aftermath eval`: validation loss and perplexity of a checkpoint at a tier."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

from aftermath.data.cache import ensure_default_data
from aftermath.evaluate import check_data_fits, check_tokenizers_match, evaluate
from aftermath.model import MatFormerLM


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss and perplexity of a checkpoint at a tier",
        description="Compute the mean next-token loss (nats/token) and perplexity of a checkpoint at a tier, "
        "on the validation split of a prepared data directory (default: the embedded Shakespeare).",
    )
    p.add_argument("checkpoint", type=Path, help="model directory (config.json + safetensors)")
    p.add_argument("--tier", type=int, default=None, help="tier to evaluate (0 = full width; default: the "
                   "checkpoint's own geometry)")
    p.add_argument("--data", type=Path, default=None, help="prepared data directory (default: the embedded corpus)")
    p.add_argument("--batches", type=int, default=20, help="batches to average over (default 20)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's "
                   "max_position_embeddings)")
    p.add_argument("--seed", type=int, default=0, help="order of the validation sequences (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def load_at_tier(checkpoint: Path, tier: int | None) -> MatFormerLM:
    """The model holding only the tier's weights, through the checkpoint loader when it is present."""
    try:
        from aftermath.checkpoint.loader import load_tier_model
    except ImportError:  # an older tree without the loader: the whole directory, run at the tier
        from aftermath.checkpoint.hf_dir import load_model_dir
        from aftermath.model import sliced_model, tier_spec

        model = load_model_dir(checkpoint)
        return model if tier is None else sliced_model(model, tier_spec(model.config.base(), tier))
    return load_tier_model(checkpoint, tier=tier)[0]


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    console = Console()
    data_dir = args.data if args.data is not None else ensure_default_data()
    check_tokenizers_match(args.checkpoint, data_dir)  # cheap, so before the model is read
    model = load_at_tier(args.checkpoint, args.tier)
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
