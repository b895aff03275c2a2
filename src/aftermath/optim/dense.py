"""Dense update rules on the same exchange path: AdamW, and Muon (+ AdamW for what Muon does not take).

Every client sends its region's gradient (a "dense" payload, float32 or bfloat16); every replica aggregates the
region-normalised mean gradient (aggregate.py) and applies the same step. Both rules act on a replica's own
region only, and give the same bits on the region a sliced replica and a universal replica share:

- AdamW is elementwise. It is written with exactly-rounded elementwise operations only (no fused
  multiply-add), so an element's result does not depend on the tensor it sits in. A coordinate no peer covered
  in a step sees gradient 0 (its moments decay, as in a standard AdamW step with a zero gradient).
- Muon orthogonalises a whole matrix, which is not elementwise: the universal replica's Muon of a full
  matrix cannot be reproduced from a sub-block. So Aftermath's Muon orthogonalises each NESTED BAND on its
  own: the rows (or columns) of a matrix between two consecutive nested-tier boundaries (for gate/up rows,
  q/k/v rows by heads; for down/o columns). Tier t's region is the union of the bands up to its width, so a
  tier-t replica computes exactly the bands it holds, with the same operations as the universal replica.
  A Mix'n'Match spec whose widths are not band boundaries cannot run Muon (ConfigError at construction).
  Matrices no tier cuts (the embedding) and vectors use AdamW, as is usual for Muon; the embedding stays on
  AdamW even though it is a matrix.
Orthogonalisation (orthogonal.py): `orthogonalizer` = "newton_schulz" (the classic quintic, the same
coefficients every iteration) or "polar_express" (per-iteration minimax-optimal quintics), `ortho_steps`
iterations in `ortho_dtype` on the band normalised to unit Frobenius norm, then scaled by
sqrt(max(1, rows / cols)). `muon_bands = "whole"` orthogonalises whole matrices instead (standard Muon): only
for runs where every replica holds the full model, since a sliced replica cannot compute it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aftermath.errors import ConfigError, PayloadError
from aftermath.model.config import MatFormerConfig
from aftermath.model.geometry import TierSpec, region_slices
from aftermath.optim.aggregate import aggregate_dense
from aftermath.optim.orthogonal import Orthogonalizer
from aftermath.optim.payload import VALUE_DTYPES, Payload, WireFormat
from aftermath.optim.rule import RegionRule
from aftermath.optim.schedule import LRSchedule
from aftermath.optim.update import RoundUpdate

ALGORITHMS = ("adamw", "muon")
MUON_BANDS = ("nested", "whole")


@dataclass(frozen=True)
class DenseConfig:
    algorithm: str = "adamw"  # "adamw" | "muon"
    lr: float = 3e-4  # AdamW's peak lr
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    final_lr_fraction: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled, matrices only
    muon_lr: float = 0.02  # Muon's peak lr; follows the same schedule shape
    muon_momentum: float = 0.95
    orthogonalizer: str = "polar_express"  # "polar_express" | "newton_schulz" (docs/optimizers.md)
    ortho_steps: int = 5
    ortho_dtype: str = "float32"  # "float32" | "bfloat16": the orthogonaliser's compute dtype
    muon_bands: str = "nested"  # "nested": each band between tier boundaries; "whole": whole matrices
    value_dtype: str = "float32"  # wire type of the gradients
    chunk: int = 64  # the chunk plan only serves to validate specs; kept equal to the DisTrO default
    min_chunk: int = 8

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm {self.algorithm!r} is not known; use one of {ALGORITHMS}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigError(f"value_dtype {self.value_dtype!r} is not known; use one of {sorted(VALUE_DTYPES)}")
        if self.muon_bands not in MUON_BANDS:
            raise ConfigError(f"muon_bands {self.muon_bands!r} is not known; use one of {MUON_BANDS}")
        self.orthogonalize()
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        self.lr_schedule()

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(peak_lr=self.lr, kind=self.schedule, warmup_steps=self.warmup_steps,
                          total_steps=self.total_steps, final_fraction=self.final_lr_fraction)

    def orthogonalize(self) -> Orthogonalizer:
        return Orthogonalizer(self.orthogonalizer, self.ortho_steps, self.ortho_dtype)

    def wire(self) -> WireFormat:
        return WireFormat(kind="dense", value_dtype=self.value_dtype)


@torch.no_grad()
def adamw_step(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place, with exactly-rounded elementwise operations only (see module doc)."""
    m.mul_(beta1).add_(grad * (1.0 - beta1))
    v.mul_(beta2).add_((grad * grad) * (1.0 - beta2))
    m_hat = m / (1.0 - beta1**t)
    v_hat = v / (1.0 - beta2**t)
    step = m_hat / (v_hat.sqrt() + eps)
    if weight_decay and p.dim() >= 2:
        p.mul_(1.0 - lr * weight_decay)
    p.sub_(step * lr)


class DenseOptimizer(RegionRule):
    """AdamW or Muon for one replica; state lives in the region of `spec` (the tier's shapes), or in the
    params' own shapes when the replica holds larger (universal) tensors."""

    def __init__(self, config: DenseConfig, model_config: MatFormerConfig, spec: TierSpec,
                 params: dict[str, torch.Tensor]) -> None:
        super().__init__(f"{config.algorithm} optimizer for {spec.name}", model_config, spec, params, config.wire(),
                         config.chunk, config.min_chunk, config.lr_schedule())
        self.config = config
        self.t = 0
        self.exp_avg = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
        self.bands: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (banded dim, boundaries)
        self.orthogonalize = config.orthogonalize()
        if config.algorithm == "muon":
            self._plan_bands()

    def _plan_bands(self) -> None:
        for name, p in self.params.items():
            if p.dim() != 2 or name.endswith(("embed_tokens.weight", "lm_head.weight")):
                continue
            varying = [d for d, sizes in enumerate(self.plan.boundaries[name]) if len(sizes) > 1]
            if len(varying) > 1:
                raise ConfigError(f"Muon: {name} is cut by tiers in both dimensions; banding needs one")
            dim = varying[0] if varying else 0
            bounds = self.plan.boundaries[name][dim] if varying else (p.shape[0],)
            held = p.shape[dim]
            if self.config.muon_bands == "whole":
                if held != bounds[-1]:
                    raise ConfigError(
                        f"muon_bands = 'whole' orthogonalises whole matrices, which only a replica holding the "
                        f"full model can compute; spec {self.spec.name!r} holds {held} of {bounds[-1]} in "
                        f"dimension {dim} of {name}. Use muon_bands = 'nested' for runs with sliced tiers")
                self.bands[name] = (dim, (held,))
                continue
            if held not in bounds:
                raise ConfigError(
                    f"Muon orthogonalises each nested band of {name} on its own (band edges {list(bounds)} in "
                    f"dimension {dim}); spec {self.spec.name!r} holds {held}, which is not a band edge. Use a "
                    f"nested tier, a spec whose widths are band edges, or AdamW/DisTrO"
                )
            self.bands[name] = (dim, tuple(b for b in bounds if b <= held))

    # ------------------------------------------------------------------ sending
    def encode(self, grads: dict[str, torch.Tensor | None], step: int, run_id: str, client_id: str) -> bytes:
        params = {}
        for name, shape in self.shapes.items():
            if name not in grads:
                raise ConfigError(f"no gradient for {name}: pass every parameter (None for no gradient)")
            g = grads[name]
            params[name] = (torch.zeros(shape) if g is None else g.detach()[region_slices(shape)].to(torch.float32))
        payload = Payload(kind="dense", run_id=run_id, step=step, client_id=client_id, spec=self.spec, params=params)
        return self.codec.encode(payload)

    # ------------------------------------------------------------------ receiving
    def aggregate(self, payloads: list[Payload]) -> dict[str, torch.Tensor]:
        return aggregate_dense(payloads, self.plan, region=self.region)

    def aggregate_and_apply(self, payloads: list[Payload], step: int) -> None:
        self.apply(self.aggregate(payloads), step)

    update_kind = "float"  # a round's update blob holds the mean gradient

    def round_update(self, payloads: list[Payload], step: int, run_id: str, accepted: str) -> RoundUpdate:
        """The round's mean gradient, in this replica's shapes (universal for the coordinator's replica)."""
        return RoundUpdate(kind="float", run_id=run_id, step=step, accepted=accepted,
                           params=self.aggregate(payloads))

    def apply_update(self, update: RoundUpdate, step: int) -> None:
        """One step from a round's update blob: the same bits as `aggregate_and_apply` of its payloads."""
        if update.kind != "float":
            raise PayloadError(f"a {update.kind!r} update cannot be applied by {self.config.algorithm}")
        self.apply(update.params, step)

    @torch.no_grad()
    def apply(self, grad: dict[str, torch.Tensor], step: int) -> None:
        """One step from the aggregated mean gradient (universal or region shaped; the overlap is used)."""
        self.t += 1
        lr = self.schedule.lr(step)
        scale = lr / self.config.lr if self.config.lr else 0.0
        c = self.config
        for name, p in self.params.items():
            g = grad[name][region_slices(tuple(p.shape))].to(torch.float32)
            if name in self.bands:
                self._muon(name, p.data, g, c.muon_lr * scale)
            else:
                adamw_step(p.data, g, self.exp_avg[name], self.exp_avg_sq[name], self.t, lr,
                           c.beta1, c.beta2, c.eps, c.weight_decay)

    def _muon(self, name: str, p: torch.Tensor, g: torch.Tensor, lr: float) -> None:
        c = self.config
        buf = self.exp_avg[name]
        buf.mul_(c.muon_momentum).add_(g)
        nesterov = g + buf * c.muon_momentum
        dim, bounds = self.bands[name]
        if c.weight_decay:
            p.mul_(1.0 - lr * c.weight_decay)
        start = 0
        for end in bounds:
            index = (slice(start, end), slice(None)) if dim == 0 else (slice(None), slice(start, end))
            band = nesterov[index].contiguous()
            ortho = self.orthogonalize(band)
            ortho = ortho * max(1.0, band.shape[0] / band.shape[1]) ** 0.5
            p[index].sub_(ortho * lr)
            start = end

    # ------------------------------------------------------------------ replica state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the apply step reads: both moments of every parameter (Muon's momentum is `exp_avg`) and the
        step count `t`. Keys `exp_avg/NAME`, `exp_avg_sq/NAME` (the parameter's shape), `t` (a scalar)."""
        state = {f"exp_avg/{n}": t.clone() for n, t in self.exp_avg.items()}
        state.update({f"exp_avg_sq/{n}": t.clone() for n, t in self.exp_avg_sq.items()})
        state["t"] = torch.tensor(self.t, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            for key, store in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                t = state.get(f"{key}/{name}")
                if t is None or t.shape != p.shape:
                    have = None if t is None else tuple(t.shape)
                    raise ConfigError(f"optimizer state: {key}/{name} has shape {have}, the replica needs "
                                      f"{tuple(p.shape)}; is the checkpoint from another model or optimizer?")
                store[name] = t.to(torch.float32).clone()
        if "t" not in state:
            raise ConfigError("optimizer state lacks the step count 't'; is the checkpoint from a DisTrO run?")
        self.t = int(state["t"])
