"""`aftermath coordinator`: run a training run's coordinator (state machine, blobs, checkpoints, data)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import socket
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from aftermath.commands.checks import check_can_listen, check_writable_dir, port_or_any, positive_int
from aftermath.errors import ConfigError
from aftermath.runconfig import load_run_config
from aftermath.tls import ADMIN_TOKEN_ENV, TOKEN_ENV, check_listen, fingerprint, is_loopback, make_self_signed, \
    read_secret, server_context


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
    p.add_argument("--token", help="run token clients need to join (default: --token-file, else $AFTERMATH_TOKEN, "
                   "else network.token, else a random one). Visible to other local users in `ps`: prefer "
                   "--token-file or AFTERMATH_TOKEN")
    p.add_argument("--token-file", type=Path, help="read the run token from this file (stripped)")
    p.add_argument("--admin-token", help="token that pauses and resumes the run from the dashboard (default: "
                   "--admin-token-file, else $AFTERMATH_ADMIN_TOKEN, else a random one, printed at start). Visible "
                   "to other local users in `ps`: prefer the file or the variable")
    p.add_argument("--admin-token-file", type=Path, help="read the admin token from this file (stripped)")
    g = p.add_argument_group("TLS (see docs/running.md, \"Run across the internet\")")
    g.add_argument("--tls-cert", type=Path, help="serve https with this PEM certificate (chain) (default: "
                   "network.tls_cert)")
    g.add_argument("--tls-key", type=Path, help="the certificate's PEM private key (default: network.tls_key)")
    g.add_argument("--tls", choices=["self-signed"], help="self-signed: make RUN_DIR/tls/cert.pem and key.pem on "
                   "the first start (reused after) and print the SHA-256 fingerprint clients pin with "
                   "--coordinator-fingerprint")
    g.add_argument("--insecure", action="store_true", help="allow listening on an address other machines reach "
                   "without TLS (the token and updates cross the network in clear text)")
    p.add_argument("--data", type=Path, help="prepared data directory to train on (from `aftermath prepare-data`; "
                   "overrides data.dir; default: the embedded Shakespeare)")
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
    overrides = {"schedule.total_steps": args.steps, "network.host": args.host, "network.port": args.port,
                 "data.dir": data_dir_override(args.data)}
    if args.min_clients is not None:
        overrides.update({"schedule.min_clients": args.min_clients, "schedule.init_min_clients": args.min_clients})
    config = config.with_overrides(overrides)
    # before anything is written or logged: a bad address or a taken port is one line, and the run is untouched
    check_can_listen(config.network.host, config.network.port)
    cert, key = tls_files(args, config)
    check_listen(config.network.host, cert is not None or args.tls is not None, args.insecure)
    given_token = read_secret(args.token, args.token_file, TOKEN_ENV, "--token") or config.network.token or None
    given_admin = read_secret(args.admin_token, args.admin_token_file, ADMIN_TOKEN_ENV, "--admin-token")
    check_writable_dir(args.run_dir, "--run-dir")
    fp = None
    if args.tls == "self-signed":
        cert, key = self_signed_files(args.run_dir, config)
    ssl_context = server_context(cert, key) if cert is not None else None
    if cert is not None:
        fp = fingerprint(cert)
    token = given_token or secrets.token_urlsafe(16)
    data_dir = Path(config.data.dir) if config.data.dir else default_data_dir()
    admin_token = given_admin or secrets.token_urlsafe(12)
    service = CoordinatorService(config, args.run_dir, token=token, data_dir=data_dir, admin_token=admin_token,
                                 force_resume=args.force_resume)

    def ready(url: str) -> None:
        if ssl_context is not None and url.startswith("http://"):
            url = "https://" + url.removeprefix("http://")
        public = config.network.public_url or url
        console.print(f"[bold]coordinator[/bold] of run [cyan]{config.run_id}[/cyan] at [green]{public}[/green]")
        if fp is not None:
            console.print(f"  TLS certificate SHA-256 fingerprint: [bold]{fp}[/bold]", soft_wrap=True)
        console.print(f"  coordinator key (signs accepted sets, assignments, checkpoints): "
                      f"[bold]{service.identity.public_hex}[/bold]", soft_wrap=True)
        pin = f" --coordinator-fingerprint {fp}" if fp is not None else ""
        pin += f" --coordinator-key {service.identity.public_hex}"
        plain_remote = public.startswith("http://") and not is_loopback(urlsplit(public).hostname)
        insecure = " --insecure" if plain_remote else ""
        from_file = not args.token and args.token_file is not None
        if given_token is None:  # generated here: the operator has no other way to learn it
            env = f"{TOKEN_ENV}={token}"
        else:  # the operator gave it: it is not echoed
            env = "" if from_file else f"{TOKEN_ENV}=<the run token>"
        token_arg = f" --token-file {args.token_file}" if from_file else ""
        console.print(f"  clients join with: {env + ' ' if env else ''}aftermath client --coordinator {public}{pin}"
                      f"{token_arg}{insecure} --tier N", soft_wrap=True)
        console.print(f"  run directory: {args.run_dir}")
        admin = f"{public}/#admin={admin_token}" if given_admin is None else f"{public}/#admin=<the admin token>"
        console.print(f"  dashboard: [green]{public}/[/green] (pause/resume: {admin})", soft_wrap=True)
        if args.ready_file:
            write_private(args.ready_file, json.dumps({"url": url, "token": token, "fingerprint": fp,
                                                       "coordinator_key": service.identity.public_hex}))

    asyncio.run(serve(service, config.network.host, config.network.port, ready, ssl_context=ssl_context))
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
        label = f"tier {tier}" if tier.isdigit() else tier
        console.print(f"  {label}: validation loss {v.val_loss or 0:.4f} (initial {v.initial_val_loss or 0:.4f}, "
                      f"best {v.best_val_loss or 0:.4f})"
                      + ("  [yellow]warning: got worse than its best[/yellow]" if v.regressed else ""))
    for d in summary.unrecovered:
        console.print(f"  [red]replica of {d.client_id} ({d.spec}) differs since epoch {d.epoch}[/red]")
    if summary.screened:
        console.print(f"  screened out: {len(summary.screened)} results (summary.json lists each with its reason)")
    for e in summary.excluded:
        console.print(f"  [red]excluded {e.client_id} at step {e.step}: {e.reason}[/red]")
    return 0 if summary.replicas_consistent else 1


def data_dir_override(data: Path | None) -> str | None:
    """--data DIR as the data.dir of the run config: checked now (one line if it is not a data directory) and
    absolute, so every process of the run reads the same directory whatever its working directory."""
    if data is None:
        return None
    from aftermath.data import TokenData

    TokenData(data, "train")
    return str(data.absolute())


def tls_files(args: argparse.Namespace, config) -> tuple[Path | None, Path | None]:
    """(cert, key) from --tls-cert/--tls-key, else network.tls_cert/tls_key; (None, None) without TLS."""
    cert = args.tls_cert or (Path(config.network.tls_cert) if config.network.tls_cert else None)
    key = args.tls_key or (Path(config.network.tls_key) if config.network.tls_key else None)
    if args.tls is not None and (args.tls_cert or args.tls_key):
        raise ConfigError("give --tls self-signed or --tls-cert/--tls-key, not both")
    if args.tls is not None:
        return None, None  # made (or reused) in RUN_DIR/tls once the run directory is known to be writable
    if (cert is None) != (key is None):
        raise ConfigError("TLS needs both the certificate and its key: give --tls-cert PATH and --tls-key PATH "
                          "(or network.tls_cert and network.tls_key), or --tls self-signed")
    return cert, key


def self_signed_files(run_dir: Path, config) -> tuple[Path, Path]:
    """RUN_DIR/tls/cert.pem and key.pem, made on the first start and reused after (the fingerprint stays)."""
    folder = run_dir / "tls"
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not (cert.is_file() and key.is_file()):
        hosts = [config.network.host, socket.gethostname()]
        if config.network.public_url:
            hosts.append(urlsplit(config.network.public_url).hostname or "")
        make_self_signed(cert, key, [h for h in hosts if h])
    return cert, key


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds the token)."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
