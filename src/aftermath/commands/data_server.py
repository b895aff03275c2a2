"""`aftermath data-server`: serve a data directory's token sequences over HTTP."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from aiohttp import web
from rich.console import Console

from aftermath.commands.checks import check_can_listen, port, positive_int
from aftermath.data.cache import ensure_default_data
from aftermath.data.server import (DEFAULT_PREFIX, MAX_REQUEST_TOKENS, MAX_SEQ_LEN, MAX_SEQUENCES,
                                   add_data_routes)
from aftermath.errors import ConfigError
from aftermath.tls import check_listen, fingerprint, make_self_signed, server_context


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data-server",
        help="serve training sequences over HTTP to clients without a local copy",
        description="Serve the sequences of a prepared data directory over HTTP, so a client with no local "
        f"copy can train. Routes: {DEFAULT_PREFIX}/meta, {DEFAULT_PREFIX}/tokenizer.json, "
        f"{DEFAULT_PREFIX}/sequences?start=A&end=B&seq_len=L&seed=S&split=train (see docs/data.md).",
    )
    p.add_argument("--data", type=Path, default=None, help="prepared data directory (default: the embedded corpus)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=port, default=8400, help="port (default 8400)")
    p.add_argument("--max-sequences", type=positive_int, default=MAX_SEQUENCES,
                   help=f"most sequences one request may ask for (default {MAX_SEQUENCES})")
    p.add_argument("--max-seq-len", type=positive_int, default=MAX_SEQ_LEN,
                   help=f"longest sequence (seq_len) a request may ask for (default {MAX_SEQ_LEN}); one request "
                   f"also gets at most {MAX_REQUEST_TOKENS:,} tokens, whatever the two limits allow")
    g = p.add_argument_group("TLS (needed to listen beyond this machine)")
    g.add_argument("--tls-cert", type=Path, help="serve https with this PEM certificate (chain)")
    g.add_argument("--tls-key", type=Path, help="the certificate's PEM private key")
    g.add_argument("--tls-self-signed", type=Path, metavar="DIR", help="make DIR/cert.pem and DIR/key.pem on the "
                   "first start (reused after) and print the SHA-256 fingerprint clients pin")
    g.add_argument("--insecure", action="store_true", help="allow plain http on an address other machines reach")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    check_can_listen(args.host, args.port)
    cert, key = tls_files(args)
    check_listen(args.host, cert is not None, args.insecure)
    ssl_context = server_context(cert, key) if cert is not None else None
    data_dir = args.data if args.data is not None else ensure_default_data()
    app = web.Application()
    service = add_data_routes(app, data_dir, max_sequences=args.max_sequences, max_seq_len=args.max_seq_len)
    meta = service.meta()
    splits = ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in meta["splits"].items())
    console.print(f"serving {data_dir} ({splits}; vocabulary {meta['vocab_size']}; data id {service.data_id[:16]})")
    scheme = "https" if ssl_context is not None else "http"
    console.print(f"listening on {scheme}://{args.host}:{args.port}{DEFAULT_PREFIX}/ (Ctrl-C stops)")
    if cert is not None:
        console.print(f"  TLS certificate SHA-256 fingerprint: {fingerprint(cert)}", soft_wrap=True)
    web.run_app(app, host=args.host, port=args.port, print=None, ssl_context=ssl_context)
    return 0


def tls_files(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(cert, key) from --tls-cert/--tls-key or --tls-self-signed DIR; (None, None) without TLS."""
    if args.tls_self_signed is not None:
        if args.tls_cert or args.tls_key:
            raise ConfigError("give --tls-self-signed DIR or --tls-cert/--tls-key, not both")
        cert, key = args.tls_self_signed / "cert.pem", args.tls_self_signed / "key.pem"
        if not (cert.is_file() and key.is_file()):
            make_self_signed(cert, key, [h for h in (args.host, socket.gethostname()) if h])
        return cert, key
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("TLS needs both the certificate and its key: give --tls-cert PATH and --tls-key PATH")
    return args.tls_cert, args.tls_key
