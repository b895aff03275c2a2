"""The DisTrO (DeMo) optimizer of one replica: decoupled momentum, chunked DCT, top-k, error feedback, apply.

Per parameter, over the tier's region only:
    delta <- decay * delta + lr * grad                      (decoupled momentum, kept locally, never sent;
                                                             local steps: + the round's pseudo-gradient)
    C     <- DCT-II of delta over the chunks of the plan     (orthonormal, per chunk)
    keep the top-k coefficients of each chunk by magnitude   (indices sorted within the chunk)
    delta <- delta - IDCT(kept)                              (error feedback: what was not sent stays)
    send  indices + values (raw, in value_dtype) or indices + 1-bit signs (decoded as +-1)
On receipt every replica aggregates all payloads (aggregate.py) and applies
    p <- p * (1 - lr * weight_decay)        (decoupled weight decay; matrices only, not norm gains)
    p <- p - lr * sign(update)              (apply_mode "sign"; "raw" skips the sign)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aftermath.errors import ConfigError, PayloadError
from aftermath.model.config import MatFormerConfig
from aftermath.model.geometry import TierSpec, region_slices
from aftermath.optim.aggregate import aggregate_distro, iter_distro_tiles
from aftermath.optim.chunks import TILE_BYTES, ParamChunking, rows_per_tile
from aftermath.optim.dct import dct_chunks, from_chunks, idct_sparse
from aftermath.optim.payload import VALUE_DTYPES, Payload, SparseCoefficients, WireFormat
from aftermath.optim.rule import RegionRule
from aftermath.optim.schedule import LRSchedule
from aftermath.optim.update import RoundUpdate

APPLY_MODES = ("sign", "raw")


@dataclass(frozen=True)
class DistroConfig:
    lr: float = 1e-3
    schedule: str = "constant"  # "constant" | "cosine" (linear warmup + cosine, clamped after total_steps)
    warmup_steps: int = 0
    total_steps: int = 0
    final_lr_fraction: float = 0.1
    momentum_decay: float = 0.999
    chunk: int = 64
    min_chunk: int = 8
    topk: int = 4  # coefficients kept per chunk (Psyche's production setting at chunk 64)
    one_bit: bool = True  # send signs only
    value_dtype: str = "float32"  # wire type of raw values: float32 | bfloat16 | float16
    apply_mode: str = "sign"
    weight_decay: float = 0.0
    average_over: str = "selected"  # "selected" | "covering" (see aggregate.py)
    # optimizer.local_steps: > 1, what is encoded is a round's pseudo-gradient (already a step in weight space,
    # the inner lr in it), accumulated into the momentum as it is; 1: a gradient, scaled by the step's lr
    local_steps: int = 1

    def __post_init__(self) -> None:
        if self.apply_mode not in APPLY_MODES:
            raise ConfigError(f"apply_mode {self.apply_mode!r} is not known; use one of {APPLY_MODES}")
        if not 0.0 <= self.momentum_decay < 1.0:
            raise ConfigError(f"momentum_decay must lie in [0, 1), got {self.momentum_decay}")
        if self.topk < 1:
            raise ConfigError(f"topk must be >= 1, got {self.topk}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigError(f"value_dtype {self.value_dtype!r} is not known; use one of {sorted(VALUE_DTYPES)}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.local_steps < 1:
            raise ConfigError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.average_over not in ("selected", "covering"):
            raise ConfigError(f"average_over {self.average_over!r} is not known; use 'selected' or 'covering'")
        self.lr_schedule()  # validates the schedule fields

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(peak_lr=self.lr, kind=self.schedule, warmup_steps=self.warmup_steps,
                          total_steps=self.total_steps, final_fraction=self.final_lr_fraction)

    def wire(self) -> WireFormat:
        return WireFormat(kind="distro", topk=self.topk, one_bit=self.one_bit, value_dtype=self.value_dtype)


@torch.no_grad()
def apply_distro_update(params: dict[str, torch.Tensor], update: dict[str, torch.Tensor], lr: float, *,
                        weight_decay: float = 0.0, apply_mode: str = "sign") -> None:
    """p <- p * (1 - lr * wd) [matrices]; p <- p - lr * sign(u) (or lr * u). In place.

    Each parameter is updated on the overlap of its shape and the update's shape (both are prefixes), so a
    universal replica and a sliced replica may both call it. Only exactly-rounded elementwise operations are
    used (no fused multiply-add), so every element gets the same bits whatever the tensor's size or layout.
    """
    if apply_mode not in APPLY_MODES:
        raise ConfigError(f"apply_mode {apply_mode!r} is not known; use one of {APPLY_MODES}")
    decay = 1.0 - lr * weight_decay
    for name, p in params.items():
        if name not in update:
            raise ConfigError(f"the update has no entry for {name}")
        _apply_one(p.data, update[name], lr, decay if weight_decay and p.dim() >= 2 else None, apply_mode)


def _apply_one(p: torch.Tensor, u: torch.Tensor, lr: float, decay: float | None, apply_mode: str) -> None:
    """The update `u` on the overlap of `p` and `u` (both prefixes), in place; elementwise, so applying a
    parameter whole or band by band gives the same bits."""
    overlap = region_slices(tuple(min(a, b) for a, b in zip(p.shape, u.shape)))
    target = p[overlap]
    if decay is not None:
        target.mul_(decay)
    direction = torch.sign(u[overlap]) if apply_mode == "sign" else u[overlap]
    target.sub_(direction.to(device=p.device, dtype=p.dtype) * lr)


class DistroOptimizer(RegionRule):
    """DisTrO state of one replica training `spec`; `params` may be the tier's own (sliced) tensors or
    universal tensors (a replica that slices at run time): momentum always has the tier's shapes."""

    def __init__(self, config: DistroConfig, model_config: MatFormerConfig, spec: TierSpec,
                 params: dict[str, torch.Tensor], *, tile_bytes: int = TILE_BYTES) -> None:
        super().__init__(f"DisTrO optimizer for {spec.name}", model_config, spec, params, config.wire(),
                         config.chunk, config.min_chunk, config.lr_schedule())
        self.config = config
        self.tile_bytes = tile_bytes  # working set of one band of rows in compress and aggregate
        # sender-side only: what this replica has not sent yet; never part of the replica state
        self.momentum = {n: torch.zeros(s, dtype=torch.float32) for n, s in self.shapes.items()}

    # ------------------------------------------------------------------ sending
    @torch.no_grad()
    def compress(self, grads: dict[str, torch.Tensor | None], step: int) -> dict[str, SparseCoefficients]:
        """Momentum update, top-k of the chunked DCT, error feedback. Returns what is sent (float32 values).

        All three are per chunk, so a parameter is processed in bands of whole chunk rows (about `tile_bytes`
        of working set each): no temporary of the parameter's full size."""
        scale = self.schedule.lr(step) if self.config.local_steps == 1 else 1.0
        out: dict[str, SparseCoefficients] = {}
        for name, shape in self.shapes.items():
            if name not in grads:
                raise ConfigError(f"no gradient for {name}: pass every parameter (None for no gradient)")
            grad = grads[name]
            grad = None if grad is None else grad.detach()[region_slices(shape)]
            pc = self.plan.params[name]
            band = pc.chunk[0] * rows_per_tile(math.prod(shape[1:]) * pc.chunk[0], self.tile_bytes)  # rows
            indices, values = [], []
            for lo in range(0, shape[0], band):
                top, sent = self._compress_band(self.momentum[name][lo:lo + band],
                                                None if grad is None else grad[lo:lo + band], scale, pc)
                indices.append(top)
                values.append(sent)
            out[name] = SparseCoefficients(shape=shape, indices=torch.cat(indices), values=torch.cat(values))
        return out

    def _compress_band(self, delta: torch.Tensor, grad: torch.Tensor | None, scale: float,
                       pc: ParamChunking) -> tuple[torch.Tensor, torch.Tensor]:
        """One band of whole chunk rows of the momentum (a view, updated in place): (indices, values)."""
        delta.mul_(self.config.momentum_decay)
        if grad is not None:
            delta.add_(grad.to(torch.float32) * scale)
        coeffs = dct_chunks(delta, pc.chunk, bases=self.plan.bases)
        k = pc.topk(self.config.topk)
        top = coeffs.abs().topk(k, dim=1).indices.sort(dim=1).values
        values = coeffs.gather(1, top)
        if not self.config.one_bit:
            # the receiver sees the wire-rounded values; feed back exactly what they see
            values = values.to(VALUE_DTYPES[self.config.value_dtype]).to(torch.float32)
        del coeffs
        sent = idct_sparse(top, values, pc.chunk, self.plan.bases)  # only the k kept coefficients of each chunk
        delta.sub_(from_chunks(sent, tuple(delta.shape), pc.chunk))
        return top, values

    def encode(self, grads: dict[str, torch.Tensor | None], step: int, run_id: str, client_id: str) -> bytes:
        """The payload bytes this replica publishes for `step` (updates the momentum: call once per step)."""
        payload = Payload(kind="distro", run_id=run_id, step=step, client_id=client_id, spec=self.spec,
                          params=dict(self.compress(grads, step)))
        return self.codec.encode(payload)

    # ------------------------------------------------------------------ receiving
    def aggregate(self, payloads: list[Payload]) -> dict[str, torch.Tensor]:
        """The aggregated update in this replica's parameter shapes (see aggregate.py). Holds the whole update
        (float32, the size of the weights); `aggregate_and_apply` does not."""
        return aggregate_distro(payloads, self.plan, average_over=self.config.average_over, region=self.region,
                                tile_bytes=self.tile_bytes)

    def apply(self, update: dict[str, torch.Tensor], step: int) -> None:
        apply_distro_update(self.params, update, self.schedule.lr(step), weight_decay=self.config.weight_decay,
                            apply_mode=self.config.apply_mode)

    @torch.no_grad()
    def aggregate_and_apply(self, payloads: list[Payload], step: int) -> None:
        """`apply(aggregate(payloads), step)` with the same bits, streamed: each band of rows of each parameter
        is aggregated, applied and freed before the next, so the step needs about `tile_bytes` beyond the
        weights and the momentum. Every payload is checked first: on a PayloadError nothing has been applied."""
        lr = self.schedule.lr(step)
        wd = self.config.weight_decay
        for tile in iter_distro_tiles(payloads, self.plan, average_over=self.config.average_over,
                                      region=self.region, tile_bytes=self.tile_bytes):
            p = self.params[tile.name]
            decay = 1.0 - lr * wd if wd and p.dim() >= 2 else None
            _apply_one(p.data[tile.rows], tile.update, lr, decay, self.config.apply_mode)
            del tile  # free this band before the next one is computed

    @property
    def update_kind(self) -> str:
        """What a round's update blob holds: directions for the sign apply, float32 values for the raw one."""
        return "sign" if self.config.apply_mode == "sign" else "float"

    @torch.no_grad()
    def round_update(self, payloads: list[Payload], step: int, run_id: str, accepted: str) -> RoundUpdate:
        """What every replica applies for `step`, in this replica's shapes (a universal replica: the universal
        shapes, the blob the coordinator publishes): the sign of the aggregate (int8), or, for apply_mode
        "raw", the aggregate itself. Computed band by band; holds one int8 (or float32) copy of the weights."""
        sign = self.update_kind == "sign"
        dtype = torch.int8 if sign else torch.float32
        out = {n: torch.zeros(tuple(p.shape) if self.region is None else self.shapes[n], dtype=dtype)
               for n, p in self.params.items()}
        for tile in iter_distro_tiles(payloads, self.plan, average_over=self.config.average_over,
                                      region=self.region, tile_bytes=self.tile_bytes):
            out[tile.name][tile.rows] = torch.sign(tile.update).to(torch.int8) if sign else tile.update
            del tile
        return RoundUpdate(kind=self.update_kind, run_id=run_id, step=step, accepted=accepted, params=out)

    @torch.no_grad()
    def apply_update(self, update: RoundUpdate, step: int) -> None:
        """Apply a round's update (universal, or this replica's region shapes): the same bits as
        `aggregate_and_apply` of the payloads it was computed from. Band by band, so the only temporary is one
        band of float32 directions."""
        if update.kind != self.update_kind:
            raise PayloadError(f"a {update.kind!r} update cannot be applied by apply_mode {self.config.apply_mode!r}")
        lr = self.schedule.lr(step)
        wd = self.config.weight_decay
        for name, p in self.params.items():
            u = update.params[name]
            decay = 1.0 - lr * wd if wd and p.dim() >= 2 else None
            band = rows_per_tile(math.prod(p.shape[1:]), self.tile_bytes)
            for lo in range(0, p.shape[0], band):
                _apply_one(p.data[lo:lo + band], u[lo:lo + band].to(torch.float32), lr, decay, self.config.apply_mode)

    # ------------------------------------------------------------------ replica state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Empty: DisTrO's apply reads no state (the momentum only shapes what this replica sends)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ConfigError(f"DisTrO's apply reads no optimizer state, but the state given holds "
                              f"{sorted(state)[:3]}: is the checkpoint from an AdamW/Muon run?")
