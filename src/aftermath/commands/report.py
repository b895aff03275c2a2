"""`aftermath report RUN_DIR`: a self-contained HTML report of a run, with matplotlib plots."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="write report.html and plots for a run directory",
        description="Write RUN_DIR/report.html (self-contained: plots inlined) and its PNGs: loss per tier, "
        "the validation loss of every tier width at each epoch end, bytes per round with the compression ratio "
        "against dense fp32 updates, and tokens/s per client. RUN_DIR is the --out directory of "
        "`aftermath testnet` or the --run-dir of `aftermath coordinator`; the run may still be going.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory to report on")
    p.add_argument("--no-samples", action="store_true",
                   help="skip the text samples (they load the last checkpoint and generate ~40 tokens per tier)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from aftermath.report import write_report

    console = Console()
    with console.status(f"reading {args.run_dir} and plotting..."):
        rep = write_report(args.run_dir, samples=not args.no_samples)
    h = rep.history
    console.print(f"[bold]report[/bold]: [green]{rep.html_path}[/green]")
    for path in rep.pngs.values():
        console.print(f"  {path}")
    steps = len(h.bandwidth)
    last_val = {k: v[-1]["loss"] for k, v in h.val_loss.items()}
    console.print(f"  {steps} rounds, {len(h.checkpoints)} checkpoints; last validation loss: "
                  + (", ".join(f"{k} {v:.4f}" for k, v in last_val.items()) or "none"))
    return 0
