"""`aftermath inspect`: what a model directory holds, tier by tier."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aftermath.model import MatFormerConfig, max_tier, own_spec, parameter_count, tier_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a model's tiers: FFN widths, attention heads, parameter counts",
        description="Show, for every nested tier of a model directory, the FFN width of each layer, the "
        "attention heads kept and the parameter count.",
    )
    p.add_argument("model", type=Path, help="model directory (with config.json)")
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
