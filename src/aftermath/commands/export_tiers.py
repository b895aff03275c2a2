"""`aftermath export-tiers`: write sliced tier directories beside a universal model, plus a verified manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from aftermath.commands.checks import non_negative_int
from aftermath.errors import CheckpointError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-tiers",
        help="slice a universal model into tier directories with a sha256 manifest",
        description="Write, for each nested tier and Mix'n'Match spec, a sibling directory SRC-tier1/, "
        "SRC-tier2/, SRC-NAME/ holding the sliced weights (safetensors), config.json and the tokenizer files, "
        "and write SRC/matformer_manifest.json listing every file with its sha256. The source is only read; "
        "each tier directory appears complete or not at all. Nested tiers load in transformers; a spec with "
        "per-layer widths needs Aftermath.",
        epilog="example: aftermath export-tiers --src runs/m --tiers 1 2 --spec mix=512,256,256,128",
    )
    p.add_argument("--src", required=True, type=Path, help="the universal model directory (with config.json)")
    p.add_argument("--tiers", type=non_negative_int, nargs="*", default=[], metavar="T",
                   help="nested tiers to export (tier t keeps FFN width base/2^t); 0 is the source itself")
    p.add_argument("--spec", action="append", default=[], metavar="NAME=w0,w1,...",
                   help="a Mix'n'Match spec: one FFN width per layer (repeatable)")
    p.add_argument("--max-shard-size", metavar="SIZE",
                   help="split each tier's weights into shards of at most SIZE (e.g. 500MB, 2GB); default one file")
    p.add_argument("--force", action="store_true", help="replace tier directories that already exist")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aftermath.checkpoint.export import export_tiers
    from aftermath.checkpoint.schema import read_config

    if not args.tiers and not args.spec:
        raise CheckpointError("nothing to export: give --tiers T [T ...] and/or --spec NAME=w0,w1,...")
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tensors"),
                  console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(tier: str, tensor: str, done: int, total: int) -> None:
            if tier not in tasks:
                tasks[tier] = bar.add_task(f"exporting {tier}", total=total)
            bar.update(tasks[tier], completed=done)

        manifest = export_tiers(args.src, tiers=args.tiers, specs=args.spec, force=args.force,
                                max_shard_size=args.max_shard_size, progress=progress)
    compatible = read_config(args.src).transformers_compatible
    table = Table("tier", "directory", "FFN width", "heads (q/kv)", "files", "transformers")
    for e in manifest.tiers:
        directory = args.src if e.tier == 0 else args.src.with_name(f"{args.src.name}-{e.name}")
        width = ",".join(map(str, e.layer_intermediate_sizes)) if e.layer_intermediate_sizes else str(e.intermediate_size)
        if not compatible:
            loads = "no (model options)"
        else:
            loads = "no (per-layer widths)" if e.layer_intermediate_sizes else "yes"
        table.add_row(e.name, str(directory), width, f"{e.num_attention_heads}/{e.num_key_value_heads}",
                      str(len(e.files)), loads)
    out = Console()
    out.print(table)
    out.print(f"wrote [bold]{Path(args.src) / 'matformer_manifest.json'}[/]: {len(manifest.sha256)} files hashed "
              f"(sha256), schema {manifest.schema_hash[:12]}")
    return 0
