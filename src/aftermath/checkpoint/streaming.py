"""Streaming safetensors I/O: read prefix regions tensor by tensor, write single files or shards.

The exporter never holds a whole model: it reads one tensor's region with `safe_open(...).get_slice`, writes
its bytes, and lets it go. Writing uses the safetensors layout directly (8-byte header length, JSON header,
raw little-endian data), which lets the header be written before any tensor is read.
"""

from __future__ import annotations

import json
import re
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from aftermath.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for s in self.shape:
            n *= s
        return n


# ------------------------------------------------------------------------------------------------ reading
def tensor_locations(directory: str | Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor of a model directory (single file or sharded)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); re-export the model") from exc
        locations = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or "/" in file or "\\" in file or file in ("", ".", ".."):
                raise CheckpointError(f"{index}: tensor {name!r} maps to {file!r}, which is not a file in {directory}")
            locations[name] = directory / file
    else:
        single = directory / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}: is this a model directory?")
        with _open(single) as f:
            locations = {name: single for name in f.keys()}
    missing = sorted({str(p) for p in locations.values() if not p.is_file()})
    if missing:
        raise CheckpointError(f"missing weight file(s) {missing} listed by {index}")
    return locations


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises several types for a corrupt header
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def tensor_headers(directory: str | Path) -> dict[str, TensorEntry]:
    """Name, dtype and shape of every tensor of a model directory, read from the headers only."""
    by_file: dict[Path, list[str]] = {}
    for name, path in tensor_locations(directory).items():
        by_file.setdefault(path, []).append(name)
    headers: dict[str, TensorEntry] = {}
    for path, names in by_file.items():
        with _open(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{path} does not hold tensor {name!r} that the index maps to it")
                sl = f.get_slice(name)
                headers[name] = TensorEntry(name, sl.get_dtype(), tuple(sl.get_shape()))
    return headers


class PrefixReader:
    """Reads prefix regions of the tensors of a model directory, keeping each source file open once."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.locations = tensor_locations(directory)
        self._stack = ExitStack()
        self._files: dict[Path, object] = {}

    def __enter__(self) -> "PrefixReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _handle(self, name: str):
        if name not in self.locations:
            raise CheckpointError(f"{self.directory} has no tensor {name!r}")
        path = self.locations[name]
        if path not in self._files:
            self._files[path] = self._stack.enter_context(_open(path))
        return self._files[path]

    def entry(self, name: str) -> TensorEntry:
        sl = self._handle(name).get_slice(name)
        return TensorEntry(name, sl.get_dtype(), tuple(sl.get_shape()))

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The region `tensor[:shape[0], :shape[1], ...]`; reads only that region from disk."""
        full = self.entry(name).shape
        if len(full) != len(shape) or any(s > f for s, f in zip(shape, full)):
            raise CheckpointError(f"{self.directory}: tensor {name} has shape {full}, cannot take a {shape} region")
        region = self._handle(name).get_slice(name)[tuple(slice(0, n) for n in shape)]
        return region.contiguous()


# ------------------------------------------------------------------------------------------------ writing
def parse_size(text: str | int | None) -> int | None:
    """`500MB`, `2GB`, `1GiB` or a byte count -> bytes (decimal units as Hugging Face uses them)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"size {text!r} is not understood; write e.g. 500MB, 2GB, 1GiB or a byte count")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(value * scale)
    if size <= 0:
        raise CheckpointError(f"size {text!r} must be positive")
    return size


def _header_bytes(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_streaming(path: Path, entries: list[TensorEntry], fetch: Callable[[TensorEntry], torch.Tensor],
                    metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file, fetching and writing one tensor at a time."""
    with open(path, "wb") as out:
        out.write(_header_bytes(entries, metadata or {"format": "pt"}))
        for e in entries:
            tensor = fetch(e).contiguous()
            if tuple(tensor.shape) != e.shape:
                raise CheckpointError(f"tensor {e.name} came with shape {tuple(tensor.shape)}, expected {e.shape}")
            data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
            if len(data) != e.nbytes:
                raise CheckpointError(f"tensor {e.name}: {len(data)} bytes, expected {e.nbytes} ({e.dtype})")
            out.write(data)


def plan_shards(entries: Iterable[TensorEntry], max_shard_size: int | None) -> list[list[TensorEntry]]:
    """Group tensors in order into shards of at most `max_shard_size` bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if max_shard_size is not None and shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_weights(directory: Path, entries: list[TensorEntry], fetch: Callable[[TensorEntry], torch.Tensor],
                  max_shard_size: int | None = None) -> list[str]:
    """Write `model.safetensors`, or shards plus a correct `model.safetensors.index.json`; returns the names."""
    shards = plan_shards(entries, max_shard_size)
    if len(shards) == 1:
        write_streaming(directory / SINGLE_FILE, shards[0], fetch)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_streaming(directory / name, shard, fetch)
        weight_map.update({e.name: name for e in shard})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [INDEX_FILE, *names]
