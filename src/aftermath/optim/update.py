"""A round's update as one blob: what every replica applies for a step, computed once from the accepted set.

The aggregate data plane: instead of every client downloading every peer's payload (N - 1 blobs per client,
N(N - 1) per round through the coordinator), the coordinator aggregates the accepted set once, exactly as every
replica would (aggregate.py, region by region, in client-id order), and publishes the result. What a replica
does with the aggregate is elementwise, so the blob carries only what the apply reads:

    kind "sign"   (DisTrO, apply_mode "sign"): the sign of the aggregated update, -1 / 0 / +1 per element
    kind "float"  (DisTrO apply_mode "raw", AdamW, Muon): the aggregated update or mean gradient, float32

A replica applying the blob gets the same bits as one aggregating the payloads itself: sign(u) of the
aggregate is the direction, and the float32 values are the aggregate's own. A sliced replica reads its region
of the universal tensors.

Wire (little-endian): b"AFTMRND" + version byte 1 + uint32 header length + a JSON header {kind, run_id, step,
accepted} (`accepted`: sha256 of the accepted set, `accepted_digest`) + one section per parameter of the
universal model in the plan's order. A "sign" section is a tag byte and its elements: tag 0 = all zero (no
bytes), 1 = no zero (1 bit per element, 1 = +1, MSB first), 2 = ternary (2 bits per element: 0 = 0, 1 = +1,
2 = -1); a "float" section is the float32 elements. Decoding is strict: exact length, known tags, no code 3,
zero padding bits, finite floats.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from aftermath.errors import PayloadError
from aftermath.optim.chunks import ChunkPlan

MAGIC = b"AFTMRND"
VERSION = 1
KINDS = ("sign", "float")
HEADER_KEYS = {"kind", "run_id", "step", "accepted"}
MAX_HEADER_BYTES = 4096
TAG_ZERO, TAG_SIGNS, TAG_TERNARY = 0, 1, 2


def accepted_digest(accepted: Iterable[tuple[str, str]]) -> str:
    """sha256 of an accepted set given as (client id, blob sha256) pairs: binds an update to what it came from."""
    text = "\n".join(f"{cid} {blob}" for cid, blob in sorted(accepted))
    return hashlib.sha256(text.encode()).hexdigest()


def expected_update_bytes(plan: ChunkPlan, kind: str) -> int:
    """The size of a universal update blob with no zero (the usual case: ~1 bit per parameter for "sign"),
    give or take its header: what the data plane 'auto' weighs against the round's payloads."""
    sizes = [math.prod(pc.universal_shape) for pc in plan.params.values()]
    return 128 + sum(1 + (n + 7) // 8 if kind == "sign" else 4 * n for n in sizes)


@dataclass
class RoundUpdate:
    """The update of one step: per parameter, int8 directions (kind "sign") or float32 values ("float"), in the
    universal shapes (or, computed by a sliced replica, in its region's shapes)."""

    kind: str
    run_id: str
    step: int
    accepted: str  # accepted_digest of the set it was computed from
    params: dict[str, torch.Tensor]


def encode_update(update: RoundUpdate, plan: ChunkPlan) -> bytes:
    """The blob of a universal update (every parameter of the plan, in its universal shape)."""
    if update.kind not in KINDS:
        raise PayloadError(f"update kind {update.kind!r} is not one of {KINDS}")
    header = json.dumps({"kind": update.kind, "run_id": update.run_id, "step": update.step,
                         "accepted": update.accepted}, separators=(",", ":")).encode()
    parts = [MAGIC, bytes([VERSION]), struct.pack("<I", len(header)), header]
    for name, pc in plan.params.items():
        t = update.params[name]
        if tuple(t.shape) != pc.universal_shape:
            raise PayloadError(f"update of {name} has shape {tuple(t.shape)}, not the universal {pc.universal_shape}")
        if update.kind == "float":
            parts.append(t.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())
        else:
            parts.append(_encode_signs(t.detach().reshape(-1).to(torch.int8).numpy()))
    return b"".join(parts)


def _encode_signs(d: np.ndarray) -> bytes:
    zeros = d == 0
    if zeros.all():
        return bytes([TAG_ZERO])
    if not zeros.any():
        return bytes([TAG_SIGNS]) + np.packbits(d > 0).tobytes()
    codes = np.where(d > 0, 1, np.where(d < 0, 2, 0)).astype(np.uint8)
    return bytes([TAG_TERNARY]) + _pack2(codes).tobytes()


def _pack2(codes: np.ndarray) -> np.ndarray:
    """2-bit codes, four per byte, the first in the high bits."""
    pad = (-codes.size) % 4
    c = np.concatenate([codes, np.zeros(pad, np.uint8)]).reshape(-1, 4)
    return (c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]


def _unpack2(data: np.ndarray, n: int) -> np.ndarray:
    out = np.empty((data.size, 4), np.uint8)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = data >> 6, (data >> 4) & 3, (data >> 2) & 3, data & 3
    return out.reshape(-1)


def decode_update(data: bytes, plan: ChunkPlan, *, run_id: str, step: int, kind: str,
                  max_bytes: int | None = None) -> RoundUpdate:
    """Validate and decode an update blob of `run_id`'s `step` (raises PayloadError naming the first problem)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"update blob of {len(data)} bytes exceeds the cap of {max_bytes}")
    if data[:len(MAGIC)] != MAGIC:
        raise PayloadError("not an update blob (its magic is not AFTMRND)")
    if len(data) < len(MAGIC) + 5:
        raise PayloadError("update blob truncated in its header")
    if data[len(MAGIC)] != VERSION:
        raise PayloadError(f"update blob version {data[len(MAGIC)]}, this build reads version {VERSION}")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC) + 1)
    pos = len(MAGIC) + 5
    if hlen > MAX_HEADER_BYTES or pos + hlen > len(data):
        raise PayloadError(f"update blob header of {hlen} bytes does not fit (at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(data[pos:pos + hlen])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PayloadError(f"update blob header is not JSON: {exc}") from exc
    pos += hlen
    if not isinstance(header, dict) or set(header) != HEADER_KEYS:
        raise PayloadError(f"update blob header must have exactly the keys {sorted(HEADER_KEYS)}")
    expected = {"kind": kind, "run_id": run_id, "step": step}
    for key, want in expected.items():
        if header[key] != want or type(header[key]) is not type(want):
            raise PayloadError(f"update blob is for {key} {header[key]!r}, expected {want!r}")
    if not isinstance(header["accepted"], str) or len(header["accepted"]) != 64:
        raise PayloadError("update blob header: accepted must be a sha256")
    buf = np.frombuffer(data, np.uint8)
    params: dict[str, torch.Tensor] = {}
    for name, pc in plan.params.items():
        n = math.prod(pc.universal_shape)
        if kind == "float":
            end = pos + 4 * n
            if end > len(data):
                raise PayloadError(f"update blob truncated in {name}")
            values = np.frombuffer(data, "<f4", count=n, offset=pos)
            if not np.isfinite(values).all():
                raise PayloadError(f"update blob: {name} holds a value that is not finite")
            params[name] = torch.from_numpy(values.astype(np.float32)).reshape(pc.universal_shape)
        else:
            if pos >= len(data):
                raise PayloadError(f"update blob truncated in {name}")
            tag = int(buf[pos])
            pos += 1
            if tag == TAG_ZERO:
                end, d = pos, np.zeros(n, np.int8)
            elif tag == TAG_SIGNS:
                end = pos + (n + 7) // 8
                if end > len(data):
                    raise PayloadError(f"update blob truncated in {name}")
                bits = np.unpackbits(buf[pos:end])
                if bits[n:].any():
                    raise PayloadError(f"update blob: padding bits of {name} are not zero")
                d = np.where(bits[:n] == 1, 1, -1).astype(np.int8)
            elif tag == TAG_TERNARY:
                end = pos + (n + 3) // 4
                if end > len(data):
                    raise PayloadError(f"update blob truncated in {name}")
                codes = _unpack2(buf[pos:end], n)
                if (codes == 3).any() or codes[n:].any():
                    raise PayloadError(f"update blob: {name} holds an invalid code or non-zero padding")
                d = np.where(codes[:n] == 1, 1, np.where(codes[:n] == 2, -1, 0)).astype(np.int8)
            else:
                raise PayloadError(f"update blob: {name} has section tag {tag}, not 0, 1 or 2")
            params[name] = torch.from_numpy(d).reshape(pc.universal_shape)
        pos = end
    if pos != len(data):
        raise PayloadError(f"update blob has {len(data) - pos} bytes after its last section")
    return RoundUpdate(kind=kind, run_id=run_id, step=step, accepted=header["accepted"], params=params)
