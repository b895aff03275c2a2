"""`aftermath inspect`: what a model directory holds, tier by tier."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aftermath.commands.checks import non_negative_int
from aftermath.model import MatFormerConfig, max_tier, own_spec, parameter_count, tier_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a model's tiers, or what loading one tier would read (and verify it)",
        description="Without --tier/--spec/--strategy: show, for every nested tier of a model directory, the FFN "
        "width of each layer, the attention heads kept and the parameter count. With --tier T (or --spec): "
        "resolve a local directory or a hub repo id (OWNER/REPO[/FOLDER]) for that tier with a strategy, "
        "verify every file against matformer_manifest.json, and say what would be loaded and why; exit "
        "non-zero with the error when it cannot be loaded.",
        epilog="strategies: auto = the sliced tier when the manifest lists it and every sha256 matches, else "
        "the universal model sliced at run time; sliced = the sliced tier or an error; universal = the full "
        "checkpoint sliced at run time. Example: aftermath inspect runs/m --tier 1 --strategy auto",
    )
    p.add_argument("model", help="model directory (with config.json) or hub repo id OWNER/REPO[/FOLDER]")
    p.add_argument("--tier", type=non_negative_int, help="the nested tier to resolve (0 = the universal model)")
    p.add_argument("--spec", metavar="NAME[=w0,w1,...]", help="a Mix'n'Match spec, by manifest name or widths")
    p.add_argument("--strategy", choices=["auto", "sliced", "universal"],
                   help="how to load the tier (default auto when --tier or --spec is given)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) for a repo id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def describe_tiers(config: MatFormerConfig) -> dict:
    """Geometry of the model and of every tier it allows, as plain data."""
    base = config.base()
    own = own_spec(config)
    tiers = []
    for t in range(max_tier(base) + 1):
        spec = tier_spec(base, t)
        tiers.append({**spec.to_json(), "parameters": parameter_count(base, spec),
                      "fits_this_checkpoint": spec.fits_within(own)})
    return {
        "model": own.to_json(),
        "universal": config.is_universal,
        "parameters": parameter_count(config),
        "base_intermediate_size": config.matformer_base_intermediate_size,
        "nest_heads": config.matformer_nest_heads,
        "transformers_compatible": config.transformers_compatible,
        "tiers": tiers,
    }


def run(args: argparse.Namespace) -> int:
    if args.tier is not None or args.spec is not None or args.strategy is not None or not Path(args.model).exists():
        return run_resolve(args)
    config = MatFormerConfig.load(args.model)
    info = describe_tiers(config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    console = Console()
    kind = "universal model" if info["universal"] else f"sliced {info['model']['name']}"
    console.print(f"[bold]{args.model}[/]: {kind}, {info['parameters']:,} parameters, "
                  f"heads {'nest' if info['nest_heads'] else 'do not nest'} across tiers")
    table = Table("tier", "FFN width per layer", "query heads", "KV heads", "parameters", "share")
    full = info["tiers"][0]["parameters"]
    for tier in info["tiers"]:
        widths = sorted(set(tier["ffn_widths"]))
        table.add_row(str(tier["tier"]), ",".join(map(str, widths)), str(tier["q_heads"][0]),
                      str(tier["kv_heads"][0]), f"{tier['parameters']:,}", f"{tier['parameters'] / full:.0%}")
    console.print(table)
    return 0


def run_resolve(args: argparse.Namespace) -> int:
    """Resolve, verify and describe what loading the tier would read; exit 2 with the error when it cannot."""
    from aftermath.checkpoint.loader import resolve_checkpoint
    from aftermath.errors import AftermathError

    try:
        resolved = resolve_checkpoint(args.model, tier=args.tier, spec=args.spec, strategy=args.strategy or "auto",
                                      revision=args.revision)
    except AftermathError as exc:
        if not args.json:
            raise
        print(json.dumps({"ok": False, "error": str(exc)}, indent=2))
        return 2
    info = {"ok": True, **resolved.to_json(), "parameters": parameter_count(resolved.config)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    console = Console()
    spec = resolved.spec
    widths = ",".join(map(str, sorted(set(spec.ffn_widths))))
    console.print(f"[bold]{args.model}[/] {spec.name}: FFN {widths}, {spec.q_heads[0]} query / {spec.kv_heads[0]} "
                  f"KV heads, {info['parameters']:,} parameters")
    console.print(f"strategy [bold]{resolved.strategy}[/] (asked {resolved.requested}): {resolved.reason}")
    console.print(f"reads {resolved.directory}")
    table = Table("file", "size", "sha256")
    for f in resolved.files:
        table.add_row(str(f), f"{f.stat().st_size:,}", "verified" if resolved.verified else "no manifest entry")
    console.print(table)
    if resolved.hub_allow_patterns is not None or resolved.hub_ignore_patterns is not None:
        console.print(f"hub selection: allow {resolved.hub_allow_patterns}, ignore {resolved.hub_ignore_patterns}")
    compat = "loads in transformers" if resolved.config.transformers_compatible else "Aftermath only (not transformers)"
    console.print(f"schema {resolved.schema_hash[:16]}, {compat}")
    return 0
