"""The one optimizer interface of a replica (`UpdateRule`), and the set-up every rule shares.

A rule turns this replica's gradients into the payload it publishes, and applies a round's accepted set of
payloads to the replica's weights, the same bits on every replica: from the payloads themselves
(`aggregate_and_apply`), or from the round's update computed once from them (`round_update`, published as one
blob by the coordinator; `apply_update`), with the same result. `state_dict()` is the REPLICA state the
apply step reads (AdamW/Muon moments and step count: part of every checkpoint, so a rebuilt replica applies
the next round exactly as the others do). Sender-side state that never reaches the weights of other replicas
(DisTrO's decoupled momentum) is not replica state: a client rebuilt without it still stays bit-identical.
"""

from __future__ import annotations

from typing import Protocol

import torch

from aftermath.errors import ConfigError
from aftermath.model.config import MatFormerConfig
from aftermath.model.geometry import TierSpec
from aftermath.optim.codec import PayloadCodec
from aftermath.optim.payload import Payload, PayloadExpectation, WireFormat
from aftermath.optim.schedule import LRSchedule
from aftermath.optim.update import RoundUpdate


class UpdateRule(Protocol):
    codec: PayloadCodec

    def encode(self, grads: dict[str, torch.Tensor | None], step: int, run_id: str, client_id: str) -> bytes: ...

    def aggregate_and_apply(self, payloads: list[Payload], step: int) -> None: ...

    update_kind: str  # what a round's update blob holds: "sign" or "float" (aftermath.optim.update)

    def round_update(self, payloads: list[Payload], step: int, run_id: str, accepted: str) -> RoundUpdate: ...

    def apply_update(self, update: RoundUpdate, step: int) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def check_params(params: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                 universal: dict[str, tuple[int, ...]], who: str) -> None:
    """Each parameter must hold the spec's region and fit in the universal shape."""
    if set(params) != set(shapes):
        missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
        raise ConfigError(f"{who}: parameters do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, p in params.items():
        have, need, full = tuple(p.shape), shapes[name], universal[name]
        if len(have) != len(need) or any(h < n or h > f for h, n, f in zip(have, need, full)):
            raise ConfigError(f"{who}: {name} has shape {have}; it must hold the region {need} and fit in the "
                              f"universal shape {full}")


class RegionRule:
    """What DisTrO, AdamW and Muon share: the codec, the region of `spec`, the parameters (the tier's own
    tensors or wider, universal ones), and the LR schedule."""

    def __init__(self, who: str, model_config: MatFormerConfig, spec: TierSpec, params: dict[str, torch.Tensor],
                 wire: WireFormat, chunk: int, min_chunk: int, schedule: LRSchedule) -> None:
        self.codec = PayloadCodec.for_model(model_config, wire, chunk, min_chunk)
        self.plan = self.codec.plan
        self.spec = spec
        self.shapes = self.plan.region_shapes(spec)
        universal = {n: pc.universal_shape for n, pc in self.plan.params.items()}
        check_params(params, self.shapes, universal, who)
        self.params = params
        self.schedule = schedule
        # a replica holding the universal tensors aggregates every region; a sliced one only its own
        holds_universal = all(tuple(p.shape) == universal[n] for n, p in params.items())
        self.region: TierSpec | None = None if holds_universal else spec

    def expectation(self, run_id: str, step: int, client_id: str | None = None, spec: TierSpec | None = None,
                    max_bytes: int | None = None) -> PayloadExpectation:
        return self.codec.expectation(run_id, step, client_id, spec, max_bytes)
