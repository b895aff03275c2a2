"""How long preparing the embedded Shakespeare takes (first run, cached run), its token counts, and how fast
sequences come out of a TokenStream and the data server.

    .venv/bin/python bench/data_prepare.py [--tokenizers bpe bytes gpt2] [--out bench/results/data_prepare.json]

Each tokenizer is prepared into a fresh temporary cache in a child process (a cold start, as a new user sees
it); the cached run is a second child process on the same cache (wall time includes Python start-up) and
an in-process call (the cost `default_data_dir()` adds to a program that is already running).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

CHILD = "from aftermath.data import ensure_default_data as e; import sys; print(e(sys.argv[1], progress=None))"


def child_prepare(cache: str, tokenizer: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, tokenizer], env={**os.environ, "AFTERMATH_CACHE": cache},
                         capture_output=True, text=True, check=True).stdout.strip()
    return time.perf_counter() - start, out


def stream_rate(data_dir: str, seq_len: int = 256, n: int = 2048) -> float:
    from aftermath.data import TokenStream

    stream = TokenStream(data_dir, seq_len, seed=0)
    stream.sequences(0, 1)  # the first call imports torch
    start = time.perf_counter()
    stream.sequences(0, n)
    return n / (time.perf_counter() - start)


def server_rate(data_dir: str, seq_len: int = 256, n: int = 2048, per_request: int = 64) -> float:
    from aiohttp import web

    from aftermath.data.server import add_data_routes, fetch_sequences

    async def run() -> float:
        app = web.Application()
        add_data_routes(app, data_dir)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            start = time.perf_counter()
            for a in range(0, n, per_request):
                await fetch_sequences(url, a, a + per_request, seq_len)
            return n / (time.perf_counter() - start)
        finally:
            await runner.cleanup()

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizers", nargs="+", default=["bpe", "bytes", "gpt2"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_prepare.json"))
    args = parser.parse_args()
    from aftermath.data import ensure_default_data, read_meta

    rows, records = [], []
    for tokenizer in args.tokenizers:
        with tempfile.TemporaryDirectory() as cache:
            first, path = child_prepare(cache, tokenizer)
            cached, _ = child_prepare(cache, tokenizer)
            os.environ["AFTERMATH_CACHE"] = cache
            start = time.perf_counter()
            ensure_default_data(tokenizer, progress=None)
            in_process = time.perf_counter() - start
            meta = read_meta(path)
            record = {
                "tokenizer": tokenizer, "vocab_size": meta["tokenizer"]["vocab_size"],
                "first_run_s": first, "cached_run_s": cached, "cached_in_process_s": in_process,
                "load_average_1min": os.getloadavg()[0],
                "train_tokens": meta["splits"]["train"]["tokens"], "val_tokens": meta["splits"]["val"]["tokens"],
                "stream_seq_per_s": stream_rate(path), "server_seq_per_s": server_rate(path),
            }
        records.append(record)
        rows.append([record[k] for k in ("tokenizer", "vocab_size", "first_run_s", "cached_run_s",
                                         "cached_in_process_s", "train_tokens", "val_tokens",
                                         "stream_seq_per_s", "server_seq_per_s")])
    columns = ["tokenizer", "vocab", "first run s", "cached run s (process)", "cached s (in-process)",
               "train tokens", "val tokens", "TokenStream seq/s (L=256)", "server seq/s (L=256, 64/req)"]
    _common.print_table("Preparing the embedded Shakespeare", columns, rows)
    path = _common.write_json(args.out, {"results": records})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
