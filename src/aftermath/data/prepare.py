"""Turn a corpus into a data directory: tokenizer.json, train_/val_ shards, meta.json.

The directory is built beside its final place and renamed into it, so a reader sees it complete or not at
all, and two processes preparing the same directory cannot corrupt each other.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
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

Progress = Callable[[str], None]


class Corpus(Protocol):
    sources: list[dict]

    def pieces(self, split: str) -> Iterator[tuple[str, bool]]: ...

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


def _batches(pieces: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    batch, chars = [], 0
    for text, ends in pieces:
        batch.append((text, ends))
        chars += len(text)
        if chars >= ENCODE_BATCH_CHARS or len(batch) >= 4096:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_split(corpus: Corpus, split: str, tokenizer: Tokenizer, directory: Path, shard_tokens: int,
                 progress: Progress) -> dict:
    """Tokenize every document of `split` into shards; documents are separated by <|endoftext|> (or, for the
    bytes tokenizer, which has none, by a newline)."""
    eot = eot_id(tokenizer)
    separator = np.array([eot] if eot is not None else tokenizer.encode("\n").ids, dtype=np.int64)
    write, close = _split_writer(directory, split, dtype_for_vocab(tokenizer.get_vocab_size()), shard_tokens)
    encode = batch_encoder(tokenizer)
    documents = tokens = 0
    for batch in _batches(corpus.pieces(split)):
        for (_, ends), ids in zip(batch, encode([text for text, _ in batch])):
            if ends:
                ids = np.concatenate([ids, separator])
                documents += 1
            write(ids)
            tokens += ids.size
        progress(f"  {split}: {tokens:,} tokens from {documents:,} documents")
    return {"tokens": tokens, "documents": documents, "shards": close()}


def _train_texts(corpus: Corpus) -> Iterator[str]:
    for text, _ in corpus.pieces("train"):
        yield text


def write_data_dir(corpus: Corpus, directory: Path, *, tokenizer: str = "bpe", vocab_size: int = DEFAULT_BPE_VOCAB,
                   shard_tokens: int = SHARD_TOKENS, progress: Progress = _quiet) -> dict:
    """Write tokenizer.json, the shards and meta.json of `corpus` into an existing empty `directory`."""
    if shard_tokens < 1:
        raise DataError(f"shard size {shard_tokens} tokens must be positive")
    start = time.perf_counter()
    if tokenizer == "bpe":
        progress(f"training a byte-level BPE tokenizer (vocabulary {vocab_size}) on the training split")
    tok = build_tokenizer(tokenizer, _train_texts(corpus) if tokenizer == "bpe" else None, vocab_size)
    tok.save(str(directory / TOKENIZER_FILE))
    progress(f"tokenizer {tokenizer}: {tok.get_vocab_size()} tokens ({time.perf_counter() - start:.1f} s)")
    splits = {split: encode_split(corpus, split, tok, directory, shard_tokens, progress) for split in SPLITS}
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


def build_atomically(final: Path, build: Callable[[Path], dict], *, overwrite: bool = False,
                     keep_existing: bool = False) -> dict:
    """Run `build(tmp_dir)` in a temporary directory beside `final`, then rename it into place.

    `keep_existing`: another process finished first -> keep its directory, discard ours (a cache).
    `overwrite`: replace an existing directory; otherwise an existing non-empty directory is an error.
    """
    final = Path(final)
    if final.exists() and any(final.iterdir()) and not (overwrite or keep_existing):
        raise DataError(f"{final} already exists and is not empty; choose another --out, or pass --force to "
                        "replace it")
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
                   progress: Progress = _quiet) -> PreparedData:
    out = Path(out_dir)
    meta = build_atomically(out, lambda tmp: write_data_dir(corpus, tmp, tokenizer=tokenizer, vocab_size=vocab_size,
                                                            shard_tokens=shard_tokens, progress=progress),
                            overwrite=overwrite)
    return PreparedData(out, meta)


def prepare_data(out_dir: str | Path, *, texts: Iterable[str | Path] = (), jsonl: Iterable[str | Path] = (),
                 jsonl_field: str = "text", tokenizer: str = "bpe", vocab_size: int = DEFAULT_BPE_VOCAB,
                 val_fraction: float = 0.05, shard_tokens: int = SHARD_TOKENS, overwrite: bool = False,
                 progress: Progress = _quiet) -> PreparedData:
    """Prepare a user's text / JSONL files (or, with neither, the embedded Shakespeare) into `out_dir`."""
    texts, jsonl = list(texts), list(jsonl)
    if texts or jsonl:
        corpus: Corpus = UserCorpus(texts=texts, jsonl=jsonl, jsonl_field=jsonl_field, val_fraction=val_fraction)
    else:
        corpus = EmbeddedCorpus()
    return prepare_corpus(corpus, out_dir, tokenizer=tokenizer, vocab_size=vocab_size, shard_tokens=shard_tokens,
                          overwrite=overwrite, progress=progress)
