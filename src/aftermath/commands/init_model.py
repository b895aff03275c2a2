"""`aftermath init-model`: write a freshly initialised universal model as an HF-format directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from aftermath.commands.checks import non_negative_int, positive_int
from aftermath.errors import ConfigError
from aftermath.model import PRESETS, build_model, parameter_count, preset_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init-model",
        help="create a new universal MatFormer model from a preset",
        description="Create a new universal MatFormer model from a preset and write it as a Hugging Face "
        "directory (config.json, model.safetensors, and the tokenizer when --tokenizer is given).",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model size: tiny (~1.5M params, tests), small (~15M), gpt2-124m (default: tiny)")
    p.add_argument("--out", required=True, type=Path, help="directory to create")
    p.add_argument("--seed", type=non_negative_int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--vocab-size", type=positive_int,
                   help="override the preset's vocabulary size (match your tokenizer)")
    p.add_argument("--tokenizer", type=Path, help="directory or tokenizer.json to copy beside the weights")
    p.add_argument("--no-nest-heads", action="store_true", help="tiers keep every attention head (FFN tiers only)")
    p.add_argument("--activation", choices=["silu", "relu2"], default="silu", help="MLP activation (default silu)")
    p.add_argument("--qk-norm", action="store_true", help="NanoGPT-style RMSNorm of queries and keys")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aftermath.checkpoint.hf_dir import save_model_dir

    if args.out.exists() and not args.force:
        raise ConfigError(f"{args.out} already exists; pass --force to overwrite it")
    overrides = {"hidden_act": args.activation, "qk_norm": args.qk_norm}
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    if args.no_nest_heads:
        overrides["matformer_nest_heads"] = False
    tokenizer_dir = None
    if args.tokenizer is not None:
        tokenizer_dir = args.tokenizer if args.tokenizer.is_dir() else args.tokenizer.parent
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise ConfigError(f"no tokenizer.json in {tokenizer_dir}")
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
        overrides.setdefault("vocab_size", vocab)
        if overrides["vocab_size"] < vocab:
            raise ConfigError(f"--vocab-size {overrides['vocab_size']} is smaller than the tokenizer's {vocab}")
    config = preset_config(args.preset, **overrides)
    model = build_model(config, seed=args.seed)
    try:
        save_model_dir(model, args.out, tokenizer_dir=tokenizer_dir)
    except OSError as exc:
        raise ConfigError(f"cannot write --out {args.out}: {exc.strerror or exc}; choose a directory you can "
                          "write to") from None
    Console().print(
        f"wrote [bold]{args.out}[/]: preset {args.preset}, {parameter_count(config):,} parameters, seed {args.seed}"
    )
    return 0
