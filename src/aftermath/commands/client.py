"""`aftermath client`: join a training run and train one tier of the model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import os
from pathlib import Path

from rich.console import Console

from aftermath.commands.checks import check_http_url, non_negative_int, positive_float, positive_int
from aftermath.crypto import PUBLIC_KEY_RE
from aftermath.errors import AftermathError, ConfigError
from aftermath.tls import TOKEN_ENV, certificate_error_message, check_plain_http, client_ssl, \
    fingerprint_mismatch_message, read_secret


def parse_memory(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise ConfigError(f"--memory-limit {text!r} is not a size; write e.g. 4GiB, 512MiB or 1000000")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "client", help="join a training run and train one tier",
        description="Join the training run of a coordinator and train one tier (or Mix'n'Match spec) of its "
        "MatFormer model: each round it trains its share of the batch, publishes a compressed DisTrO update, "
        "then applies every accepted update of the round so that all replicas stay identical.")
    p.add_argument("--coordinator", required=True, help="coordinator URL, e.g. https://10.0.0.5:8700 (plain http:// "
                   "only to this machine, or with --insecure)")
    p.add_argument("--token", help="the run token (printed by the coordinator). Visible to other local users in "
                   "`ps`: prefer --token-file or the AFTERMATH_TOKEN environment variable")
    p.add_argument("--token-file", type=Path, help="read the run token from this file (stripped)")
    g = p.add_argument_group("TLS (see docs/running.md, \"Run across the internet\")")
    g.add_argument("--coordinator-fingerprint", metavar="SHA256",
                   help="pin the coordinator's certificate: its SHA-256 fingerprint, printed by the coordinator "
                   "(accepted instead of a CA; any other certificate is refused before the token is sent)")
    g.add_argument("--coordinator-key", metavar="HEX",
                   help="pin the coordinator's identity: its ed25519 public key, printed by the coordinator. Every "
                   "accepted set, assignment and checkpoint must carry its signature (without this flag: the key "
                   "the coordinator reports at the first contact)")
    g.add_argument("--ca-file", type=Path, help="verify the coordinator's certificate against this PEM CA file "
                   "(default: the system's CAs)")
    g.add_argument("--insecure", action="store_true", help="allow plain http:// to another machine (the token "
                   "and updates cross the network in clear text)")
    p.add_argument("--tier", default="0", help="tier to train: a number (0 = full width) or auto (the widest "
                   "tier whose estimated memory fits; see --memory-limit) (default 0)")
    p.add_argument("--spec", help="a Mix'n'Match spec instead of a tier: NAME=w0,w1,... (one FFN width per layer)")
    p.add_argument("--device", default="auto", help="where to train: auto (the first CUDA GPU if torch sees one, "
                   "else the CPU), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--memory-limit", help="memory the training step may use, for --tier auto and "
                   "train.micro_batch_size = \"auto\", e.g. 4GiB (default: the device's free memory: the GPU's own "
                   "for a CUDA device)")
    p.add_argument("--name", default="", help="a name for this client (letters, digits, . _ -)")
    p.add_argument("--metrics", type=Path, help="write per-round metrics as JSON lines to this file")
    p.add_argument("--work-dir", type=Path, default=Path(".aftermath-client"),
                   help="where downloaded model files go (default ./.aftermath-client)")
    p.add_argument("--threads", type=positive_int, help="torch threads of each process (default: the run's "
                   "train.threads)")
    p.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                   help="train each step with N processes, one per device: N GPUs from --device (cuda:0 to "
                   "cuda:N-1 with --device cuda), or N CPU processes. They split the client's share of every step "
                   "and sum their gradients (torch.distributed: NCCL on GPUs, gloo on the CPU); the coordinator "
                   "sees one client with one payload (default 1)")
    add_fault_arguments(p)
    p.add_argument("--give-up-after", type=positive_float, default=300.0, metavar="SECONDS",
                   help="end with an error when the coordinator stays unreachable this long (default 300)")
    p.add_argument("--crash-at", default=os.environ.get("AFTERMATH_CRASH_AT"), help=argparse.SUPPRESS)
    p.add_argument("--perturb-at", type=int, default=_env_int("AFTERMATH_PERTURB_AT"), help=argparse.SUPPRESS)
    p.add_argument("--attack", default=os.environ.get("AFTERMATH_ATTACK"), help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isascii() and value.isdigit() else None


def add_fault_arguments(p: argparse.ArgumentParser) -> None:
    """Fault injection flags (aftermath.faults), shared by `client` and `testnet`."""
    g = p.add_argument_group("fault injection (tests and stress runs; see docs/reliability.md)")
    g.add_argument("--fault-latency-ms", metavar="BASE-JITTER",
                   help="delay every request by BASE ms plus up to JITTER ms, e.g. 50-20")
    g.add_argument("--fault-loss", type=float, default=0.0, metavar="FRACTION",
                   help="drop this fraction of requests and blob transfers (they are retried), e.g. 0.1")
    g.add_argument("--fault-bandwidth", type=float, default=0.0, metavar="BYTES_PER_S",
                   help="limit uploads and downloads to this many bytes per second each (0 = unlimited)")
    g.add_argument("--fault-bandwidth-up", type=float, default=0.0, metavar="BYTES_PER_S",
                   help="limit uploads (blob uploads, commits, every request body) to this many bytes per second; "
                   "overrides --fault-bandwidth for uploads. E.g. 1250000 = 10 Mbit/s, a home line's upload "
                   "(default 0 = --fault-bandwidth, or unlimited)")
    g.add_argument("--fault-bandwidth-down", type=float, default=0.0, metavar="BYTES_PER_S",
                   help="limit downloads (peers' blobs, checkpoint files, state and other answers) to this many "
                   "bytes per second; overrides --fault-bandwidth for downloads. E.g. 6250000 = 50 Mbit/s "
                   "(default 0 = --fault-bandwidth, or unlimited)")
    g.add_argument("--fault-seed", type=non_negative_int, default=0, help="seed of the injected faults (default 0)")


def fault_config_from_args(args: argparse.Namespace):
    from aftermath.faults import make_fault_config

    return make_fault_config(args.fault_latency_ms, args.fault_loss, args.fault_bandwidth, args.fault_seed,
                             bandwidth_up=args.fault_bandwidth_up, bandwidth_down=args.fault_bandwidth_down)


def run(args: argparse.Namespace) -> int:
    from aftermath.client.hooks import parse_attack, parse_crash_at
    from aftermath.client.data_parallel import rank_devices
    from aftermath.client.loop import ClientOptions, TrainingClient, resolve_device

    check_http_url(args.coordinator, "--coordinator")
    check_plain_http(args.coordinator, args.insecure)
    token = read_secret(args.token, args.token_file, TOKEN_ENV, "--token")
    if not token:
        raise ConfigError(f"no run token: give --token-file FILE, set {TOKEN_ENV}, or --token TOKEN (the coordinator "
                          "prints it at start)")
    ssl_arg = client_ssl(args.coordinator_fingerprint, args.ca_file)
    if args.coordinator_key is not None and PUBLIC_KEY_RE.fullmatch(args.coordinator_key) is None:
        raise ConfigError(f"--coordinator-key {args.coordinator_key[:80]!r} is not an ed25519 public key: give the 64 "
                          f"hex digits the coordinator printed ('coordinator key: ...')")
    if (ssl_arg is not None or args.coordinator_fingerprint) and not args.coordinator.startswith("https://"):
        raise ConfigError(f"--coordinator-fingerprint and --ca-file need an https:// --coordinator, not "
                          f"{args.coordinator}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    console = Console(stderr=True)
    if args.spec and args.tier not in ("0", None):
        raise ConfigError("give --tier or --spec, not both")
    if args.spec:
        tier = None
    elif args.tier == "auto":
        tier = None
    else:
        try:
            tier = int(args.tier)
        except ValueError:
            raise ConfigError(f"--tier {args.tier!r} must be a number or auto")
        if tier < 0:
            raise ConfigError(f"--tier {tier} must be 0 or more (0 = full width), or auto")
    # an absent or malformed device, or too few GPUs for --nproc, is refused before the coordinator is contacted
    rank_devices(resolve_device(args.device), args.nproc)
    if args.coordinator.startswith("https://"):
        check_coordinator_identity(args.coordinator, ssl_arg, args.give_up_after)
    options = ClientOptions(coordinator=args.coordinator, token=token, tier=tier, spec=args.spec, ssl=ssl_arg,
                            coordinator_key=args.coordinator_key,
                            name=args.name, device=args.device, memory_limit=parse_memory(args.memory_limit),
                            work_dir=args.work_dir, metrics_path=args.metrics, threads=args.threads, nproc=args.nproc,
                            faults=fault_config_from_args(args), crash_at=parse_crash_at(args.crash_at),
                            perturb_at=args.perturb_at, attack=parse_attack(args.attack),
                            give_up_after=args.give_up_after)
    result = TrainingClient(options).run_blocking()
    loss = result.get("loss")
    console.print(f"[bold]{result['client_id']}[/bold] ({'tier ' + str(result['tier'])}) finished at step "
                  f"{result['step']}: loss {'-' if loss is None else f'{loss:.3f}'}, "
                  f"{result['bytes_up']} bytes up, {result['bytes_down']} bytes down, "
                  f"weights {str(result['weights_sha256'])[:16]}")
    return 0


def check_coordinator_identity(url: str, ssl_arg, give_up_after: float) -> None:
    """Before any token is sent: one TLS handshake with the coordinator (GET /health, no credentials), waiting while
    it is not up yet. A certificate that is not the pinned one, or not trusted, is one line (ConfigError)."""
    import aiohttp

    async def probe() -> None:
        started = time.monotonic()
        said = started
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_arg)) as session:
            while True:
                try:
                    async with session.get(url.rstrip("/") + "/health",
                                           timeout=aiohttp.ClientTimeout(total=10)) as resp:
                        await resp.read()
                        return
                except aiohttp.ServerFingerprintMismatch as exc:
                    raise ConfigError(fingerprint_mismatch_message(exc)) from None
                except aiohttp.ClientConnectorCertificateError as exc:
                    raise ConfigError(certificate_error_message(url, exc)) from None
                except aiohttp.ClientConnectorSSLError as exc:
                    raise ConfigError(f"TLS with the coordinator at {url} failed ({exc}); is it serving https?") \
                        from None
                except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                    waited = time.monotonic() - started
                    if waited > give_up_after:
                        raise AftermathError(f"cannot reach the coordinator at {url} after {waited:.0f}s ({exc}); "
                                             "check the URL and that the coordinator runs (giving up after "
                                             f"--give-up-after {give_up_after:g}s)") from None
                    if time.monotonic() - said >= 10:
                        said = time.monotonic()
                        logging.getLogger("aftermath.client").warning(
                            "waiting for the coordinator at %s (%.0fs so far): %s", url, waited, exc)
                    await asyncio.sleep(0.5)

    asyncio.run(probe())
