"""Serve a data directory's sequences over HTTP (aiohttp), and fetch them with retries.

Routes, mounted under a prefix (default `/data`) by `add_data_routes` (the coordinator mounts them in its own
app; `aftermath data-server` runs them alone):

    GET {prefix}/meta                -> JSON: data_id, vocab_size, dtype, tokens per split, meta.json
    GET {prefix}/tokenizer.json      -> the tokenizer file
    GET {prefix}/sequences?start=A&end=B&seq_len=L[&seed=S][&split=train|val][&shuffle=1|0]
        -> 200, body = the tokens of sequences [A, B) as little-endian integers, row-major [B-A, L+1];
           headers X-Aftermath-Dtype (uint16 | uint32), X-Aftermath-Shape ("rows,cols"),
           X-Aftermath-Data-Id and X-Aftermath-Sha256 (of the body)

Bad input gets a 4xx with a JSON body {"error": "..."} that says what was wrong and how to fix it. A request
is bounded before anything is read: at most `max_sequences` sequences of at most `max_seq_len` tokens, and at most
`max_tokens` tokens in all, so no request makes the server hold more than the run's shapes need.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import aiohttp
import numpy as np
import torch
from aiohttp import web

from aftermath.data.batches import TokenStream
from aftermath.data.dataset import SPLITS, TokenData
from aftermath.errors import DataError

DEFAULT_PREFIX = "/data"
MAX_SEQUENCES = 4096
MAX_SEQ_LEN = 4096
MAX_REQUEST_TOKENS = 2**22  # tokens of one response: 32 MiB as int64 while it is gathered
HEADER_DTYPE = "X-Aftermath-Dtype"
HEADER_SHAPE = "X-Aftermath-Shape"
HEADER_DATA_ID = "X-Aftermath-Data-Id"
HEADER_SHA256 = "X-Aftermath-Sha256"
WIRE_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class DataService:
    """The state behind the routes: the opened splits and the streams asked for so far."""

    def __init__(self, data_dir: str | Path, max_sequences: int = MAX_SEQUENCES, max_seq_len: int = MAX_SEQ_LEN,
                 max_tokens: int = MAX_REQUEST_TOKENS) -> None:
        self.dir = Path(data_dir)
        self.max_sequences = max_sequences
        self.max_seq_len = max_seq_len
        self.max_tokens = max_tokens
        self.splits: dict[str, TokenData] = {"train": TokenData(self.dir, "train")}
        try:
            self.splits["val"] = TokenData(self.dir, "val")
        except DataError:
            pass  # a directory without a validation split still serves training data
        self.data_id = self.splits["train"].data_id()
        self.streams: dict[tuple[str, int, int, bool], TokenStream] = {}

    def stream(self, split: str, seq_len: int, seed: int, shuffle: bool) -> TokenStream:
        if split not in self.splits:
            raise web.HTTPNotFound(text=_error(f"split {split!r} is not served here; this data directory has "
                                               f"{sorted(self.splits)}"), content_type="application/json")
        key = (split, seq_len, seed, shuffle)
        if key not in self.streams:
            if len(self.streams) > 64:  # a handful are in use at once; forget old ones
                self.streams.clear()
            self.streams[key] = TokenStream(self.splits[split], seq_len, seed, shuffle=shuffle)
        return self.streams[key]

    def meta(self) -> dict:
        train = self.splits["train"]
        return {
            "data_id": self.data_id,
            "vocab_size": train.vocab_size,
            "dtype": train.dtype.name,
            "splits": {s: {"tokens": d.num_tokens, "max_token_id": d.max_token_id} for s, d in self.splits.items()},
            "meta": train.meta,
        }


def _error(message: str) -> str:
    return json.dumps({"error": message})


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=_error(message), content_type="application/json")


def _int_param(request: web.Request, name: str, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise _bad_request(f"missing query parameter {name!r}; e.g. ?start=0&end=8&seq_len=128")
        return default
    try:
        return int(raw)
    except ValueError:
        raise _bad_request(f"query parameter {name}={raw!r} is not an integer") from None


def add_data_routes(app: web.Application, data_dir: str | Path, *, prefix: str = DEFAULT_PREFIX,
                    max_sequences: int = MAX_SEQUENCES, max_seq_len: int = MAX_SEQ_LEN,
                    max_tokens: int = MAX_REQUEST_TOKENS) -> DataService:
    """Mount the data routes for `data_dir` under `prefix` on `app`; returns the service (for its data_id).

    One request may ask for at most `max_sequences` sequences of at most `max_seq_len` tokens, and at most
    `max_tokens` tokens in all (sequences x (seq_len + 1)); more gets a 400.
    """
    service = DataService(data_dir, max_sequences, max_seq_len, max_tokens)
    prefix = prefix.rstrip("/")

    async def meta(_: web.Request) -> web.Response:
        return web.json_response(service.meta())

    async def tokenizer(_: web.Request) -> web.StreamResponse:
        path = service.splits["train"].tokenizer_path
        if path is None:
            raise web.HTTPNotFound(text=_error(f"{service.dir} has no tokenizer.json"), content_type="application/json")
        return web.FileResponse(path)

    async def sequences(request: web.Request) -> web.Response:
        start, end = _int_param(request, "start"), _int_param(request, "end")
        seq_len, seed = _int_param(request, "seq_len"), _int_param(request, "seed", 0)
        split = request.query.get("split", "train")
        shuffle = request.query.get("shuffle", "1") not in ("0", "false", "no")
        if split not in SPLITS:
            raise _bad_request(f"split={split!r} is unknown; use one of {', '.join(SPLITS)}")
        if end - start > service.max_sequences:
            raise _bad_request(f"range [{start}, {end}) asks for {end - start} sequences; this server sends at "
                               f"most {service.max_sequences} per request: split the range")
        if seq_len > service.max_seq_len:
            raise _bad_request(f"seq_len={seq_len} is longer than this server sends: give seq_len <= "
                               f"{service.max_seq_len}")
        if (end - start) * (seq_len + 1) > service.max_tokens:
            raise _bad_request(f"range [{start}, {end}) of seq_len={seq_len} asks for {(end - start) * (seq_len + 1)} "
                               f"tokens; this server sends at most {service.max_tokens} per request: split the range")
        try:
            stream = service.stream(split, seq_len, seed, shuffle)
            stream.check_range(start, end)
            tokens = await asyncio.to_thread(stream.sequences_numpy, start, end)
        except DataError as exc:
            raise _bad_request(str(exc)) from exc
        dtype = WIRE_DTYPES[stream.data.dtype.name]
        body = tokens.astype(dtype).tobytes()
        return web.Response(body=body, content_type="application/octet-stream", headers={
            HEADER_DTYPE: dtype.name, HEADER_SHAPE: f"{tokens.shape[0]},{tokens.shape[1]}",
            HEADER_DATA_ID: service.data_id, HEADER_SHA256: hashlib.sha256(body).hexdigest()})

    app.router.add_get(f"{prefix}/meta", meta)
    app.router.add_get(f"{prefix}/tokenizer.json", tokenizer)
    app.router.add_get(f"{prefix}/sequences", sequences)
    return service


# ------------------------------------------------------------------------------------------------ client
class _Retry(Exception):
    """A failure worth another try (connection, timeout, 5xx, damaged body)."""


async def _get(session: aiohttp.ClientSession, url: str, params: dict, timeout: float) -> tuple[bytes, dict]:
    try:
        async with session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.read()
            if resp.status >= 500:
                raise _Retry(f"server error {resp.status} from {url}")
            if resp.status >= 400:
                try:
                    message = (await resp.json(content_type=None))["error"]
                except Exception:
                    message = body[:200].decode(errors="replace")
                raise DataError(f"{url} refused the request ({resp.status}): {message}")
            return body, dict(resp.headers)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise _Retry(f"{type(exc).__name__} {exc} from {url}") from exc


async def _with_retries(call, url: str, retries: int, backoff: float):
    if retries < 0:
        raise DataError(f"retries={retries} must be >= 0")
    last = ""
    for attempt in range(retries + 1):
        try:
            return await call()
        except _Retry as exc:
            last = str(exc)
            if attempt < retries:
                await asyncio.sleep(backoff * 2**attempt)
    raise DataError(f"could not fetch from {url} after {retries + 1} attempts (last: {last}); check that the data "
                    "server is running and reachable, or use a local copy of the data (--data DIR)")


def _decode_sequences(body: bytes, headers: dict, rows: int, cols: int, url: str) -> torch.Tensor:
    dtype = WIRE_DTYPES.get(headers.get(HEADER_DTYPE, ""))
    if dtype is None:
        raise _Retry(f"unknown token dtype {headers.get(HEADER_DTYPE)!r} from {url}")
    if headers.get(HEADER_SHAPE) != f"{rows},{cols}" or len(body) != rows * cols * dtype.itemsize:
        raise _Retry(f"{url} sent {len(body)} bytes, shape {headers.get(HEADER_SHAPE)}; expected [{rows}, {cols}]")
    if headers.get(HEADER_SHA256) != hashlib.sha256(body).hexdigest():
        raise _Retry(f"body from {url} does not match its sha256 header (damaged in transit)")
    return torch.from_numpy(np.frombuffer(body, dtype=dtype).astype(np.int64).reshape(rows, cols))


async def fetch_sequences(url: str, start: int, end: int, seq_len: int, seed: int = 0, split: str = "train", *,
                          shuffle: bool = True, prefix: str = DEFAULT_PREFIX, retries: int = 3,
                          timeout: float = 30.0, backoff: float = 0.25, data_id: str | None = None,
                          session: aiohttp.ClientSession | None = None) -> torch.Tensor:
    """Sequences [start, end) from a data server at `url` (e.g. http://127.0.0.1:8400): int64
    [end - start, seq_len + 1], identical to `TokenStream(dir, seq_len, seed, split).sequences(start, end)`.

    Each request has `timeout` seconds; connection errors, timeouts, 5xx and damaged bodies are retried
    `retries` more times with exponential backoff; a 4xx is raised at once as DataError. With `data_id`,
    a server holding other data is refused.
    """
    if start < 0 or end < start:
        raise DataError(f"sequence range [{start}, {end}) is invalid; give 0 <= start <= end")
    endpoint = url.rstrip("/") + prefix.rstrip("/") + "/sequences"
    params = {"start": start, "end": end, "seq_len": seq_len, "seed": seed, "split": split,
              "shuffle": int(shuffle)}

    async def once(s: aiohttp.ClientSession) -> torch.Tensor:
        body, headers = await _get(s, endpoint, params, timeout)
        if data_id is not None and headers.get(HEADER_DATA_ID) != data_id:
            raise DataError(f"{url} serves data {headers.get(HEADER_DATA_ID)}, not the run's {data_id}; point the "
                            "client at the run's data server")
        return _decode_sequences(body, headers, end - start, seq_len + 1, endpoint)

    return await _session_call(session, lambda s: _with_retries(lambda: once(s), endpoint, retries, backoff))


async def fetch_meta(url: str, *, prefix: str = DEFAULT_PREFIX, retries: int = 3, timeout: float = 30.0,
                     backoff: float = 0.25, session: aiohttp.ClientSession | None = None) -> dict:
    """The server's `{prefix}/meta` JSON (data_id, vocab_size, dtype, tokens per split, meta.json)."""
    endpoint = url.rstrip("/") + prefix.rstrip("/") + "/meta"

    async def once(s: aiohttp.ClientSession) -> dict:
        body, _ = await _get(s, endpoint, {}, timeout)
        return json.loads(body)

    return await _session_call(session, lambda s: _with_retries(lambda: once(s), endpoint, retries, backoff))


async def _session_call(session: aiohttp.ClientSession | None, call):
    if session is not None:
        return await call(session)
    async with aiohttp.ClientSession() as own:
        return await call(own)


def fetch_sequences_blocking(url: str, start: int, end: int, seq_len: int, seed: int = 0, split: str = "train",
                             **kwargs) -> torch.Tensor:
    """`fetch_sequences` for code that is not inside an event loop."""
    return asyncio.run(fetch_sequences(url, start, end, seq_len, seed, split, **kwargs))
