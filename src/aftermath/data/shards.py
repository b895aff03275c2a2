"""Token shards: the nanoGPT / modded-nanogpt `.bin` format, memory-mapped.

A shard is a header of 256 little-endian int32 followed by the tokens:

    header[0] = 20240520          magic
    header[1] = 1 | 2             version: 1 = uint16 tokens (modded-nanogpt's), 2 = uint32 tokens (ours, for
                                  vocabularies above 65536 ids)
    header[2] = number of tokens
    header[3:] = 0

A file whose first int32 is not the magic is read as *headerless* raw tokens (nanoGPT's `train.bin`), uint16
unless told otherwise. Nothing here reads a whole shard into memory: tokens are `np.memmap` views.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aftermath.errors import DataError

MAGIC = 20240520
VERSION_UINT16 = 1
VERSION_UINT32 = 2
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_DTYPES = {VERSION_UINT16: np.dtype("<u2"), VERSION_UINT32: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits in 16 bits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def version_for_dtype(dtype: np.dtype) -> int:
    for version, d in VERSION_DTYPES.items():
        if np.dtype(dtype) == d:
            return version
    raise DataError(f"token dtype {dtype} cannot be stored in a shard; use uint16 or uint32")


def make_header(num_tokens: int, dtype: np.dtype) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, version_for_dtype(dtype), num_tokens
    if num_tokens >= 1 << 31:
        raise DataError(f"a shard holds at most 2^31-1 tokens, got {num_tokens}; write smaller shards")
    return header.tobytes()


class ShardWriter:
    """Streams tokens into one shard: header placeholder, tokens, then the real header; renamed in at close.

    The file appears at `path` only when complete, so a crash never leaves a shard that looks whole.
    """

    def __init__(self, path: str | Path, dtype: np.dtype) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")
        self.file.write(make_header(0, self.dtype))
        self.num_tokens = 0
        self.max_token_id = -1

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        if tokens.min() < 0 or int(tokens.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"token ids {int(tokens.min())}..{int(tokens.max())} do not fit in {self.dtype}")
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self.file.write(data)
        self.num_tokens += int(tokens.size)
        self.max_token_id = max(self.max_token_id, int(tokens.max()))

    def close(self) -> "ShardInfo":
        header = make_header(self.num_tokens, self.dtype)
        self.file.seek(0)
        self.file.write(header)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        # The header is only known now, so the file's hash is taken by reading it back (page cache, cheap).
        return ShardInfo(file=self.path.name, tokens=self.num_tokens, max_token_id=self.max_token_id,
                         sha256=file_sha256(self.path))

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardInfo:
    """What meta.json records of one shard."""

    file: str
    tokens: int
    max_token_id: int
    sha256: str

    def to_json(self) -> dict:
        return {"file": self.file, "tokens": self.tokens, "max_token_id": self.max_token_id, "sha256": self.sha256}


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> ShardInfo:
    """Write `tokens` as one `.bin` shard (uint16 when `vocab_size` <= 65536, else uint32), atomically."""
    writer = ShardWriter(path, dtype_for_vocab(vocab_size))
    try:
        writer.write(np.asarray(tokens))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def read_header(path: Path) -> tuple[int, np.dtype] | None:
    """(token count, dtype) from a `.bin` header, or None for a headerless file. Validates the header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < 4 or int(np.frombuffer(head[:4], dtype="<i4")[0]) != MAGIC:
        return None
    if len(head) < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard, only {size} bytes, less than its {HEADER_BYTES}-byte header; "
                        "re-run `aftermath prepare-data` to rewrite it")
    header = np.frombuffer(head, dtype="<i4")
    version, count = int(header[1]), int(header[2])
    if version not in VERSION_DTYPES:
        raise DataError(f"{path}: shard header has version {version}; this reader knows {sorted(VERSION_DTYPES)} "
                        "(1 = uint16 tokens, 2 = uint32 tokens). Re-run `aftermath prepare-data`")
    dtype = VERSION_DTYPES[version]
    expected = HEADER_BYTES + count * dtype.itemsize
    if count < 0 or size != expected:
        kind = "truncated" if size < expected else "longer than its header says"
        raise DataError(
            f"{path}: header says {count} tokens ({expected} bytes with the header) but the file has {size} bytes "
            f"({kind}). The shard is damaged or its header lies; re-run `aftermath prepare-data` to rewrite it"
        )
    return count, dtype


def open_shard(path: str | Path, raw_dtype: str | np.dtype = "<u2") -> np.memmap:
    """Memory-map the tokens of one shard (`.bin` with header, or headerless raw tokens of `raw_dtype`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} is missing; re-run `aftermath prepare-data` or fix the data directory")
    header = read_header(path)
    if header is None:
        dtype = np.dtype(raw_dtype).newbyteorder("<")
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path} is empty: no tokens. Prepare data with `aftermath prepare-data`")
        if size % dtype.itemsize:
            raise DataError(f"{path}: headerless shard of {size} bytes is not a whole number of {dtype} tokens "
                            f"({dtype.itemsize} bytes each); the file is truncated or not {dtype}")
        return np.memmap(path, dtype=dtype, mode="r")
    count, dtype = header
    if count == 0:
        raise DataError(f"{path} holds no tokens; remove it or re-run `aftermath prepare-data`")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def max_token(tokens: np.ndarray, block: int = 1 << 24) -> int:
    """Largest id in a (memory-mapped) token array, read block by block."""
    return max(int(tokens[i : i + block].max()) for i in range(0, len(tokens), block))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
