"""The payload codec of a run: encodes and strictly decodes update payloads from the run's geometry (the chunk
plan of the universal model) and its wire format alone. Checking a payload needs no model and no optimizer
state, so the coordinator validates every commit with a codec, not with a replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from aftermath.model.config import MatFormerConfig
from aftermath.model.geometry import TierSpec
from aftermath.optim.chunks import ChunkPlan
from aftermath.optim.payload import Payload, PayloadExpectation, WireFormat, decode_payload, encode_payload


@dataclass(frozen=True)
class PayloadCodec:
    plan: ChunkPlan
    wire: WireFormat

    @classmethod
    def for_model(cls, model_config: MatFormerConfig, wire: WireFormat, chunk: int, min_chunk: int) -> "PayloadCodec":
        return cls(ChunkPlan(model_config, chunk, min_chunk), wire)

    def encode(self, payload: Payload) -> bytes:
        return encode_payload(payload, self.plan, self.wire)

    def expectation(self, run_id: str, step: int, client_id: str | None = None, spec: TierSpec | None = None,
                    max_bytes: int | None = None) -> PayloadExpectation:
        """What this run's payloads for `step` must look like; None fields accept any valid value."""
        return PayloadExpectation(run_id=run_id, step=step, plan=self.plan, wire=self.wire, client_id=client_id,
                                  spec=spec, max_bytes=max_bytes)

    def decode(self, data: bytes, run_id: str, step: int, client_id: str | None = None,
               spec: TierSpec | None = None, max_bytes: int | None = None) -> Payload:
        """Validate and decode one payload (raises PayloadError naming the first problem)."""
        return decode_payload(data, self.expectation(run_id, step, client_id, spec, max_bytes))
