"""The update payload, wire version 2: a compact self-describing binary format, and its strict decoder.

    bytes 0..7      MAGIC: b"AFTMUPD" and the version byte (2)
    bytes 8..11     n, the length of the header (uint32, little-endian)
    n bytes         the header: UTF-8 JSON with exactly the keys
                    kind ("distro" | "dense"), run_id, step, client_id, spec, chunk, min_chunk, topk, one_bit,
                    value_dtype. `spec` is {"tier": t} for a nested tier, else the Mix'n'Match geometry
                    {"name", "ffn_widths", "q_heads", "kv_heads"} (head_dim is the model's).
    the body        one section per parameter of the spec, in the order of `param_shapes(config, spec)`, each
                    starting on a byte boundary; its length follows from the header, the run's chunk plan and the
                    shapes, and the payload must be exactly that long:
        distro: indices   n_chunks * k unsigned integers of b = bits(chunk_numel - 1) bits each (12 bits for a
                          64 x 64 chunk), packed most significant bit first, zero-padded to a byte; strictly
                          increasing within a chunk (sorted, no repeats), each < chunk_numel
                then signs    n_chunks * k bits, 1 = positive (>= 0), packed MSB first, zero padding  (one_bit)
                or   values   n_chunks * k little-endian value_dtype numbers, finite                   (otherwise)
        dense:  grad      the tier's shape of the parameter, little-endian value_dtype, finite
Chunks are numbered row-major over the TIER's chunk grid (the region's own grid); the aggregator maps them to
the universal grid. Indices are positions inside a chunk's row-major flattened coefficients. Shapes are not
sent: both sides derive them from the spec. A version-1 (safetensors) payload is refused with a message saying so.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import torch

from aftermath.errors import AftermathError, PayloadError
from aftermath.model.geometry import LayerGeometry, TierSpec, param_shapes, tier_spec
from aftermath.optim.chunks import ChunkPlan

MAGIC = b"AFTMUPD"
VERSION = 2
PREFIX = len(MAGIC) + 1 + 4  # magic, version byte, header length
KINDS = ("distro", "dense")
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_HEADER = 64 * 1024  # a Mix'n'Match spec of a few hundred layers fits; a larger claim is corrupt
HEADER_KEYS = frozenset({"kind", "run_id", "step", "client_id", "spec", "chunk", "min_chunk", "topk", "one_bit",
                         "value_dtype"})


@dataclass(frozen=True)
class WireFormat:
    """What every payload of a run looks like (all peers must agree)."""

    kind: str = "distro"
    topk: int = 4  # distro only
    one_bit: bool = True  # distro only
    value_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PayloadError(f"payload kind {self.kind!r} is not known; use one of {KINDS}")
        if self.value_dtype not in VALUE_DTYPES:
            raise PayloadError(f"value_dtype {self.value_dtype!r} is not known; use one of {sorted(VALUE_DTYPES)}")
        if self.topk < 1:
            raise PayloadError(f"topk must be >= 1, got {self.topk}")


@dataclass
class SparseCoefficients:
    """The DCT coefficients one peer sends for one parameter: `shape` is the tier's shape of it."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # (n_chunks, k) int64 after decoding
    values: torch.Tensor  # (n_chunks, k) float32; +-1 for one-bit payloads


@dataclass
class Payload:
    kind: str
    run_id: str
    step: int
    client_id: str
    spec: TierSpec
    params: dict[str, SparseCoefficients | torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PayloadExpectation:
    """What a receiver requires of a payload. client_id / spec: None accepts any (valid) value."""

    run_id: str
    step: int
    plan: ChunkPlan
    wire: WireFormat
    client_id: str | None = None
    spec: TierSpec | None = None
    max_bytes: int | None = None


@dataclass(frozen=True)
class SizeReport:
    """Exact size of a payload and the dense sizes of the region it stands for."""

    payload_bytes: int
    region_params: int
    dense_fp32_bytes: int
    dense_bf16_bytes: int

    @property
    def ratio_fp32(self) -> float:
        return self.dense_fp32_bytes / self.payload_bytes

    @property
    def ratio_bf16(self) -> float:
        return self.dense_bf16_bytes / self.payload_bytes


def size_report(data: bytes, plan: ChunkPlan, spec: TierSpec) -> SizeReport:
    n = sum(math.prod(s) for s in param_shapes(plan.model_config, spec).values())
    return SizeReport(payload_bytes=len(data), region_params=n, dense_fp32_bytes=4 * n, dense_bf16_bytes=2 * n)


# --------------------------------------------------------------------------------------------- bits
def index_bits(chunk_numel: int) -> int:
    """Bits of one index into a chunk of `chunk_numel` coefficients (12 for 64 x 64)."""
    return max(1, (chunk_numel - 1).bit_length())


def pack_bits(values: torch.Tensor, bits: int) -> bytes:
    """Unsigned integers < 2**bits, `bits` each, most significant bit first, zero-padded to a whole byte."""
    v = values.reshape(-1).to(torch.int64).numpy()
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    return np.packbits(((v[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)).tobytes()


def unpack_bits(data: bytes | memoryview, count: int, bits: int) -> torch.Tensor:
    """The `count` integers of `pack_bits` (int64). The caller checks the padding with `padding_is_zero`."""
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits).reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return torch.from_numpy((flat.astype(np.int64) * weights).sum(axis=1))


def padding_is_zero(data: bytes | memoryview, used_bits: int) -> bool:
    pad = len(data) * 8 - used_bits
    return pad == 0 or not data[-1] & ((1 << pad) - 1)


def pack_signs(values: torch.Tensor) -> bytes:
    """One bit per value, 1 where value >= 0, most significant bit first, zero-padded to a whole byte."""
    return np.packbits((values.reshape(-1) >= 0).numpy().astype(np.uint8)).tobytes()


def unpack_signs(data: bytes | memoryview, count: int) -> torch.Tensor:
    """+1.0 / -1.0 (float32) for the first `count` packed bits."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count)
    return torch.from_numpy(bits.astype(np.float32) * 2.0 - 1.0)


def _number_bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    # little-endian on every platform torch supports here (x86-64, aarch64)
    return t.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _numbers(data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


# ------------------------------------------------------------------------------------------- layout
def _section_sizes(plan: ChunkPlan, wire: WireFormat,
                   shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str, int]]:
    """(name, part, bytes) of every body section, in order: the layout both sides derive from the header."""
    itemsize = VALUE_DTYPES[wire.value_dtype].itemsize
    out = []
    for name, shape in shapes.items():
        if wire.kind == "dense":
            out.append((name, "grad", math.prod(shape) * itemsize))
            continue
        pc = plan.params[name]
        count = pc.n_chunks(shape) * pc.topk(wire.topk)
        out.append((name, "indices", -(-count * index_bits(pc.chunk_numel) // 8)))
        out.append((name, "signs", -(-count // 8)) if wire.one_bit else (name, "values", count * itemsize))
    return out


def _spec_header(spec: TierSpec) -> dict:
    if spec.tier is not None:
        return {"tier": spec.tier}
    return {"name": spec.name, "ffn_widths": list(spec.ffn_widths), "q_heads": list(spec.q_heads),
            "kv_heads": list(spec.kv_heads)}


# ------------------------------------------------------------------------------------------- encode
def encode_payload(payload: Payload, plan: ChunkPlan, wire: WireFormat) -> bytes:
    """The bytes of `payload` (whose params hold the tier's coefficients or gradients)."""
    shapes = param_shapes(plan.model_config, payload.spec)
    if set(payload.params) != set(shapes):
        raise PayloadError(f"payload of {payload.spec.name} must hold exactly its {len(shapes)} parameters")
    dtype = VALUE_DTYPES[wire.value_dtype]
    header = json.dumps({
        "kind": wire.kind, "run_id": payload.run_id, "step": payload.step, "client_id": payload.client_id,
        "spec": _spec_header(payload.spec), "chunk": plan.chunk, "min_chunk": plan.min_chunk, "topk": wire.topk,
        "one_bit": wire.one_bit, "value_dtype": wire.value_dtype}, separators=(",", ":")).encode()
    parts = [MAGIC, bytes([VERSION]), struct.pack("<I", len(header)), header]
    for name in shapes:
        item = payload.params[name]
        if wire.kind == "dense":
            parts.append(_number_bytes(item, dtype))
            continue
        parts.append(pack_bits(item.indices, index_bits(plan.params[name].chunk_numel)))
        parts.append(pack_signs(item.values) if wire.one_bit else _number_bytes(item.values, dtype))
    return b"".join(parts)


# ------------------------------------------------------------------------------------------- decode
def _header(data: bytes | memoryview) -> tuple[dict, int]:
    """The header and the offset of the body."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a payload must be bytes, got {type(data).__name__}")
    if len(data) < PREFIX:
        raise PayloadError(f"payload of {len(data)} bytes is too short to hold a header (truncated?)")
    if bytes(data[:len(MAGIC)]) != MAGIC:
        if bytes(data[8:10]) == b'{"':
            raise PayloadError("this is a version-1 (safetensors) payload from an older Aftermath; this build reads "
                               f"wire version {VERSION}: upgrade the sending client")
        raise PayloadError(f"payload starts with {bytes(data[:8])!r}, not {MAGIC!r}: not an Aftermath update payload")
    version = data[len(MAGIC)]
    if version != VERSION:
        raise PayloadError(f"payload wire version {version} is not supported (this build reads {VERSION})")
    (n,) = struct.unpack("<I", bytes(data[len(MAGIC) + 1:PREFIX]))
    if n > MAX_HEADER or PREFIX + n > len(data):
        raise PayloadError(f"payload header claims {n} bytes but the payload has {len(data)} (truncated or corrupt)")
    try:
        header = json.loads(bytes(data[PREFIX:PREFIX + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"payload header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise PayloadError("payload header is not a JSON object")
    if set(header) != HEADER_KEYS:
        missing, extra = sorted(HEADER_KEYS - set(header)), sorted(set(header) - HEADER_KEYS)
        raise PayloadError(f"payload header lacks {missing} / has unexpected keys {extra[:3]}")
    return header, PREFIX + n


def _parse_spec(raw: object, plan: ChunkPlan) -> TierSpec:
    cfg = plan.model_config
    if isinstance(raw, dict) and set(raw) == {"tier"}:
        tier = raw["tier"]
        if type(tier) is not int:
            raise PayloadError(f"payload spec tier {tier!r} is not an integer")
        try:
            spec = tier_spec(cfg, tier)
        except AftermathError as exc:
            raise PayloadError(f"payload claims tier {tier!r}: {exc}") from exc
    else:
        try:
            if set(raw) != {"name", "ffn_widths", "q_heads", "kv_heads"}:
                raise KeyError(sorted(raw))
            layers = tuple(LayerGeometry(int(w), int(q), int(kv))
                           for w, q, kv in zip(raw["ffn_widths"], raw["q_heads"], raw["kv_heads"], strict=True))
            name = raw["name"]
            if not isinstance(name, str) or not name or (name.startswith("tier") and name[4:].isdigit()):
                raise ValueError(f"name {name!r}")
            spec = TierSpec(name=name, tier=None, layers=layers, head_dim=cfg.head_dim)
        except (KeyError, TypeError, ValueError) as exc:
            raise PayloadError(f"payload spec {str(raw)[:200]!r} is malformed: {exc}") from exc
        if len(spec.layers) != cfg.num_hidden_layers:
            raise PayloadError(f"payload spec {spec.name!r} has {len(spec.layers)} layers; the run's model has "
                               f"{cfg.num_hidden_layers}")
    try:
        plan.check_spec(spec)
    except AftermathError as exc:
        raise PayloadError(f"payload spec is not usable in this run: {exc}") from exc
    return spec


def decode_payload(data: bytes, expected: PayloadExpectation) -> Payload:
    """Validate and decode payload bytes. Raises PayloadError naming the first problem found."""
    if expected.max_bytes is not None and len(data) > expected.max_bytes:
        raise PayloadError(f"payload is {len(data)} bytes, over the limit of {expected.max_bytes}")
    header, body = _header(data)
    wire, plan = expected.wire, expected.plan
    checks = [("kind", wire.kind), ("run_id", expected.run_id), ("step", expected.step), ("chunk", plan.chunk),
              ("min_chunk", plan.min_chunk), ("value_dtype", wire.value_dtype), ("topk", wire.topk),
              ("one_bit", wire.one_bit)]
    if expected.client_id is not None:
        checks.append(("client_id", expected.client_id))
    for key, want in checks:
        # type() too: JSON's true must not pass for 1, nor 3.0 for 3
        if type(header[key]) is not type(want) or header[key] != want:
            raise PayloadError(f"payload {key} is {header[key]!r}; this run expects {want!r}")
    client_id = header["client_id"]
    if not isinstance(client_id, str) or not 1 <= len(client_id) <= 256:
        raise PayloadError(f"payload client_id {str(client_id)[:40]!r} must be 1..256 characters")
    spec = _parse_spec(header["spec"], plan)
    if expected.spec is not None and (spec.layers, spec.tier, spec.name) != (
            expected.spec.layers, expected.spec.tier, expected.spec.name):
        raise PayloadError(f"payload is for spec {spec.to_json()}; client {client_id!r} was assigned "
                           f"{expected.spec.to_json()}")
    shapes = {n: tuple(s) for n, s in param_shapes(plan.model_config, spec).items()}
    sections = _section_sizes(plan, wire, shapes)
    want_len = body + sum(size for _, _, size in sections)
    if len(data) != want_len:
        raise PayloadError(f"payload is {len(data)} bytes; its header ({spec.name}, top-{wire.topk}) describes "
                           f"{want_len} (truncated or corrupt)")
    view = memoryview(data)
    parts: dict[tuple[str, str], memoryview] = {}
    for name, part, size in sections:
        parts[name, part] = view[body:body + size]
        body += size
    dtype = VALUE_DTYPES[wire.value_dtype]
    params: dict[str, SparseCoefficients | torch.Tensor] = {}
    for name, shape in shapes.items():
        if wire.kind == "dense":
            grad = _numbers(parts[name, "grad"], dtype, shape)
            _check_finite(grad, name)
            params[name] = grad.to(torch.float32)
            continue
        pc = plan.params[name]
        n_chunks, k = pc.n_chunks(shape), pc.topk(wire.topk)
        bits = index_bits(pc.chunk_numel)
        packed = parts[name, "indices"]
        if not padding_is_zero(packed, n_chunks * k * bits):
            raise PayloadError(f"payload {name}: the padding bits after the last index are not zero")
        idx = unpack_bits(packed, n_chunks * k, bits).reshape(n_chunks, k)
        if idx.numel() and int(idx.max()) >= pc.chunk_numel:
            raise PayloadError(f"payload {name}: an index lies outside [0, {pc.chunk_numel}) (chunk {pc.chunk})")
        if k > 1 and bool((idx.diff(dim=1) <= 0).any()):
            raise PayloadError(f"payload {name}: the indices of a chunk are not strictly increasing (sorted, each "
                               f"coefficient once)")
        if wire.one_bit:
            signs = parts[name, "signs"]
            if not padding_is_zero(signs, n_chunks * k):
                raise PayloadError(f"payload {name}: the padding bits after the last sign are not zero")
            values = unpack_signs(signs, n_chunks * k).reshape(n_chunks, k)
        else:
            values = _numbers(parts[name, "values"], dtype, (n_chunks, k))
            _check_finite(values, name)
            values = values.to(torch.float32)
        params[name] = SparseCoefficients(shape=shape, indices=idx, values=values)
    return Payload(kind=wire.kind, run_id=expected.run_id, step=expected.step, client_id=client_id, spec=spec,
                   params=params)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise PayloadError(f"payload {name} holds NaN or Inf values; the sender's update diverged")
