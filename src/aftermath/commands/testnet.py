"""`aftermath testnet`: a coordinator and N clients on this machine, with a live view and the run's results."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aftermath.commands.checks import check_writable_dir, non_negative_int, positive_float, positive_int
from aftermath.errors import ConfigError

DEFAULT_OUT = Path("out")


def add_testnet_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=positive_int, default=3, help="client processes (default 3)")
    p.add_argument("--tiers", default="0,1,2", help="tiers, assigned to the clients cyclically (default 0,1,2)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (default: the run config's total_steps, 40)")
    p.add_argument("--config", type=Path, help="run.toml laid over the embedded default run")
    p.add_argument("--data", type=Path, help="prepared data directory to train on (from `aftermath prepare-data`; "
                   "overrides data.dir; default: the embedded Shakespeare)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default ./out)")
    p.add_argument("--force", action="store_true", help="replace the results of an earlier run in --out (without "
                   "it, an --out that is not empty is refused)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--timeout", type=positive_float, default=600.0,
                   help="give up after this many seconds (default 600)")
    p.add_argument("--no-live", action="store_true", help="no live view (for logs and CI)")
    from aftermath.commands.client import add_fault_arguments

    add_fault_arguments(p)
    g = p.add_argument_group("process faults")
    g.add_argument("--kill-random", type=non_negative_int, default=0, metavar="N",
                   help="kill N random clients with SIGKILL during the run; each is restarted a moment later and "
                   "rejoins at the next epoch")
    g.add_argument("--kill-interval", type=positive_float, default=10.0, metavar="S",
                   help="seconds between kills (default 10)")
    p.add_argument("--tls", action="store_true", help="run over https with a self-signed certificate (OUT/tls), "
                   "pinned by its SHA-256 fingerprint in every client")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "testnet", help="run a coordinator and N clients locally",
        description="Start a coordinator and N client processes on 127.0.0.1 (tiers assigned cyclically), show a "
        "live view (phase, step, loss per client, tokens/s, bytes), and write OUT/checkpoint (universal + tiers + "
        "manifest), OUT/metrics/*.jsonl, OUT/summary.json and OUT/loss.png. With no arguments: the tiny model on "
        "the embedded Shakespeare, 3 clients at tiers 0, 1 and 2. Ctrl-C or SIGTERM stops every process it started.")
    add_testnet_arguments(p)
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    from aftermath.testnet import TestnetOptions

    try:
        tiers = [int(t) for t in args.tiers.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--tiers {args.tiers!r} must be comma-separated numbers, e.g. 0,1,2")
    from aftermath.commands.client import fault_config_from_args
    from aftermath.commands.coordinator import data_dir_override

    faults = fault_config_from_args(args)
    data_dir = data_dir_override(args.data)
    return TestnetOptions(clients=args.clients, tiers=tiers, steps=args.steps, config=args.config, out=args.out,
                          extra_overrides={"data.dir": data_dir} if data_dir else {},
                          live=not args.no_live, timeout=args.timeout, threads=args.threads,
                          faults=faults if faults.active else None, kill_random=args.kill_random,
                          kill_interval=args.kill_interval, tls=getattr(args, "tls", False))


def print_summary(console: Console, summary: dict) -> None:
    tp = summary.get("throughput", {})
    table = Table("client", "tier", "final loss", "bytes up", "bytes down", "weights sha256",
                  title=f"{summary['steps']} steps in {summary.get('wall_seconds', 0):.0f} s, replicas consistent: "
                  f"{summary['replicas_consistent']}")
    for c in summary["clients"]:
        loss = c.get("final_loss")
        table.add_row(c["id"], str(c["tier"]), "-" if loss is None else f"{loss:.3f}", str(c["bytes_up"]),
                      str(c["bytes_down"]), (c.get("weights_sha256") or "-")[:16])
    console.print(table)
    tiers = Table("tier / spec", "validation loss", "initial", "best",
                  title="the final checkpoint, every exported tier and the Mix'n'Match specs between them")
    for tier, v in summary["tiers"].items():
        init, best = v.get("initial_val_loss"), v.get("best_val_loss")
        tiers.add_row(tier, f"{v['val_loss']:.4f}" + (" [yellow](got worse)[/yellow]" if v.get("regressed") else ""),
                      "-" if init is None else f"{init:.4f}", "-" if best is None else f"{best:.4f}")
    console.print(tiers)
    for tier, v in summary["tiers"].items():
        if v.get("regressed"):
            console.print(f"[yellow]warning: {tier} ended at {v['val_loss']:.4f}, worse than its best "
                          f"{v['best_val_loss']:.4f}: train.objective = \"sampled\" trains every exported "
                          f"tier[/yellow]")
    if summary.get("screened"):
        console.print(f"screened out: {len(summary['screened'])} results (summary.json lists each with its reason)")
    for e in summary.get("excluded", []):
        console.print(f"[red]excluded {e['client_id']} at step {e['step']}: {e['reason']}[/red]")
    faults = summary.get("faults")
    if faults and any(faults.values()):
        console.print("faults: " + ", ".join(f"{k} {v}" for k, v in faults.items()))
    console.print(f"tokens trained: {tp.get('tokens')} ({tp.get('tokens_per_s_wall')} tokens/s over the wall time); "
                  f"mean payload {tp.get('payload_bytes_mean')} bytes")


def check_out(out: Path, force: bool) -> None:
    """Refuse an --out that holds files unless --force; create it and check it is writable."""
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} is not empty (an earlier run?); pass --force to replace the testnet's "
                          "results there, or choose another --out")
    check_writable_dir(out, "--out")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM does what Ctrl-C does: KeyboardInterrupt unwinds the testnet, which stops every child process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut that clean-up short
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from aftermath.testnet import Testnet

    console = Console()
    options = options_from_args(args)
    check_out(options.out, args.force)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = Testnet(options, console).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_summary(console, summary)
    out = options.out
    console.print(f"wrote {out / 'checkpoint'}, {out / 'metrics'}, {out / 'summary.json'}, {out / 'loss.png'}")
    return 0 if summary["replicas_consistent"] else 1
