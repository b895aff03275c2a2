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

Both sides handle a DisTrO body all at once (numpy over every parameter's fields, no per-parameter work but
slicing the result), from a layout computed once per (plan, wire, spec) and kept in a small cache per plan. The
decoder runs every check vectorised; when one fails, the per-parameter decoder runs instead to name the first
problem, so the messages are those of a parameter-by-parameter check.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import weakref
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


def _range_starts(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per element of the concatenated ranges [starts[i], starts[i] + lengths[i]): what to add to its position in
    the concatenation (0, 1, ..., sum(lengths) - 1) to get its position in the ranges."""
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)


MAX_FAST_BITS = 57  # an index field read as one 8-byte big-endian window at any bit offset (7 + 57 = 64)
PACK_BLOCK = 1 << 16  # index fields the vectorised encoder and decoder handle at a time (temporaries stay in cache)


class _BodyLayout:
    """Everything about the body of a payload that follows from (plan, wire, spec) alone, computed once per
    spec: the parameter shapes, the sections, and per parameter (small arrays, one entry each) what the
    vectorised DisTrO decoder needs. Body offsets are relative to the start of the body."""

    def __init__(self, plan: ChunkPlan, wire: WireFormat, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.sections = _section_sizes(plan, wire, shapes)
        self.body_len = sum(size for _, _, size in self.sections)
        self.fast = False
        if wire.kind != "distro" or not shapes:
            return
        names = list(shapes)
        pcs = [plan.params[n] for n in names]
        n_chunks = [pc.n_chunks(shapes[n]) for n, pc in zip(names, pcs)]
        ks = [pc.topk(wire.topk) for pc in pcs]
        counts = np.array([n * k for n, k in zip(n_chunks, ks)], dtype=np.int64)
        bits = np.array([index_bits(pc.chunk_numel) for pc in pcs], dtype=np.int64)
        numel = np.array([pc.chunk_numel for pc in pcs], dtype=np.int64)
        sizes = np.array([size for _, _, size in self.sections], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        idx_start, idx_size = starts[0::2], sizes[0::2]
        sv_start, sv_size = starts[1::2], sizes[1::2]
        elem_start = np.cumsum(counts) - counts
        self.total = int(counts.sum())
        if self.total == 0 or int(bits.max()) > MAX_FAST_BITS:
            return  # nothing to vectorise, or fields too wide for one window: the per-parameter decoder
        self.fast = True
        self.names = names
        self.shape_list = [shapes[n] for n in names]
        self.n_chunks = n_chunks
        self.counts = counts
        self.count_list = counts.tolist()
        self.ks = ks
        self.k = ks[0] if len(set(ks)) == 1 else 0  # the top-k of every chunk when all parameters share it
        # index field j of parameter p starts at bit idx_base[p] + j * bits[p] of the body (j counted over all
        # parameters' fields): one repeat and one multiply-add give every field's position
        self.bits = bits
        self.uniform_bits = int(bits[0]) if len(set(bits.tolist())) == 1 else 0
        self.idx_base = idx_start * 8 - elem_start * bits
        # a 4-byte word holds a field of up to 25 bits at any offset in its first byte, an 8-byte one up to 57
        self.word, self.word_bits, self.big_endian = ((np.uint32, 32, ">u4") if int(bits.max()) <= 25
                                                      else (np.uint64, 64, ">u8"))
        self.need_range = bool(((np.int64(1) << bits) > numel).any())  # fields can say more than the chunk holds
        self.numel = numel
        if not self.k:
            self.elem_start = elem_start
            self.k_arr = np.array(ks, dtype=np.int64)
        self.one_bit = wire.one_bit
        self.dtype = VALUE_DTYPES[wire.value_dtype]
        if wire.one_bit:
            # the sign sections' bytes, unpacked back to back: the padding bits to drop from that stream
            self.sign_starts, self.sign_sizes = sv_start, sv_size
            ends = np.cumsum(sv_size) * 8
            pads = sv_size * 8 - counts
            self.sign_padding = (np.repeat(ends - pads, pads) + np.arange(int(pads.sum()))
                                 - np.repeat(np.cumsum(pads) - pads, pads))
        else:
            # value j (counted over all parameters) starts at byte value_base[p] + j * itemsize of the body
            self.itemsize = self.dtype.itemsize
            self.value_base = sv_start - elem_start * self.itemsize
        # the last byte of every section with padding bits, and the mask of those bits
        used = np.concatenate([counts * bits, counts]) if wire.one_bit else counts * bits
        size = np.concatenate([idx_size, sv_size]) if wire.one_bit else idx_size
        last = np.concatenate([idx_start, sv_start]) + size - 1 if wire.one_bit else idx_start + idx_size - 1
        pad = size * 8 - used
        self.pad_at = last[pad > 0]
        self.pad_mask = ((np.int64(1) << pad[pad > 0]) - 1).astype(np.uint8)


class _EncodeLayout:
    """The parameter names of a spec and their index widths under a plan (what the encoder needs)."""

    def __init__(self, plan: ChunkPlan, spec: TierSpec) -> None:
        shapes = param_shapes(plan.model_config, spec)
        self.n_params = len(shapes)
        self.names = tuple(shapes)
        self.name_set = frozenset(shapes)
        try:
            bits = [index_bits(plan.params[n].chunk_numel) for n in self.names]
        except KeyError:
            self.bits = None  # the per-parameter encoder raises what it raised before
            return
        self.bits = np.array(bits, dtype=np.int64)
        self.bit_list = bits
        self.max_bits = max(bits, default=1)
        self.uniform_bits = bits[0] if len(set(bits)) == 1 else 0


class _LayoutCache:
    """Layouts of the specs a plan has seen, a bounded number per plan; an entry lives while its plan does (weak
    keys). A layout is stored only after its spec passed every check, so a hit stands for those checks."""

    def __init__(self, per_plan: int) -> None:
        self.per_plan = per_plan
        self._plans: weakref.WeakKeyDictionary[ChunkPlan, dict] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, plan: ChunkPlan, key: object) -> object | None:
        entries = self._plans.get(plan)
        return None if entries is None else entries.get(key)

    def put(self, plan: ChunkPlan, key: object, value: object) -> object:
        with self._lock:
            entries = self._plans.get(plan)
            if entries is None:
                entries = self._plans[plan] = {}
            while len(entries) >= self.per_plan:
                del entries[next(iter(entries))]  # the oldest first
            entries[key] = value
        return value


_LAYOUTS = _LayoutCache(per_plan=64)  # a run sees its tiers and a few Mix'n'Match specs


def _encode_layout(plan: ChunkPlan, spec: TierSpec) -> _EncodeLayout:
    try:
        key = ("encode", spec)
        hit = _LAYOUTS.get(plan, key)
    except TypeError:  # an unhashable spec: compute it each time
        return _EncodeLayout(plan, spec)
    return hit if hit is not None else _LAYOUTS.put(plan, key, _EncodeLayout(plan, spec))


# ------------------------------------------------------------------------------------------- encode
def encode_payload(payload: Payload, plan: ChunkPlan, wire: WireFormat) -> bytes:
    """The bytes of `payload` (whose params hold the tier's coefficients or gradients)."""
    layout = _encode_layout(plan, payload.spec)
    if payload.params.keys() != layout.name_set:
        raise PayloadError(f"payload of {payload.spec.name} must hold exactly its {layout.n_params} parameters")
    dtype = VALUE_DTYPES[wire.value_dtype]
    header = json.dumps({
        "kind": wire.kind, "run_id": payload.run_id, "step": payload.step, "client_id": payload.client_id,
        "spec": _spec_header(payload.spec), "chunk": plan.chunk, "min_chunk": plan.min_chunk, "topk": wire.topk,
        "one_bit": wire.one_bit, "value_dtype": wire.value_dtype}, separators=(",", ":")).encode()
    parts = [MAGIC, bytes([VERSION]), struct.pack("<I", len(header)), header]
    if wire.kind == "distro" and layout.bits is not None and layout.names:
        body = _encode_distro(payload, layout, wire, dtype)
        if body is not None:
            parts.extend(body)
            return b"".join(parts)
    for name in layout.names:  # dense, or what the vectorised encoder leaves to the per-parameter one
        item = payload.params[name]
        if wire.kind == "dense":
            parts.append(_number_bytes(item, dtype))
            continue
        parts.append(pack_bits(item.indices, index_bits(plan.params[name].chunk_numel)))
        parts.append(pack_signs(item.values) if wire.one_bit else _number_bytes(item.values, dtype))
    return b"".join(parts)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    try:
        return torch.cat(tensors).reshape(-1)  # (n_chunks, k) tables of one k: no per-parameter reshape
    except (RuntimeError, TypeError, ValueError):
        return torch.cat([t.reshape(-1) for t in tensors])


def _encode_distro(payload: Payload, layout: _EncodeLayout, wire: WireFormat,
                   dtype: torch.dtype) -> list | None:
    """The body sections of a DisTrO payload, every parameter at once: exactly the bytes `pack_bits` and
    `pack_signs` / `_number_bytes` give parameter by parameter. None leaves it to those (unusual inputs: mixed
    dtypes, fields wider than 57 bits)."""
    items = [payload.params[n] for n in layout.names]
    indices = [item.indices for item in items]
    values = [item.values for item in items]
    if not all(isinstance(t, torch.Tensor) for t in indices) or not all(isinstance(t, torch.Tensor) for t in values):
        return None
    if len({t.dtype for t in indices}) != 1 or len({t.dtype for t in values}) != 1 or layout.max_bits > MAX_FAST_BITS:
        return None  # promoting mixed dtypes in one cat could round differently from converting each
    idx_counts = np.array([t.numel() for t in indices], dtype=np.int64)
    val_counts = np.array([t.numel() for t in values], dtype=np.int64)

    # indices: each field's low `bits` bits, MSB first, each parameter's section zero-padded to a byte
    idx_bytes, idx_sizes = _pack_fields(_cat(indices).to(torch.int64).numpy(), idx_counts, layout)

    cat_values = _cat(values)
    if wire.one_bit:
        sv_bytes = np.packbits(_pad_sections((cat_values >= 0).numpy(), val_counts))
        sv_sizes = (val_counts + 7) // 8
    else:
        sv_bytes = cat_values.detach().to(dtype).contiguous().view(torch.uint8).numpy()
        sv_sizes = val_counts * dtype.itemsize
    idx_view, sv_view = memoryview(idx_bytes), memoryview(sv_bytes)
    idx_ends, sv_ends = np.cumsum(idx_sizes).tolist(), np.cumsum(sv_sizes).tolist()
    out, a, b = [], 0, 0
    for a_end, b_end in zip(idx_ends, sv_ends):
        out.append(idx_view[a:a_end])
        out.append(sv_view[b:b_end])
        a, b = a_end, b_end
    return out


def _pack_fields(v: np.ndarray, counts: np.ndarray, layout: _EncodeLayout) -> tuple[np.ndarray, np.ndarray]:
    """The sections `pack_bits` gives for each parameter's `counts[p]` fields of `layout.bits[p]` bits, back to
    back (the bytes, and each section's size). Each field, top-aligned in the big-endian word that starts at its
    first byte, is added into the bytes it covers: fields never share a bit, so adding is OR-ing."""
    sizes = (counts * layout.bits + 7) // 8
    out = np.zeros(int(sizes.sum()) + 8, dtype=np.uint8)
    base = (np.cumsum(sizes) - sizes) * 8 - (np.cumsum(counts) - counts) * layout.bits
    # a 4-byte word holds a field of up to 25 bits at any offset in its first byte, an 8-byte one up to 57
    word, word_bits, big_endian = (np.uint32, 32, ">u4") if layout.max_bits <= 25 else (np.uint64, 64, ">u8")
    if layout.uniform_bits:
        bits = layout.uniform_bits
        top = word(word_bits - bits)
    else:
        bits = np.repeat(layout.bits, counts)
        top = (word_bits - bits).astype(word)
    pos = np.arange(v.size, dtype=np.int64) * bits + np.repeat(base, counts)  # each field's first bit
    span = (7 + layout.max_bits + 7) // 8  # the bytes a field can cover
    for a in range(0, v.size, PACK_BLOCK):
        at = pos[a:a + PACK_BLOCK]
        # v as its low word_bits bits (two's complement), shifted to the top: only its low `bits` bits stay, what
        # pack_bits takes of any integer; then down to the field's offset in its first byte
        words = (v[a:a + PACK_BLOCK].astype(word) << (top if layout.uniform_bits else top[a:a + PACK_BLOCK])
                 ) >> (at & 7).astype(word)
        pieces = words.astype(big_endian).view(np.uint8).reshape(-1, word_bits // 8)
        first = at >> 3
        for i in range(span):
            np.add.at(out, first + i, pieces[:, i])
    return out[:-8], sizes


def _pad_sections(stream: np.ndarray, used: np.ndarray) -> np.ndarray:
    """`stream`, the bits of consecutive sections of `used` bits each, with zeros after each section up to a byte."""
    pad = -used % 8
    if not pad.any():
        return stream
    return np.insert(stream, np.repeat(np.cumsum(used), pad), 0)


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


def payload_body(data: bytes | memoryview) -> memoryview:
    """The body of a payload's bytes (what follows its header)."""
    _, body = _header(data)
    return memoryview(data)[body:]


def _parse_spec(raw: object, plan: ChunkPlan) -> TierSpec:
    if isinstance(raw, dict) and set(raw) == {"tier"}:
        tier = raw["tier"]
        if type(tier) is not int:
            raise PayloadError(f"payload spec tier {tier!r} is not an integer")
        try:
            spec = tier_spec(plan.model_config, tier)
        except AftermathError as exc:
            raise PayloadError(f"payload claims tier {tier!r}: {exc}") from exc
    else:
        spec = _parse_mix_spec(raw, plan)
    _check_usable(spec, plan)
    return spec


def _parse_mix_spec(raw: object, plan: ChunkPlan) -> TierSpec:
    cfg = plan.model_config
    try:
        if set(raw) != {"name", "ffn_widths", "q_heads", "kv_heads"}:
            raise KeyError(sorted(raw))
        layers = tuple(LayerGeometry(int(w), int(q), int(kv))
                       for w, q, kv in zip(raw["ffn_widths"], raw["q_heads"], raw["kv_heads"], strict=True))
        name = raw["name"]
        if not isinstance(name, str) or not name or (name.startswith("tier") and name[4:].isascii() and name[4:].isdigit()):
            raise ValueError(f"name {name!r}")
        spec = TierSpec(name=name, tier=None, layers=layers, head_dim=cfg.head_dim)
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"payload spec {str(raw)[:200]!r} is malformed: {exc}") from exc
    if len(spec.layers) != cfg.num_hidden_layers:
        raise PayloadError(f"payload spec {spec.name!r} has {len(spec.layers)} layers; the run's model has "
                           f"{cfg.num_hidden_layers}")
    return spec


def _check_usable(spec: TierSpec, plan: ChunkPlan) -> None:
    try:
        plan.check_spec(spec)
    except AftermathError as exc:
        raise PayloadError(f"payload spec is not usable in this run: {exc}") from exc


def _spec_and_layout(raw: object, plan: ChunkPlan, wire: WireFormat) -> tuple[TierSpec, _BodyLayout]:
    """The spec a header names, checked as `_parse_spec` checks it, and its body layout; both cached per plan
    once the spec passed (a tier by its number, a Mix'n'Match spec by its parsed geometry)."""
    if isinstance(raw, dict) and len(raw) == 1 and "tier" in raw:
        key = (wire, "tier", raw["tier"]) if type(raw["tier"]) is int else None
        hit = None if key is None else _LAYOUTS.get(plan, key)
        if hit is not None:
            return hit
        spec = _parse_spec(raw, plan)  # raises for a tier that is not an integer
    else:
        spec = _parse_mix_spec(raw, plan)
        key = (wire, "spec", spec)
        hit = _LAYOUTS.get(plan, key)
        if hit is not None:
            return hit
        _check_usable(spec, plan)
    shapes = {n: tuple(s) for n, s in param_shapes(plan.model_config, spec).items()}
    return _LAYOUTS.put(plan, key, (spec, _BodyLayout(plan, wire, shapes)))


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
    spec, layout = _spec_and_layout(header["spec"], plan, wire)
    if expected.spec is not None and (spec.layers, spec.tier, spec.name) != (
            expected.spec.layers, expected.spec.tier, expected.spec.name):
        raise PayloadError(f"payload is for spec {spec.to_json()}; client {client_id!r} was assigned "
                           f"{expected.spec.to_json()}")
    want_len = body + layout.body_len
    if len(data) != want_len:
        raise PayloadError(f"payload is {len(data)} bytes; its header ({spec.name}, top-{wire.topk}) describes "
                           f"{want_len} (truncated or corrupt)")
    params = _decode_distro(data, body, layout) if layout.fast else None
    if params is None:  # dense, or a body the vectorised checks refused: name its first problem
        params = _decode_sections(data, body, plan, wire, layout)
    return Payload(kind=wire.kind, run_id=expected.run_id, step=expected.step, client_id=client_id, spec=spec,
                   params=params)


def _decode_distro(data: bytes | memoryview, body: int,
                   layout: _BodyLayout) -> dict[str, SparseCoefficients] | None:
    """Every parameter of a DisTrO body at once, with every check of `_decode_sections`; None when a check fails
    (that decoder then names the first problem, parameter by parameter)."""
    n = layout.body_len
    buf = np.zeros(n + 8, dtype=np.uint8)  # 8 spare zero bytes: a window may start at the last byte
    buf[:n] = np.frombuffer(data, dtype=np.uint8, count=n, offset=body)
    if layout.pad_at.size and (buf[layout.pad_at] & layout.pad_mask).any():
        return None
    # every index field: the word from its first byte (big-endian), shifted so that the field is its low bits
    ordinal = np.arange(layout.total, dtype=np.int64)
    counts = layout.counts
    word, word_bits = layout.word, layout.word_bits
    if layout.uniform_bits:
        pos = ordinal * layout.uniform_bits + np.repeat(layout.idx_base, counts)
        drop = word(word_bits - layout.uniform_bits)
    else:
        bits = np.repeat(layout.bits, counts)
        pos = ordinal * bits + np.repeat(layout.idx_base, counts)
        drop = (word_bits - bits).astype(word)
    windows = np.ndarray((n + 1,), dtype=layout.big_endian, buffer=buf, strides=(1,))
    idx = np.empty(layout.total, dtype=np.int64)
    for a in range(0, layout.total, PACK_BLOCK):  # a block at a time: the temporaries stay in cache
        at = pos[a:a + PACK_BLOCK]
        words = windows[at >> 3].astype(word)
        idx[a:a + PACK_BLOCK] = (words << (at & 7).astype(word)) >> (
            drop if layout.uniform_bits else drop[a:a + PACK_BLOCK])
    if layout.need_range and (idx >= np.repeat(layout.numel, counts)).any():
        return None
    k = layout.k
    if k:
        if k > 1:
            table = idx.reshape(-1, k)
            if (table[:, 1:] <= table[:, :-1]).any():
                return None
    else:  # parameters keep different top-k (chunks smaller than topk): compare within chunks only
        within = (ordinal - np.repeat(layout.elem_start, counts)) % np.repeat(layout.k_arr, counts) != 0
        if (np.diff(idx) <= 0)[within[1:]].any():
            return None
    if layout.one_bit:
        sizes = layout.sign_sizes
        where = np.arange(int(sizes.sum()), dtype=np.int64) + _range_starts(layout.sign_starts, sizes)
        signs = np.unpackbits(buf[where])
        if layout.sign_padding.size:
            signs = np.delete(signs, layout.sign_padding)
        signs = signs.astype(np.float32)
        signs *= 2
        signs -= 1  # exactly +1.0 / -1.0
        values = torch.from_numpy(signs)
    else:
        size = layout.itemsize
        numbers = np.ndarray((n + 1,), dtype=f"<u{size}", buffer=buf, strides=(1,))  # one at every byte
        raw = numbers[ordinal * size + np.repeat(layout.value_base, counts)]
        values = torch.from_numpy(raw.view(np.uint8)).view(layout.dtype)
        if not bool(torch.isfinite(values).all()):
            return None
        values = values.to(torch.float32)
    indices = torch.from_numpy(idx)
    if k:
        idx_parts = indices.view(-1, k).split(layout.n_chunks)
        value_parts = values.view(-1, k).split(layout.n_chunks)
    else:
        idx_parts = [t.view(c, kk) for t, c, kk in zip(indices.split(layout.count_list), layout.n_chunks, layout.ks)]
        value_parts = [t.view(c, kk) for t, c, kk in zip(values.split(layout.count_list), layout.n_chunks, layout.ks)]
    return {name: SparseCoefficients(shape=shape, indices=i, values=v)
            for name, shape, i, v in zip(layout.names, layout.shape_list, idx_parts, value_parts)}


def _decode_sections(data: bytes | memoryview, body: int, plan: ChunkPlan, wire: WireFormat,
                     layout: _BodyLayout) -> dict[str, SparseCoefficients | torch.Tensor]:
    """Decode the body parameter by parameter, raising PayloadError at the first problem."""
    view = memoryview(data)
    parts: dict[tuple[str, str], memoryview] = {}
    for name, part, size in layout.sections:
        parts[name, part] = view[body:body + size]
        body += size
    dtype = VALUE_DTYPES[wire.value_dtype]
    params: dict[str, SparseCoefficients | torch.Tensor] = {}
    for name, shape in layout.shapes.items():
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
    return params


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise PayloadError(f"payload {name} holds NaN or Inf values; the sender's update diverged")
