"""`aftermath prepare-data`: text / JSONL / parquet files, directories of them or a Hugging Face dataset (or the
embedded Shakespeare) -> token shards + tokenizer."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from aftermath.commands.checks import positive_int
from aftermath.data.cache import ensure_default_data
from aftermath.data.dataset import read_meta
from aftermath.data.prepare import SHARD_TOKENS, ProgressBar, SplitProgress, default_workers, prepare_data
from aftermath.data.sources import TEXT_SUFFIXES
from aftermath.data.tokenizer import DEFAULT_BPE_VOCAB, TOKENIZER_KINDS
from aftermath.errors import DataError

# vocab_size of the default run's model (preset tiny). Not read from aftermath.model, which would import torch
# (seconds) into a command that needs none; tests/test_prepare_inputs.py checks the two agree.
DEFAULT_MODEL_VOCAB = 4096


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-data",
        help="tokenize text into training shards (default: the embedded Shakespeare)",
        description="Tokenize your text into a data directory for training and evaluation: tokenizer.json, "
        "train_*.bin / val_*.bin token shards (nanoGPT .bin format; uint16 tokens, uint32 when the vocabulary "
        "is larger than 65536) and meta.json. Inputs can be mixed: text files, JSONL, parquet, directories of "
        "them, and one Hugging Face dataset. With no input, prepares the embedded Shakespeare corpus (into --out, "
        "or into the user cache when --out is omitted). See docs/data.md.",
        epilog="examples:\n  aftermath prepare-data --text mybook.txt --out data/mybook\n"
        "  aftermath prepare-data --text notes/ --out data/notes           # every .txt/.md file under notes/\n"
        "  aftermath prepare-data --jsonl docs.jsonl --text-field body --tokenizer gpt2 --out data/docs\n"
        "  aftermath prepare-data --parquet shards/ --out data/web --workers 4\n"
        "  aftermath prepare-data --hf-dataset ./saved_dataset --hf-split train --out data/hf\n"
        "  aftermath prepare-data            # the embedded default, cached\n"
        "then train with it: aftermath testnet --data DIR",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("inputs (any mix of them; none = the embedded Shakespeare)")
    g.add_argument("--text", type=Path, nargs="+", default=[], metavar="FILE|DIR",
                   help="UTF-8 text files, each one document; a directory gives every "
                   f"{' '.join(TEXT_SUFFIXES)} file under it (recursively, sorted by path)")
    g.add_argument("--jsonl", type=Path, nargs="+", default=[], metavar="FILE|DIR",
                   help="JSON-lines files, each line one document; a directory gives its *.jsonl files")
    g.add_argument("--parquet", type=Path, nargs="+", default=[], metavar="FILE|DIR",
                   help="parquet files, each row one document (read in record batches); a directory gives its "
                   "*.parquet files")
    g.add_argument("--hf-dataset", metavar="DIR|NAME",
                   help="a Hugging Face dataset: a directory written by save_to_disk, a folder of "
                   "parquet/json/csv/txt files, or a hub id such as OWNER/NAME (needs the network)")
    g.add_argument("--hf-split", help="split of --hf-dataset (default: train)")
    g.add_argument("--hf-config", help="configuration (subset) of a hub --hf-dataset, e.g. wikitext-2-raw-v1")
    g.add_argument("--text-field", "--jsonl-field", dest="text_field", default="text", metavar="NAME",
                   help="field of each JSONL record / column of each parquet or dataset row that holds the text "
                   "(default: text; --jsonl-field is its old name)")
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
    p.add_argument("--workers", type=positive_int, default=default_workers(),
                   help=f"processes that tokenize (default: CPUs, at most 4; here {default_workers()}); the "
                   "output is the same for any number")
    p.add_argument("--out", type=Path, help="data directory to write (required with an input)")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")
    p.set_defaults(func=run)


@contextmanager
def progress_bar(console: Console) -> Iterator[ProgressBar | None]:
    """A rich progress bar per split (documents done of the split's total, tokens so far), removed when done.
    None when the console is not a terminal: a log gets the one line per split that `progress` prints."""
    if not console.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("documents, {task.fields[tokens]:,} tokens"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bars:
        tasks: dict[str, TaskID] = {}

        def show(state: SplitProgress) -> None:
            if state.split not in tasks:
                tasks[state.split] = bars.add_task(f"tokenizing {state.split}", total=state.total_documents,
                                                   tokens=0)
            bars.update(tasks[state.split], completed=state.documents, tokens=state.tokens)

        yield show


def training_hint(out: Path, vocab_size: int) -> list[str]:
    """The lines that say exactly how to train on `out`, and how to size the model for its vocabulary."""
    data = shlex.quote(str(out))
    lines = [f"train with it: aftermath testnet --data {data}",
             f"  (a coordinator: aftermath coordinator --data {data}, or dir = {json.dumps(str(out.absolute()))} "
             "under [data] in its run.toml)"]
    if vocab_size > DEFAULT_MODEL_VOCAB:
        lines.append(f"  its {vocab_size:,} tokens do not fit the default model (preset tiny, {DEFAULT_MODEL_VOCAB} "
                     f"tokens): add --config run.toml, with vocab_size = {vocab_size} under [model.overrides] in "
                     "run.toml")
    return lines


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    start = time.perf_counter()
    has_input = bool(args.text or args.jsonl or args.parquet or args.hf_dataset)
    if not args.hf_dataset and (args.hf_split is not None or args.hf_config is not None):
        raise DataError("--hf-split / --hf-config choose a part of --hf-dataset; give --hf-dataset DIR|NAME too, "
                        "or drop them")
    if args.out is None and has_input:
        raise DataError("--out DIR is required with an input (--text/--jsonl/--parquet/--hf-dataset): name the "
                        "data directory to write")
    with progress_bar(console) as bar:
        if args.out is None:
            out = ensure_default_data(args.tokenizer, args.vocab, progress=console.print, workers=args.workers,
                                      bar=bar)
            meta = read_meta(out)
        else:
            prepared = prepare_data(args.out, texts=args.text, jsonl=args.jsonl, parquet=args.parquet,
                                    hf_dataset=args.hf_dataset, hf_split=args.hf_split or "train",
                                    hf_config=args.hf_config, text_field=args.text_field, tokenizer=args.tokenizer,
                                    vocab_size=args.vocab, val_fraction=args.val_fraction,
                                    shard_tokens=args.shard_tokens, overwrite=args.force, workers=args.workers,
                                    progress=console.print, bar=bar)
            out, meta = prepared.dir, prepared.meta
    table = Table("split", "tokens", "documents", "shards")
    for split, info in meta["splits"].items():
        table.add_row(split, f"{info['tokens']:,}", f"{info['documents']:,}", str(len(info["shards"])))
    out_console = Console()
    out_console.print(f"[bold]{escape(str(out))}[/]")
    out_console.print(table)
    tok = meta["tokenizer"]
    out_console.print(f"tokenizer {tok['kind']}, vocabulary {tok['vocab_size']}, tokens stored as {meta['dtype']}; "
                      f"data id {meta['data_id'][:16]}; {time.perf_counter() - start:.1f} s", soft_wrap=True)
    for line in training_hint(out, int(tok["vocab_size"])):
        out_console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0
