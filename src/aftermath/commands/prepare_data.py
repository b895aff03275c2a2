"""`aftermath prepare-data`: text or JSONL files (or the embedded Shakespeare) -> token shards + tokenizer."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aftermath.commands.checks import positive_int
from aftermath.data.cache import ensure_default_data
from aftermath.data.dataset import read_meta
from aftermath.data.prepare import SHARD_TOKENS, prepare_data
from aftermath.data.tokenizer import DEFAULT_BPE_VOCAB, TOKENIZER_KINDS
from aftermath.errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-data",
        help="tokenize text into training shards (default: the embedded Shakespeare)",
        description="Tokenize your text into a data directory for training and evaluation: tokenizer.json, "
        "train_*.bin / val_*.bin token shards (nanoGPT .bin format) and meta.json. With no --text/--jsonl, "
        "prepares the embedded Shakespeare corpus (into --out, or into the user cache when --out is omitted).",
        epilog="examples:\n  aftermath prepare-data --text mybook.txt --out data/mybook\n"
        "  aftermath prepare-data --jsonl docs.jsonl --jsonl-field body --tokenizer gpt2 --out data/docs\n"
        "  aftermath prepare-data            # the embedded default, cached",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--text", type=Path, nargs="+", default=[], metavar="FILE",
                   help="UTF-8 text files; each file is one document")
    p.add_argument("--jsonl", type=Path, nargs="+", default=[], metavar="FILE",
                   help="JSON-lines files; each line is one document")
    p.add_argument("--jsonl-field", default="text", help="field of each JSONL record that holds the text "
                   "(default: text)")
    p.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="bpe",
                   help="bpe: byte-level BPE trained on your training split (default); gpt2: GPT-2's 50257 tokens; "
                   "bytes: 256 byte tokens")
    p.add_argument("--vocab", type=positive_int, default=DEFAULT_BPE_VOCAB,
                   help=f"vocabulary size of the bpe tokenizer (default {DEFAULT_BPE_VOCAB}; match the model's "
                   "vocab_size)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the text held out for validation (default 0.05)")
    p.add_argument("--shard-tokens", type=positive_int, default=SHARD_TOKENS,
                   help="tokens per shard file (default 1e8)")
    p.add_argument("--out", type=Path, help="data directory to write (required with --text/--jsonl)")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    start = time.perf_counter()
    progress = console.print
    if args.out is None:
        if args.text or args.jsonl:
            raise DataError("--out DIR is required with --text/--jsonl: name the data directory to write")
        out = ensure_default_data(args.tokenizer, args.vocab, progress=progress)
        meta = read_meta(out)
    else:
        prepared = prepare_data(args.out, texts=args.text, jsonl=args.jsonl, jsonl_field=args.jsonl_field,
                                tokenizer=args.tokenizer, vocab_size=args.vocab, val_fraction=args.val_fraction,
                                shard_tokens=args.shard_tokens, overwrite=args.force, progress=progress)
        out, meta = prepared.dir, prepared.meta
    table = Table("split", "tokens", "documents", "shards")
    for split, info in meta["splits"].items():
        table.add_row(split, f"{info['tokens']:,}", f"{info['documents']:,}", str(len(info["shards"])))
    out_console = Console()
    out_console.print(f"[bold]{out}[/]")
    out_console.print(table)
    tok = meta["tokenizer"]
    out_console.print(f"tokenizer {tok['kind']}, vocabulary {tok['vocab_size']}, tokens stored as {meta['dtype']}; "
                      f"data id {meta['data_id'][:16]}; {time.perf_counter() - start:.1f} s")
    out_console.print(f"train with it: --data {out}")
    return 0
