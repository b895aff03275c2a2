"""`aftermath data-server`: serve a data directory's token sequences over HTTP."""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web
from rich.console import Console

from aftermath.commands.checks import check_can_listen, port, positive_int
from aftermath.data.cache import ensure_default_data
from aftermath.data.server import (DEFAULT_PREFIX, MAX_REQUEST_TOKENS, MAX_SEQ_LEN, MAX_SEQUENCES,
                                   add_data_routes)


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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    check_can_listen(args.host, args.port)
    data_dir = args.data if args.data is not None else ensure_default_data()
    app = web.Application()
    service = add_data_routes(app, data_dir, max_sequences=args.max_sequences, max_seq_len=args.max_seq_len)
    meta = service.meta()
    splits = ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in meta["splits"].items())
    console.print(f"serving {data_dir} ({splits}; vocabulary {meta['vocab_size']}; data id {service.data_id[:16]})")
    console.print(f"listening on http://{args.host}:{args.port}{DEFAULT_PREFIX}/ (Ctrl-C stops)")
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
