"""The update payload: a self-describing binary format, and its strict decoder.

A payload is safetensors bytes. Its `__metadata__` header holds:
  format="aftermath-update", version="1", kind ("distro" | "dense"), run_id, step, client_id,
  spec (the tier spec as JSON: name, tier, ffn_widths, q_heads, kv_heads, head_dim),
  shapes (JSON {param name: shape in the tier}), and the wire settings chunk, min_chunk, topk, one_bit,
  value_dtype.
Its tensors, per parameter NAME of the spec (every parameter; the tier's own shapes):
  distro: NAME/indices  (n_chunks, k) smallest integer type that holds an index into one chunk
                         (uint8 up to 256 coefficients, int16 up to 32768, else int32), sorted within a chunk
          NAME/values   (n_chunks, k) value_dtype                 -- raw values, or, when one_bit:
          NAME/signs    (ceil(n_chunks * k / 8),) uint8           -- 1 = positive (>= 0), packed MSB first
  dense:  NAME/grad     the tier's shape, value_dtype
Chunks are numbered row-major over the TIER's chunk grid (the region's own grid); the aggregator maps them to
the universal grid. Indices are positions inside a chunk's row-major flattened coefficients.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aftermath.errors import AftermathError, PayloadError
from aftermath.model.geometry import LayerGeometry, TierSpec, param_shapes, tier_spec
from aftermath.optim.chunks import ChunkPlan

FORMAT = "aftermath-update"
VERSION = "1"
KINDS = ("distro", "dense")
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_HEADER = 16 * 1024 * 1024


@dataclass(frozen=True)
class WireFormat:
    """What every payload of a run looks like (all peers must agree)."""

    kind: str = "distro"
    topk: int = 32  # distro only
    one_bit: bool = False  # distro only
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
def pack_signs(values: torch.Tensor) -> torch.Tensor:
    """One bit per value, 1 where value >= 0, eight to a byte (most significant bit first), zero-padded."""
    bits = (values.reshape(-1) >= 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, torch.zeros(pad, dtype=torch.uint8)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, count: int) -> torch.Tensor:
    """+1.0 / -1.0 (float32) for the first `count` packed bits."""
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    bits = ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:count]
    return bits.to(torch.float32) * 2.0 - 1.0


# ------------------------------------------------------------------------------------------- encode
def _spec_json(spec: TierSpec) -> str:
    return json.dumps({**spec.to_json(), "head_dim": spec.head_dim}, sort_keys=True)


def encode_payload(payload: Payload, plan: ChunkPlan, wire: WireFormat) -> bytes:
    """The bytes of `payload` (whose params hold the tier's coefficients or gradients)."""
    shapes = param_shapes(plan.model_config, payload.spec)
    if set(payload.params) != set(shapes):
        raise PayloadError(f"payload of {payload.spec.name} must hold exactly its {len(shapes)} parameters")
    dtype = VALUE_DTYPES[wire.value_dtype]
    tensors: dict[str, torch.Tensor] = {}
    for name, item in payload.params.items():
        pc = plan.params[name]
        if wire.kind == "dense":
            tensors[f"{name}/grad"] = item.detach().to(dtype).contiguous()
            continue
        tensors[f"{name}/indices"] = item.indices.to(pc.index_dtype).contiguous()
        if wire.one_bit:
            tensors[f"{name}/signs"] = pack_signs(item.values)
        else:
            tensors[f"{name}/values"] = item.values.to(dtype).contiguous()
    metadata = {
        "format": FORMAT, "version": VERSION, "kind": wire.kind, "run_id": payload.run_id,
        "step": str(payload.step), "client_id": payload.client_id, "spec": _spec_json(payload.spec),
        "shapes": json.dumps({n: list(s) for n, s in shapes.items()}, sort_keys=True),
        "chunk": str(plan.chunk), "min_chunk": str(plan.min_chunk), "topk": str(wire.topk),
        "one_bit": "1" if wire.one_bit else "0", "value_dtype": wire.value_dtype,
    }
    return st_save(tensors, metadata=metadata)


# ------------------------------------------------------------------------------------------- decode
def _header(data: bytes) -> dict:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a payload must be bytes, got {type(data).__name__}")
    if len(data) < 8:
        raise PayloadError(f"payload of {len(data)} bytes is too short to hold a header (truncated?)")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > MAX_HEADER or 8 + n > len(data):
        raise PayloadError(f"payload header claims {n} bytes but the payload has {len(data)} (truncated or corrupt)")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"payload header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise PayloadError("payload header has no __metadata__: not an Aftermath update payload")
    return header


def _parse_spec(text: str, plan: ChunkPlan) -> TierSpec:
    try:
        raw = json.loads(text)
        layers = tuple(LayerGeometry(int(w), int(q), int(kv))
                       for w, q, kv in zip(raw["ffn_widths"], raw["q_heads"], raw["kv_heads"], strict=True))
        spec = TierSpec(name=str(raw["name"]), tier=raw["tier"], layers=layers, head_dim=int(raw["head_dim"]))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise PayloadError(f"payload spec {text[:200]!r} is malformed: {exc}") from exc
    cfg = plan.model_config
    if len(spec.layers) != cfg.num_hidden_layers:
        raise PayloadError(f"payload spec {spec.name!r} has {len(spec.layers)} layers; the run's model has "
                           f"{cfg.num_hidden_layers}")
    if spec.tier is not None:
        try:
            expected = tier_spec(cfg, spec.tier)
        except AftermathError as exc:
            raise PayloadError(f"payload claims tier {spec.tier!r}: {exc}") from exc
        if expected != spec:
            raise PayloadError(f"payload claims tier {spec.tier} but its geometry {spec.to_json()} differs from "
                               f"the run's tier {spec.tier} {expected.to_json()}")
    try:
        plan.check_spec(spec)
    except AftermathError as exc:
        raise PayloadError(f"payload spec is not usable in this run: {exc}") from exc
    return spec


def decode_payload(data: bytes, expected: PayloadExpectation) -> Payload:
    """Validate and decode payload bytes. Raises PayloadError naming the first problem found."""
    if expected.max_bytes is not None and len(data) > expected.max_bytes:
        raise PayloadError(f"payload is {len(data)} bytes, over the limit of {expected.max_bytes}")
    meta = _header(data)["__metadata__"]
    wire, plan = expected.wire, expected.plan

    def field_(key: str) -> str:
        if not isinstance(meta.get(key), str):
            raise PayloadError(f"payload metadata lacks {key!r}")
        return meta[key]

    if field_("format") != FORMAT:
        raise PayloadError(f"payload format {meta['format']!r} is not {FORMAT!r}")
    if field_("version") != VERSION:
        raise PayloadError(f"payload format version {meta['version']!r} is not supported (this build reads {VERSION})")
    checks = [("kind", wire.kind), ("run_id", expected.run_id), ("step", str(expected.step)),
              ("chunk", str(plan.chunk)), ("min_chunk", str(plan.min_chunk)),
              ("value_dtype", wire.value_dtype)]
    if wire.kind == "distro":
        checks += [("topk", str(wire.topk)), ("one_bit", "1" if wire.one_bit else "0")]
    if expected.client_id is not None:
        checks.append(("client_id", expected.client_id))
    for key, want in checks:
        if field_(key) != want:
            raise PayloadError(f"payload {key} is {meta[key]!r}; this run expects {want!r}")
    client_id = field_("client_id")
    if not client_id or len(client_id) > 256:
        raise PayloadError(f"payload client_id {client_id[:40]!r} must be 1..256 characters")
    spec = _parse_spec(field_("spec"), plan)
    if expected.spec is not None and (spec.layers, spec.tier, spec.name) != (
            expected.spec.layers, expected.spec.tier, expected.spec.name):
        raise PayloadError(f"payload is for spec {spec.to_json()}; client {client_id!r} was assigned "
                           f"{expected.spec.to_json()}")
    shapes = {n: tuple(s) for n, s in param_shapes(plan.model_config, spec).items()}
    try:
        claimed = {n: tuple(s) for n, s in json.loads(field_("shapes")).items()}
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise PayloadError(f"payload shapes are malformed: {exc}") from exc
    if claimed != shapes:
        wrong = sorted(set(claimed) ^ set(shapes)) or sorted(n for n in shapes if claimed[n] != shapes[n])
        raise PayloadError(f"payload parameter shapes do not match spec {spec.name!r}, e.g. {wrong[:3]}")
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types for corrupt bytes
        raise PayloadError(f"payload tensors cannot be read: {exc}") from exc

    dtype = VALUE_DTYPES[wire.value_dtype]
    if wire.kind == "dense":
        suffixes = ["grad"]
    else:
        suffixes = ["indices", "signs" if wire.one_bit else "values"]
    want_keys = {f"{n}/{s}" for n in shapes for s in suffixes}
    if set(tensors) != want_keys:
        extra, missing = sorted(set(tensors) - want_keys), sorted(want_keys - set(tensors))
        raise PayloadError(f"payload tensors do not match spec {spec.name!r}: unexpected {extra[:3]}, "
                           f"missing {missing[:3]}")
    params: dict[str, SparseCoefficients | torch.Tensor] = {}
    for name, shape in shapes.items():
        if wire.kind == "dense":
            grad = _check_tensor(tensors[f"{name}/grad"], name, "grad", dtype, shape)
            _check_finite(grad, name)
            params[name] = grad.to(torch.float32)
            continue
        pc = plan.params[name]
        n_chunks, k = pc.n_chunks(shape), pc.topk(wire.topk)
        idx = _check_tensor(tensors[f"{name}/indices"], name, "indices", pc.index_dtype, (n_chunks, k)).long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= pc.chunk_numel):
            raise PayloadError(f"payload {name}: an index lies outside [0, {pc.chunk_numel}) (chunk {pc.chunk})")
        if k > 1 and bool((idx.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise PayloadError(f"payload {name}: a chunk lists the same coefficient twice")
        if wire.one_bit:
            n_bytes = (n_chunks * k + 7) // 8
            packed = _check_tensor(tensors[f"{name}/signs"], name, "signs", torch.uint8, (n_bytes,))
            pad = n_bytes * 8 - n_chunks * k
            if pad and int(packed[-1]) & ((1 << pad) - 1):
                raise PayloadError(f"payload {name}: the padding bits after the last sign are not zero")
            values = unpack_signs(packed, n_chunks * k).reshape(n_chunks, k)
        else:
            values = _check_tensor(tensors[f"{name}/values"], name, "values", dtype, (n_chunks, k))
            _check_finite(values, name)
            values = values.to(torch.float32)
        params[name] = SparseCoefficients(shape=shape, indices=idx, values=values)
    return Payload(kind=wire.kind, run_id=expected.run_id, step=expected.step, client_id=client_id, spec=spec,
                   params=params)


def _check_tensor(t: torch.Tensor, name: str, what: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if t.dtype != dtype:
        raise PayloadError(f"payload {name}/{what} has dtype {t.dtype}; this run expects {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise PayloadError(f"payload {name}/{what} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise PayloadError(f"payload {name} holds NaN or Inf values; the sender's update diverged")
