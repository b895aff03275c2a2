"""`aftermath demo`: what `make demo` runs: the local testnet with its defaults.

A coordinator and 3 client processes (tiers 0, 1 and 2) train the tiny MatFormer on the embedded Shakespeare
on this machine, with a live view; the results land in ./out (checkpoint, metrics, summary.json, loss.png).
"""

from __future__ import annotations

import argparse

from aftermath.commands.testnet import add_testnet_arguments
from aftermath.commands.testnet import run as run_testnet


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the local testnet with its defaults (what `make demo` runs)",
        description="Run the local testnet with its defaults: a coordinator and 3 clients at tiers 0, 1 and 2 "
        "train the tiny MatFormer on the embedded Shakespeare, with a live view. Writes out/checkpoint, "
        "out/metrics/*.jsonl, out/summary.json and out/loss.png. Same options as `aftermath testnet`.")
    add_testnet_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_testnet(args)
