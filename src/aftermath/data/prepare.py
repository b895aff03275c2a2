"""Turn a corpus into a data directory: tokenizer.json, train_/val_ shards, meta.json.

The directory is built beside its final place and renamed into it, so a reader sees it complete or not at
all, and two processes preparing the same directory cannot corrupt each other.

Tokenization streams: the corpus is cut into batches of pieces (about ENCODE_BATCH_CHARS characters each), and
with `workers` > 1 the batches are encoded in that many processes, at most two batches per process in flight,
their results written in corpus order. Every batch is encoded the same way wherever it runs, so the directory
is byte-identical for any number of workers.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

from aftermath.data.corpus import EmbeddedCorpus
from aftermath.data.dataset import META_FILE, META_FORMAT, META_VERSION, SPLITS, data_id_of
from aftermath.data.shards import ShardWriter, dtype_for_vocab
from aftermath.data.sources import UserCorpus
from aftermath.data.tokenizer import (DEFAULT_BPE_VOCAB, TOKENIZER_FILE, batch_encoder, build_tokenizer, eot_id,
                                      tokenizer_sha256)
from aftermath.errors import DataError

SHARD_TOKENS = 100_000_000  # modded-nanogpt's shard size: 200 MB of uint16 tokens
ENCODE_BATCH_CHARS = 1 << 23  # text handed to the tokenizer at once (it encodes a batch in parallel)
ENCODE_BATCH_PIECES = 4096

Progress = Callable[[str], None]
Piece = tuple[str, bool]  # (text, ends_document)


class Corpus(Protocol):
    sources: list[dict]

    def pieces(self, split: str) -> Iterator[Piece]: ...

    def documents(self, split: str) -> int: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class PreparedData:
    """A prepared data directory and its meta.json."""

    dir: Path
    meta: dict

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    def tokens(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])


@dataclass(frozen=True)
class SplitProgress:
    """How far the tokenization of one split is: what a progress bar shows after each batch."""

    split: str
    documents: int
    total_documents: int
    tokens: int


ProgressBar = Callable[[SplitProgress], None]


def default_workers() -> int:
    """Encoding processes when none are asked for: one per CPU, at most 4 (past that, reading is the limit)."""
    return min(os.cpu_count() or 1, 4)


def _quiet(_: str) -> None:
    pass


def _split_writer(directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
    """A sink for one split's tokens that starts a new shard every `shard_tokens` tokens."""
    shards: list[dict] = []
    writer: ShardWriter | None = None

    def write(tokens: np.ndarray) -> None:
        nonlocal writer
        while tokens.size:
            if writer is None:
                writer = ShardWriter(directory / f"{split}_{len(shards):06d}.bin", dtype)
            room = shard_tokens - writer.num_tokens
            writer.write(tokens[:room])
            tokens = tokens[room:]
            if writer.num_tokens == shard_tokens:
                shards.append(writer.close().to_json())
                writer = None

    def close() -> list[dict]:
        nonlocal writer
        if writer is not None and writer.num_tokens:
            shards.append(writer.close().to_json())
        elif writer is not None:
            writer.abort()
        writer = None
        return shards

    return write, close


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch, chars = [], 0
    for text, ends in pieces:
        batch.append((text, ends))
        chars += len(text)
        if chars >= ENCODE_BATCH_CHARS or len(batch) >= ENCODE_BATCH_PIECES:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class BatchEncoder:
    """A batch of pieces -> (their tokens as one array of the shard dtype, the number of documents ended).

    Documents are separated by <|endoftext|> (or, for the bytes tokenizer, which has none, by a newline).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        eot = eot_id(tokenizer)
        self.separator = np.array([eot] if eot is not None else tokenizer.encode("\n").ids, dtype=np.int64)
        self.dtype = dtype_for_vocab(tokenizer.get_vocab_size())
        self.encode = batch_encoder(tokenizer)

    def __call__(self, batch: list[Piece]) -> tuple[np.ndarray, int]:
        parts, documents = [], 0
        for (_, ends), ids in zip(batch, self.encode([text for text, _ in batch])):
            parts.append(ids)
            if ends:
                parts.append(self.separator)
                documents += 1
        return np.concatenate(parts).astype(self.dtype), documents


_worker_encoder: BatchEncoder | None = None  # the encoder of a worker process, made once by `_start_worker`


def _start_worker(tokenizer_json: str) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism; no threads on top
    _worker_encoder = BatchEncoder(Tokenizer.from_str(tokenizer_json))


def _encode_in_worker(batch: list[Piece]) -> tuple[np.ndarray, int]:
    assert _worker_encoder is not None, "_start_worker runs first in every worker"
    return _worker_encoder(batch)


def encode_batches(batches: Iterable[list[Piece]], tokenizer: Tokenizer,
                   workers: int = 1) -> Iterator[tuple[np.ndarray, int]]:
    """`BatchEncoder` results of `batches`, in order; with `workers` > 1 computed in that many processes, with at
    most 2 x `workers` batches read ahead (the corpus streams through, it is never held whole)."""
    if workers < 1:
        raise DataError(f"--workers {workers} must be at least 1")
    batches = iter(batches)
    head = list(itertools.islice(batches, 2))
    if workers == 1 or len(head) < 2:  # one batch is not worth starting processes for
        encoder = BatchEncoder(tokenizer)
        yield from map(encoder, itertools.chain(head, batches))
        return
    # spawn, not fork: the parent may hold the tokenizer's threads (BPE training), which a fork does not copy
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(tokenizer.to_str(),))
    try:
        pending: deque[Future] = deque()
        for batch in itertools.chain(head, batches):
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def encode_split(corpus: Corpus, split: str, tokenizer: Tokenizer, directory: Path, shard_tokens: int,
                 workers: int = 1, bar: ProgressBar | None = None) -> dict:
    """Tokenize every document of `split` into shards, reporting to `bar` after each batch."""
    write, close = _split_writer(directory, split, dtype_for_vocab(tokenizer.get_vocab_size()), shard_tokens)
    total = corpus.documents(split)
    documents = tokens = 0
    for ids, ended in encode_batches(_batches(corpus.pieces(split)), tokenizer, workers):
        write(ids)
        documents += ended
        tokens += ids.size
        if bar is not None:
            bar(SplitProgress(split, documents, total, tokens))
    return {"tokens": tokens, "documents": documents, "shards": close()}


def _train_texts(corpus: Corpus) -> Iterator[str]:
    for text, _ in corpus.pieces("train"):
        yield text


def write_data_dir(corpus: Corpus, directory: Path, *, tokenizer: str = "bpe", vocab_size: int = DEFAULT_BPE_VOCAB,
                   shard_tokens: int = SHARD_TOKENS, workers: int = 1, progress: Progress = _quiet,
                   bar: ProgressBar | None = None) -> dict:
    """Write tokenizer.json, the shards and meta.json of `corpus` into an existing empty `directory`.

    `progress` gets a line per stage, `bar` the state of the split being encoded after each batch."""
    if shard_tokens < 1:
        raise DataError(f"shard size {shard_tokens} tokens must be positive")
    start = time.perf_counter()
    if tokenizer == "bpe":
        progress(f"training a byte-level BPE tokenizer (vocabulary {vocab_size}) on the training split")
    tok = build_tokenizer(tokenizer, _train_texts(corpus) if tokenizer == "bpe" else None, vocab_size)
    tok.save(str(directory / TOKENIZER_FILE))
    progress(f"tokenizer {tokenizer}: {tok.get_vocab_size()} tokens ({time.perf_counter() - start:.1f} s)")
    splits = {}
    for split in SPLITS:
        splits[split] = encode_split(corpus, split, tok, directory, shard_tokens, workers, bar)
        progress(f"  {split}: {splits[split]['tokens']:,} tokens from {splits[split]['documents']:,} documents")
    if splits["train"]["tokens"] == 0:
        raise DataError("the corpus is empty: the training split has no text. Give files that hold text")
    tok_sha = tokenizer_sha256(tok)
    meta = {
        "format": META_FORMAT,
        "format_version": META_VERSION,
        "tokenizer": {"kind": tokenizer, "vocab_size": tok.get_vocab_size(), "file": TOKENIZER_FILE,
                      "sha256": tok_sha, "eot_id": eot_id(tok)},
        "dtype": str(dtype_for_vocab(tok.get_vocab_size()).name),
        "shard_format": "nanoGPT .bin: 256 int32 header (magic 20240520, version 1=uint16 2=uint32, tokens)",
        "splits": splits,
        "sources": corpus.sources,
        "options": {**corpus.describe(), "shard_tokens": shard_tokens,
                    "requested_vocab_size": vocab_size if tokenizer == "bpe" else None},
        "data_id": data_id_of(tok_sha, {s: v["shards"] for s, v in splits.items()}),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def check_out_dir(final: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty directory unless `overwrite`."""
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise DataError(f"{final} already exists and is not empty; choose another --out, or pass --force to "
                        "replace it")


def build_atomically(final: Path, build: Callable[[Path], dict], *, overwrite: bool = False,
                     keep_existing: bool = False) -> dict:
    """Run `build(tmp_dir)` in a temporary directory beside `final`, then rename it into place.

    `keep_existing`: another process finished first -> keep its directory, discard ours (a cache).
    `overwrite`: replace an existing directory; otherwise an existing non-empty directory is an error.
    """
    final = Path(final)
    if not keep_existing:
        check_out_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        meta = build(tmp)
        if final.exists() and overwrite:
            trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                if final.exists() and not any(final.iterdir()):
                    final.rmdir()
                os.rename(tmp, final)
            except OSError:
                if not (keep_existing and (final / META_FILE).is_file()):
                    raise
                meta = json.loads((final / META_FILE).read_text())  # another process won the race
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def prepare_corpus(corpus: Corpus, out_dir: str | Path, *, tokenizer: str = "bpe",
                   vocab_size: int = DEFAULT_BPE_VOCAB, shard_tokens: int = SHARD_TOKENS, overwrite: bool = False,
                   workers: int = 1, progress: Progress = _quiet, bar: ProgressBar | None = None) -> PreparedData:
    out = Path(out_dir)
    meta = build_atomically(out, lambda tmp: write_data_dir(corpus, tmp, tokenizer=tokenizer, vocab_size=vocab_size,
                                                            shard_tokens=shard_tokens, workers=workers,
                                                            progress=progress, bar=bar),
                            overwrite=overwrite)
    return PreparedData(out, meta)


def prepare_data(out_dir: str | Path, *, texts: Iterable[str | Path] = (), jsonl: Iterable[str | Path] = (),
                 parquet: Iterable[str | Path] = (), hf_dataset: str | None = None, hf_split: str = "train",
                 hf_config: str | None = None, text_field: str = "text", tokenizer: str = "bpe",
                 vocab_size: int = DEFAULT_BPE_VOCAB, val_fraction: float = 0.05, shard_tokens: int = SHARD_TOKENS,
                 overwrite: bool = False, workers: int = 1, progress: Progress = _quiet,
                 bar: ProgressBar | None = None) -> PreparedData:
    """Prepare a user's text / JSONL / parquet files (or directories of them) and Hugging Face dataset (or, with
    none, the embedded Shakespeare) into `out_dir`, tokenizing in `workers` processes."""
    texts, jsonl, parquet = list(texts), list(jsonl), list(parquet)
    check_out_dir(Path(out_dir), overwrite)  # before the inputs are read: that can take long
    if texts or jsonl or parquet or hf_dataset:
        start = time.perf_counter()
        user = UserCorpus(texts=texts, jsonl=jsonl, parquet=parquet, hf_dataset=hf_dataset, hf_split=hf_split,
                          hf_config=hf_config, text_field=text_field, val_fraction=val_fraction)
        progress(f"read {user.num_documents:,} documents from {len(user.sources)} inputs "
                 f"({time.perf_counter() - start:.1f} s)")
        corpus: Corpus = user
    else:
        corpus = EmbeddedCorpus()
    return prepare_corpus(corpus, out_dir, tokenizer=tokenizer, vocab_size=vocab_size, shard_tokens=shard_tokens,
                          overwrite=overwrite, workers=workers, progress=progress, bar=bar)
