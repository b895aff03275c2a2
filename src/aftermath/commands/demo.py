"""`aftermath demo`: what `make demo` runs: the local testnet with its defaults.

A coordinator and 3 client processes (tiers 0, 1 and 2) train the tiny MatFormer on the embedded Shakespeare
on this machine, with a live view; the results land in ./out (checkpoint, metrics, summary.json, loss.png),
replacing those of an earlier demo.
"""

from __future__ import annotations

import argparse

from aftermath.commands.testnet import DEFAULT_OUT, add_testnet_arguments
from aftermath.commands.testnet import run as run_testnet


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the local testnet with its defaults (what `make demo` runs)",
        description="Run the local testnet with its defaults: a coordinator and 3 clients at tiers 0, 1 and 2 "
        "train the tiny MatFormer on the embedded Shakespeare, with a live view. Writes out/checkpoint, "
        "out/metrics/*.jsonl, out/summary.json and out/loss.png; a re-run replaces them. Same options as "
        "`aftermath testnet`.")
    add_testnet_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out == DEFAULT_OUT:
        args.force = True  # re-running the demo replaces its own earlier results; another --out needs --force
    return run_testnet(args)
