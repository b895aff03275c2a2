"""Heterogeneous aggregation: every peer's payload, onto the universal parameter space, region by region.

DisTrO payloads. For a parameter, a universal chunk c and a coefficient position j inside it, let
P(c) be the peers whose tier region covers chunk c, and S(c, j) those of them that selected (c, j). Then

    average_over="selected" (default, as the issue states it):
        A[c, j] = sum_{p in S(c,j)} v_p[c, j] / |S(c,j)|          (0 when S(c,j) is empty)
    average_over="covering" (non-selecting covering peers count as zeros):
        A[c, j] = sum_{p in S(c,j)} v_p[c, j] / |P(c)|            (0 when P(c) is empty)

and the update of chunk c is the inverse DCT of A[c, :]. A chunk no peer covers gets exactly zero. Because a
tier's region is a union of whole chunks, a suffix chunk (outside a small tier) only ever hears from the tiers
wide enough to hold it: the shared prefix learns from every tier, a suffix only from the wide tiers, and a
small tier cannot vote on the suffix at all (it sends nothing there).

Dense payloads (AdamW / Muon runs): G[x] = sum_{p : x in region(p)} g_p[x] / |{p : x in region(p)}|, 0 where no
peer covers x.

Determinism: payloads are summed in order of client id (duplicates are rejected), in float64, and the inverse
DCT runs in float64 over a fixed partition of each parameter's universal chunk grid into blocks of chunk rows,
then is rounded to float32. The result is therefore the same bits whatever order the payloads arrived in. A
replica that holds only a region asks for `region=spec`: it computes the blocks of the universal grid that
reach into its region (the same blocks, shapes and inputs as the universal replica) and keeps its region, so
the two agree bit for bit on the shared region.
"""

from __future__ import annotations

from typing import Iterable

import torch

from aftermath.errors import PayloadError
from aftermath.model.geometry import TierSpec, region_slices
from aftermath.optim.chunks import ChunkPlan
from aftermath.optim.dct import idct_chunks
from aftermath.optim.payload import Payload, SparseCoefficients

AVERAGE_OVER = ("selected", "covering")


def _canonical(payloads: Iterable[Payload]) -> list[Payload]:
    ordered = sorted(payloads, key=lambda p: p.client_id)
    if not ordered:
        return ordered
    ids = [p.client_id for p in ordered]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PayloadError(f"two payloads come from the same client {dup[0]!r}; keep one per client per step")
    first = ordered[0]
    for p in ordered:
        if (p.kind, p.run_id, p.step) != (first.kind, first.run_id, first.step):
            raise PayloadError(
                f"payload of {p.client_id!r} is ({p.kind}, run {p.run_id!r}, step {p.step}); the others are "
                f"({first.kind}, run {first.run_id!r}, step {first.step}): aggregate one step of one run at a time"
            )
    return ordered


def aggregate(payloads: Iterable[Payload], plan: ChunkPlan, *, average_over: str = "selected",
              region: TierSpec | None = None) -> dict[str, torch.Tensor]:
    """The aggregated update (DisTrO: before sign) of every parameter, float32, in the universal shapes or,
    with `region`, in that spec's shapes. An empty payload list gives all zeros."""
    ordered = _canonical(payloads)
    kinds = {p.kind for p in ordered}
    if kinds == {"dense"}:
        return aggregate_dense(ordered, plan, region=region)
    return aggregate_distro(ordered, plan, average_over=average_over, region=region)


def _target_shapes(plan: ChunkPlan, region: TierSpec | None) -> dict[str, tuple[int, ...]]:
    if region is None:
        return {n: pc.universal_shape for n, pc in plan.params.items()}
    return plan.region_shapes(region)


def aggregate_distro(payloads: Iterable[Payload], plan: ChunkPlan, *, average_over: str = "selected",
                     region: TierSpec | None = None) -> dict[str, torch.Tensor]:
    if average_over not in AVERAGE_OVER:
        raise PayloadError(f"average_over {average_over!r} is not known; use one of {AVERAGE_OVER}")
    ordered = _canonical(payloads)
    out: dict[str, torch.Tensor] = {}
    for name, target in _target_shapes(plan, region).items():
        pc = plan.params[name]
        n_universal = pc.n_chunks(pc.universal_shape)
        sums = torch.zeros(n_universal * pc.chunk_numel, dtype=torch.float64)
        if average_over == "selected":
            counts = torch.zeros(n_universal * pc.chunk_numel, dtype=torch.float64)
        else:
            counts = torch.zeros(n_universal, dtype=torch.float64)
        for p in ordered:
            item = p.params.get(name)
            if not isinstance(item, SparseCoefficients):
                raise PayloadError(f"payload of {p.client_id!r} holds no DisTrO coefficients for {name}")
            chunk_ids = pc.universal_chunk_ids(item.shape)
            positions = (chunk_ids[:, None] * pc.chunk_numel + item.indices).reshape(-1)
            sums.index_add_(0, positions, item.values.reshape(-1).to(torch.float64))
            if average_over == "selected":
                counts.index_add_(0, positions, torch.ones(positions.numel(), dtype=torch.float64))
            else:
                counts[chunk_ids] += 1.0
        if average_over == "covering":
            counts = counts.repeat_interleave(pc.chunk_numel)
        mean = (sums / counts.clamp(min=1.0)).reshape(n_universal, pc.chunk_numel)
        out[name] = _inverse_in_blocks(mean, pc, target, plan)
    return out


BLOCK_CHUNK_ROWS = 4  # the inverse DCT runs over fixed blocks of this many chunk rows of the universal grid


def _inverse_in_blocks(mean: torch.Tensor, pc, target: tuple[int, ...], plan: ChunkPlan) -> torch.Tensor:
    """Inverse DCT of the universal coefficients, block by block over a FIXED partition of the universal chunk
    rows, skipping the blocks below the target region. Every replica computes a block with the same shapes and
    inputs, hence the same bits; a small replica just computes fewer blocks."""
    grid = pc.grid(pc.universal_shape)
    per_row = grid[1] if len(grid) == 2 else 1  # chunks per chunk row
    rows_needed = -(-target[0] // pc.chunk[0])
    parts = []
    for start in range(0, rows_needed, BLOCK_CHUNK_ROWS):
        stop = min(start + BLOCK_CHUNK_ROWS, grid[0])
        shape = ((stop - start) * pc.chunk[0],) + tuple(pc.universal_shape[1:])
        parts.append(idct_chunks(mean[start * per_row:stop * per_row], shape, pc.chunk, plan.bases))
    full = torch.cat(parts).to(torch.float32)
    return full[region_slices(target)].contiguous()


def aggregate_dense(payloads: Iterable[Payload], plan: ChunkPlan, *,
                    region: TierSpec | None = None) -> dict[str, torch.Tensor]:
    ordered = _canonical(payloads)
    out: dict[str, torch.Tensor] = {}
    for name, target in _target_shapes(plan, region).items():
        sums = torch.zeros(target, dtype=torch.float64)
        counts = torch.zeros(target, dtype=torch.float64)
        for p in ordered:
            grad = p.params.get(name)
            if not isinstance(grad, torch.Tensor):
                raise PayloadError(f"payload of {p.client_id!r} holds no dense gradient for {name}")
            # the overlap of the sender's region and ours (both are prefixes)
            overlap = region_slices(tuple(min(a, b) for a, b in zip(grad.shape, target)))
            sums[overlap] += grad[overlap].to(torch.float64)
            counts[overlap] += 1.0
        out[name] = (sums / counts.clamp(min=1.0)).to(torch.float32)
    return out

