"""`aftermath generate`: continue a prompt with a checkpoint at a tier."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from aftermath.commands.checks import non_negative_int, positive_int
from aftermath.errors import CheckpointError, ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a checkpoint at a tier (see what the model has learnt)",
        description="Load a checkpoint at a tier (or a Mix'n'Match spec), the way `aftermath eval` and "
        "`aftermath inspect` do, and print the prompt followed by the text the model writes after it. CKPT is a "
        "model directory (the universal model, e.g. out/checkpoint/model after a testnet, or an exported tier "
        "directory such as out/checkpoint/model-tier1, which transformers loads too) or a hub repo id. The "
        "tokenizer is the tokenizer.json beside the weights (every checkpoint a run writes has one), or --tokenizer. "
        "Each new token is drawn from the model's probabilities, sharpened by --temperature (lower = safer, 0 = "
        "always the most likely token) and limited to the --top-k most likely tokens; the same --seed gives the "
        "same text. Generation stops after --max-new-tokens tokens, or at <|endoftext|>.",
        epilog="examples:\n"
        "  aftermath generate out/checkpoint/model --prompt 'ROMEO:'\n"
        "  aftermath generate out/checkpoint/model --tier 2 --prompt 'To be' --max-new-tokens 200\n"
        "  aftermath generate out/checkpoint/model-tier1 --prompt 'KING:' --temperature 0   # a tier directory, "
        "greedy\n"
        "  aftermath generate out/checkpoint/model --tier 1 --strategy universal --prompt 'JULIET:' --seed 7\n"
        "  aftermath generate runs/m --prompt 'Hello' --tokenizer data/mybook   # a model without tokenizer.json\n"
        "strategies (as for inspect and eval): auto = the sliced tier when the manifest lists it and its files "
        "verify,\nelse the universal model sliced at run time; sliced = the sliced tier or an error; universal = "
        "the full\ncheckpoint sliced at run time.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # a str, not a Path: Path("./m") drops the "./" that marks a local path rather than a hub repo id
    p.add_argument("checkpoint", metavar="CKPT",
                   help="model directory (config.json + safetensors) or hub repo id OWNER/REPO[/FOLDER]")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tier", type=non_negative_int,
                       help="the nested tier to run (0 = full width; default: the checkpoint's own geometry)")
    which.add_argument("--spec", metavar="NAME[=w0,w1,...]", help="a Mix'n'Match spec, by manifest name or widths")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to add (default 100)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="randomness: 0 = always the most likely token, 1 = the model's own probabilities "
                   "(default 0.8)")
    p.add_argument("--top-k", type=non_negative_int, default=40,
                   help="draw only from the K most likely tokens; 0 = from all (default 40)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default 0)")
    p.add_argument("--strategy", choices=["auto", "sliced", "universal"], default="auto",
                   help="how to load the tier (default auto)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) for a repo id")
    p.add_argument("--tokenizer", type=Path, metavar="FILE|DIR",
                   help="tokenizer.json, or a directory holding one (e.g. the data directory the model was trained "
                   "on); default: the checkpoint's")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    p.set_defaults(func=run)


def find_tokenizer(checkpoint: str, weights_dir: Path, given: Path | None) -> Path:
    """--tokenizer, else the tokenizer.json beside the weights that are read, else beside CKPT's config.json."""
    from aftermath.data.tokenizer import TOKENIZER_FILE

    if given is not None:
        path = given / TOKENIZER_FILE if given.is_dir() else given
        if not path.is_file():
            raise ConfigError(f"--tokenizer {given}: no tokenizer.json there; give a tokenizer.json or the data "
                              "directory `aftermath prepare-data` wrote")
        return path
    for folder in (weights_dir, Path(checkpoint)):
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    raise CheckpointError(f"{checkpoint} has no {TOKENIZER_FILE} beside its weights ({weights_dir}); pass "
                          "--tokenizer with the data directory it was trained on (prepare-data writes one there)")


def run(args: argparse.Namespace) -> int:
    import torch

    from aftermath.checkpoint.loader import load_tier_model
    from aftermath.data.tokenizer import eot_id, load_tokenizer
    from aftermath.evaluate import check_sampling, sample_tokens

    check_sampling(args.temperature, args.top_k)  # before the model is read, which takes seconds for a large one
    torch.set_num_threads(args.threads)
    model, resolved = load_tier_model(args.checkpoint, tier=args.tier, spec=args.spec, strategy=args.strategy,
                                      revision=args.revision)
    tokenizer_path = find_tokenizer(args.checkpoint, resolved.directory, args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_vocab_size()
    if vocab > model.config.vocab_size:
        raise CheckpointError(f"{tokenizer_path} has {vocab} tokens but the model only {model.config.vocab_size}: "
                              "it is not the model's tokenizer; pass --tokenizer with the one it was trained with")
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise ConfigError(f"--prompt {args.prompt!r} encodes to no tokens; give some text to continue")
    start = time.perf_counter()
    seq = sample_tokens(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        seed=args.seed, stop_id=eot_id(tokenizer), vocab_size=vocab)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(seq), flush=True)
    new = len(seq) - len(ids)
    Console(stderr=True).print(
        f"{escape(args.checkpoint)} at {resolved.spec.name} ({resolved.strategy}: {escape(resolved.reason)}); "
        f"{new} new tokens in {seconds:.1f} s; temperature {args.temperature}, top-k {args.top_k}, seed {args.seed}",
        highlight=False, soft_wrap=True)
    return 0
