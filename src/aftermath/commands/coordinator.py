"""`aftermath coordinator`: run a training run's coordinator (state machine, blobs, checkpoints, data)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aftermath.commands.checks import check_can_listen, check_writable_dir, port_or_any, positive_int
from aftermath.runconfig import load_run_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coordinator", help="run the coordinator of a training run",
        description="Run the coordinator of a training run: clients join it, it assigns each round's batches, "
        "keeps the accepted results, writes a checkpoint (universal model, tier exports, manifest) at every epoch "
        "end, and serves token batches. Without --config it runs the embedded default run (tiny model, "
        "embedded Shakespeare). It exits when the run has finished, after writing RUN_DIR/summary.json.")
    p.add_argument("--config", type=Path, help="run.toml (laid over the embedded default; see docs/running.md)")
    p.add_argument("--host", help="address to listen on (default: network.host, 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=port_or_any, help="port (default: network.port, 8700; 0 = any free port)")
    p.add_argument("--run-dir", type=Path, default=Path("run"),
                   help="directory for checkpoints, metrics, blobs and state (default ./run); an unfinished run "
                   "there is resumed from its last checkpoint")
    p.add_argument("--token", help="run token clients need to join (default: network.token, else a random one)")
    p.add_argument("--admin-token", help="token that pauses and resumes the run from the dashboard (default: a "
                   "random one, printed at start)")
    p.add_argument("--steps", type=positive_int, help="override schedule.total_steps")
    p.add_argument("--min-clients", type=positive_int, help="override schedule.min_clients and init_min_clients")
    p.add_argument("--force-resume", action="store_true",
                   help="resume the run in --run-dir even though run.toml changed a field that shapes the run "
                   "(seed, model, optimizer, data, batch, length); without it such a resume is refused")
    p.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)  # the testnet learns the URL from it
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aftermath.coordinator.service import CoordinatorService, serve
    from aftermath.data import default_data_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    console = Console(stderr=True)
    config = load_run_config(args.config)
    overrides = {"schedule.total_steps": args.steps, "network.host": args.host, "network.port": args.port}
    if args.min_clients is not None:
        overrides.update({"schedule.min_clients": args.min_clients, "schedule.init_min_clients": args.min_clients})
    config = config.with_overrides(overrides)
    # before anything is written or logged: a bad address or a taken port is one line, and the run is untouched
    check_can_listen(config.network.host, config.network.port)
    check_writable_dir(args.run_dir, "--run-dir")
    token = args.token or config.network.token or secrets.token_urlsafe(16)
    data_dir = Path(config.data.dir) if config.data.dir else default_data_dir()
    admin_token = args.admin_token or secrets.token_urlsafe(12)
    service = CoordinatorService(config, args.run_dir, token=token, data_dir=data_dir, admin_token=admin_token,
                                 force_resume=args.force_resume)

    def ready(url: str) -> None:
        public = config.network.public_url or url
        console.print(f"[bold]coordinator[/bold] of run [cyan]{config.run_id}[/cyan] at [green]{public}[/green]")
        console.print(f"  clients join with: aftermath client --coordinator {public} --token {token} --tier N")
        console.print(f"  run directory: {args.run_dir}")
        console.print(f"  dashboard: [green]{public}/[/green] (pause/resume: {public}/#admin={admin_token})")
        if args.ready_file:
            args.ready_file.write_text(json.dumps({"url": url, "token": token}))

    asyncio.run(serve(service, config.network.host, config.network.port, on_ready=ready))
    summary = service.summary
    if summary is None:
        console.print("the coordinator stopped before the run finished; no summary")
        return 1
    table = Table("client", "tier", "final loss", "bytes up", "bytes down", "weights sha256",
                  title=f"run {config.run_id}: {summary.steps} steps, replicas consistent: "
                  f"{summary.replicas_consistent}")
    for c in summary.clients:
        table.add_row(c.id, str(c.tier), "-" if c.final_loss is None else f"{c.final_loss:.3f}", str(c.bytes_up),
                      str(c.bytes_down), (c.weights_sha256 or "-")[:16])
    console.print(table)
    for tier, v in summary.tiers.items():
        console.print(f"  tier {tier}: validation loss {v.val_loss or 0:.4f} (initial {v.initial_val_loss or 0:.4f})")
    for d in summary.unrecovered:
        console.print(f"  [red]replica of {d.client_id} ({d.spec}) differs since epoch {d.epoch}[/red]")
    return 0 if summary.replicas_consistent else 1
